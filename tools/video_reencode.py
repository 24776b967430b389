"""One video's prepared copy, for tools/prepare_videos.py (runs in its worker processes).

Decodes every frame of the source and encodes it with libx264 (``tune=fastdecode``, a keyframe at least every
``gop`` frames, the short side scaled down, constant frame rate, no audio) into a temporary file next to the
output, which is checked with the training reader, fsynced and renamed into place: an existing output is a
finished one.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Tuple

from video_io import declared_frames, open_video


def output_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """Scale so the short side is ``short_side`` (never up; 0 keeps the size); both sides even for yuv420p."""
    s = min(width, height)
    if short_side and s > short_side:
        width, height = round(width * short_side / s), round(height * short_side / s)
    return max(2, width // 2 * 2), max(2, height // 2 * 2)


def encode(src: str, tmp: str, short_side: int, gop: int, crf: int, preset: str) -> int:
    """Decode every frame of ``src`` in order and encode it to ``tmp``; returns the number of frames.

    Raises ``ValueError("undecodable: ...")`` or ``ValueError("truncated: ...")`` for bad sources."""
    import av
    from av.video.frame import PictureType
    from av.video.reformatter import Interpolation, VideoReformatter

    try:
        inp = av.open(src)
    except Exception as e:
        raise ValueError(f"undecodable: cannot open ({type(e).__name__}: {e})") from None
    with inp:
        if not inp.streams.video:
            raise ValueError("undecodable: no video stream")
        ist = inp.streams.video[0]
        ist.codec_context.thread_count = 1  # the processes are the parallelism
        # NTSC rates (30000/1001) stay exact; a variable-rate source's odd average gets a nearby simple rate
        rate = Fraction(ist.average_rate or ist.guessed_rate or 25).limit_denominator(1001)
        expected = declared_frames(inp, ist)
        reformatter = VideoReformatter()
        n = 0
        with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as out:
            ost = None
            try:
                for frame in inp.decode(ist):
                    if ost is None:
                        w, h = output_size(frame.width, frame.height, short_side)
                        interp = Interpolation.AREA if w < frame.width else Interpolation.BICUBIC
                        ost = out.add_stream("libx264", rate=rate, options={
                            "crf": str(crf), "preset": preset, "tune": "fastdecode", "threads": "1"})
                        ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
                        ost.codec_context.gop_size = gop
                    f = reformatter.reformat(frame, w, h, "yuv420p", interpolation=interp)
                    f.pts, f.time_base, f.pict_type = n, 1 / rate, PictureType.NONE  # constant rate; x264 picks types
                    out.mux(ost.encode(f))
                    n += 1
            except av.error.FFmpegError as e:
                if n == 0:
                    raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None
                raise ValueError(f"truncated: decoding failed after {n} frames ({type(e).__name__}: {e})") from None
            if ost is None:
                raise ValueError("undecodable: no frames")
            out.mux(ost.encode())
    if expected and n + max(2, expected // 50) <= expected:  # a container's count/duration may be off by a frame
        raise ValueError(f"truncated: {n} frames decodable of {expected} listed")
    return n


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str, frames: int) -> None:
    """The training reader opens ``path``, counts the source's frames (within 1) and decodes first/middle/last;
    raises ``ValueError("output check failed: ...")`` otherwise."""
    try:
        with open_video(path, "pyav") as r:
            n = len(r)
            if abs(n - frames) <= 1:
                r.get_batch(sorted({0, n // 2, n - 1}))
    except Exception as e:
        raise ValueError(f"output check failed: {type(e).__name__}: {e}") from None
    if abs(n - frames) > 1:
        raise ValueError(f"output check failed: {n} frames, the source decodes to {frames}")


def convert(src: str, dst: str, short_side: int, gop: int, crf: int, preset: str) -> Tuple[str | None, int]:
    """Write the prepared copy of ``src`` to ``dst`` atomically; returns ``(error or None, frames)``."""
    if not os.path.exists(src):
        return "missing: file not found", 0
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        n = encode(src, tmp, short_side, gop, crf, preset)
        verify(tmp, n)
        _fsync(tmp)
        os.replace(tmp, dst)
        _fsync(os.path.dirname(dst))
        return None, n
    except ValueError as e:
        return str(e), 0
    except Exception as e:  # anything else from FFmpeg or the file system: report it, keep going
        return f"failed: {type(e).__name__}: {e}", 0
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
