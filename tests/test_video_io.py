"""Decoding backends: identical frames for identical indices, right frame numbering, clear errors."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from conftest import VIDEO_SPECS, frame_code

from video_io import BACKENDS, VideoDecodeError, num_frames, open_video, read_frames

GOOD = list(VIDEO_SPECS)
# decord has no wheels for some platforms/Pythons; PyAV alone must still be tested there.
HAVE_DECORD = importlib.util.find_spec("decord") is not None
needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord is not installed")
BACKEND_PARAMS = [pytest.param(b, marks=needs_decord) if b == "decord" else b for b in BACKENDS]


@needs_decord
@pytest.mark.parametrize("name", GOOD)
def test_backends_agree(video_dir, name):
    path = os.path.join(video_dir, name)
    _, h, w, n, _ = VIDEO_SPECS[name]
    assert num_frames(path, "decord") == num_frames(path, "pyav") == n
    rng = np.random.default_rng(0)
    index_sets = [list(range(n)), [n - 1, 0, n // 2, n // 2, 1], sorted(rng.choice(n, size=min(n, 5), replace=False))]
    for idx in index_sets:
        a = read_frames(path, idx, "decord")
        b = read_frames(path, idx, "pyav")
        assert a.dtype == b.dtype == np.uint8
        assert a.shape == b.shape == (len(idx), h, w, 3)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", GOOD)
def test_region_is_exactly_a_crop_of_the_full_frames(video_dir, name):
    """PyAV converts only the region from YUV; the pixels must be those of the full conversion, for even and odd
    offsets and sizes and regions touching the borders (decord crops after converting)."""
    path = os.path.join(video_dir, name)
    _, h, w, n, _ = VIDEO_SPECS[name]
    idx = [0, n // 2, n - 1, n // 2]
    full = read_frames(path, idx, "pyav")
    rng = np.random.default_rng(1)
    regions = [(0, 0, h, w), (1, 3, h - 1, w - 3), (h - 5, w - 7, 5, 7), (0, 0, 1, 1)]
    regions += [(int(t), int(left), int(rng.integers(1, h - t + 1)), int(rng.integers(1, w - left + 1)))
                for t, left in zip(rng.integers(0, h, 8), rng.integers(0, w, 8))]
    for backend in [b for b in BACKENDS if b != "decord" or HAVE_DECORD]:
        with open_video(path, backend) as r:
            assert r.frame_size() in ((h, w), None)
            for top, left, rh, rw in regions:
                got = r.get_batch(idx, (top, left, rh, rw))
                np.testing.assert_array_equal(got, full[:, top:top + rh, left:left + rw], err_msg=f"{backend} "
                                              f"{(top, left, rh, rw)}")
            with pytest.raises(ValueError, match="does not fit"):
                r.get_batch(idx, (0, 0, h + 1, w))


def test_pyav_index_from_the_mp4_sample_table(video_dir):
    """mp4: the frame index comes from the container's sample table (no demux pass) and equals the demuxed one;
    an index that does not match the stream is detected at decode time and rebuilt, never returning wrong frames."""
    for name in [n for n in GOOD if n.endswith(".mp4")] + ["vp9_64x48.webm"]:
        path = os.path.join(video_dir, name)
        with open_video(path, "pyav") as r:
            impl = r._impl
            # PyAV < 17 does not expose the sample table (Stream.index_entries): the demux pass is used instead.
            has_table = hasattr(impl._stream, "index_entries")
            assert impl._from_container == (name.endswith(".mp4") and has_table), name
            pts, keyframes = list(impl._pts), list(impl._keyframes)
            impl._container.seek(0)
            impl._index_by_demux()
            assert (pts, keyframes) == (impl._pts, impl._keyframes), name

    path = os.path.join(video_dir, "h264_64x48.mp4")
    with open_video(path, "pyav") as r:
        impl = r._impl
        if not impl._from_container:
            return  # PyAV < 17: the index was demuxed (asserted above), there is no container guess to rebuild
        d = impl._pts[1] - impl._pts[0]
        impl._set_index([impl._pts[0] + k * d // 2 for k in range(len(impl._pts))], [0])  # a wrong grid
        ref = read_frames(path, [5, 20, 39], "decord" if HAVE_DECORD else "pyav")  # the latter with a right index
        np.testing.assert_array_equal(r.get_batch([5, 20, 39]), ref)
        assert not impl._from_container


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", ["h264_64x48.mp4", "vp9_64x48.webm"])
def test_right_frames(video_dir, name, backend):
    """The frame-index block decodes to the code of the requested frame (seeking lands on the right frame)."""
    path = os.path.join(video_dir, name)
    idx = [37, 3, 20, 8, 9, 39, 0]
    frames = read_frames(path, idx, backend)
    got = frames[:, 2:6, 2:6].reshape(len(idx), -1).mean(1)
    want = np.array([frame_code(i) for i in idx])
    assert np.abs(got - want).max() < 4, (got, want)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_reader_reuse_and_fps(video_dir, backend):
    with open_video(os.path.join(video_dir, "vp9_80x64.webm"), backend) as r:
        assert len(r) == 24
        assert abs(r.fps() - 25) < 0.5
        a = r.get_batch([5, 6])
        b = r.get_batch([0, 23, 5])
        np.testing.assert_array_equal(a[0], b[2])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", ["missing.mp4", "garbage.mp4", "empty.mp4", "truncated.mp4"])
def test_broken_raise_decode_error(video_dir, name, backend):
    with pytest.raises(VideoDecodeError) as e:
        with open_video(os.path.join(video_dir, name), backend) as r:
            r.get_batch(range(len(r)))
    assert name in str(e.value)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_truncated_webm_and_bad_index(video_dir, backend):
    # A cut webm either fails to open, or has fewer frames than the original; it never returns garbage frames
    # for indices beyond what is there.
    path = os.path.join(video_dir, "truncated.webm")
    try:
        n = num_frames(path, backend)
    except VideoDecodeError:
        return
    assert n < 40
    with pytest.raises(VideoDecodeError):
        read_frames(path, [n + 5], backend)
    with pytest.raises(VideoDecodeError):
        read_frames(os.path.join(video_dir, "h264_short.mp4"), [6], backend)


@needs_decord
def test_auto_backend_is_pyav_and_equals_decord(video_dir):
    from video_io import resolve_backend

    assert resolve_backend("auto") == "pyav"  # PyAV is installed here
    for name in ("h264_64x48.mp4", "vp9_64x48.webm"):
        path = os.path.join(video_dir, name)
        with open_video(path) as r:
            assert r.backend == "pyav"
            np.testing.assert_array_equal(r.get_batch([3, 17, 5, 5]), read_frames(path, [3, 17, 5, 5], "decord"))
