"""Real-world files and lists the data path once got wrong: mp4 edit lists, variable-frame-rate WebM, odd list
files (BOM, other encodings, names starting with '#'), raw-frame folders with flow images."""
from __future__ import annotations

import fractions
import importlib.util
import os

import av  # before decord: decord's FFmpeg breaks PyAV's VP9 encoder
import numpy as np
import pytest
from conftest import coded_frames, frame_code

from tools.check_dataset import check_video
from tools.make_synthetic_dataset import write_video
from tools.video_reencode import _source_frames
from video_datasets import _short_of_container
from video_io import open_video

HAVE_DECORD = importlib.util.find_spec("decord") is not None
BACKENDS = ["pyav"] + (["decord"] if HAVE_DECORD else [])
EDIT_FRAMES, EDIT_CUT = 24, 3


def _codes(frames: np.ndarray) -> list[int]:
    """The frame index each frame carries (conftest.frame_code, through lossy coding)."""
    return [int(round(f[:8, :8].astype(float).mean() / 8)) for f in frames]


def _make_edit_list_mp4(path: str, tmp: str) -> None:
    """An H.264 mp4 whose first EDIT_CUT frames are cut by an edit list, as a stream-copy trim leaves it: the packets
    stay (the decoder needs them as references) with negative timestamps, marked discard."""
    write_video(tmp, coded_frames(EDIT_FRAMES, 48, 64, seed=3), "mp4", fps=25, gop=8)
    with av.open(tmp) as ic, av.open(path, "w") as oc:
        ist = ic.streams.video[0]
        ost = (oc.add_stream_from_template(ist) if hasattr(oc, "add_stream_from_template")
               else oc.add_stream(template=ist))
        shift = None
        for pkt in ic.demux(ist):
            if pkt.dts is None:
                continue
            if shift is None:
                shift = pkt.duration * EDIT_CUT
            pkt.pts -= shift
            pkt.dts -= shift
            pkt.stream = ost
            oc.mux(pkt)


def _make_vfr_webm(path: str, n1: int = 30, n2: int = 20) -> None:
    """A complete VP9 .webm at 30 fps for ``n1`` frames, then 10 fps for ``n2``: its average rate (from the first
    frames) times its duration is far more frames than it has."""
    tb = fractions.Fraction(1, 1000)
    pts = [i * 33 for i in range(n1)] + [n1 * 33 + i * 100 for i in range(n2)]
    with av.open(path, "w") as c:
        s = c.add_stream("libvpx-vp9", rate=30, options={"deadline": "realtime", "cpu-used": "8", "threads": "1"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = tb
        for i, f in enumerate(coded_frames(n1 + n2, 48, 64, seed=7)):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = pts[i], tb
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def edge_videos(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("edge")
    paths = {"editlist": str(d / "editlist.mp4"), "vfr": str(d / "vfr.webm"), "vfr_cut": str(d / "vfr_cut.webm")}
    _make_edit_list_mp4(paths["editlist"], str(d / "src.mp4"))
    _make_vfr_webm(paths["vfr"])
    data = open(paths["vfr"], "rb").read()
    with open(paths["vfr_cut"], "wb") as f:
        f.write(data[: len(data) // 2])
    return paths


def test_pyav_reads_an_edit_list_mp4_exactly(edge_videos):
    """The frames an edit list cuts are decoded only as references: PyAV must neither count them nor call the file
    truncated, and frame i must be the i-th frame shown, also on random access."""
    path = edge_videos["editlist"]
    n = EDIT_FRAMES - EDIT_CUT
    want = [frame_code(i) // 8 for i in range(EDIT_CUT, EDIT_FRAMES)]
    with open_video(path, "pyav") as r:
        assert len(r) == n and r.declared_frames() == n
        assert _codes(r.get_batch(list(range(n)))) == want
        assert _codes(r.get_batch([n - 1, 0, 7])) == [want[n - 1], want[0], want[7]]
    assert check_video(path, "pyav", full=True) == (n, None)
    frames, _ = _source_frames(path)  # prepare_videos' reader: not "truncated" either
    assert sum(1 for _ in frames) == n


@pytest.mark.parametrize("backend", BACKENDS)
def test_complete_vfr_webm_is_not_truncated(edge_videos, backend):
    """Duration x average rate (the rate of the first frames) overstates a variable-frame-rate file's count; the
    checks compare times, so the complete file passes everywhere and a cut one is still caught."""
    path = edge_videos["vfr"]
    with av.open(path) as c:
        s = c.streams.video[0]
        assert float(c.duration / 1e6) * float(s.average_rate) > 75  # what the count-based check expected
    with open_video(path, backend) as r:
        assert len(r) == 50 and r.declared_frames() == 50 and _short_of_container(r) == ""
        r.get_batch(list(range(50)))
    assert check_video(path, backend, full=True) == (50, None)
    if backend == "pyav":
        frames, _ = _source_frames(path)
        assert sum(1 for _ in frames) == 50
    cut = edge_videos["vfr_cut"]
    with open_video(cut, backend) as r:
        n = len(r)
        assert 0 < n < 50 and r.declared_frames() > n
        assert _short_of_container(r).startswith(f"truncated: {n} decodable frames")
    assert check_video(cut, backend, full=True)[1].startswith(f"truncated: decoded {n} of")


def _encode(path: str, codec: str, n: int, options: dict, packets=None, flat: bool = False) -> np.ndarray:
    """Write ``n`` coded frames (64x48; ``flat``: one grey level per frame) with PyAV; ``packets(list) -> list`` may
    rewrite the packets' timestamps. Returns the frames as a sequential decode gives them."""
    frames = np.stack([np.full((48, 64, 3), 3 * i % 256, np.uint8) for i in range(n)]) if flat else \
        coded_frames(n, 48, 64)
    with av.open(path, "w") as out:
        s = out.add_stream(codec, rate=25, options=options)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        pk = []
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            pk += list(s.encode(frame))
        pk += list(s.encode())
        for q in packets(pk) if packets else pk:
            out.mux(q)
    with av.open(path) as c:
        frames = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)), key=lambda x: x[0])
    return np.stack([f for _, f in frames])


@pytest.mark.parametrize("name,codec,n,options", [
    ("mpeg4_bframes.avi", "mpeg4", 90, {"bf": "2", "g": "30", "qscale": "3"}),
    ("h264_bframes.ts", "libx264", 60, {"x264-params": "keyint=12:bframes=2"}),
    ("mpeg2.mpg", "mpeg2video", 60, {"bf": "2", "g": "12"}),
    ("open_gop.mp4", "libx264", 60, {"x264-params": "open-gop=1:keyint=12:min-keyint=12:bframes=3:scenecut=0"}),
])
def test_pyav_reads_every_frame_of_avi_ts_mpg_and_open_gop(tmp_path, name, codec, n, options):
    """Their seek can land past the target at the first keyframe (AVI with B-frames: start_time 0, first pts 1) or
    at the end: frames 0-2 of such an AVI were 'truncated' (every view starting at frame 0 lost; with this
    FFmpeg, for the AVI below, not for every AVI), and frames of a .ts. Each frame alone and a clip from frame 0
    must be the sequential decode's (on open-GOP H.264 decord returns other frames; DATASET.md section 3)."""
    path = str(tmp_path / name)
    truth = _encode(path, codec, n, options, flat=name.endswith(".avi"))
    for i in range(len(truth)):
        with open_video(path, "pyav") as r:
            np.testing.assert_array_equal(r.get_batch([i])[0], truth[i], err_msg=f"frame {i}")
    with open_video(path, "pyav") as r:
        np.testing.assert_array_equal(r.get_batch(list(range(0, 48, 4))), truth[0:48:4])


def test_mp4_with_an_empty_frame_slot_is_indexed_from_its_frames(tmp_path):
    """Uniform decode timestamps but one presentation slot left empty (frames 30 on stamped one slot later, as
    a dropped frame leaves it): the sample-table index named frame 29 as 30 for every later index, unless some
    earlier request happened to need the empty slot."""
    path = str(tmp_path / "gap.mp4")

    def shift(pk):
        d = pk[1].dts - pk[0].dts
        for k, q in enumerate(pk):
            q.dts, q.pts = k * d, k * d + (d if k >= 30 else 0)
        return pk

    truth = _encode(path, "libx264", 60, {"x264-params": "bframes=0:keyint=20"}, shift)
    with open_video(path, "pyav") as r:
        np.testing.assert_array_equal(r.get_batch([40, 50]), truth[[40, 50]])
        assert not r._impl._from_container


@pytest.mark.parametrize("name,codec,options", [("held.webm", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8"}),
                                                ("held.mp4", "libx264", {"x264-params": "bframes=0"})])
def test_a_last_frame_held_for_seconds_is_not_truncation(tmp_path, name, codec, options):
    """Recorders hold the last frame (here 2 s of a 2 s video): its duration was taken as the last gap, so the
    complete file read as cut off: excluded from evaluation, and not prepared."""
    from tools.video_reencode import convert

    def hold(pk):
        last = max(pk, key=lambda q: q.pts)
        last.duration = 50 * (last.duration or 1)
        return pk

    path = str(tmp_path / name)
    n = len(_encode(path, codec, 50, options, hold))
    for backend in BACKENDS:
        with open_video(path, backend) as r:
            assert len(r) == n and r.declared_frames() == n and _short_of_container(r) == "", backend
    assert convert(path, str(tmp_path / "out.mp4"), 0, 32, 23, "ultrafast") == (None, n)


def test_a_cut_faststart_mp4_is_truncated_for_pyav(tmp_path):
    """With its index at the front, a cut mp4 still opens; PyAV's sample-table index no longer fits it, so the
    reader indexes the frames left by demuxing: the file must read as truncated, not as a shorter, valid video."""
    from video_datasets import VideoClsDataset
    from datasets import VideoList

    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options={"movflags": "+faststart"}) as out:
        s = out.add_stream("libx264", rate=25, options={"x264-params": "keyint=12"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i, f in enumerate(coded_frames(100, 48, 64)):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            out.mux(s.encode(frame))
        out.mux(s.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[:int(full.stat().st_size * 0.6)])
    with open_video(str(cut), "pyav") as r:
        assert len(r) < 100 and _short_of_container(r).startswith(f"truncated: {len(r)} decodable frames")
    lst = tmp_path / "l.csv"
    lst.write_text(f"{cut} 0\n")
    ds = VideoClsDataset(VideoList(str(lst), nb_classes=1), mode="validation", sampling="dense", num_frames=8,
                         sampling_rate=2, num_segments=1, input_size=32, short_side_size=32, test_num_segment=1,
                         test_num_crop=1, video_backend="pyav")
    info = ds[0][-1]
    assert not info["valid"] and info["reason"].startswith("truncated"), info


def test_checker_warns_about_frames_missing_inside_a_webm(tmp_path, capsys):
    """Corrupt bytes in the middle of a WebM: the demuxer skips them and the frames they held, so every later
    index names a later frame and the file still ends on time (not 'truncated'). The checker names the jump."""
    path = tmp_path / "holed.webm"
    _encode(str(path), "libvpx-vp9", 120, {"deadline": "realtime", "cpu-used": "8", "g": "12"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    clean = tmp_path / "clean.webm"
    _encode(str(clean), "libvpx-vp9", 120, {"deadline": "realtime", "cpu-used": "8", "g": "12"})
    _assert_one_checker_warning(tmp_path, str(clean), str(path), "frames seem missing inside: the timestamps jump by",
                                capsys)


@pytest.mark.skipif(not HAVE_DECORD, reason="decord is not installed")
def test_decord_alone_trains_evaluates_and_checks_webm_without_pyav(video_dir, tmp_path):
    """PyAV is optional (auto falls back to decord): the header reads that look for truncation and missing frames
    must then give up quietly, not fail every .webm item with ModuleNotFoundError."""
    import subprocess
    import sys

    lst = tmp_path / "l.csv"
    lst.write_text(f"{os.path.join(video_dir, 'vp9_64x48.webm')} 0\n")
    code = f"""
import sys
sys.modules["av"] = None  # as if PyAV were not installed
from datasets import VideoList
from tools import check_dataset
from video_datasets import PretrainVideoDataset, VideoClsDataset
videos = VideoList({str(lst)!r}, nb_classes=1)
train = PretrainVideoDataset(videos, num_frames=8, sampling_rate=2, input_size=32, flip=False, num_sample=1,
                             video_backend="auto", max_retries=0, max_broken_ratio=0.5)
assert train.backend == "decord" and train[0].pixels.shape[0] == 8 and train.num_broken == 0
val = VideoClsDataset(videos, mode="validation", sampling="dense", num_frames=8, sampling_rate=2, num_segments=1,
                      input_size=32, short_side_size=32, test_num_segment=1, test_num_crop=1, video_backend="auto")
assert val[0][-1]["valid"], val[0][-1]
assert check_dataset.main([{str(lst)!r}, "--no_progress"]) == 0
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_checker_and_visualiser_default_to_the_training_backend():
    """A list checked (or a clip drawn) with another decoder than training's can pass with frames training never
    sees; all three take their default from video_io.DEFAULT_BACKEND."""
    import argparse

    import run_mae_vis
    from datasets import add_data_args
    from tools.check_dataset import get_args_parser as check_parser

    train = add_data_args(argparse.ArgumentParser()).get_default("video_backend")
    assert train == "auto"
    assert check_parser().get_default("video_backend") == train
    assert run_mae_vis.get_args_parser().get_default("video_backend") == train


def test_list_with_a_byte_order_mark_keeps_its_first_video(tmp_path, video_dir):
    """Windows editors start UTF-8 files with a BOM; it must not stick to the first path (a missing video) or hide
    the header. prepare_videos' rewritten list reads the list the same way."""
    from datasets import read_list_file
    from tools.prepare_videos import rewrite_list

    a, b = (os.path.join(video_dir, n) for n in ("h264_64x48.mp4", "vp9_64x48.webm"))
    for text in (f"{a} 0\n{b} 1\n", f"path,label\n{a},0\n{b},1\n"):
        lst = tmp_path / "bom.csv"
        lst.write_bytes(b"\xef\xbb\xbf" + text.encode())
        recs = read_list_file(str(lst))
        assert [(r.path, r.label) for r in recs] == [(a, 0), (b, 1)]
        assert rewrite_list(str(lst), {recs[0].line_no: "x.mp4"}, set()).splitlines()[-2].startswith("x.mp4")


def test_list_not_in_utf8_is_a_user_error_naming_file_and_line(tmp_path, video_dir, capsys):
    from cli import UserError
    from datasets import read_list_file
    from tools import check_dataset, prepare_videos

    a = os.path.join(video_dir, "h264_64x48.mp4")
    lst = tmp_path / "latin1.csv"
    lst.write_bytes(f"{a} 0\n".encode() + "caf\xe9/v.mp4 1\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"{lst}:2: not UTF-8"):
        read_list_file(str(lst))
    assert check_dataset.main([str(lst), "--no_progress"]) == 2
    assert f"{lst}:2: not UTF-8" in capsys.readouterr().err
    assert prepare_videos.main([str(lst), str(tmp_path / "out"), "--no-bench"]) == 2
    err = capsys.readouterr().err
    assert f"{lst}:2: not UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["h264_64x48.mp4", "vp9_64x48.webm"])
def test_a_video_given_as_the_list_is_named_as_a_video(video_dir, name):
    """--data_path video.mp4 said 'not UTF-8 text ...; save the list as UTF-8'."""
    from cli import UserError
    from datasets import read_list_file

    video = os.path.join(video_dir, name)
    with pytest.raises(UserError, match=f"{video} is a video, not a list: a list names one video per line"):
        read_list_file(video)


def test_a_path_with_spaces_split_into_fields_gets_a_hint(tmp_path):
    from datasets import read_list_file

    lst = tmp_path / "l.csv"
    lst.write_text("/data/my videos/a.mp4 0\n")
    with pytest.raises(ValueError, match=r"l.csv:1: .*\(a path with spaces\? write the line as 'path,label'\)"):
        read_list_file(str(lst))
    lst.write_text("/data/my videos/a.mp4,0\n")
    assert read_list_file(str(lst))[0].path == "/data/my videos/a.mp4"


def test_hash_line_naming_an_existing_video_is_a_record(tmp_path, video_dir):
    """HMDB51 has videos named '#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi': such a line is a video when its first field
    names an existing file or folder (relative to data_root like any path), a comment otherwise."""
    import shutil

    from datasets import read_list_file

    shutil.copy(os.path.join(video_dir, "h264_64x48.mp4"), tmp_path / "#20_clap.mp4")
    (tmp_path / "#frames").mkdir()
    lst = tmp_path / "hmdb.csv"
    lst.write_text("# a comment\n#20_clap.mp4 3\n#not_there.mp4 1\n#frames,2\n#\n")
    recs = read_list_file(str(lst), data_root=str(tmp_path))
    assert [(r.path, r.label, r.line_no) for r in recs] == [("#20_clap.mp4", 3, 2), ("#frames", 2, 4)]
    assert recs[0].full_path == str(tmp_path / "#20_clap.mp4")


def _assert_one_checker_warning(tmp_path, good: str, flagged: str, warning: str, capsys) -> None:
    """check_dataset on a list of ``good`` then ``flagged``: exit status 0, one warning, on line 2, naming it."""
    from tools import check_dataset

    lst = tmp_path / "list.csv"
    lst.write_text(f"{good} 0\n{flagged} 1\n")
    assert check_dataset.main([str(lst), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert f"{lst}:2: {flagged}: warning: {warning}" in out, out
    assert out.count("warning:") == 1


def test_checker_warns_about_a_rotated_video(tmp_path, video_dir, capsys):
    """A phone video's display matrix asks players to rotate it; both backends return the frames as stored, so the
    checker names each such file (a warning: the exit status stays 0)."""
    import struct


    data = bytearray(open(os.path.join(video_dir, "h264_64x48.mp4"), "rb").read())
    m = data.find(b"tkhd") + 4 + 40  # version 0 tkhd: the 3x3 matrix after 40 bytes of fields
    data[m:m + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)  # 90 degrees
    rot = tmp_path / "rot90.mp4"
    rot.write_bytes(bytes(data))
    _assert_one_checker_warning(tmp_path, os.path.join(video_dir, "vp9_64x48.webm"), str(rot),
                                "its display matrix rotates it by -90 degrees", capsys)
