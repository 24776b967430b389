"""tools/prepare_videos.py on real videos, run as the user runs it (a subprocess): H.264 and VP9 sources, a
source with audio and x264's default keyframe interval, a corrupt and a missing one; usage errors; resume after
SIGKILL."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
from conftest import ROOT, coded_frames

from tools.make_synthetic_dataset import write_video

TOOL = os.path.join(ROOT, "tools", "prepare_videos.py")
GOP = 8


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args, "--no_progress"], capture_output=True, text=True,
                          timeout=timeout)


def write_with_audio(path: str, n: int = 48) -> None:
    """H.264 at x264's default keyframe interval (one keyframe) plus an AAC track."""
    frames = coded_frames(n, 48, 64, seed=3)
    with av.open(path, "w") as c:
        v = c.add_stream("libx264", rate=25, options={"preset": "veryfast", "threads": "1"})
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("aac", rate=16000, layout="mono")
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        for k in range(n * 16000 // 25 // 1024):
            tone = (0.1 * np.sin(np.arange(1024) / 5.0)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, k * 1024
            c.mux(a.encode(af))
        c.mux(v.encode())
        c.mux(a.encode())


def decoded_count(path: str) -> int:
    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def keyframe_gaps(path: str) -> list[int]:
    """Frames from each keyframe to the next (and to the end), in decode order."""
    with av.open(path) as c:
        keys = [pkt.is_keyframe for pkt in c.demux(video=0) if pkt.size]
    starts = [i for i, k in enumerate(keys) if k]
    assert starts and starts[0] == 0
    return [b - a for a, b in zip(starts, starts[1:] + [len(keys)])]


def test_prepare_list(video_dir, tmp_path):
    src = tmp_path / "src"
    (src / "ssv2").mkdir(parents=True)
    (src / "k400").mkdir()
    shutil.copy(os.path.join(video_dir, "vp9_64x48.webm"), src / "ssv2" / "1.webm")
    shutil.copy(os.path.join(video_dir, "h264_96x128.mp4"), src / "k400" / "portrait.mp4")
    shutil.copy(os.path.join(video_dir, "garbage.mp4"), src / "k400" / "garbage.mp4")
    shutil.copy(os.path.join(video_dir, "truncated.webm"), src / "ssv2" / "cut.webm")
    write_with_audio(str(src / "k400" / "audio.mp4"))
    lst = tmp_path / "train.csv"
    lst.write_text("path,label\n"
                   "ssv2/1.webm,3\n"
                   "k400/garbage.mp4,5\n"
                   "# a comment\n"
                   "k400/portrait.mp4,1\n"
                   "k400/missing.mp4,2\n"
                   "k400/audio.mp4,0\n"
                   "ssv2/1.webm,4\n"
                   "ssv2/cut.webm,7\n")
    out = tmp_path / "out"
    res = run_tool(str(lst), str(out), "--data_root", str(src), "--short_side", "32", "--gop", str(GOP),
                   "-j", "2", "--bench_videos", "2", "--bench_clips", "2", "--num_frames", "4")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    # failures named with list:line and left out of the new list
    for line, path, why in ((3, "k400/garbage.mp4", "undecodable"), (6, "k400/missing.mp4", "missing"),
                            (9, "ssv2/cut.webm", "truncated")):
        assert f"{lst}:{line}: {path}: {why}" in res.stdout
        assert f"{lst}:{line}: {path}: {why}" in (out / "failed.txt").read_text()
    assert (out / "train.csv").read_text() == ("path,label\n"
                                              "ssv2/1.mp4,3\n"
                                              "# a comment\n"
                                              "k400/portrait.mp4,1\n"
                                              "k400/audio.mp4,0\n"
                                              "ssv2/1.mp4,4\n")
    assert "clips/s" in res.stdout and "bytes" in res.stdout
    for name, source in (("ssv2/1.mp4", "ssv2/1.webm"), ("k400/portrait.mp4", "k400/portrait.mp4"),
                         ("k400/audio.mp4", "k400/audio.mp4")):
        path = str(out / name)
        with av.open(path) as c:
            assert c.format.name.startswith("mov,mp4")
            assert c.streams.video[0].codec_context.name == "h264"
            assert not c.streams.audio and len(c.streams) == 1
            w, h = c.streams.video[0].width, c.streams.video[0].height
        assert min(w, h) == 32 and w % 2 == 0 and h % 2 == 0
        assert decoded_count(path) == decoded_count(str(src / source))
        assert max(keyframe_gaps(path)) <= GOP
    assert max(keyframe_gaps(str(src / "k400" / "audio.mp4"))) > GOP  # the source really had fewer keyframes
    assert not [f for f in os.listdir(out / "ssv2") + os.listdir(out / "k400") if f.endswith(".tmp")]


def test_usage_errors(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.mp4 0\n")
    for args, word in (([str(tmp_path / "nope.txt"), str(tmp_path / "o")], "nope.txt"),
                       ([str(lst), str(tmp_path / "o"), "--short_side", "33"], "--short_side"),
                       ([str(lst), str(tmp_path / "o"), "-j", "0"], "-j"),
                       ([str(lst), str(tmp_path)], "overwrite"),
                       ([str(lst)], "OUT_DIR")):
        res = run_tool(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], res.stderr


def test_out_dir_holding_the_sources_is_a_usage_error(video_dir, tmp_path):
    """Outputs that would be their own sources were counted as finished: nothing converted, exit 0, and the new
    list named the raw videos."""
    src = tmp_path / "v"
    src.mkdir()
    shutil.copy(os.path.join(video_dir, "h264_64x48.mp4"), src / "a.mp4")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{src / 'a.mp4'} 0\n")
    res = run_tool(str(lst), str(src), "--no_progress")
    assert res.returncode == 2 and "is where the videos are" in res.stderr and "l.txt:1" in res.stderr, res.stderr
    assert sorted(p.name for p in src.iterdir()) == ["a.mp4"]


def test_resume_after_sigkill(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    n = 12
    for i in range(n):
        write_video(str(src / f"v{i}.mp4"), coded_frames(90, 96, 128, seed=i), "mp4", fps=25)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{src / f'v{i}.mp4'} {i}\n" for i in range(n)))
    out = tmp_path / "out"
    args = [str(lst), str(out), "--short_side", "0", "--gop", str(GOP), "-j", "1", "--no-bench", "--no_progress"]
    proc = subprocess.Popen([sys.executable, TOOL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done: dict = {}
    deadline = time.time() + 90
    try:
        while not done and time.time() < deadline and proc.poll() is None:
            done = {f: os.stat(out / f) for f in os.listdir(out) if f.endswith(".mp4")} if out.exists() else {}
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # at least one output is finished, the others are not
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    done = {f: os.stat(out / f) for f in os.listdir(out) if f.endswith(".mp4")}
    assert 0 < len(done) < n, sorted(os.listdir(out))
    res = run_tool(*args[:-1])
    assert res.returncode == 0, res.stderr
    assert f"{len(done)} already done" in res.stdout
    for f, st in done.items():  # not rewritten
        now = os.stat(out / f)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == sorted(
        [f"v{i}.mp4" for i in range(n)] + ["list.txt", "failed.txt"])
    assert (out / "list.txt").read_text() == "".join(f"{out / f'v{i}.mp4'} {i}\n" for i in range(n))
    assert (out / "failed.txt").read_text() == ""
    for i in range(n):
        assert decoded_count(str(out / f"v{i}.mp4")) == 90


def test_stale_tmp_removed_only_for_dead_writers(tmp_path):
    from tools.prepare_videos import remove_stale_tmp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "a").mkdir()
    stale, live = tmp_path / "a" / f"x.mp4.{dead.pid}.tmp", tmp_path / "a" / f"y.mp4.{os.getpid()}.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    (tmp_path / "a" / "z.mp4").write_bytes(b"finished")
    assert remove_stale_tmp(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path / "a")) == [f"y.mp4.{os.getpid()}.tmp", "z.mp4"]


def test_prepared_copy_keeps_the_colours_of_bt709_and_full_range_sources(tmp_path):
    """The re-encoded YUV keeps the source's matrix and range, so the output must say which: untagged, a BT.709
    or full-range source came out 6-7 grey levels off on average when read back."""
    from tools.video_reencode import convert

    from video_io import read_frames

    frames = coded_frames(12, 48, 64)
    for name, pix_fmt, colorspace, color_range in (("bt709.mp4", "yuv420p", 1, 1), ("full.mp4", "yuvj420p", 5, 2)):
        src = str(tmp_path / name)
        with av.open(src, "w") as out:
            s = out.add_stream("libx264", rate=25, options={"crf": "0"})
            s.width, s.height, s.pix_fmt = 64, 48, pix_fmt
            s.codec_context.colorspace, s.codec_context.color_range = colorspace, color_range
            for i, f in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format=pix_fmt)
                frame.pts, frame.colorspace, frame.color_range = i, colorspace, color_range
                out.mux(s.encode(frame))
            out.mux(s.encode())
        dst = str(tmp_path / f"out_{name}")
        convert(src, dst, 0, 32, 0, "ultrafast", None)  # lossless: any difference is the colour handling
        a, b = (read_frames(p, list(range(12)), "pyav").astype(int) for p in (src, dst))
        assert np.abs(a - b).max() == 0, (name, np.abs(a - b).mean())


def test_an_out_dir_with_a_space_or_a_comma_and_nested_frame_folders(video_dir, tmp_path):
    """Absolute sources get absolute outputs in the new list: under an OUT_DIR with a space the line is written
    as 'path,label' (it was unreadable), one with a comma is refused. In --format frames, a/b.mp4's folder a/b/
    would hold a/b/c.mp4's frames (and a rerun took it for finished, with no frames): named as a failure."""
    from datasets import read_list_file
    from tools import prepare_videos

    def run_here(*args: str) -> subprocess.CompletedProcess:  # in this process: no interpreter start per call
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = prepare_videos.main([*args, "--no_progress"])
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    src = os.path.join(video_dir, "h264_64x48.mp4")
    lst = tmp_path / "abs.txt"
    lst.write_text(f"{src} 3\n")
    out = tmp_path / "my prepared"
    res = run_here(str(lst), str(out), "--no-bench")
    assert res.returncode == 0, res.stderr[-2000:]
    (rec,) = read_list_file(str(out / "abs.txt"))
    assert rec.label == 3 and rec.path.startswith(str(out)) and os.path.isfile(rec.path)
    res = run_here(str(lst), str(tmp_path / "a,b"), "--no-bench")
    assert res.returncode == 2 and "holds a comma" in res.stderr, res.stderr

    raw = tmp_path / "raw"
    (raw / "a" / "b").mkdir(parents=True)
    shutil.copy(src, raw / "a" / "b.mp4")
    shutil.copy(src, raw / "a" / "b" / "c.mp4")
    nested = tmp_path / "nested.txt"
    nested.write_text("a/b/c.mp4 0\na/b.mp4 1\n")
    for _ in range(2):  # the rerun must not take a/b/ for a finished output
        res = run_here(str(nested), str(tmp_path / "frames"), "--data_root", str(raw), "--format", "frames",
                       "--no-bench")
        assert res.returncode == 0 and "nested.txt:2: a/b.mp4: its output folder a/b would hold the output of " \
            "line 1 (a/b/c.mp4)" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "frames" / "nested.txt").read_text() == "a/b/c 0\n"
