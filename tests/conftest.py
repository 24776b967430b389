"""Shared fixtures: small real videos written with PyAV (H.264 .mp4 and VP9 .webm) and a tiny synthetic set.

Every frame carries its index: the top-left 8x8 block has grey level ``min(8 * i, 248)``, so tests can check
that a backend returned the right frame, not only that both backends agree.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.make_synthetic_dataset import make_synthetic_dataset, write_video  # noqa: E402


def frame_code(i: int) -> int:
    """Grey level of the index block in frame ``i``."""
    return min(8 * i, 248)


def coded_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """``uint8 [n, h, w, 3]``: smooth background, a moving bright square and the frame-index block."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, 96)], -1)
    bg = (bg * 0.6 + rng.integers(0, 40, size=(h, w, 3))).astype(np.uint8)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f = bg.copy()
        x = (3 * i) % max(w - 12, 1)
        f[h // 2:h // 2 + 12, x:x + 12] = 230
        f[:8, :8] = frame_code(i)
        out[i] = f
    return out


# name -> (format, height, width, frames, gop)
VIDEO_SPECS = {
    "h264_64x48.mp4": ("mp4", 48, 64, 40, 8),
    "vp9_64x48.webm": ("webm", 48, 64, 40, 8),
    "h264_96x128.mp4": ("mp4", 128, 96, 30, 12),  # portrait
    "vp9_80x64.webm": ("webm", 64, 80, 24, 10),
    "h264_short.mp4": ("mp4", 48, 64, 6, None),  # shorter than a clip
}


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> str:
    """Folder with the videos of VIDEO_SPECS plus broken files: ``truncated.mp4`` (first half of a valid file),
    ``truncated.webm``, ``garbage.mp4`` (random bytes) and ``empty.mp4``."""
    d = tmp_path_factory.mktemp("videos")
    for name, (fmt, h, w, n, gop) in VIDEO_SPECS.items():
        write_video(str(d / name), coded_frames(n, h, w, seed=n), fmt, fps=25, gop=gop)
    data = (d / "h264_64x48.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    data = (d / "vp9_64x48.webm").read_bytes()
    (d / "truncated.webm").write_bytes(data[: len(data) // 3])
    (d / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "empty.mp4").write_bytes(b"")
    return str(d)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    """A tiny synthetic dataset (16 videos, 4 classes, 64 px, 20 frames) with train/val/test lists."""
    d = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(d), num_videos=16, num_classes=4, fmt="mp4", seed=0, size=64, frames=20)
    return str(d)


def run_launcher(script: str, tmp_path, program: str, env: dict | None = None, cwd: str | None = None) -> list[str]:
    """Run a launcher script (from ``cwd``) with torchrun/srun/python replaced by a recorder; return the argv it
    passed (all of it, launcher options included). ``program`` only checks that the launcher really starts that
    program."""
    import json
    import subprocess

    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv.json"
    for tool in ("torchrun", "srun", "python"):
        (bindir / tool).write_text(f"#!{sys.executable}\nimport json, sys\n"
                                   f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
        (bindir / tool).chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
                "SLURM_SUBMIT_DIR": ROOT, **(env or {})}
    res = subprocess.run(["bash", os.path.join(ROOT, script)], env=full_env, capture_output=True, text=True,
                         timeout=60, cwd=cwd)
    assert res.returncode == 0, res.stderr
    argv = json.loads(record.read_text())
    assert program in argv, argv
    return argv


def run_main(module, argv: list[str]):
    """Run a program's ``main`` through its command-line entry (``cli.run_program``) in this process: the exit
    status and what it printed, as a ``subprocess.CompletedProcess``, without a new interpreter's start-up."""
    import contextlib
    import io
    import subprocess
    import traceback

    from cli import run_program

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_program(module.main, module.get_args_parser(), list(argv))
        except SystemExit as e:
            code = e.code
        except Exception:  # noqa: BLE001 - --debug re-raises: report it as a process would
            err.write(traceback.format_exc())
            code = 1
    return subprocess.CompletedProcess([module.__name__, *argv], code, out.getvalue(), err.getvalue())


class TinyViT(nn.Module):
    """Just enough structure for parameter grouping: stem, blocks, final norm, head."""

    def __init__(self, depth: int = 2, dim: int = 8):
        super().__init__()
        self.patch_embed = nn.Linear(4, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, dim))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self):
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^patch_embed|^pos_embed", blocks=r"^blocks\.(\d+)")

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x).mean(1))


def tiny_train_step(model: nn.Module, scaler, opt: torch.optim.Optimizer, precision: str = "fp32", **kw):
    """One step of ``model`` (a TinyViT) through ``precision.LossScaler`` on random input."""
    from precision import autocast

    x = torch.randn(2, 3, 4)
    with autocast("cpu", precision):
        loss = model(x).float().pow(2).mean()
    return scaler(loss, opt, **kw)
