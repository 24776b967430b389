"""tools/make_synthetic_dataset.py and tools/check_dataset.py."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from datasets import read_list_file
from tools.check_dataset import check_list
from tools.check_dataset import main as check_main
from tools.make_synthetic_dataset import make_synthetic_dataset, render_video
from video_io import num_frames, read_frames


def _digest(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(d, "videos"))):
        with open(os.path.join(d, "videos", name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_synthetic_lists_and_videos(synthetic_dir):
    recs = {part: read_list_file(os.path.join(synthetic_dir, f"{part}.csv")) for part in ("train", "val", "test")}
    assert sum(len(r) for r in recs.values()) == 16
    for part, rs in recs.items():
        counts = np.bincount([r.label for r in rs], minlength=4)
        assert len(set(counts)) == 1 and counts[0] > 0, (part, counts)  # balanced
    r = recs["train"][0]
    assert num_frames(r.full_path) == 20
    assert read_frames(r.full_path, [0, 19]).shape == (2, 64, 64, 3)


def test_synthetic_deterministic_and_webm(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    make_synthetic_dataset(a, num_videos=4, num_classes=2, fmt="webm", seed=3, size=48, frames=12)
    make_synthetic_dataset(b, num_videos=4, num_classes=2, fmt="webm", seed=3, size=48, frames=12)
    make_synthetic_dataset(c, num_videos=4, num_classes=2, fmt="webm", seed=4, size=48, frames=12)
    assert _digest(a) == _digest(b) != _digest(c)
    assert open(os.path.join(a, "train.csv")).read() == open(os.path.join(a, "train.csv")).read()


def test_synthetic_class_is_motion():
    # the moving object's centre of change goes up for class 0 and down for class 1
    for cls, sign in ((0, -1), (1, 1)):
        v = render_video(cls, np.random.default_rng(1), size=64, frames=16).astype(np.float32)
        diff = np.abs(np.diff(v, axis=0)).sum(-1)  # [T-1, H, W]
        ys = [(d.sum(1) * np.arange(64)).sum() / d.sum() for d in diff]
        assert sign * (ys[-1] - ys[0]) > 5


def test_check_dataset(tmp_path, video_dir, synthetic_dir):
    good = open(os.path.join(synthetic_dir, "train.csv")).read().splitlines()
    lines = good + [
        good[0],  # duplicate
        f"{os.path.join(video_dir, 'missing.mp4')} 0",
        f"{os.path.join(video_dir, 'garbage.mp4')} 0",
        f"{os.path.join(video_dir, 'truncated.mp4')} 0",
        f"{os.path.join(video_dir, 'h264_short.mp4')} 1",  # 6 frames: too short for --min_frames 8
        f"{os.path.join(video_dir, 'h264_64x48.mp4')} 7",  # label out of range
        "not a valid line",
    ]
    lst = tmp_path / "list.csv"
    lst.write_text("\n".join(lines) + "\n")
    res = check_list(str(lst), nb_classes=4, min_frames=8, progress=False)
    kinds = {p.split(":")[0] for _, _, p in res["bad"]}
    assert kinds == {"duplicate", "missing", "undecodable", "too short", "label out of range", "malformed"}
    n = len(good)
    assert sorted(line for line, _, _ in res["bad"]) == list(range(n + 1, n + 8))

    report = tmp_path / "report.txt"
    assert check_main([str(lst), "--nb_classes", "4", "--min_frames", "8", "--report", str(report),
                       "--no_progress", "--video_backend", "pyav"]) == 1
    assert len(report.read_text().splitlines()) == 7

    ok = tmp_path / "ok.csv"
    ok.write_text("\n".join(good) + "\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_dataset.py"), str(ok),
                          "--nb_classes", "4", "--no_progress"], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"{len(good)} ok, 0 bad" in out.stdout
