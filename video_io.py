"""Video decoding backends: PyAV and decord; ``auto`` (the default) picks PyAV when it is installed.

Both backends decode only the frames a clip needs and return identical ``uint8 [T, H, W, 3]`` RGB arrays for
identical frame indices on even frame sizes of 8-bit video (tested on H.264 .mp4 and VP9 .webm; odd sizes and
10-bit video convert differently, by up to tens of grey levels). decord is wrong where PyAV is exact: mp4 edit
lists that cut leading frames, AVI (MPEG-4 Part 2) with B-frames, open-GOP H.264 (DATASET.md, section 3).

Frame numbering is the same for both: frame ``i`` is the ``i``-th frame in presentation (pts) order, counted over
the packets of the first video stream. decord builds this table itself. For PyAV it comes from an mp4's sample table
when the stream is constant-frame-rate (PyAV >= 17 exposes it; no pass over the file; checked at both ends and at
decode time, rebuilt if wrong), otherwise from one demux pass (no decoding); ``pyav_index``. PyAV then seeks to the
keyframe before the first needed frame and decodes forward only as far as the last needed frame, seeking again only
when a later keyframe lets us skip work; frames we do not need are decoded with ``skip_frame=NONREF`` (unreferenced
B-frames are dropped without changing any other frame). ``get_batch(indices, region)`` returns only a region of each
frame; PyAV then converts only that region from YUV, with exactly the same pixels (``pyav_rgb``).

A folder instead of a file is a video stored as frame images (``frame_folders``, VideoMAE V2's raw frames).

Every failure (missing file, unreadable container, no video stream, truncated data, index out of range) is
raised as :class:`VideoDecodeError` so that callers can catch one exception type.

Works with PyAV 12 to 19 (tested on each): arguments that newer versions added or dropped are feature-detected.

Decoders use one thread: DataLoader workers provide the parallelism, and decord with ``num_threads > 1`` is
known to fail on VP9 webm. Readers are opened per item and closed right away (no handle is shared across
workers, nothing is constructed before ``fork``).
"""
from __future__ import annotations

import bisect
import os
from typing import Sequence, Tuple

import numpy as np

from pyav_index import container_index, demux_index
from pyav_rgb import frame_to_rgb
from video_metadata import declared_frames, declared_frames_in_file, frames_span

BACKENDS = ("auto", "decord", "pyav")
# Every program's --video_backend default (training, checker, visualisation): check with what you train with.
DEFAULT_BACKEND = "auto"
FROM_FILE_START = -1  # _PyAVReader._seek target: the first byte of the file, not a frame
Region = Tuple[int, int, int, int]  # (top, left, height, width) in frame pixels


def resolve_backend(backend: str) -> str:
    """The backend ``backend`` names: ``auto`` is PyAV when importable (exact frames, region decoding, the faster
    one on every video measured in DATASET.md), else decord."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}, expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    import importlib.util

    return "pyav" if importlib.util.find_spec("av") is not None else "decord"


class VideoDecodeError(RuntimeError):
    """A video could not be opened or the requested frames could not be decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")


class _DecordReader:
    def __init__(self, path: str):
        _check_file(path)
        import decord

        self.path = path
        try:
            self._vr = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
            self._len = len(self._vr)
        except Exception as e:  # decord raises DECORDError / RuntimeError subclasses
            raise VideoDecodeError(path, f"cannot open with decord ({type(e).__name__}: {e})") from None
        if self._len <= 0:
            raise VideoDecodeError(path, "no frames")

    def __len__(self) -> int:
        return self._len

    def fps(self) -> float:
        try:
            return float(self._vr.get_avg_fps())
        except Exception:
            return 0.0

    def frame_size(self) -> tuple[int, int]:
        return self.get_batch([0]).shape[1:3]  # decord tells the size only with a frame; the first is the cheapest

    def get_batch(self, indices: Sequence[int], region: Region | None = None) -> np.ndarray:
        idx = check_indices(self.path, indices, self._len)
        try:
            frames = self._vr.get_batch(idx).asnumpy()
        except Exception as e:
            raise VideoDecodeError(self.path, f"decord failed to decode frames ({type(e).__name__}: {e})") from None
        if frames.shape[0] != len(idx):
            raise VideoDecodeError(self.path, f"decord returned {frames.shape[0]} frames, expected {len(idx)}")
        if region is not None:
            top, left, h, w = check_region(self.path, region, frames.shape[1], frames.shape[2])
            frames = frames[:, top:top + h, left:left + w]
        return frames

    def declared_frames(self) -> int:
        n = self._len
        try:
            t = [self._vr.get_frame_timestamp(i) for i in (0, max(n - 2, 0), n - 1)]  # [start, end] seconds
        except Exception:
            return n
        return declared_frames_in_file(self.path, n, frames_span(*(x[0] for x in t), n, self.fps(),
                                                                 float(t[2][1] - t[2][0])))

    def close(self) -> None:
        self._vr = None


class _PyAVReader:
    def __init__(self, path: str):
        _check_file(path)
        import av

        self.path = path
        try:
            self._container = av.open(path, options=_probe_options(av, path))
            if not self._container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = 1
            self._from_container = self._index_from_container()
            if not self._from_container:
                self._index_by_demux()
        except VideoDecodeError:
            self.close()
            raise
        except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
            self.close()
            raise VideoDecodeError(path, f"cannot open with PyAV ({type(e).__name__}: {e})") from None

    def _set_index(self, pts: list[int], keyframes: list[int], last_duration: int = 0) -> None:
        self._pts, self._last_duration = pts, last_duration
        self._pts_to_idx = {p: i for i, p in enumerate(pts)}
        self._keyframes = sorted(set(keyframes) | {0})

    def _index_by_demux(self) -> None:
        index = demux_index(self._container, self._stream)
        if index is None:
            raise VideoDecodeError(self.path, "no frames")
        self._set_index(*index)

    def _index_from_container(self) -> bool:
        index = container_index(self._container, self._stream)
        if index is not None:
            self._set_index(*index)
        return index is not None

    def __len__(self) -> int:
        return len(self._pts)

    def fps(self) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return float(rate) if rate else 0.0

    def declared_frames(self) -> int:
        p, tb = self._pts, self._stream.time_base
        span = frames_span(*(float(x * tb) for x in (p[0], p[max(len(p) - 2, 0)], p[-1])), len(p), self.fps(),
                           float(self._last_duration * tb))
        return declared_frames(self._container, self._stream, len(p), span)

    def _seek(self, frame_idx: int) -> None:
        """Seek to the keyframe at or before ``frame_idx``; frame 0 to the stream's start, ``FROM_FILE_START`` to
        the first byte (for containers whose seek lands past frame 0: AVI with B-frames, MPEG-TS/PS)."""
        if frame_idx == FROM_FILE_START:
            self._container.seek(0, backward=True, any_frame=True)
            return
        start = self._stream.start_time  # may be 0 while the first frame's pts is 1 (AVI with B-frames)
        ts = self._pts[frame_idx] if frame_idx > 0 else (start if start is not None else self._pts[0])
        self._container.seek(ts, stream=self._stream, backward=True, any_frame=False)

    def frame_size(self) -> tuple[int, int]:
        cc = self._stream.codec_context
        return (cc.height, cc.width) if cc.height and cc.width else self.get_batch([0]).shape[1:3]

    def get_batch(self, indices: Sequence[int], region: Region | None = None) -> np.ndarray:
        idx = check_indices(self.path, indices, len(self))
        if region is not None:
            region = check_region(self.path, region, *self.frame_size())
        targets = sorted(set(idx))
        slots: dict[int, list[int]] = {}
        for k, i in enumerate(idx):
            slots.setdefault(i, []).append(k)
        out: list[np.ndarray] = []  # the [len(idx), H, W, 3] result, allocated at the first decoded frame
        got: set[int] = set()

        def store(t: int, frame) -> None:
            view = self._to_rgb(frame, region)
            if not out:
                out.append(np.empty((len(idx), *view.shape), np.uint8))
            elif view.shape != out[0].shape[1:]:
                raise VideoDecodeError(self.path, f"frame size changed within the clip: {view.shape[:2]} after "
                                                  f"{out[0].shape[1:3]}")
            for k in slots[t]:
                out[0][k] = view
            got.add(t)

        try:
            self._decode_targets(targets, store)
            if self._from_container and len(got) < len(targets):
                # The stream is not on the uniform grid the container index assumed: index it the slow way.
                self._from_container = False
                self._container.seek(0)
                self._index_by_demux()
                return self.get_batch(indices, region)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.path, f"PyAV failed to decode frames ({type(e).__name__}: {e})") from None
        missing = [t for t in targets if t not in got]
        if missing:
            raise VideoDecodeError(self.path, f"truncated: frames {missing[:5]} could not be decoded")
        return out[0]

    def _to_rgb(self, frame, region: Region | None) -> np.ndarray:
        """``pyav_rgb.frame_to_rgb``, once the region is known to fit the decoded frame."""
        if region is not None and (region[0] + region[2] > frame.height or region[1] + region[3] > frame.width):
            raise VideoDecodeError(self.path, f"decoded frames are {frame.height}x{frame.width}, not "
                                              f"{self.frame_size()} as the stream says")
        return frame_to_rgb(frame, region)

    def _frames_from(self, wanted: set):
        """Decode forward from the current position, yielding ``(index, frame)``.

        Packets of frames we do not need are decoded with ``skip_frame=NONREF``: the decoder drops them if no
        other frame references them (e.g. most H.264 B-frames), which cannot change any frame we return.
        """
        cc = self._stream.codec_context
        skip = cc.skip_frame = "DEFAULT"
        for pkt in self._container.demux(self._stream):
            i = self._pts_to_idx.get(pkt.pts) if pkt.size else None
            want = "DEFAULT" if i is None or i in wanted else "NONREF"
            if want != skip:  # PyAV's setter is not free; most packets keep the previous setting
                skip = cc.skip_frame = want
            for frame in cc.decode(pkt if pkt.size else None):
                j = self._pts_to_idx.get(frame.pts)
                if j is not None:
                    yield j, frame

    def _decode_targets(self, targets: list[int], store) -> None:
        ti = 0
        fallback_kf = None
        wanted = set(targets)
        while ti < len(targets):
            t = targets[ti]
            kf = fallback_kf if fallback_kf is not None else self._keyframe_before(t)
            fallback_kf = None
            self._seek(kf)
            first, restart = True, False
            for i, frame in self._frames_from(wanted):
                if first:
                    first = False
                    if i > t and kf != FROM_FILE_START:
                        # The demuxer overshot: fall back to the previous keyframe, then the file's first byte.
                        fallback_kf, restart = self._before(kf), True
                        break
                if i < t:
                    continue
                if i > t:
                    break  # frame t never came out of the decoder (corrupt data): reported as missing
                store(t, frame)
                ti += 1
                if ti == len(targets):
                    return
                t = targets[ti]
                if self._keyframe_before(t) > i + 1:
                    # A keyframe lies between here and the next target: seeking skips decoding.
                    restart = True
                    break
            if first and kf != FROM_FILE_START:  # the seek gave no frame at all (it landed at the end)
                fallback_kf, restart = self._before(kf), True
            if not restart:
                return

    def _keyframe_before(self, t: int) -> int:
        return self._keyframes[bisect.bisect_right(self._keyframes, t) - 1]

    def _before(self, kf: int) -> int:
        """The keyframe before keyframe ``kf``; before the first, the file's first byte."""
        return self._keyframes[bisect.bisect_left(self._keyframes, kf) - 1] if kf > 0 else FROM_FILE_START

    def close(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
            self._container = None


def _probe_options(av, path: str) -> dict[str, str] | None:
    """Options for ``av.open`` that stop FFmpeg's open-time probe from decoding mp4/mov frames.

    On open FFmpeg probes each stream by decoding its first frames, to fill in parameters that an mp4's sample
    description already holds; that probe decoder is not the one we decode with, so it is told to discard
    everything (0.4 ms per open on fast-decode H.264, 2.5 ms with CABAC). ``options`` reach every stream's probe
    decoder on PyAV 12-19 (the decoder we use starts with its own, empty options); PyAV 19 removed the per-stream
    ``stream_options``. The probe then leaves the pixel format unset and FFmpeg warns about it once per open, so
    the skip is only used while FFmpeg's log is off or quieter than warnings (PyAV >= 13 default; PyAV 12 logs).
    """
    if os.path.splitext(path)[1].lower() not in (".mp4", ".m4v", ".mov"):
        return None
    level = av.logging.get_level()
    if level is not None and level >= av.logging.WARNING:
        return None
    return {"skip_frame": "all"}


def check_region(path: str, region: Region, height: int, width: int) -> Region:
    """``region`` as ints; ``ValueError`` (a caller's bug, not the video's) if it does not fit the frame."""
    top, left, h, w = (int(v) for v in region)
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > height or left + w > width:
        raise ValueError(f"{path}: region (top, left, h, w)={region} does not fit a {height}x{width} frame")
    return top, left, h, w


def check_indices(path: str, indices: Sequence[int], n: int) -> list[int]:
    """``indices`` as ints; ``VideoDecodeError`` if one is outside a video of ``n`` frames (e.g. a short one)."""
    idx = [int(i) for i in indices]
    if not idx:
        raise VideoDecodeError(path, "no frame indices requested")
    bad = [i for i in idx if i < 0 or i >= n]
    if bad:
        raise VideoDecodeError(path, f"frame indices {bad[:5]} out of range for a video of {n} frames")
    return idx


class VideoReader:
    """A video opened with one backend: ``len(r)``, ``r.frame_size()``, ``r.fps()``, ``r.get_batch(indices,
    region)``, ``r.close()``. A folder is a video stored as frame images (``frame_folders``) whatever the backend.

    Usable as a context manager; open it inside ``__getitem__`` and close it before returning.
    """

    def __init__(self, path: str, backend: str = DEFAULT_BACKEND):
        backend = resolve_backend(backend)
        self.path = path
        if os.path.isdir(path):
            from frame_folders import FrameFolderReader  # imports video_io: not at module level

            self.backend, self._impl = "frames", FrameFolderReader(path)
        else:
            self.backend = backend
            self._impl = _DecordReader(path) if backend == "decord" else _PyAVReader(path)

    def __len__(self) -> int:
        return len(self._impl)

    def fps(self) -> float:
        return self._impl.fps()

    def frame_size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames: from the stream header (PyAV), else by decoding frame 0 (decord).

        With ``len(r)`` this is all a caller needs to plan a clip (frame indices, crop region) before
        ``get_batch``."""
        return self._impl.frame_size()

    def get_batch(self, indices: Sequence[int], region: Region | None = None) -> np.ndarray:
        """Return ``uint8 [len(indices), H, W, 3]`` RGB frames; indices may repeat and be in any order.

        ``region=(top, left, h, w)`` returns only that part of every frame, exactly ``frames[:, top:top+h,
        left:left+w]``; PyAV then converts only that part from YUV (cheaper), decord crops after converting.
        """
        return self._impl.get_batch(indices, region)

    def declared_frames(self) -> int:
        """Frames the container declares (``video_metadata.declared_frames``): ``len(r)`` unless the indexed frames end
        clearly before the declared duration, i.e. the file was cut short (a frame folder declares nothing)."""
        return self._impl.declared_frames() if self.backend != "frames" else len(self)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_video(path: str, backend: str = DEFAULT_BACKEND) -> VideoReader:
    """Open ``path`` with ``backend`` ('auto', 'decord' or 'pyav'); raises VideoDecodeError if it cannot be opened."""
    return VideoReader(path, backend)


def num_frames(path: str, backend: str = DEFAULT_BACKEND) -> int:
    """Number of frames of the first video stream (same count for both backends)."""
    with open_video(path, backend) as r:
        return len(r)


def read_frames(path: str, indices: Sequence[int], backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """Decode only the frames at ``indices``: ``uint8 [len(indices), H, W, 3]`` RGB."""
    with open_video(path, backend) as r:
        return r.get_batch(indices)
