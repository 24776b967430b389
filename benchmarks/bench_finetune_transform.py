"""Fine-tuning's training transform alone (RandAugment, crop, resize, flip, erasing), ms per clip on one core.

    python benchmarks/bench_finetune_transform.py [--against REV] [--sizes 240x320,320x426] [--frames 16]

Random uint8 frames of each size go through ``video_transforms.TrainTransform`` with the program's defaults
(``--aa rand-m7-n4-mstd0.5-inc1``, bicubic, ``--reprob 0.25``, 224 px), and with ``--aa_on_crop``. ``--against
REV`` also times the ``video_transforms.py`` of git revision ``REV`` in the same run, for a before/after table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time
from types import ModuleType

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import video_transforms  # noqa: E402


def module_at(rev: str) -> ModuleType:
    """``video_transforms.py`` as of git revision ``rev``, imported under another name."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:video_transforms.py"], check=True, capture_output=True,
                         text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "video_transforms_at_rev.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("video_transforms_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ms_per_clip(module: ModuleType, frames: torch.Tensor, repeats: int, **kw) -> float:
    tr = module.TrainTransform(224, aa="rand-m7-n4-mstd0.5-inc1", interpolation="bicubic", reprob=0.25,
                               remode="pixel", recount=1, flip=True, **kw)
    random.seed(0)
    np.random.seed(0)
    for _ in range(3):  # warm-up
        tr(frames)
    start = time.perf_counter()
    for _ in range(repeats):
        tr(frames)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=None, help="git revision to time as 'before'")
    p.add_argument("--sizes", default="240x320,320x426", help="frame sizes HxW, comma-separated")
    p.add_argument("--frames", default=16, type=int)
    p.add_argument("--repeats", default=30, type=int)
    args = p.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's view
    versions = [("this tree", video_transforms, {}), ("this tree, --aa_on_crop", video_transforms,
                                                      {"aa_on_crop": True})]
    versions += [(args.against, module_at(args.against), {})] if args.against else []
    print("| frames | " + " | ".join(f"{name} (ms/clip)" for name, _, _ in versions) + " |")
    print("|---|" + "---|" * len(versions))
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        frames = torch.randint(0, 256, (args.frames, h, w, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        times = [ms_per_clip(module, frames, args.repeats, **kw) for _, module, kw in versions]
        print(f"| {args.frames} x {h}x{w} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
