"""Unit tests for the shared training infrastructure: schedules, optimizer groups, precision, distributed
set-up and logging (CPU only, a few seconds). Checkpoints: ``test_checkpointing.py``."""
from __future__ import annotations

import argparse
import builtins
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
import distributed
from precision import LossScaler, autocast, get_grad_norm_, resolve_precision
import optim_factory  # noqa: E402
import metric_logging  # noqa: E402
from conftest import TinyViT, tiny_train_step  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_print():
    """init_distributed_mode replaces builtins.print; keep other tests unaffected."""
    saved = builtins.print
    yield
    builtins.print = saved


def _opt_args(**kw) -> argparse.Namespace:
    base = dict(opt="adamw", lr=1e-3, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95], momentum=0.9)
    base.update(kw)
    return argparse.Namespace(**base)


def _group_of(optimizer, model):
    id2name = {id(p): n for n, p in model.named_parameters()}
    return {id2name[id(p)]: g for g in optimizer.param_groups for p in g["params"]}


# ------------------------------------------------------------------------------------------------ schedules

def _videomae_reference(base, final, epochs, niter, warmup_epochs, start_warmup):
    warmup_iters = warmup_epochs * niter
    warm = np.linspace(start_warmup, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_iters)
    cos = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters])
    return np.concatenate((warm, cos))


def test_cosine_scheduler_matches_videomae_semantics():
    s = optim_factory.cosine_scheduler(1e-3, 1e-6, epochs=5, niter_per_ep=7, warmup_epochs=2, start_warmup_value=1e-7)
    ref = _videomae_reference(1e-3, 1e-6, 5, 7, 2, 1e-7)
    assert s.shape == (35,)
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert s[0] == pytest.approx(1e-7) and s[13] == pytest.approx(1e-3) and s[14] == pytest.approx(1e-3)
    assert np.all(np.diff(s[14:]) <= 0) and s[-1] > 1e-6


def test_cosine_scheduler_edge_cases():
    # warmup_steps with warmup_epochs == 0 used to fail an assertion in VideoMAE
    s = optim_factory.cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_epochs=0, warmup_steps=3)
    assert len(s) == 10 and s[0] == 0.0 and s[2] == pytest.approx(1.0) and s[3] == pytest.approx(1.0)
    # warm-up longer than the run is clamped
    s = optim_factory.cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=4, warmup_epochs=3)
    assert len(s) == 4 and s[-1] == pytest.approx(1.0)
    # zero-length runs and a one-step warm-up
    assert len(optim_factory.cosine_scheduler(1.0, 0.0, epochs=0, niter_per_ep=4)) == 0
    assert len(optim_factory.cosine_scheduler(1.0, 0.0, epochs=3, niter_per_ep=0, warmup_epochs=1)) == 0
    s = optim_factory.cosine_scheduler(1.0, 0.5, epochs=1, niter_per_ep=3, warmup_steps=1, start_warmup_value=0.1)
    assert s[0] == pytest.approx(0.1) and s[1] == pytest.approx(1.0)
    # constant schedule (weight decay with weight_decay_end == weight_decay)
    np.testing.assert_allclose(optim_factory.cosine_scheduler(0.05, 0.05, 2, 3), 0.05)


def test_scale_lr_prints_and_is_idempotent(capsys):
    args = argparse.Namespace(lr=1.5e-4, min_lr=1e-5, warmup_lr=1e-6)
    assert optim_factory.scale_lr(args, total_batch=512) == pytest.approx(3e-4)
    assert args.min_lr == pytest.approx(2e-5) and args.warmup_lr == pytest.approx(2e-6)
    out = capsys.readouterr().out
    assert "base lr 1.500e-04" in out and "512" in out and "3.000e-04" in out
    optim_factory.scale_lr(args, total_batch=512)  # second call re-derives from the stored base value
    assert args.lr == pytest.approx(3e-4)


# ------------------------------------------------------------------------------------------------ optimizer

def test_param_groups_no_weight_decay_for_bias_norm_and_skip_list():
    model = TinyViT()
    opt = optim_factory.create_optimizer(_opt_args(), model, verbose=False)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _group_of(opt, model)
    for name in ("pos_embed", "patch_embed.bias", "blocks.0.0.weight", "blocks.0.1.bias", "norm.weight",
                 "head.bias"):
        assert groups[name]["weight_decay"] == 0.0, name
    for name in ("patch_embed.weight", "blocks.1.1.weight", "head.weight"):
        assert groups[name]["weight_decay"] == 0.05, name
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8


def test_skip_list_matches_dotted_suffix_and_zero_weight_decay_keeps_lr_scale():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = TinyViT()
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))

        def no_weight_decay(self):
            return {"pos_embed", "mask_token"}

    model = Wrapper()
    groups = _group_of(optim_factory.create_optimizer(_opt_args(), model, verbose=False), model)
    assert groups["encoder.pos_embed"]["weight_decay"] == 0.0
    assert groups["mask_token"]["weight_decay"] == 0.0
    assert groups["encoder.head.weight"]["weight_decay"] == 0.05
    # an explicit skip list replaces no_weight_decay()
    opt = optim_factory.create_optimizer(_opt_args(), model, skip_list=["head.weight"], verbose=False)
    groups = _group_of(opt, model)
    assert groups["encoder.head.weight"]["weight_decay"] == 0.0
    assert groups["mask_token"]["weight_decay"] == 0.05
    # weight_decay == 0 still yields groups with lr_scale (VideoMAE raised KeyError there)
    opt = optim_factory.create_optimizer(_opt_args(weight_decay=0.0), model, verbose=False)
    assert all("lr_scale" in g and g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_layer_decay_lr_scales(capsys):
    model = TinyViT(depth=2)
    opt = optim_factory.create_optimizer(_opt_args(), model, layer_decay=0.5)
    assert "lr_scale" in capsys.readouterr().out  # the group summary is printed
    groups = _group_of(opt, model)
    # depth 2 -> layers: stem 0, blocks 1..2, norm/head 3 = max  (VideoMAE's get_num_layer_for_vit)
    assert groups["patch_embed.weight"]["lr_scale"] == pytest.approx(0.5**3)
    assert groups["pos_embed"]["lr_scale"] == pytest.approx(0.5**3)
    assert groups["blocks.0.1.weight"]["lr_scale"] == pytest.approx(0.5**2)
    assert groups["blocks.1.1.weight"]["lr_scale"] == pytest.approx(0.5)
    assert groups["head.weight"]["lr_scale"] == pytest.approx(1.0)
    assert groups["norm.weight"]["lr_scale"] == pytest.approx(1.0)
    assert groups["pos_embed"]["weight_decay"] == 0.0 and groups["blocks.0.1.bias"]["weight_decay"] == 0.0
    assert groups["blocks.0.1.weight"]["weight_decay"] == 0.05
    # per-step schedule application
    optim_factory.apply_schedule(opt, lr=2e-3, weight_decay=0.1)
    assert groups["patch_embed.weight"]["lr"] == pytest.approx(2e-3 * 0.125)
    assert groups["patch_embed.weight"]["weight_decay"] == 0.1 and groups["pos_embed"]["weight_decay"] == 0.0
    optim_factory.apply_schedule(opt, weight_decay=0.0)  # decaying to zero must not lose track of decaying groups
    optim_factory.apply_schedule(opt, weight_decay=0.2)
    assert groups["patch_embed.weight"]["weight_decay"] == 0.2 and groups["pos_embed"]["weight_decay"] == 0.0
    stats = optim_factory.get_lr_stats(opt)
    assert stats["lr"] == pytest.approx(2e-3) and stats["min_lr"] == pytest.approx(2e-3 * 0.125)


# ------------------------------------------------------------------------------------------------ precision

def test_loss_scaler_interfaces():
    torch.manual_seed(0)
    model = TinyViT()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.head.weight.detach().clone()
    scaler = LossScaler("fp32", "cpu")
    assert tiny_train_step(model, scaler, opt, update_grad=False) is None  # accumulation micro-step
    assert torch.equal(model.head.weight, before)
    norm = tiny_train_step(model, scaler, opt, clip_grad=1e-3)
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0 and norm > 1e-3
    assert not torch.equal(model.head.weight, before)
    assert scaler.state_dict() == {} and scaler.get_scale() == 1.0
    opt.zero_grad()
    norm = tiny_train_step(model, LossScaler("bf16", "cpu"), opt, precision="bf16")
    assert isinstance(norm, torch.Tensor) and torch.isfinite(norm)
    # measured norm equals the reference total norm
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert torch.allclose(get_grad_norm_(model.parameters()), expected)
    assert float(get_grad_norm_([nn.Parameter(torch.ones(2))])) == 0.0


def test_loss_scaler_fp16_state_and_skipped_step():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler("fp16", "cpu", init_scale=1024.0)
    loss = model(torch.randn(4, 3)).sum()
    norm = scaler(loss, opt)
    assert isinstance(norm, torch.Tensor) and scaler.get_scale() == 1024.0
    opt.zero_grad()
    loss = model(torch.randn(4, 3)).sum() * float("inf")
    before = model.weight.detach().clone()
    skipped = scaler(loss, opt)  # inf gradients: the GradScaler skips the step and halves the scale
    assert scaler.get_scale() == 512.0 and not torch.isfinite(skipped) and torch.equal(model.weight, before)
    assert float(scaler.get_scale_tensor()) == 512.0
    assert float(LossScaler("bf16", "cpu").get_scale_tensor()) == 1.0
    sd = scaler.state_dict()
    other = LossScaler("fp16", "cpu")
    other.load_state_dict(sd)
    assert other.get_scale() == 512.0
    other.load_state_dict({})  # checkpoint from a bf16 run: keep the fresh scale instead of crashing
    with pytest.raises(ValueError):
        LossScaler("fp8")


def test_autocast_helper():
    with autocast("cpu", "bf16"):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
    with autocast("cpu:0", "fp32"):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.float32
    assert resolve_precision("BF16", "cpu") == "bf16"


# ------------------------------------------------------------------------------------------------ distributed

def test_parse_slurm_nodelist():
    assert distributed.parse_slurm_nodelist("node[001-004,7],gpu5") == [
        "node001", "node002", "node003", "node004", "node7", "gpu5"]
    assert distributed.parse_slurm_nodelist("rack[1-2]-n[08-09]") == [
        "rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert distributed.parse_slurm_nodelist("single-host") == ["single-host"]
    assert distributed.parse_slurm_nodelist("a[9-11],b") == ["a9", "a10", "a11", "b"]
    with pytest.raises(ValueError):
        distributed.parse_slurm_nodelist("node[1-", use_scontrol=False)


SLURM_ENV = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NODELIST": "gpu[017-018]"}


def test_resolve_slurm_env():
    info = distributed.resolve_distributed_env(dict(SLURM_ENV), use_scontrol=False)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (5, 8, 1, "slurm")
    assert info.master_addr == "gpu017" and info.master_port == str(15000 + 123456 % 20000)
    info = distributed.resolve_distributed_env({**SLURM_ENV, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert info.master_addr == "10.0.0.1" and info.master_port == "4242"
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_ID"}
    assert distributed.resolve_distributed_env(env).master_port == "29500"
    # torchrun inside an allocation: torchrun's ranks win
    info = distributed.resolve_distributed_env({**SLURM_ENV, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                          "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 16, 3, "torchrun")
    # one task (interactive python inside salloc) and plain python: not distributed
    assert distributed.resolve_distributed_env({**SLURM_ENV, "SLURM_NTASKS": "1"}) is None
    assert distributed.resolve_distributed_env({}) is None
    info = distributed.resolve_distributed_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                                          "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, dist_on_itp=True)
    assert (info.rank, info.world_size, info.source) == (2, 4, "itp")


def test_init_distributed_mode_single_process(monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    parser = distributed.add_distributed_args(argparse.ArgumentParser())
    args = parser.parse_args(["--local-rank=3", "--device", "cpu"])
    assert args.local_rank == 3 and args.dist_url == "env://" and args.seed == 0
    assert parser.parse_args(["--local_rank", "2"]).local_rank == 2
    distributed.init_distributed_mode(args)
    assert not args.distributed and args.rank == 0 and args.world_size == 1 and args.dist_backend is None
    assert "Not using distributed mode" in capsys.readouterr().out
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    distributed.barrier()  # no-op without a process group
    assert distributed.all_reduce_mean(2.5) == 2.5
    assert torch.equal(distributed.all_reduce_mean(torch.ones(2)), torch.ones(2))
    assert utils.setup_seed(7) == 7
    # re-adding to a parser that already defines --seed must not raise
    p2 = argparse.ArgumentParser()
    p2.add_argument("--seed", type=int, default=42)
    assert distributed.add_distributed_args(p2).parse_args([]).seed == 42


def test_print_silenced_on_non_master(capsys):
    distributed.setup_for_distributed(False)
    print("hidden")
    print("shown", force=True)
    assert capsys.readouterr().out == "shown\n"


# ------------------------------------------------------------------------------------------------ logging

def test_a_skipped_fp16_step_is_counted_not_averaged():
    """A step the GradScaler skipped has an inf/NaN grad norm: the epoch's average is over the applied steps and
    the record says how many were skipped, also after a mid-epoch resume of the meters."""
    ml = metric_logging.MetricLogger()
    for v in (1.0, float("inf"), 3.0, float("nan")):
        ml.update(grad_norm=torch.tensor(v), loss=torch.tensor(0.5))
    again = metric_logging.MetricLogger()
    for k, state in ml.state_dict().items():
        again.meters[k].load_state_dict(state)
    for m in (ml, again):
        avg = m.global_averages()
        assert avg["grad_norm"] == 2.0 and avg["grad_norm_nonfinite"] == 2 and "loss_nonfinite" not in avg
    assert again.meters["grad_norm"].count == 2


def test_metric_logger_lazy_tensors_and_output(capsys):
    ml = metric_logging.MetricLogger(delimiter="  ")
    ml.add_meter("lr", metric_logging.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    seen = []
    for i, batch in enumerate(ml.log_every(range(5), print_freq=2, header="Epoch: [0]")):
        seen.append(batch)
        ml.update(loss=torch.tensor(float(i)), lr=np.float32(1e-3), grad_norm=None)
        assert len(ml.loss._pending) <= 5  # tensors are kept until printed
    out = capsys.readouterr().out
    assert seen == list(range(5))
    assert "eta: " in out and "data" in out and "time:" in out and "Total time" in out
    assert "Epoch: [0]" in out and "[4/5]" in out and "lr: 0.001000" in out
    assert ml.loss.global_avg == pytest.approx(2.0) and ml.loss.count == 5
    assert ml.loss.max == 4.0 and ml.loss.median == 2.0 and ml.loss.value == 4.0
    assert "grad_norm" not in ml.meters
    ml.synchronize_between_processes()  # no-op without a process group
    assert ml.global_averages()["loss"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ml.update(bad=torch.ones(3))


def test_metric_logger_iterable_without_len(capsys):
    ml = metric_logging.MetricLogger()
    assert list(ml.log_every(iter(range(3)), print_freq=1, header="x")) == [0, 1, 2]
    assert "[2]" in capsys.readouterr().out


def test_metric_logger_warns_when_input_bound(capsys):
    def slow_data(n, wait):
        for i in range(n):
            time.sleep(wait)
            yield i

    for wait, work, warned in ((0.03, 0.0, True), (0.0, 0.03, False)):
        for _ in metric_logging.MetricLogger().log_every(slow_data(4, wait), print_freq=10, header="Epoch: [0]"):
            time.sleep(work)
        out = capsys.readouterr().out
        assert ("waiting for data" in out) == warned, out


def test_tensorboard_logger_writes_events(tmp_path):
    tb = metric_logging.TensorboardLogger(tmp_path / "tb")
    for step in range(3):
        tb.set_step(step)
        tb.update(head="loss", loss=torch.tensor(1.0 / (step + 1)), lr=1e-3, skipped=None)
    tb.add_images("vis/x", torch.rand(2, 3, 8, 8), step=0)
    tb.flush()
    tb.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [round(e.value, 4) for e in acc.Scalars("loss/loss")] == [1.0, 0.5, 0.3333]
    assert "loss/lr" in acc.Tags()["scalars"]


def test_write_log_line(tmp_path):
    metric_logging.write_log_line(tmp_path, {"epoch": 0, "train_loss": torch.tensor(0.5), "n": np.int64(3)})
    metric_logging.write_log_line(tmp_path, {"epoch": 1, "train_loss": float("nan")})
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"epoch": 0, "train_loss": 0.5, "n": 3},
                                              {"epoch": 1, "train_loss": "nan"}]
    metric_logging.write_log_line(None, {"epoch": 2})  # no output dir: silently nothing
    assert os.path.getsize(tmp_path / "log.txt") > 0
