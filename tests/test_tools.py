"""tools/make_synthetic_dataset.py and tools/check_dataset.py."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
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


def test_check_dataset_names_a_bad_label_on_a_duplicate_line(tmp_path, synthetic_dir):
    """Training rejects the whole list for it: the checker names that line, not 'line 0' with no path."""
    good = open(os.path.join(synthetic_dir, "train.csv")).read().splitlines()[:3]
    path = good[0].split()[0]
    lst = tmp_path / "dup.csv"
    lst.write_text("\n".join(good + [f"{path} 9"]) + "\n")
    res = check_list(str(lst), nb_classes=4, progress=False)
    assert sorted(p.split(":")[0] for line, _, p in res["bad"] if line == 4) == ["duplicate", "label out of range"]
    assert all(line > 0 and path for line, path, _ in res["bad"]), res["bad"]


def _run_check(argv, capsys) -> tuple[int, str, str]:
    rc = check_main([*argv, "--no_progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_dataset_empty_or_missing_list_is_a_usage_error(tmp_path, capsys):
    for text in ("", "# only a comment\n\n", "path,label\n"):
        lst = tmp_path / "empty.csv"
        lst.write_text(text)
        rc, out, err = _run_check([str(lst)], capsys)
        assert rc == 2 and f"{lst}: no videos listed" in err and "Traceback" not in err, (text, out, err)
    rc, _, err = _run_check([str(tmp_path / "nope.csv")], capsys)
    assert rc == 2 and "nope.csv" in err


def test_check_dataset_labels_checked_as_training_does(tmp_path, video_dir, capsys):
    """With --nb_classes / --data_set the checker accepts exactly the lists fine-tuning accepts (VideoList)."""
    from datasets import VideoList

    v = os.path.join(video_dir, "h264_64x48.mp4")
    w = os.path.join(video_dir, "vp9_64x48.webm")
    no_label = tmp_path / "no_label.csv"
    no_label.write_text(f"{v} 0\n{w}\n")
    out_of_range = tmp_path / "range.csv"
    out_of_range.write_text(f"{v} 0\n{w} 3\n")
    good = tmp_path / "good.csv"
    good.write_text(f"{v} 0\n{w} 2\n")

    cases = ((no_label, 2, "missing label"), (out_of_range, 2, "label out of range: 3 not in [0, 3)"))
    for lst, line, problem in cases:
        with pytest.raises(ValueError, match=f":{line}: "):
            VideoList(str(lst), require_label=True, nb_classes=3)  # training rejects it ...
        rc, out, _ = _run_check([str(lst), "--nb_classes", "3", "--video_backend", "pyav"], capsys)
        assert rc == 1 and f"{lst}:{line}: " in out and problem in out, out  # ... and so does the checker
        assert _run_check([str(lst), "--video_backend", "pyav"], capsys)[0] == 0  # pre-training: labels optional
    rc, out, _ = _run_check([str(no_label), "--data_set", "UCF101", "--video_backend", "pyav"], capsys)
    assert rc == 1 and "missing label" in out
    VideoList(str(good), require_label=True, nb_classes=3)
    rc, out, _ = _run_check([str(good), "--nb_classes", "3", "--video_backend", "pyav"], capsys)
    assert rc == 0 and "2 ok, 0 bad" in out and "1 of 3 classes have no video in this list (1)" in out

    # flags that contradict each other, as training refuses them
    for flags, msg in ((["--nb_classes", "3", "--data_set", "UCF101"], "does not match --data_set UCF101"),
                       (["--data_set", "custom"], "needs --nb_classes")):
        rc, _, err = _run_check([str(good), *flags], capsys)
        assert rc == 2 and msg in err and "Traceback" not in err, err


def test_check_dataset_full_finds_a_cut_webm(tmp_path, video_dir, capsys):
    """A VP9 .webm cut short still opens as a valid, shorter video whose header declares the full length: the quick
    check passes it, --full decodes every frame and names it with the count."""
    from conftest import coded_frames

    from tools.make_synthetic_dataset import write_video

    full = tmp_path / "full.webm"
    write_video(str(full), coded_frames(30, 48, 64, seed=5), "webm", fps=25, gop=8)
    data = full.read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) * 6 // 10])
    n = num_frames(str(cut), "pyav")
    assert 0 < n < 30  # some but not all frames are there
    lst = tmp_path / "list.csv"
    good = [full, os.path.join(video_dir, "h264_64x48.mp4"), os.path.join(video_dir, "vp9_80x64.webm")]
    lst.write_text("".join(f"{p} 0\n" for p in good[:2]) + f"{cut} 1\n" + f"{good[2]} 1\n")
    backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
    for backend in backends:
        rc, out, _ = _run_check([str(lst), "--video_backend", backend], capsys)
        assert rc == 0, out  # first, middle and last indexed frame decode fine
        rc, out, _ = _run_check([str(lst), "--video_backend", backend, "--full"], capsys)
        assert rc == 1 and "3 ok, 1 bad" in out, out  # the intact videos are not flagged
        assert f"{lst}:3: {cut}: truncated: decoded {n} of 30 frames" in out, out


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord is not installed")
@pytest.mark.parametrize("first", ["av", "decord"])
def test_vp9_writing_works_or_says_why_after_decord_was_imported(tmp_path, first):
    """decord's own FFmpeg, imported before PyAV, stops PyAV's VP9 encoder from opening: write_video then names the
    cause and the way out instead of FFmpeg's bare 'Invalid argument'. With av imported first it writes the video."""
    code = ("import sys; import numpy as np\n"
            f"import {first}, {'decord' if first == 'av' else 'av'}\n"
            "from tools.make_synthetic_dataset import write_video\n"
            "write_video(sys.argv[1], np.zeros((4, 32, 32, 3), np.uint8), 'webm')\n")
    out = tmp_path / "clip.webm"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    if first == "av":
        assert res.returncode == 0, res.stderr
        assert num_frames(str(out), "pyav") == 4
    elif res.returncode != 0:  # the conflict (decord 0.6.0 with PyAV 18.1): a clear message
        assert "imported decord before av" in res.stderr and "import av first" in res.stderr, res.stderr
    else:  # a decord / PyAV pair without the conflict writes a real video
        assert num_frames(str(out), "pyav") == 4


def test_synthetic_lists_survive_a_space_in_out_and_bad_flags_exit_2(tmp_path, capsys):
    """A space in --out used to split the path of every line (space-separated lists); such lists are written as
    `path,label`. Flags that cannot work are argparse's one-line errors (exit 2), not tracebacks."""
    from tools.make_synthetic_dataset import main as synth_main

    out = tmp_path / "my data"
    lists = make_synthetic_dataset(str(out), num_videos=4, num_classes=2, size=16, frames=4)
    recs = read_list_file(lists["train"])
    assert recs and all(os.path.isfile(r.full_path) and r.label in (0, 1) for r in recs)
    assert "," in open(lists["train"]).readline()
    rel = make_synthetic_dataset(str(tmp_path / "rel"), num_videos=4, num_classes=2, size=16, frames=4,
                                 relative=True)
    assert "," not in open(rel["train"]).readline()  # VideoMAE's `path label` where it works
    for flags, needle in ((["--num_classes", "9"], "--num_classes"), (["--size", "15"], "--size"),
                          (["--frames", "0"], "--frames"), (["--distractor_prob", "2"], "--distractor_prob"),
                          (["--num_videos", "x"], "--num_videos")):
        with pytest.raises(SystemExit) as e:
            synth_main(["--out", str(tmp_path / "bad"), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()
