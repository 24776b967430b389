"""Checkpoints: atomic save, the save frequency and tags, resume (explicit and automatic, past a torn file),
refusing non-finite weights, and state-dict unwrapping (CPU only)."""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.utils import unwrap_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpointing  # noqa: E402
import utils  # noqa: E402
from conftest import TinyViT, tiny_train_step  # noqa: E402
from precision import LossScaler  # noqa: E402


def _ckpt_args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(output_dir=str(tmp_path), save_ckpt_freq=1, epochs=3, resume="", auto_resume=True,
                start_epoch=0)
    base.update(kw)
    return argparse.Namespace(**base)


def _make_state(seed=0):
    torch.manual_seed(seed)
    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = LossScaler("fp16", "cpu", init_scale=256.0)
    return model, opt, scaler


def test_checkpoint_round_trip(tmp_path):
    model, opt, scaler = _make_state(0)
    tiny_train_step(model, scaler, opt)
    args = _ckpt_args(tmp_path)
    written = checkpointing.save_checkpoint(args, 0, model, opt, scaler, global_step=17, extra={"kind": "pretrain"})
    assert sorted(Path(p).name for p in written) == ["checkpoint-0.pth", "checkpoint-latest.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth", "checkpoint-latest.pth"]
    after_save = (torch.rand(3), np.random.rand(3), random.random())

    ck = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=False)
    assert ck["format_version"] == 1 and ck["kind"] == "pretrain" and ck["epoch"] == 0
    assert ck["global_step"] == 17 and ck["args"]["save_ckpt_freq"] == 1 and ck["scaler"]["scale"] == 256.0

    model2, opt2, scaler2 = _make_state(1)
    scaler2 = LossScaler("fp16", "cpu", init_scale=8.0)
    args2 = _ckpt_args(tmp_path)
    torch.manual_seed(123)
    info = checkpointing.auto_load_model(args2, model2, opt2, scaler2)
    assert info.resumed and info.global_step == 17 and info.epoch == 0 and args2.start_epoch == 1
    for (n, p), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, p2), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert scaler2.get_scale() == 256.0
    after_load = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after_save[0], after_load[0]) and np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]


def test_save_frequency_tag_and_explicit_resume(tmp_path):
    model, opt, scaler = _make_state()
    args = _ckpt_args(tmp_path, save_ckpt_freq=2, epochs=3)
    written = checkpointing.save_checkpoint(args, 0, model, opt, scaler, 1)
    assert [Path(p).name for p in written] == ["checkpoint-latest.pth"]
    assert len(checkpointing.save_checkpoint(args, 1, model, opt, scaler, 2)) == 2  # (1 + 1) % 2 == 0
    assert len(checkpointing.save_checkpoint(args, 2, model, opt, scaler, 3)) == 2  # last epoch
    best = checkpointing.save_checkpoint(args, 2, model, opt, scaler, 3, tag="best")
    assert [Path(p).name for p in best] == ["checkpoint-best.pth"]
    args2 = _ckpt_args(tmp_path, resume=str(tmp_path / "checkpoint-1.pth"))
    info = checkpointing.auto_load_model(args2, TinyViT(), None, None)
    assert info.epoch == 1 and args2.start_epoch == 2
    args3 = _ckpt_args(tmp_path, resume=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        checkpointing.auto_load_model(args3, TinyViT(), None, None)
    # --no-auto_resume starts over only in a folder without a run's checkpoints: it would write over them one by
    # one, and a later auto-resume could continue the old run from its newest (here epoch 2) file
    args4 = _ckpt_args(tmp_path, auto_resume=False)
    with pytest.raises(checkpointing.CheckpointError, match=r"holds a run's checkpoints \(checkpoint-1.pth, "
                                                            r"checkpoint-2.pth, checkpoint-best.pth, checkpoint-lat"):
        checkpointing.auto_load_model(args4, TinyViT(), None, None)
    args5 = _ckpt_args(tmp_path / "new", auto_resume=False)
    assert not checkpointing.auto_load_model(args5, TinyViT(), None, None).resumed and args5.start_epoch == 0


def test_truncated_latest_falls_back_to_previous_numbered(tmp_path, capsys):
    model, opt, scaler = _make_state()
    args = _ckpt_args(tmp_path, save_ckpt_freq=2, epochs=10)
    for epoch in range(3):  # writes checkpoint-1.pth, latest = epoch 2
        checkpointing.save_checkpoint(args, epoch, model, opt, scaler, global_step=10 * (epoch + 1))
    latest = tmp_path / "checkpoint-latest.pth"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    args2 = _ckpt_args(tmp_path, save_ckpt_freq=2, epochs=10)
    info = checkpointing.auto_load_model(args2, TinyViT(), torch.optim.AdamW(TinyViT().parameters()), None)
    out = capsys.readouterr().out
    assert "checkpoint-latest.pth" in out and "truncated" in out
    assert info.path.endswith("checkpoint-1.pth") and args2.start_epoch == 2 and info.global_step == 20
    with pytest.raises(checkpointing.CheckpointError, match="checkpoint-latest.pth.*truncated"):
        checkpointing.load_checkpoint_file(latest)


def test_crash_during_save_leaves_previous_file(tmp_path, monkeypatch):
    model, opt, scaler = _make_state()
    args = _ckpt_args(tmp_path, save_ckpt_freq=100, epochs=100)
    checkpointing.save_checkpoint(args, 0, model, opt, scaler, 1)
    good = (tmp_path / "checkpoint-latest.pth").read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(utils.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_checkpoint(args, 1, model, opt, scaler, 2)
    assert (tmp_path / "checkpoint-latest.pth").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-latest.pth"]  # no temp file left behind


def test_refuses_non_finite_weights(tmp_path):
    model, opt, scaler = _make_state()
    with torch.no_grad():
        model.blocks[1][1].weight[0, 0] = float("nan")
    with pytest.raises(checkpointing.NonFiniteCheckpointError, match=r"blocks\.1\.1\.weight"):
        checkpointing.save_checkpoint(_ckpt_args(tmp_path), 0, model, opt, scaler, 1)
    assert list(tmp_path.iterdir()) == []


def test_state_dict_unwrapping_and_counting():
    model = TinyViT()
    compiled = torch.compile(model)  # compilation is lazy; no forward is run
    keys = list(utils.get_model_state_dict(compiled))
    assert keys == list(model.state_dict()) and not any(k.startswith("_orig_mod.") for k in keys)
    assert unwrap_model(nn.DataParallel(model)) is model
    stripped = utils.strip_state_dict_prefixes({"module._orig_mod.head.weight": 1, "head.bias": 2})
    assert stripped == {"head.weight": 1, "head.bias": 2}
    model.head.weight.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    assert utils.count_parameters(model, trainable_only=False) == total
    assert utils.count_parameters(model) == total - model.head.weight.numel()


