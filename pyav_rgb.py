"""RGB arrays from decoded PyAV frames, whole or a region of them: the colour conversion of ``video_io``'s PyAV
reader, on one core per worker and on every PyAV version it supports.

swscale contexts are kept per source size and thread (``_converter``): making one costs more than a conversion.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from video_io import Region


def frame_to_rgb(frame, region: Region | None) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB of ``frame``, or of its ``region`` (inside the frame), as a view of a reused buffer.

    For 4:2:0 frames a region is cut from the YUV planes first, widened to even coordinates so that chroma
    samples stay aligned, and only that is converted: swscale's 4:2:0 -> RGB conversion is per 2x2 block,
    so the pixels are exactly those of the full frame's conversion (tested), at a fraction of the cost.
    """
    h, w = frame.height, frame.width
    conv = None
    if region is not None:
        top, left, rh, rw = region
        if frame.format.name in ("yuv420p", "yuvj420p") and h % 2 == 0 and w % 2 == 0:
            t0, l0 = top & ~1, left & ~1
            conv = _converter((left + rw - l0 + 1) & ~1, (top + rh - t0 + 1) & ~1, frame.format.name, True)
            for i, (src, dst) in enumerate(zip(frame.planes, conv.planes)):
                f = 1 if i == 0 else 2
                dst[:] = _plane_array(src)[t0 // f:t0 // f + dst.shape[0], l0 // f:l0 // f + dst.shape[1]]
            sub = conv.scratch
            sub.colorspace, sub.color_range = frame.colorspace, frame.color_range
            frame, (top, left) = sub, (top - t0, left - l0)
    if conv is None:  # whole frames (no region, or not 4:2:0)
        conv = _converter(w, h, frame.format.name, False)
    rgb = _reformat(conv.rgb, frame)
    view = _plane_array(rgb.planes[0])[:, :rgb.width * 3].reshape(rgb.height, rgb.width, 3)
    return view if region is None else view[top:top + rh, left:left + rw]


_REFORMAT_THREADS = [True]  # PyAV < 17 has no ``threads`` argument (its swscale is single-threaded by default)


def _reformat(reformatter, frame):
    """``frame`` as rgb24 on one core per worker (no swscale thread pool), on every PyAV version."""
    if _REFORMAT_THREADS[0]:
        try:
            return reformatter.reformat(frame, format="rgb24", threads=1)
        except TypeError as e:
            if "threads" not in str(e):
                raise
            _REFORMAT_THREADS[0] = False
    return reformatter.reformat(frame, format="rgb24")


class _Converter:
    """A swscale context for one source size; for regions also a scratch YUV frame and writable views of its
    planes, which the region is copied into."""

    def __init__(self, width: int, height: int, fmt: str, scratch: bool):
        import av
        from av.video.reformatter import VideoReformatter

        self.rgb = VideoReformatter()
        self.scratch = av.VideoFrame(width, height, fmt) if scratch else None
        self.planes = [_plane_array(p)[:, :p.width] for p in self.scratch.planes] if scratch else []


_LOCAL = threading.local()


def _converter(width: int, height: int, fmt: str, scratch: bool) -> _Converter:
    """This thread's converter for a source size. swscale re-initialises (~0.25 ms) whenever the source size
    changes, and region sizes change from clip to clip but take few values (the crop scales), so one converter
    per size is kept; at most 64, then the cache starts over."""
    cache = getattr(_LOCAL, "converters", None)
    if cache is None or len(cache) >= 64 or _LOCAL.pid != os.getpid():  # never reuse one across a fork
        cache, _LOCAL.pid = {}, os.getpid()
        _LOCAL.converters = cache
    key = (width, height, fmt, scratch)
    conv = cache.get(key)
    if conv is None:
        conv = cache[key] = _Converter(width, height, fmt, scratch)
    return conv


def _plane_array(plane) -> np.ndarray:
    """A PyAV plane as a ``[rows, line_size]`` uint8 array (a view; rows are padded past the visible width)."""
    return np.frombuffer(plane, np.uint8)[:plane.height * plane.line_size].reshape(plane.height, -1)

