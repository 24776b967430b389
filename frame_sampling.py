"""Temporal sampling: which frames of a video a clip takes (VideoMAE semantics).

Every function returns a list of frame indices in ``[0, length)``. ``dense_*`` (Kinetics/UCF/HMDB) take frames
``sampling_rate`` apart; ``segment_*`` (SSv2 / ``--sparse_sample``, TSN) take one frame per equal segment. Short
videos clamp to the last frame as VideoMAE does. Random choices come from ``rng`` (the ``random`` module, seeded
per item by the datasets, unless given).
"""
from __future__ import annotations

import random
from typing import List

import numpy as np


def pretrain_indices(length: int, num_frames: int, sampling_rate: int, rng: random.Random = random) -> List[int]:
    """``num_frames`` frames ``sampling_rate`` apart from a random start; clamped at the end if short."""
    span = num_frames * sampling_rate
    n_starts = length - span + 1
    start = rng.randrange(n_starts) if n_starts > 0 else 0
    return [min(start + k * sampling_rate, length - 1) for k in range(num_frames)]


def _dense_window(length: int, num_frames: int, sampling_rate: int, end: int | None) -> List[int]:
    span = num_frames * sampling_rate
    if length <= span or end is None:
        n = min(length // sampling_rate, num_frames)
        idx = np.linspace(0, length, num=n) if n > 0 else np.zeros(0)
        idx = np.concatenate([idx, np.full(num_frames - n, length)])
        return np.clip(idx, 0, length - 1).astype(np.int64).tolist()
    start = end - span
    idx = np.linspace(start, end, num=num_frames)
    return np.clip(idx, start, end - 1).astype(np.int64).tolist()


def dense_train_indices(length: int, num_frames: int, sampling_rate: int,
                        rng: random.Random = random) -> List[int]:
    """Kinetics fine-tuning: ``num_frames`` points spread over a random window of ``num_frames*rate`` frames."""
    span = num_frames * sampling_rate
    end = rng.randrange(span, length) if length > span else None
    return _dense_window(length, num_frames, sampling_rate, end)


def dense_center_indices(length: int, num_frames: int, sampling_rate: int) -> List[int]:
    """Validation: the same window as training, centred in the video (deterministic)."""
    span = num_frames * sampling_rate
    end = (length - span) // 2 + span if length > span else None
    return _dense_window(length, num_frames, sampling_rate, end)


def dense_test_indices(length: int, num_frames: int, sampling_rate: int, seg_idx: int,
                       num_segs: int) -> List[int]:
    """Test view ``seg_idx`` of ``num_segs``: consecutive frames at stride ``sampling_rate`` starting at a
    uniformly spaced position (``num_segs == 1``: the centre)."""
    allf = list(range(0, length, sampling_rate))
    allf += [allf[-1]] * max(0, num_frames - len(allf))
    room = len(allf) - num_frames
    # VideoMAE's int(chunk_nb * temporal_step): the step is rounded first (8 views of 305 frames at stride 4, view 7:
    # 7 * (61 / 7) = 60.99..., frame 240, where 7 * 61 / 7 = 61 gives frame 244)
    start = int(seg_idx * (room / (num_segs - 1))) if num_segs > 1 else room // 2
    return allf[start:start + num_frames]


def segment_train_indices(length: int, num_segments: int, rng: random.Random = random) -> List[int]:
    """SSv2 / TSN: one random frame in each of ``num_segments`` equal segments."""
    avg = length // num_segments
    if avg > 0:
        return [k * avg + rng.randrange(avg) for k in range(num_segments)]
    # shorter than num_segments: spread evenly, repeating frames in order
    return [int(k * length / num_segments) for k in range(num_segments)]


def segment_center_indices(length: int, num_segments: int) -> List[int]:
    tick = length / num_segments
    return [min(int(tick / 2 + tick * k), length - 1) for k in range(num_segments)]


def segment_test_indices(length: int, num_segments: int, seg_idx: int, num_segs: int) -> List[int]:
    """Test view ``seg_idx``: frames at offset ``seg_idx * tick / num_segs`` in each segment (VideoMAE);
    a single view uses segment centres."""
    if num_segs <= 1:
        return segment_center_indices(length, num_segments)
    tick = length / num_segments
    return [min(int(tick * k + seg_idx * tick / num_segs), length - 1) for k in range(num_segments)]
