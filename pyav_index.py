"""Where each frame of a PyAV video stream is: its presentation timestamps in order and which frames are
keyframes, the index ``video_io``'s PyAV reader seeks and decodes by. Two ways to build it: a demux pass (every
file) or, for constant-frame-rate mp4s, the container's own sample table (no pass; checked at both ends)."""
from __future__ import annotations

from typing import Any

import numpy as np

# (pts of every frame in presentation order, keyframe positions, the last frame's own duration or 0), in the
# stream's time base
Index = tuple[list[int], list[int], int]


def demux_index(container: Any, stream: Any) -> Index | None:
    """The index from one demux pass (no decoding): pts of every packet, in presentation order; None if the
    stream has no frames.

    Packets flagged discard (the frames an mp4 edit list cuts from the start, e.g. after a stream-copy trim) are
    decoded only as references and never output, so they are not frames of the video."""
    pts, key, latest, last_duration = [], [], None, 0
    for pkt in container.demux(stream):
        if pkt.pts is None or pkt.size == 0 or _is_discard(pkt):
            continue
        if latest is None or pkt.pts >= latest:  # the last presented so far (in decode order)
            latest, last_duration = pkt.pts, pkt.duration or 0
        pts.append(pkt.pts)
        key.append(bool(pkt.is_keyframe))
    if not pts:
        return None
    order = np.argsort(np.asarray(pts), kind="stable")
    return [pts[i] for i in order], [i for i, j in enumerate(order) if key[j]], last_duration


def container_index(container: Any, stream: Any) -> Index | None:
    """The index from the demuxer's own table (an mp4's sample table, read at open), without a demux pass; None
    when it cannot be trusted (then demux; the container is left at its start).

    Only for constant-frame-rate streams whose table lists every frame: decode timestamps then step by one
    frame duration ``d`` and the presentation timestamps are the same grid from the stream's start time, which
    the first packets and the last keyframe's group must confirm. A keyframe's presentation slot is estimated from
    its decode position (exact for closed GOPs; a later real slot only costs a re-seek). If a decoded frame's
    timestamp is still not on the grid, the reader rebuilds the index by demuxing and decodes again.
    """
    st = stream
    try:
        entries = st.index_entries
        n = len(entries)
    except Exception:
        return None
    if n < 2 or n != st.frames or st.start_time is None:
        return None
    ts, keyframes = np.empty(n, np.int64), []
    for k, e in enumerate(entries):  # one pass: PyAV builds an object per entry
        if e.size <= 0 or e.is_discard:
            return None
        ts[k] = e.timestamp
        if e.is_keyframe:
            keyframes.append(k)
    step = np.diff(ts)
    if step[0] <= 0 or not (step == step[0]).all():
        return None
    d = int(step[0])
    # The grid's origin: the first presented frame is among the first packets (B-frame reordering is short).
    head = []
    for pkt in container.demux(st):
        if pkt.pts is not None and pkt.size:
            head.append(pkt.pts)
        if len(head) == min(n, 16):
            break
    if not head or min(head) != st.start_time or any((p - st.start_time) % d for p in head):
        container.seek(0)  # back to the start for the demux pass
        return None
    # The grid's end: the last frame is presented from the last keyframe's group. A slot left empty earlier (a
    # dropped frame under uniform decode timestamps) pushes it one slot further: every later index would name the
    # previous frame.
    container.seek(int(ts[keyframes[-1]]) if keyframes else 0, stream=st, backward=True)
    tail = [(pkt.pts, pkt.duration or 0) for pkt in container.demux(st) if pkt.pts is not None and pkt.size]
    if not tail or max(tail)[0] != st.start_time + (n - 1) * d:
        container.seek(0)
        return None
    return [st.start_time + k * d for k in range(n)], keyframes, max(tail)[1]


def _is_discard(pkt: Any) -> bool:
    """``Packet.is_discard`` (AV_PKT_FLAG_DISCARD; present on PyAV 12-19, feature-detected all the same)."""
    return bool(getattr(pkt, "is_discard", False))

