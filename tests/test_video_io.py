"""Decoding backends: identical frames for identical indices, right frame numbering, clear errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import VIDEO_SPECS, frame_code

from video_io import BACKENDS, VideoDecodeError, num_frames, open_video, read_frames

GOOD = list(VIDEO_SPECS)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264_64x48.mp4", "vp9_64x48.webm"])
def test_right_frames(video_dir, name, backend):
    """The frame-index block decodes to the code of the requested frame (seeking lands on the right frame)."""
    path = os.path.join(video_dir, name)
    idx = [37, 3, 20, 8, 9, 39, 0]
    frames = read_frames(path, idx, backend)
    got = frames[:, 2:6, 2:6].reshape(len(idx), -1).mean(1)
    want = np.array([frame_code(i) for i in idx])
    assert np.abs(got - want).max() < 4, (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_reuse_and_fps(video_dir, backend):
    with open_video(os.path.join(video_dir, "vp9_80x64.webm"), backend) as r:
        assert len(r) == 24
        assert abs(r.fps() - 25) < 0.5
        a = r.get_batch([5, 6])
        b = r.get_batch([0, 23, 5])
        np.testing.assert_array_equal(a[0], b[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["missing.mp4", "garbage.mp4", "empty.mp4", "truncated.mp4"])
def test_broken_raise_decode_error(video_dir, name, backend):
    with pytest.raises(VideoDecodeError) as e:
        with open_video(os.path.join(video_dir, name), backend) as r:
            r.get_batch(range(len(r)))
    assert name in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
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
