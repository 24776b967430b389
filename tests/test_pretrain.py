"""Pre-training program end to end on real synthetic videos: checkpoints, logs, resume after SIGKILL,
truncated checkpoints, non-finite loss, a 2-process torchrun run against a 1-process run, and the launchers."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_mae_pretraining  # noqa: E402
from modeling_pretrain import create_pretrain_model  # noqa: E402
from conftest import run_launcher  # noqa: E402
from tools.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402

TINY_MODEL = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                             decoder_num_heads=4))


@pytest.fixture(scope="module")
def train_list(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("pretrain_data")
    lists = make_synthetic_dataset(str(d), num_videos=24, num_classes=4, fmt="mp4", seed=1, size=64, frames=16,
                                   split=(0.67, 0.165, 0.165))
    return lists["train"]


def tiny_args(train_list: str, out: Path, *extra: str) -> list[str]:
    return ["--data_path", train_list, "--output_dir", str(out), "--model", "pretrain_videomae_small_patch16_224",
            "--model_kwargs", TINY_MODEL, "--decoder_depth", "1", "--num_frames", "4", "--sampling_rate", "2",
            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-2",
            "--mask_ratio", "0.75", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
            "--opt_betas", "0.9", "0.95", *extra]


def test_the_sampler_gradient_is_logged_and_comes_only_from_the_sampling_loss(train_list, tmp_path):
    """The mask is drawn (not differentiable), so the sampler learns only through the REINFORCE term: without it,
    its logged gradient norm is exactly 0 while the rest of the model still learns."""
    args = run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, tmp_path, "--epochs", "1", "--sampling_loss_weight", "0", "--vis_freq", "0"))
    stats = run_mae_pretraining.main(args)
    assert stats["sampler_grad_norm"] == 0 and stats["grad_norm"] > 0


def test_pretrain_writes_checkpoints_logs_and_tensorboard(train_list, tmp_path):
    args = run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, tmp_path, "--save_ckpt_freq", "1", "--vis_freq", "1", "--vis_num_clips", "5"))
    stats = run_mae_pretraining.main(args)
    assert args.lr == pytest.approx(1e-2 * 4 / 256)  # linear scaling from the base lr
    assert {"loss", "loss_rec", "loss_samp", "grad_norm", "sampler_entropy", "motion_coverage",
            "sampler_grad_norm"} <= set(stats)
    assert 0 < stats["sampler_grad_norm"] < stats["grad_norm"]  # the sampler learns, and is a part of the whole
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-latest.pth"):
        assert (tmp_path / name).is_file()
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert all(torch.isfinite(torch.tensor(x["train_loss"])) for x in lines)
    # the steady state (the first iteration, which waits for the workers to fill the pipeline, left out)
    assert all(0 <= x["train_steady_data_time"] < x["train_steady_step_time"] for x in lines)
    # the TensorBoard mask grid has a row per --vis_num_clips clip (it stopped at 4)
    import mask_visualization as mv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    cell = mv.panel_scale(32, 32, 96) * 32
    assert acc.Images("vis/masks")[0].height == mv.sheet_size(5, cell, cell, 12 * 5 + mv.PAD)[1]

    ckpt = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["kind"] == "pretrain" and ckpt["mask_type"] == "adaptive"
    assert ckpt["global_step"] == 2 * args.num_training_steps_per_epoch
    model = create_pretrain_model(args)
    model.load_state_dict(ckpt["model"], strict=True)
    assert "encoder.pos_embed_probs" in ckpt["model"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/loss", "loss/loss_reconstruction", "loss/loss_sampling", "opt/lr", "opt/weight_decay",
                "opt/grad_norm", "opt/loss_scale", "sampler/entropy", "sampler/max_prob", "sampler/motion_coverage",
                "sampler/grad_norm",
                "data/data_time", "data/broken_videos"}
    assert expected <= tags, expected - tags
    assert len(acc.Scalars("loss/loss")) == 2 * args.num_training_steps_per_epoch
    grids = acc.Images("vis/masks")  # the mask grid of fixed clips, once per epoch, at its last step
    assert [g.step for g in grids] == [args.num_training_steps_per_epoch * (e + 1) - 1 for e in range(2)]


def final_steps_per_epoch(out: Path) -> int:
    return int(torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=False)["args"]
               ["num_training_steps_per_epoch"])


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_sigkill_mid_epoch_then_same_command_resumes_and_finishes(train_list, tmp_path):
    cmd = [sys.executable, "run_mae_pretraining.py", *tiny_args(train_list, tmp_path, "--epochs", "3")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:  # kill as soon as epoch 1 has taken a step: mid-epoch, after epoch 0 was saved
        seen.append(line)
        if re.search(r"Epoch: \[1\]\s+\[\s*1/", line) or time.time() > deadline:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    ckpt = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0

    res = _run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Resumed from" in res.stdout and "start_epoch 1" in res.stdout
    assert "Epoch: [0]" not in res.stdout and "Epoch: [2]" in res.stdout
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    # The killed run had logged steps of epoch 1 that the resumed run logs again: TensorBoard keeps each step once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for tag in ("loss/loss", "opt/lr"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)) and len(steps) == 3 * final_steps_per_epoch(tmp_path), (tag, steps)
    final = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert final["epoch"] == 2

    # A latest checkpoint torn on disk is reported by name and the previous numbered one is used instead.
    latest = tmp_path / "checkpoint-latest.pth"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    res = _run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "checkpoint-latest.pth is truncated or unreadable" in out
    assert re.search(r"Resumed from \S*checkpoint-2\.pth", out)


def test_accumulation_logs_every_tensorboard_tag(train_list, tmp_path):
    """With --update_freq and --print_freq both even, the periodic tags (loss scale, data time) are still written."""
    args = run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, tmp_path, "--update_freq", "2", "--print_freq", "2", "--batch_size", "2",
                  "--epochs", "1", "--vis_freq", "0"))
    run_mae_pretraining.main(args)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    steps = args.num_training_steps_per_epoch
    assert [e.step for e in acc.Scalars("loss/loss")] == list(range(steps))
    for tag in ("opt/loss_scale", "data/data_time", "data/broken_videos"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(0, steps, 2)), tag
    # each step's loss is the mean of its 2 batches (not the last one's): over the epoch, log.txt's average
    record = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    per_step = [e.value for e in acc.Scalars("loss/loss")]
    assert sum(per_step) / len(per_step) == pytest.approx(record["train_loss"], rel=1e-5)
    entropy = [e.value for e in acc.Scalars("sampler/entropy")]
    assert sum(entropy) / len(entropy) == pytest.approx(record["train_sampler_entropy"], rel=1e-5)


def test_a_crash_in_the_epoch_end_work_redoes_that_epoch_and_loses_no_record(train_list, tmp_path, monkeypatch):
    """The epoch's checkpoint is written after its end-of-epoch work (here the mask pictures; validation when
    fine-tuning) and its log record: a crash there resumes from the previous epoch, so no epoch goes without its
    record, and the pictures an earlier epoch logged survive the resumed run's TensorBoard purge."""
    import mask_visualization

    calls = []

    def crash_in_epoch_1(*a, **k):
        calls.append(k["step"])
        if len(calls) == 2:
            raise RuntimeError("out of memory in the pictures (injected)")
        return mask_visualization.log_mask_images(*a, **k)

    monkeypatch.setattr(run_mae_pretraining, "log_mask_images", crash_in_epoch_1)
    args = tiny_args(train_list, tmp_path, "--vis_freq", "1", "--vis_num_clips", "2")
    with pytest.raises(RuntimeError, match="injected"):
        run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(args))
    ckpt = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0  # epoch 1 was not saved: its pictures and record were not done
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(args))
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    steps = final_steps_per_epoch(tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [g.step for g in acc.Images("vis/masks")] == [steps - 1, 2 * steps - 1]


def test_a_trailing_partial_step_is_not_fetched_and_the_epoch_summary_is_kept(train_list, tmp_path, capsys):
    """16 batches with --update_freq 3 make 5 steps and one batch left over: the loop broke out of the progress
    logger for it, losing the epoch's 'Total time' line and its steady-state timings in log.txt."""
    stats = run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, tmp_path, "--batch_size", "1", "--update_freq", "3", "--epochs", "1", "--vis_freq",
                  "0")))
    out = capsys.readouterr().out
    assert "5 optimizer steps per epoch" in out and "Epoch: [0] Total time" in out and "[14/15]" in out
    record = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert "train_steady_step_time" in record and stats["loss"] > 0


def test_the_samplers_position_table_is_decayed_as_in_adamae_unless_asked(train_list, tmp_path):
    import optim_factory

    for flag, decay in (((), 0.05), (("--no_sampler_pos_weight_decay",), 0.0)):
        args = run_mae_pretraining.get_args_parser().parse_args(tiny_args(train_list, tmp_path, *flag))
        model = create_pretrain_model(args)
        opt = optim_factory.create_optimizer(args, model, verbose=False,
                                             skip_list=run_mae_pretraining.no_weight_decay_names(args, model))
        group = next(g for g in opt.param_groups if any(p is model.encoder.pos_embed_probs for p in g["params"]))
        assert group["weight_decay"] == decay, flag


def test_non_finite_loss_stops_naming_epoch_and_step_and_saves_nothing(train_list, tmp_path):
    args = run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, tmp_path, "--lr", "1e38", "--warmup_epochs", "0", "--epochs", "1"))
    from precision import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step \d+"):
        run_mae_pretraining.main(args)
    assert not list(tmp_path.glob("checkpoint-*.pth"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_matches_one_process_with_same_total_batch(train_list, tmp_path):
    """Same steps and weights after an epoch, and the same count of broken videos in log.txt, summed over both ranks
    (it was rank 0's alone). 19 videos (3 of them missing files): 4 steps of 4 either way (DistributedSampler's
    padding to an even count made a fifth step, with a repeated clip, on 2 processes)."""
    listed = tmp_path / "with_missing.csv"
    listed.write_text(Path(train_list).read_text() + "".join(f"{tmp_path / f'gone{i}.mp4'} 0\n" for i in range(3)))
    train_list = str(listed)
    common = ["--epochs", "1", "--warmup_epochs", "0", "--model_kwargs",
              json.dumps({**json.loads(TINY_MODEL), "sampler_drop": 0.0}), "--save_ckpt_freq", "1"]
    one = tmp_path / "one"
    res = _run([sys.executable, "run_mae_pretraining.py",
                *tiny_args(train_list, one, "--batch_size", "4", *common)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "run_mae_pretraining.py",
                *tiny_args(train_list, two, "--batch_size", "2", *common)], env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2" in res.stdout
    a = torch.load(one / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    b = torch.load(two / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == len(Path(train_list).read_text().splitlines()) // 4
    before = create_pretrain_model(run_mae_pretraining.get_args_parser().parse_args(
        tiny_args(train_list, one, *common))).state_dict()
    moved = 0
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=2e-5, rtol=1e-4), k
        moved += int(not torch.allclose(v, before[k]))
    assert moved > 0.9 * len(a["model"])  # training really changed the weights
    broken = [json.loads((d / "log.txt").read_text().splitlines()[0])["broken_videos"] for d in (one, two)]
    assert broken[0] == broken[1] >= 3, broken


@pytest.mark.parametrize("script,env,expect", [
    ("scripts/pretrain/ssv2_vitb_adamae_800e.sh", {}, {"sampling_rate": 2, "data_set": "SSV2", "accum_iter": 8}),
    ("scripts/pretrain/k400_vitb_adamae_800e.sh", {"NNODES": "2", "GPUS_PER_NODE": "4", "MASTER_ADDR": "node0"},
     {"sampling_rate": 4, "data_set": "Kinetics-400", "accum_iter": 8}),
    ("scripts/pretrain/k400_vitb_adamae_800e.sh", {"NNODES": "8", "ACCUM": "3", "MASTER_ADDR": "node0"},
     {"accum_iter": 3}),
    # a torchrun launch from inside a SLURM allocation: torchrun's processes count, not the allocation's tasks
    ("scripts/pretrain/ssv2_vitb_adamae_800e.sh", {"SLURM_NTASKS": "1"}, {"accum_iter": 8}),
    ("scripts/pretrain/ssv2_vitb_adamae_800e_1gpu.sh", {}, {"sampling_rate": 2, "accum_iter": 64}),
    ("scripts/pretrain/slurm_k400_vitb_adamae_800e.sbatch", {"SLURM_NTASKS": "64"},
     {"sampling_rate": 4, "accum_iter": 1}),
    ("scripts/pretrain/slurm_ssv2_vitb_adamae_800e.sbatch", {"SLURM_NTASKS": "16"},
     {"sampling_rate": 2, "accum_iter": 4}),
])
def test_launchers_pass_the_paper_recipe(script, env, expect, tmp_path):
    """Run each launcher with torchrun/srun/python replaced by a recorder, then parse what it passed: the paper's
    recipe, and the accumulation that keeps its total batch of 2048 on the job's processes."""
    argv = run_launcher(script, tmp_path, "run_mae_pretraining.py", env)
    if "NNODES" in env:
        assert argv[argv.index("--nnodes") + 1] == env["NNODES"]
        assert argv[argv.index("--nproc_per_node") + 1] == env.get("GPUS_PER_NODE", "8")
    argv = argv[argv.index("run_mae_pretraining.py") + 1:]
    args = run_mae_pretraining.get_args_parser().parse_args(argv)
    assert args.model == "pretrain_videomae_base_patch16_224" and args.mask_type == "adaptive"
    assert args.mask_ratio == 0.95 and args.decoder_depth == 4 and args.batch_size == 32
    assert args.lr == 1.5e-4 and args.opt_betas == [0.9, 0.95] and args.weight_decay == 0.05
    assert args.epochs == 800 and args.warmup_epochs == 40 and args.num_frames == 16
    assert args.sampling_loss_weight == 1e-4
    for k, v in expect.items():
        assert getattr(args, k) == v, k


@pytest.mark.parametrize("env", [{"NNODES": "3"}, {"GPUS_PER_NODE": "6"}, {"NNODES": "16"}])
def test_launchers_refuse_a_process_count_that_cannot_keep_the_total_batch(env, tmp_path):
    """64 / processes must be whole: otherwise the total batch (and the lr scaled from it) would silently leave the
    recipe. ACCUM=N is the way to choose another one."""
    res = subprocess.run(["bash", str(ROOT / "scripts/pretrain/k400_vitb_adamae_800e.sh")], cwd=tmp_path,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env}, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "set ACCUM=N" in res.stderr and "does not divide 64" in res.stderr, res.stderr
    argv = run_launcher("scripts/pretrain/k400_vitb_adamae_800e.sh", tmp_path, "run_mae_pretraining.py",
                        {**env, "ACCUM": "5", "MASTER_ADDR": "node0"})
    assert argv[argv.index("--accum_iter") + 1] == "5"
    if "NNODES" in env:  # several nodes: each must be told where node 0 is
        res = subprocess.run(["bash", str(ROOT / "scripts/pretrain/k400_vitb_adamae_800e.sh")], cwd=tmp_path,
                             env={**{k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}, **env, "ACCUM": "1"},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "needs MASTER_ADDR" in res.stderr, res.stderr


def test_spawned_workers_train_exactly_as_forked_ones(train_list, tmp_path):
    """--worker_start_method spawn (macOS's default, and the way out of a library that is not fork-safe) starts
    workers that import everything afresh: the run must be the same, step for step (also with fewer batches
    prepared ahead, --prefetch_factor 1)."""
    from utils import worker_kwargs

    parse = run_mae_pretraining.get_args_parser().parse_args
    got = worker_kwargs(parse(["--num_workers", "2", "--worker_start_method", "spawn", "--prefetch_factor", "1"]))
    assert (got["num_workers"], got["multiprocessing_context"], got["prefetch_factor"]) == (2, "spawn", 1)
    assert worker_kwargs(parse(["--num_workers", "0"])) == {"num_workers": 0}
    runs = {}
    for method in ("fork", "spawn"):
        out = tmp_path / method
        res = subprocess.run([sys.executable, "run_mae_pretraining.py",
                              *tiny_args(train_list, out, "--num_workers", "2", "--worker_start_method", method,
                                         "--vis_freq", "0", "--prefetch_factor", "2" if method == "fork" else "1")],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[method] = [{k: v for k, v in json.loads(x).items() if not k.endswith(("_time", "_mb"))}
                        for x in (out / "log.txt").read_text().splitlines()]
    assert len(runs["fork"]) == 2 and runs["fork"] == runs["spawn"]
