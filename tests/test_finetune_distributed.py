"""Fine-tuning under torchrun (2 CPU processes, gloo) with sharded evaluation, and the DeepSpeed path on CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_VIT = json.dumps(dict(embed_dim=64, depth=2, num_heads=4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def ft_argv(data: str, out: Path, *extra: str) -> list[str]:
    return ["run_class_finetuning.py", "--data_path", data, "--data_set", "custom", "--nb_classes", "4",
            "--output_dir", str(out), "--model", "vit_small_patch16_224", "--model_kwargs", TINY_VIT,
            "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--short_side_size", "32",
            "--batch_size", "2", "--num_sample", "2", "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-2",
            "--num_workers", "0", "--device", "cpu", "--print_freq", "4", "--save_ckpt_freq", "1", *extra]


@pytest.fixture(scope="module")
def uneven_data(synthetic_dir, tmp_path_factory) -> str:
    """The synthetic lists with a 3-video test list: 3 videos x 1 segment x 3 crops = 9 views over 2 ranks."""
    d = tmp_path_factory.mktemp("uneven")
    for name in ("train.csv", "val.csv"):
        (d / name).write_text(Path(synthetic_dir, name).read_text())
    lines = [x for x in Path(synthetic_dir, "test.csv").read_text().splitlines() if x.strip()]
    (d / "test.csv").write_text("\n".join(lines[:3]) + "\n")
    return str(d)


def test_two_process_torchrun_finetune_with_dist_eval_matches_one_process_eval(uneven_data, tmp_path):
    out = tmp_path / "two"
    views = ["--test_num_segment", "1", "--test_num_crop", "3"]
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), *ft_argv(uneven_data, out, "--dist_eval", *views)])
    assert "world 2" in res.stdout
    result = json.loads((out / "test_results.json").read_text())
    assert result["num_videos"] == 3 and result["num_views"] == 9
    assert result["duplicates_removed"] == 0 and result["warning"] is None
    per_rank = [len((out / f"test_views_rank{r}.jsonl").read_text().splitlines()) for r in range(2)]
    assert sorted(per_rank) == [4, 5]  # uneven shards, nothing padded, nothing dropped
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert log[0]["val_num_clips"] == len(Path(uneven_data, "val.csv").read_text().split()) // 2

    # One process evaluating the saved weights gives the same per-video predictions.
    one = tmp_path / "one"
    _run([sys.executable, *ft_argv(uneven_data, one, "--eval", "--finetune", str(out / "checkpoint-latest.pth"),
                                   *views)])
    single = json.loads((one / "test_results.json").read_text())
    assert {k: v["pred"] for k, v in single["predictions"].items()} == \
        {k: v["pred"] for k, v in result["predictions"].items()}
    for k, v in single["predictions"].items():
        assert v["score"] == pytest.approx(result["predictions"][k]["score"], rel=1e-4)
    assert single["top1"] == result["top1"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed not installed (pip install -r requirements-deepspeed.txt)")
def test_deepspeed_trains_saves_resumes_and_its_checkpoint_evaluates(uneven_data, tmp_path):
    env = {"DS_ACCELERATOR": "cpu"}
    common = ["--enable_deepspeed", "--update_freq", "2", "--clip_grad", "1.0", "--model_ema", "--test_num_segment",
              "1", "--test_num_crop", "1", "--opt_betas", "0.9", "0.98"]
    _run([sys.executable, *ft_argv(uneven_data, tmp_path, *common, "--skip_final_test")], env)
    cfg = json.loads((tmp_path / "deepspeed_config.json").read_text())
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["train_batch_size"] == 4 and cfg["zero_optimization"]["stage"] == 0
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0"
    state = torch.load(tmp_path / "checkpoint-0" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert state["epoch"] == 0 and "model_ema" in state and "head.weight" in state["module"]
    first = {k: v.clone() for k, v in state["module"].items()}

    # more epochs: an explicit --resume (auto-resume refuses a changed schedule)
    res = _run([sys.executable, *ft_argv(uneven_data, tmp_path, *common, "--epochs", "2", "--resume",
                                         str(tmp_path / "checkpoint-0"))], env)
    assert "Resumed from" in res.stdout and "start_epoch 1" in res.stdout
    assert "Epoch: [0]" not in res.stdout and "Epoch: [1]" in res.stdout
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    state = torch.load(tmp_path / "checkpoint-1" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert any(not torch.equal(v, first[k]) for k, v in state["module"].items())  # it trained
    opt = state["optimizer"]  # ZeRO 0 keeps it here (ZeRO >= 1: *optim_states.pt files)
    assert opt["state"] and opt["param_groups"][0]["betas"] == (0.9, 0.98)  # --opt_betas reach DeepSpeed
    assert {g["lr_scale"] for g in opt["param_groups"]} > {1.0}  # the layer-decay groups
    assert json.loads((tmp_path / "test_results.json").read_text())["num_views"] == 3

    # a DeepSpeed folder is accepted by --finetune (weights under 'module') for --eval
    ev = tmp_path / "eval"
    _run([sys.executable, *ft_argv(uneven_data, ev, "--eval", "--finetune", str(tmp_path / "checkpoint-1"),
                                   "--test_num_segment", "1", "--test_num_crop", "1", "--model_ema")])
    assert json.loads((ev / "test_results.json").read_text())["predictions"] == \
        json.loads((tmp_path / "test_results.json").read_text())["predictions"]
    # with --model_ema, the folder's own EMA weights (DeepSpeed keeps them in its client state)
    assert json.loads((ev / "test_results_ema.json").read_text())["predictions"] == \
        json.loads((tmp_path / "test_results_ema.json").read_text())["predictions"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed not installed (pip install -r requirements-deepspeed.txt)")
def test_deepspeed_two_process_zero1(uneven_data, tmp_path):
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), *ft_argv(uneven_data, tmp_path, "--enable_deepspeed", "--zero_stage", "1",
                                            "--dist_eval", "--test_num_segment", "1", "--test_num_crop", "3")],
               {"DS_ACCELERATOR": "cpu"})
    assert "ZeRO stage 1" in res.stdout
    assert (tmp_path / "checkpoint-0").is_dir()
    assert json.loads((tmp_path / "test_results.json").read_text())["num_views"] == 9


def test_missing_deepspeed_gives_a_clear_error(uneven_data, tmp_path):
    """With DeepSpeed hidden, --enable_deepspeed stops with the install hint (not an ImportError trace)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "deepspeed.py").write_text("raise ImportError('hidden for the test')\n")
    res = subprocess.run([sys.executable, *ft_argv(uneven_data, tmp_path / "o", "--enable_deepspeed",
                                                   "--skip_final_test", "--disable_eval_during_finetuning")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(shim), "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert "pip install -r requirements-deepspeed.txt" in res.stderr + res.stdout
