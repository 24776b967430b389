"""Video decoding backends: decord (default) and PyAV.

Both backends decode only the frames a clip needs and return identical ``uint8 [T, H, W, 3]`` RGB arrays for
identical frame indices (tested on H.264 .mp4 and VP9 .webm).

Frame numbering is the same for both: frame ``i`` is the ``i``-th frame in presentation (pts) order, counted
over the packets of the first video stream. decord builds this table itself; for PyAV we build it by demuxing
the packets (no decoding, cheap), then seek to the keyframe before the first needed frame and decode forward
only as far as the last needed frame, seeking again only when a later keyframe lets us skip work; frames we do
not need are decoded with ``skip_frame=NONREF`` (unreferenced B-frames are dropped without changing any other
frame). The packet index costs one demux pass over the file (no decoding), as decord's own index does.

Every failure (missing file, unreadable container, no video stream, truncated data, index out of range) is
raised as :class:`VideoDecodeError` so that callers can catch one exception type.

Decoders use one thread: DataLoader workers provide the parallelism, and decord with ``num_threads > 1`` is
known to fail on VP9 webm. Readers are opened per item and closed right away (no handle is shared across
workers, nothing is constructed before ``fork``).
"""
from __future__ import annotations

import bisect
import os
from typing import Sequence

import numpy as np

BACKENDS = ("decord", "pyav")


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

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        idx = _check_indices(self.path, indices, self._len)
        try:
            frames = self._vr.get_batch(idx).asnumpy()
        except Exception as e:
            raise VideoDecodeError(self.path, f"decord failed to decode frames ({type(e).__name__}: {e})") from None
        if frames.shape[0] != len(idx):
            raise VideoDecodeError(self.path, f"decord returned {frames.shape[0]} frames, expected {len(idx)}")
        return frames

    def close(self) -> None:
        self._vr = None


class _PyAVReader:
    def __init__(self, path: str):
        _check_file(path)
        import av
        from av.video.reformatter import VideoReformatter

        self.path = path
        try:
            self._container = av.open(path)
            if not self._container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = 1
            self._rgb = VideoReformatter()
            # Packet index in presentation order: pts of every frame and which ones are keyframes.
            pts, key = [], []
            for pkt in self._container.demux(self._stream):
                if pkt.pts is None or pkt.size == 0:
                    continue
                pts.append(pkt.pts)
                key.append(bool(pkt.is_keyframe))
        except VideoDecodeError:
            self.close()
            raise
        except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
            self.close()
            raise VideoDecodeError(path, f"cannot open with PyAV ({type(e).__name__}: {e})") from None
        if not pts:
            self.close()
            raise VideoDecodeError(path, "no frames")
        order = np.argsort(np.asarray(pts), kind="stable")
        self._pts = [pts[i] for i in order]
        self._pts_to_idx = {p: i for i, p in enumerate(self._pts)}
        self._keyframes = [i for i, j in enumerate(order) if key[j]] or [0]
        if self._keyframes[0] != 0:
            self._keyframes.insert(0, 0)

    def __len__(self) -> int:
        return len(self._pts)

    def fps(self) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return float(rate) if rate else 0.0

    def _seek(self, frame_idx: int) -> None:
        # Seek to the keyframe at or before frame_idx. Frame 0 seeks to the very start of the stream.
        ts = self._pts[frame_idx] if frame_idx > 0 else (self._stream.start_time or self._pts[0])
        self._container.seek(ts, stream=self._stream, backward=True, any_frame=False)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        idx = _check_indices(self.path, indices, len(self))
        targets = sorted(set(idx))
        slots: dict[int, list[int]] = {}
        for k, i in enumerate(idx):
            slots.setdefault(i, []).append(k)
        out: list[np.ndarray] = []  # the [len(idx), H, W, 3] result, allocated at the first decoded frame
        got: set[int] = set()

        def store(t: int, frame) -> None:
            # One persistent swscale context for every frame (a new one per frame costs more than the
            # conversion itself), converted frame copied straight into its slot(s) of the result.
            rgb = self._rgb.reformat(frame, format="rgb24")
            h, w = rgb.height, rgb.width
            plane = rgb.planes[0]
            view = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w * 3].reshape(h, w, 3)
            if not out:
                out.append(np.empty((len(idx), h, w, 3), np.uint8))
            for k in slots[t]:
                out[0][k] = view
            got.add(t)

        try:
            self._decode_targets(targets, store)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.path, f"PyAV failed to decode frames ({type(e).__name__}: {e})") from None
        missing = [t for t in targets if t not in got]
        if missing:
            raise VideoDecodeError(self.path, f"truncated: frames {missing[:5]} could not be decoded")
        return out[0]

    def _frames_from(self, wanted: set):
        """Decode forward from the current position, yielding ``(index, frame)``.

        Packets of frames we do not need are decoded with ``skip_frame=NONREF``: the decoder drops them if no
        other frame references them (e.g. most H.264 B-frames), which cannot change any frame we return.
        """
        cc = self._stream.codec_context
        for pkt in self._container.demux(self._stream):
            i = self._pts_to_idx.get(pkt.pts) if pkt.size else None
            cc.skip_frame = "DEFAULT" if i is None or i in wanted else "NONREF"
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
                    if i > t and kf > 0:
                        # The demuxer overshot: fall back to the previous keyframe (eventually the start).
                        fallback_kf = self._keyframes[max(bisect.bisect_left(self._keyframes, kf) - 1, 0)]
                        restart = True
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
            if not restart:
                return

    def _keyframe_before(self, t: int) -> int:
        return self._keyframes[bisect.bisect_right(self._keyframes, t) - 1]

    def close(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
            self._container = None


def _check_indices(path: str, indices: Sequence[int], n: int) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise VideoDecodeError(path, "no frame indices requested")
    bad = [i for i in idx if i < 0 or i >= n]
    if bad:
        raise VideoDecodeError(path, f"frame indices {bad[:5]} out of range for a video of {n} frames")
    return idx


class VideoReader:
    """A video opened with one backend: ``len(r)``, ``r.fps()``, ``r.get_batch(indices)``, ``r.close()``.

    Usable as a context manager; open it inside ``__getitem__`` and close it before returning.
    """

    def __init__(self, path: str, backend: str = "decord"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}, expected one of {BACKENDS}")
        self.path = path
        self.backend = backend
        self._impl = _DecordReader(path) if backend == "decord" else _PyAVReader(path)

    def __len__(self) -> int:
        return len(self._impl)

    def fps(self) -> float:
        return self._impl.fps()

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Return ``uint8 [len(indices), H, W, 3]`` RGB frames; indices may repeat and be in any order."""
        return self._impl.get_batch(indices)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_video(path: str, backend: str = "decord") -> VideoReader:
    """Open ``path`` with ``backend`` ('decord' or 'pyav'); raises VideoDecodeError if it cannot be opened."""
    return VideoReader(path, backend)


def num_frames(path: str, backend: str = "decord") -> int:
    """Number of frames of the first video stream (same count for both backends)."""
    with open_video(path, backend) as r:
        return len(r)


def read_frames(path: str, indices: Sequence[int], backend: str = "decord") -> np.ndarray:
    """Decode only the frames at ``indices``: ``uint8 [len(indices), H, W, 3]`` RGB."""
    with open_video(path, backend) as r:
        return r.get_batch(indices)
