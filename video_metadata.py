"""What a video container declares without decoding: its duration and the frame count that implies for the
frames actually indexed (truncation is judged by times, so variable frame rates and edit lists count right), and
the display rotation a player would apply. Used by ``video_io``'s readers, evaluation's truncation check, the
dataset checker and the re-encoder."""
from __future__ import annotations

import os


def display_rotation(path: str) -> int:
    """Degrees (counter-clockwise, in (-180, 180], as ffprobe reports them) a player would rotate ``path``'s frames
    by (a phone video's display matrix); 0 if none or unknown.

    Neither backend applies it: frames come out as stored, so such a video trains sideways; the checker warns.
    Read from the first decoded frame (``VideoFrame.rotation``, feature-detected), else the old ``rotate`` tag."""
    if os.path.isdir(path):
        return 0
    try:
        import av

        with av.open(path) as c:
            s = c.streams.video[0]
            frame = next(c.decode(s), None)
            rot = getattr(frame, "rotation", None)
            if rot is None:  # FFmpeg < 5's tag is the clockwise angle ("rotate: 90" = display matrix -90)
                rot = -int(float(s.metadata.get("rotate", 0)))
            rot = int(round(rot)) % 360
            return rot - 360 if rot > 180 else rot
    except Exception:  # no PyAV, or unreadable: decoding reports the file itself
        return 0


def declared_seconds(container, stream) -> float | None:
    """Seconds of video the container declares for ``stream``, without decoding, or None if it declares none.

    The stream's own duration (mp4: its edit list's length), else Matroska's per-track ``DURATION`` tag, else the
    file's duration only when the video is the file's only stream (an audio track may be longer)."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if tag:  # "HH:MM:SS.nnnnnnnnn"
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def frames_span(first: float, before_last: float, last: float, n: int, fps: float,
                last_duration: float = 0.0) -> float:
    """Seconds covered by ``n`` frames presented at ``first`` ... ``before_last``, ``last`` (sorted): up to the end
    of the last one. Its duration is ``last_duration`` when the container gives one (a last frame held for
    seconds, as recorders write, would otherwise read as a cut-off file), else the last gap (right for variable
    frame rates too); a single frame lasts ``1 / fps`` (0 without a rate)."""
    if last_duration > 0:
        return last - first + last_duration
    if n > 1:
        return last - first + max(last - before_last, 0.0)
    return 1.0 / fps if fps else 0.0


def declared_frames_in_file(path: str, n: int, span: float) -> int:
    """``declared_frames`` for a file not already open with PyAV (the decord reader's); ``n`` if its header cannot
    be read, or without PyAV (decoding then reports the file itself)."""
    try:
        import av

        with av.open(path) as c:
            return declared_frames(c, c.streams.video[0], n, span)
    except Exception:
        return n


def declared_frames(container, stream, n: int, span: float) -> int:
    """Frames an open PyAV ``container`` declares for its video ``stream`` of which ``n`` frames covering ``span``
    seconds (``frames_span``) were indexed or decoded: ``n`` when they reach the declared duration, else the
    count at their own average rate.

    Times, not counts: a demuxer indexes only the packets it finds, so a file cut short whose header keeps the full
    duration (e.g. a .webm) opens as a shorter, valid video; but the count a duration implies at the *average*
    rate is wrong for variable-frame-rate files, and an mp4's sample count includes edit-list-discarded frames.
    Slack: two frames or 2 % of the duration, for rounding and muxers' last-frame durations."""
    declared = declared_seconds(container, stream)
    if not declared or n <= 0 or span <= 0:
        return n
    if span >= declared - max(2 * span / n, 0.02 * declared):
        return n
    return max(n + 1, round(declared * n / span))
