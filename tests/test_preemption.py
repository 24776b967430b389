"""Preemption and exact resume, on real processes and real signals: SIGTERM to one rank of a 2-process torchrun
pre-training run, SIGINT to a fine-tuning run with workers, a second signal, and the refusal of flag drift."""
from __future__ import annotations

import importlib.util
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

from conftest import run_main  # noqa: E402
from preemption import PREEMPTED_EXIT_CODE  # noqa: E402
from tools.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402

TINY_MAE = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                           decoder_num_heads=4))
TINY_VIT = json.dumps(dict(embed_dim=64, depth=2, num_heads=4))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MEASURED_KEYS = ("step_time", "data_time", "_mb")  # wall-clock times and memory: the only values that may differ


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("preempt_data")
    make_synthetic_dataset(str(d), num_videos=24, num_classes=4, fmt="mp4", seed=1, size=64, frames=16,
                           split=(0.67, 0.165, 0.165))
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_cmd(data: Path, out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "run_mae_pretraining.py", "--data_path", str(data / "train.csv"), "--output_dir", str(out),
            "--model", "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE, "--decoder_depth", "1",
            "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--batch_size", "1", "--epochs", "2",
            "--warmup_epochs", "1", "--lr", "1e-2", "--mask_ratio", "0.75", "--num_workers", "1", "--device", "cpu",
            "--print_freq", "1", "--vis_freq", "0"]


def finetune_cmd(data: Path, out: Path, port: int | None = None) -> list[str]:
    """One process, or with ``port`` two under torchrun (then 1 video x 2 samples per rank: 8 steps per epoch)."""
    launch = [sys.executable] if port is None else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    "2", "--master_port", str(port)]
    batch = ["--batch_size", "2", "--num_sample", "1"] if port is None else \
        ["--batch_size", "1", "--num_sample", "2", "--dist_eval"]
    return [*launch, "run_class_finetuning.py", "--data_path", str(data), "--data_set", "custom",
            "--nb_classes", "4", "--output_dir", str(out), "--model", "vit_small_patch16_224", "--model_kwargs",
            TINY_VIT, "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--short_side_size", "32",
            *batch, "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-2", "--num_workers", "1", "--device",
            "cpu", "--print_freq", "1", "--test_num_segment", "1", "--test_num_crop", "1", "--model_ema",
            "--model_ema_decay", "0.9"]


def run_and_signal(cmd: list[str], *steps: tuple[str, object], env: dict | None = None) -> tuple[int, str]:
    """Start ``cmd``; for each ``(pattern, send)`` in turn, call ``send(proc)`` when a line matches ``pattern``;
    return (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, todo = [], list(steps)
    for line in proc.stdout:
        lines.append(line)
        if todo and re.search(todo[0][0], line):
            todo.pop(0)[1](proc)
    assert not todo, "".join(lines[-30:])
    return proc.wait(timeout=300), "".join(lines)


class Ranks:
    """torchrun's two rank processes, found early: ``ps`` can take several training steps on a loaded machine, and
    a signal that arrives that late in the last epoch lets the run finish (by design) instead of stopping."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def find(self, launcher: subprocess.Popen) -> None:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
        self.pids = [int(x) for x in out.stdout.split()]
        assert len(self.pids) == 2, self.pids

    def sigterm(self, index: int):
        """SIGTERM to one rank (as SLURM signals the processes of a job)."""
        return lambda launcher: os.kill(self.pids[index], signal.SIGTERM)


def sigint(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def log_records(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(MEASURED_KEYS)} for r in recs]


def assert_same_run(full: Path, resumed: Path) -> None:
    """Every per-step scalar bit-identical, each step once, and the same log.txt records (timings aside)."""
    a, b = scalars(full), scalars(resumed)
    assert set(a) == set(b)
    for tag in a:
        if tag.startswith("data/"):
            continue  # data-loading time and counters
        steps = [s for s, _ in b[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        assert a[tag] == b[tag], tag
    assert log_records(full) == log_records(resumed)


def run_uninterrupted(cmd: list[str], env: dict[str, str] = ENV) -> None:
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)


def resume_and_compare(cmd: list[str], full: Path, cut: Path, env: dict[str, str] = ENV) -> str:
    """Run ``cmd`` again in the interrupted run's folder; it must finish and equal the uninterrupted run. Returns
    its stdout."""
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_run(full, cut)
    return res.stdout


def test_sigterm_to_one_rank_of_torchrun_pretraining_stops_all_and_resumes_bit_exact(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_uninterrupted(pretrain_cmd(data, full, _free_port()))

    # Only one rank gets the signal: both must stop at the same step.
    ranks = Ranks()
    rc, out = run_and_signal(pretrain_cmd(data, cut, _free_port()), (r"Epoch: \[0\]\s+\[\s*0/8\]", ranks.find),
                             (r"Epoch: \[0\]\s+\[\s*1/8\]", ranks.sigterm(1)))
    # torchrun exits 1 and names the first rank's PREEMPTED_EXIT_CODE; it terminates the ranks still shutting down.
    codes = re.findall(r"exitcode  : (-?\d+)", out)
    assert rc == 1 and str(PREEMPTED_EXIT_CODE) in codes and set(codes) <= {str(PREEMPTED_EXIT_CODE), "-15"}, \
        out[-3000:]
    assert re.search(r"\[rank 1\] SIGTERM received", out)
    m = re.search(r"Stopped by .* in epoch 0 after step (\d) of 8; saved checkpoint (\S+)\.", out)
    assert m, out[-3000:]
    ckpt = torch.load(m.group(2), map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] == int(m.group(1)) and len(ckpt["rank_state"]) == 2

    assert f"step {m.group(1)} of epoch 0" in resume_and_compare(pretrain_cmd(data, cut, _free_port()), full, cut)


def test_sigterm_to_torchrun_finetuning_with_workers_resumes_bit_exact(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_uninterrupted(finetune_cmd(data, full, _free_port()))
    ranks = Ranks()
    rc, out = run_and_signal(finetune_cmd(data, cut, _free_port()), (r"Epoch: \[0\]\s+\[\s*0/8\]", ranks.find),
                             (r"Epoch: \[1\]\s+\[\s*0/8\]", ranks.sigterm(0)))
    assert rc == 1 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in out, out[-3000:]
    ours = r"(run_\w+|engine_\w+|training|checkpointing|evaluation|utils)\.py\", line"
    assert not re.search(ours, out)  # no traceback through our code
    assert re.search(r"Stopped by (SIGTERM|a signal on another rank) in epoch 1 after step \d of 8; saved checkpoint "
                     r"\S+checkpoint-latest", out), out[-3000:]
    assert [r["epoch"] for r in log_records(cut)] == [0]

    resume_and_compare(finetune_cmd(data, cut, _free_port()), full, cut)
    a, b = (json.loads((d / "test_results.json").read_text()) for d in (full, cut))
    assert a["predictions"] == b["predictions"]


def test_second_signal_exits_at_once_without_saving(data, tmp_path):
    rc, out = run_and_signal(finetune_cmd(data, tmp_path), (r"Epoch: \[0\]\s+\[\s*0/8\]", sigint),
                             (r"SIGINT received", sigint))
    assert rc == 128 + signal.SIGINT, out[-2000:]
    assert "second signal (SIGINT): exiting now without saving" in out
    assert not (tmp_path / "checkpoint-latest.pth").exists()


def test_auto_resume_refuses_flag_drift_and_accepts_harmless_flags(data, tmp_path):
    import run_mae_pretraining

    listed = tmp_path / "lists" / "train.csv"  # a copy of the list (absolute video paths), edited below
    listed.parent.mkdir()
    listed.write_text((data / "train.csv").read_text())
    base = ["--data_path", str(listed), "--output_dir", str(tmp_path), "--model",
            "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE, "--decoder_depth", "1", "--num_frames",
            "4", "--sampling_rate", "2", "--input_size", "32", "--batch_size", "8", "--epochs", "1", "--mask_ratio",
            "0.75", "--num_workers", "0", "--device", "cpu"]
    assert run_main(run_mae_pretraining, base).returncode == 0

    for extra, expected in ((["--mask_ratio", "0.5"], ["--mask_ratio: 0.75 -> 0.5"]),
                            (["--mask_type", "tube", "--lr", "3e-4"],
                             ["--mask_type: 'adaptive' -> 'tube'", "--lr: 0.00015 -> 0.0003"]),
                            (["--batch_size", "4"], ["--batch_size x accum_iter x processes: 8 -> 4"])):
        res = run_main(run_mae_pretraining, base + extra)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        for text in expected:
            assert text in res.stderr, res.stderr
        assert "--no-auto_resume" in res.stderr and "old flags" in res.stderr

    # The same examples in another order: the list is compared by content, and the sampler's positions moved.
    lines = listed.read_text().splitlines(keepends=True)
    listed.write_text("".join([lines[1], lines[0], *lines[2:]]))
    res = run_main(run_mae_pretraining, base)
    assert res.returncode == 2 and "training examples (sha256 of the list's paths and labels, in order)" in res.stderr
    listed.write_text("".join(lines))
    recorded = json.loads((tmp_path / "args.json").read_text())  # the refused runs left the folder's record alone
    assert recorded["mask_ratio"] == 0.75 and recorded["mask_type"] == "adaptive" and recorded["batch_size"] == 8

    # Print frequency, workers, prefetching and the same list elsewhere (a copy, not a link) do not define the run.
    moved = tmp_path / "moved.csv"
    moved.write_text(listed.read_text())
    res = run_main(run_mae_pretraining, base + ["--print_freq", "3", "--num_workers", "1", "--prefetch_factor", "1",
                                                "--data_path", str(moved)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Resumed from" in res.stdout
    saved = json.loads((tmp_path / "args.json").read_text())["train_data_sha256"]
    assert len(saved) == 64 and saved == torch.load(tmp_path / "checkpoint-0.pth", map_location="cpu",
                                                    weights_only=False)["args"]["train_data_sha256"]


@pytest.mark.parametrize("script", ["scripts/pretrain/slurm_k400_vitb_adamae_800e.sbatch",
                                    "scripts/finetune/slurm_ssv2_vitb_800e.sbatch"])
def test_slurm_launchers_requeue_a_run_that_stopped_on_a_signal(script, tmp_path):
    """srun exiting with the preemption status makes the batch script requeue the job (real bash, fake srun)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'srun_args.txt'}\n"
                                 f"exit {PREEMPTED_EXIT_CODE}\n")
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    for tool in ("srun", "scontrol"):
        (bindir / tool).chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"},
           "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT)}
    res = subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == PREEMPTED_EXIT_CODE, res.stderr
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    # no --cpus-per-task in the job: srun is not told one (it would pin every rank to a single core)
    assert (tmp_path / "srun_args.txt").read_text().split()[0] == "python"


@pytest.mark.parametrize("script", ["scripts/pretrain/slurm_k400_vitb_adamae_800e.sbatch",
                                    "scripts/finetune/slurm_ssv2_vitb_800e.sbatch"])
def test_slurm_preemption_sigterm_to_the_whole_job_still_requeues(script, tmp_path):
    """On preemption SLURM sends SIGTERM to every process of the job, the batch shell included: the shell must wait
    for srun's tasks to save and exit 75, then requeue (real bash, real signal; srun a stand-in that exits 75 on
    SIGTERM, as the programs do). srun gets the job's CPUs per task."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    started = tmp_path / "srun_started"
    (bindir / "srun").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path / 'srun_args.txt'}\n"
                                 f"trap 'sleep 1; exit {PREEMPTED_EXIT_CODE}' TERM\ntouch {started}\n"
                                 "sleep 60 & wait\n")
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    for tool in ("srun", "scontrol"):
        (bindir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "12"}
    proc = subprocess.Popen(["bash", str(ROOT / script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 60
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the "job": the batch shell, srun and its children
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"], out
    assert (tmp_path / "srun_args.txt").read_text().split()[:2] == ["--cpus-per-task=12", "python"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed not installed (pip install -r requirements-deepspeed.txt)")
def test_sigint_under_deepspeed_saves_a_step_folder_and_resumes_bit_exact(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ["--enable_deepspeed", "--epochs", "1"]
    env = {**ENV, "DS_ACCELERATOR": "cpu"}
    run_uninterrupted(finetune_cmd(data, full) + extra, env)
    rc, out = run_and_signal(finetune_cmd(data, cut) + extra, (r"Epoch: \[0\]\s+\[\s*1/8\]", sigint), env=env)
    m = re.search(r"after step (\d) of 8; saved checkpoint (\S+checkpoint-0-step\d)\.", out)
    assert rc == PREEMPTED_EXIT_CODE and m, out[-3000:]
    assert Path(m.group(2)).is_dir() and (cut / "latest").read_text().strip() == Path(m.group(2)).name
    assert f"step {m.group(1)} of epoch 0" in resume_and_compare(finetune_cmd(data, cut) + extra, full, cut, env)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed not installed (pip install -r requirements-deepspeed.txt)")
def test_a_stop_between_epochs_under_deepspeed_saves_that_epoch_and_resumes_bit_exact(data, tmp_path):
    """Every epoch leaves a resumable folder (not only every --save_ckpt_freq epochs): a signal at the end of epoch 0
    saves checkpoint-0; once checkpoint-1 is written, checkpoint-0 (not one to keep) is removed."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ["--enable_deepspeed", "--save_ckpt_freq", "5"]
    env = {**ENV, "DS_ACCELERATOR": "cpu"}
    run_uninterrupted(finetune_cmd(data, full) + extra, env)
    rc, out = run_and_signal(finetune_cmd(data, cut) + extra, (r"Epoch: \[0\] Total time", sigint), env=env)
    assert rc == PREEMPTED_EXIT_CODE and "at the end of epoch 0; saved checkpoint " in out, out[-3000:]
    assert (cut / "latest").read_text().strip() == "checkpoint-0" and (cut / "checkpoint-0").is_dir()
    assert "start_epoch 1" in resume_and_compare(finetune_cmd(data, cut) + extra, full, cut, env)
    assert (cut / "latest").read_text().strip() == "checkpoint-1"
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-best"]


def test_a_run_saved_before_a_flag_existed_resumes_only_as_it_was_trained(data, tmp_path):
    """Runs saved before --no_sampler_pos_weight_decay / --sampling_log_prob / --flip existed were trained with the
    position table undecayed, log_softmax and flips: auto-resume names the three flags instead of switching recipe
    mid-run (or failing in torch on the optimizer's groups); with them it resumes. An explicit --resume says why
    the optimizer does not fit."""
    import run_mae_pretraining

    base = ["--data_path", str(data / "train.csv"), "--output_dir", str(tmp_path), "--model",
            "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE, "--decoder_depth", "1", "--num_frames",
            "4", "--sampling_rate", "2", "--input_size", "32", "--batch_size", "8", "--mask_ratio", "0.75",
            "--num_workers", "0", "--device", "cpu", "--vis_freq", "0"]
    old = ["--no_sampler_pos_weight_decay", "--sampling_log_prob", "log_softmax", "--flip"]
    assert run_main(run_mae_pretraining, base + old + ["--epochs", "1"]).returncode == 0
    ckpt_path = tmp_path / "checkpoint-0.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key in ("no_sampler_pos_weight_decay", "sampling_log_prob", "flip"):  # as a run saved before they existed
        del ckpt["args"][key]
    ckpt["args"]["no_flip"] = False  # pre-training's flip flag then
    torch.save(ckpt, ckpt_path)
    torch.save(ckpt, tmp_path / "checkpoint-latest.pth")

    res = run_main(run_mae_pretraining, base + ["--epochs", "1"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--no_sampler_pos_weight_decay: True -> False" in res.stderr
    assert "--sampling_log_prob: 'log_softmax' -> 'categorical'" in res.stderr
    assert "--flip: True -> False" in res.stderr
    res = run_main(run_mae_pretraining, base + ["--epochs", "1", "--resume", str(ckpt_path)])
    assert res.returncode == 2 and "optimizer state does not fit" in res.stderr, res.stderr[-2000:]
    assert "--no_sampler_pos_weight_decay" in res.stderr
    res = run_main(run_mae_pretraining, base + old + ["--epochs", "1"])
    assert res.returncode == 0 and "Resumed from" in res.stdout, res.stderr[-2000:]


def test_runs_without_a_sampler_resume_whatever_the_sampler_flags_added_later(tmp_path):
    """The sampler flags added later concern the adaptive sampler only: an older tube-mask run is not refused for
    them. --flip concerns every pre-training run but SSV2's (never flipped)."""
    from resume import run_config_changes

    current = {"mask_type": "tube", "no_sampler_pos_weight_decay": False, "sampling_log_prob": "categorical"}
    assert run_config_changes({"mask_type": "tube"}, current) == []
    assert [c[0] for c in run_config_changes({"mask_type": "adaptive"}, {**current, "mask_type": "adaptive"})] == \
        ["no_sampler_pos_weight_decay", "sampling_log_prob"]
    # a run whose steps per epoch differ (saved when 2 processes padded an odd list): its schedule would shift
    assert run_config_changes({"num_training_steps_per_epoch": 5}, {"num_training_steps_per_epoch": 4}) == \
        [("num_training_steps_per_epoch", 5, 4)]
    # pre-training flipped (never SSV2) until --flip existed
    flip_off = {"mask_type": "tube", "flip": False}
    assert run_config_changes({"mask_type": "tube", "no_flip": False}, flip_off) == [("flip", True, False)]
    assert run_config_changes({"mask_type": "tube", "no_flip": True}, flip_off) == []
    assert run_config_changes({"mask_type": "tube", "no_flip": False, "data_set": "SSV2"},
                              {**flip_off, "data_set": "SSV2"}) == []


def test_a_resume_inside_an_epoch_keeps_its_broken_video_count(data, tmp_path):
    """log.txt's broken_videos of the interrupted epoch must count the failures before the stop too (the resumed
    process's counter starts at 0; the mid-epoch checkpoint carries the count). With six missing files listed; no
    loader workers, so no batch is prepared ahead of the stop."""
    listed = tmp_path / "train.csv"
    gone = "".join(f"{tmp_path / f'gone{i}.mp4'} 0\n" for i in range(6))
    listed.write_text((data / "train.csv").read_text() + gone)

    def cmd(out: Path) -> list[str]:
        argv = pretrain_cmd(data, out, 0)
        argv = [sys.executable] + argv[argv.index("run_mae_pretraining.py"):]  # one process
        argv[argv.index("--data_path") + 1] = str(listed)
        argv[argv.index("--num_workers") + 1] = "0"
        argv[argv.index("--batch_size") + 1] = "2"
        return argv

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_uninterrupted(cmd(full))
    rc, out = run_and_signal(cmd(cut), (r"Epoch: \[0\]\s+\[\s*5/11\]", sigint))
    assert rc == PREEMPTED_EXIT_CODE, out[-3000:]
    resume_and_compare(cmd(cut), full, cut)  # every log.txt value, broken_videos included
    assert [r["broken_videos"] for r in log_records(full)][0] >= 6
