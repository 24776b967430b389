"""One video's prepared copy, for tools/prepare_videos.py (runs in its worker processes).

Decodes every frame of the source and encodes it with libx264 (``tune=fastdecode``, a keyframe at least every
``gop`` frames, the short side scaled down, constant frame rate, no audio) into a temporary file next to the
output, or writes it as JPEG images into a temporary folder (``frame_folders``); the output is checked with the
training reader, fsynced and renamed into place: an existing output is a finished one.
"""
from __future__ import annotations

import os
import shutil
from fractions import Fraction
from typing import Tuple

from video_io import open_video
from video_metadata import declared_frames, frames_span


def output_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """Scale so the short side is ``short_side`` (never up; 0 keeps the size); both sides even for yuv420p."""
    s = min(width, height)
    if short_side and s > short_side:
        width, height = round(width * short_side / s), round(height * short_side / s)
    return max(2, width // 2 * 2), max(2, height // 2 * 2)


def _source_frames(src: str):
    """``(frames, rate)``: every decoded frame of ``src`` in order, at its average frame rate. Bad sources raise
    ``ValueError("undecodable: ...")`` / ``"truncated: ..."`` (the latter once the frames run out)."""
    import av

    try:
        inp = av.open(src)
    except Exception as e:
        raise ValueError(f"undecodable: cannot open ({type(e).__name__}: {e})") from None
    if not inp.streams.video:
        inp.close()
        raise ValueError("undecodable: no video stream")
    ist = inp.streams.video[0]
    ist.codec_context.thread_count = 1  # the processes are the parallelism
    # NTSC rates (30000/1001) stay exact; a variable-rate source's odd average gets a nearby simple rate
    rate = Fraction(ist.average_rate or ist.guessed_rate or 25).limit_denominator(1001)

    def frames():
        n, times = 0, [0.0, 0.0, 0.0]  # presentation times of the first, second-last and last decoded frame
        last_duration = 0.0  # the last frame's own duration, when the container gives one (PyAV >= 14 tells)
        with inp:
            try:
                for frame in inp.decode(ist):
                    t = float(frame.time) if frame.time is not None else n / float(rate)
                    times[1:] = times[2], t
                    if n == 0:
                        times = [t, t, t]
                    last_duration = float((getattr(frame, "duration", None) or 0) * (frame.time_base or 0))
                    yield frame
                    n += 1
            except av.error.FFmpegError as e:
                if n == 0:
                    raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None
                raise ValueError(f"truncated: decoding failed after {n} frames ({type(e).__name__}: {e})") \
                    from None
            if n == 0:
                raise ValueError("undecodable: no frames")
            expected = declared_frames(inp, ist, n, frames_span(*times, n, float(rate), last_duration))
        if expected > n:
            raise ValueError(f"truncated: {n} frames decodable of {expected} listed")

    return frames(), rate


def _interpolation(out_width: int, in_width: int):
    from av.video.reformatter import Interpolation

    return Interpolation.AREA if out_width < in_width else Interpolation.BICUBIC


def encode(src: str, tmp: str, short_side: int, gop: int, crf: int, preset: str) -> int:
    """Decode every frame of ``src`` in order and encode it to ``tmp``; returns the number of frames."""
    import av
    from av.video.frame import PictureType
    from av.video.reformatter import VideoReformatter

    frames, rate = _source_frames(src)
    reformatter = VideoReformatter()
    with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as out:
        ost = None
        n = 0
        for frame in frames:
            if ost is None:
                w, h = output_size(frame.width, frame.height, short_side)
                interp = _interpolation(w, frame.width)
                ost = out.add_stream("libx264", rate=rate, options={
                    "crf": str(crf), "preset": preset, "tune": "fastdecode", "threads": "1"})
                ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
                ost.codec_context.gop_size = gop
                # The YUV values keep the source's matrix and range (BT.709, full-range yuvj...): say so, or
                # readers take them for BT.601 limited range and shift the colours (by 6-7 grey levels on average)
                ost.codec_context.colorspace, ost.codec_context.color_range = frame.colorspace, frame.color_range
            f = reformatter.reformat(frame, w, h, "yuv420p", interpolation=interp)
            f.pts, f.time_base, f.pict_type = n, 1 / rate, PictureType.NONE  # constant rate; x264 picks types
            out.mux(ost.encode(f))
            n += 1
        out.mux(ost.encode())
    return n


def write_frames(src: str, tmp: str, short_side: int, quality: int) -> int:
    """Decode every frame of ``src`` and write it as ``tmp/img_00001.jpg``, ... (VideoMAE V2's names, numbered
    from 1), each file fsynced; returns the number of frames."""
    from av.video.reformatter import VideoReformatter

    frames, _ = _source_frames(src)
    reformatter = VideoReformatter()
    os.makedirs(tmp)
    n = 0
    for frame in frames:
        if n == 0:
            w, h = output_size(frame.width, frame.height, short_side)
            interp = _interpolation(w, frame.width)
        image = reformatter.reformat(frame, w, h, "rgb24", interpolation=interp).to_image()
        n += 1
        with open(os.path.join(tmp, f"img_{n:05d}.jpg"), "wb") as f:
            image.save(f, format="JPEG", quality=quality)
            f.flush()
            os.fsync(f.fileno())
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


def convert(src: str, dst: str, short_side: int, gop: int, crf: int, preset: str,
            jpeg_quality: int | None = None) -> Tuple[str | None, int]:
    """Write the prepared copy of ``src`` to ``dst`` atomically, a video, or a folder of JPEG frames when
    ``jpeg_quality`` is given; returns ``(error or None, frames)``."""
    if not os.path.exists(src):
        return "missing: file not found", 0
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if jpeg_quality is None:
            n = encode(src, tmp, short_side, gop, crf, preset)
        else:
            n = write_frames(src, tmp, short_side, jpeg_quality)
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
        remove_output(tmp)


def remove_output(path: str) -> None:
    """Remove a (temporary) output, a file or a folder of frames, if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
