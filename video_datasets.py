"""The torch Datasets: a list's videos decoded into pre-training, fine-tuning and multi-view test items.

They read a :class:`datasets.VideoList` (``datasets.build_*`` make both from the flags), take frames from
``frame_sampling`` and transform them with ``video_transforms``. Items:

* ``PretrainVideoDataset``: a ``video_transforms.CropItem``, the uint8 region of the sampled frames that holds the
  item's ``num_sample`` crops, and the crops (with flips); ``datasets.multiple_samples_collate`` makes a
  ``CropBatch`` and ``video_transforms.resize_crops`` gives the ``[B*K, 3, T, H, W]`` clips in ``[0, 1]`` on the
  training device.
* ``VideoClsDataset``:
    - ``mode='train'``: ``(clip, label, index, {})``; with ``num_sample=K>1``:
      ``([K clips], [K labels], [K indices], {})``, flattened by ``datasets.multiple_samples_collate``.
    - ``mode='validation'``: ``(clip, label, video_id, info)``, the centre clip and centre crop (deterministic).
    - ``mode='test'``: ``(clip, label, video_id, segment_idx, crop_idx, info)``; the dataset has
      ``len(list) * test_num_segment * test_num_crop`` items, ordered video-major, for merging per video.
  ``video_id`` is the path as written in the list, made unique (``#L<line>``, then ``#`` as needed) when it was
  already used (``datasets.read_list_file``). ``info`` is
  ``{"valid": bool, "path": path as written, "line": list line, "reason": "" or why it could not be decoded}``.

Broken videos (missing / undecodable / truncated, also when the decodable frames fall short of the length the
container declares, e.g. a cut-off .webm / too short): during training they are logged once per path, counted in a
shared-memory counter visible from the main process (``dataset.num_broken``,
``datasets.get_broken_count(dataset)``), and replaced by another random item; after ``max_retries`` consecutive
failures, or when more than ``max_broken_ratio`` of the loads (at least 20 failures) failed, a UserError stops the
run. Validation/test never substitute anything: a broken video gives an item with ``info["valid"] = False`` and the
reason (logged once as excluded); its clip is a zero placeholder only so that the batch collates, and ``evaluation``
leaves it out of every metric and names it (``unevaluated``).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Sequence, Tuple, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from cli import UserError
from frame_sampling import (dense_center_indices, dense_test_indices, dense_train_indices, pretrain_indices,
                            segment_center_indices, segment_test_indices, segment_train_indices)
from video_io import BACKENDS, Region, VideoDecodeError, VideoReader, open_video, resolve_backend
from video_transforms import Crop, CropItem, EvalTransform, PretrainTransform, TrainTransform

if TYPE_CHECKING:
    from datasets import VideoList

logger = logging.getLogger(__name__)
T = TypeVar("T")


class BrokenVideoCounter:
    """Counts loads and broken videos across DataLoader workers.

    A shared-memory int64 tensor with one slot per process (main = slot 0, worker ``k`` = slot ``k + 1``), so
    workers never race on the same cell; it pickles (fork and spawn) and the main process sums the slots.
    """

    MAX_SLOTS = 257

    def __init__(self):
        self.counts = torch.zeros(2, self.MAX_SLOTS, dtype=torch.int64).share_memory_()
        self._logged: set = set()

    def _slot(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (self.MAX_SLOTS - 1)

    def record_ok(self) -> None:
        self.counts[1, self._slot()] += 1

    def record_broken(self, path: str, reason: str, action: str = "skipped") -> None:
        s = self._slot()
        self.counts[0, s] += 1
        self.counts[1, s] += 1
        if path not in self._logged:
            self._logged.add(path)
            logger.warning("broken video %s: %s", action, reason)

    @property
    def broken(self) -> int:
        return int(self.counts[0].sum())

    @property
    def loads(self) -> int:
        return int(self.counts[1].sum())

    def reset(self) -> None:
        self.counts.zero_()

    def __getstate__(self):
        return {"counts": self.counts}

    def __setstate__(self, state):
        self.counts = state["counts"]
        self._logged = set()


class _VideoDatasetBase(Dataset):
    """Decoding, per-item seeding and the broken-video policy shared by both datasets (``max_retries`` and
    ``max_broken_ratio`` only matter where items are replaced: training)."""

    def __init__(self, videos: VideoList, backend: str, max_retries: int | None, max_broken_ratio: float | None,
                 min_frames: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"unknown --video_backend {backend!r}, expected one of {BACKENDS}")
        self.videos = videos
        self.backend = resolve_backend(backend)
        self.max_retries = max_retries
        self.max_broken_ratio = max_broken_ratio
        self.min_frames = min_frames
        self.broken_counter = BrokenVideoCounter()
        self.training = True  # items are training clips (broken ones replaced); False for validation / test
        self.seed: int | None = None  # set: augmentation is a function of (seed, epoch, index) only
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def fingerprint(self) -> str:
        """What the examples are, for auto-resume (``resume.data_fingerprint``)."""
        return self.videos.fingerprint()

    def _seed_item(self, index: int) -> None:
        """Seed the augmentation RNGs from (seed, epoch, index), so a clip's crop, flip and temporal offset do
        not depend on which worker or process loads it: runs reproduce across worker and GPU counts."""
        if self.seed is not None:
            s = hash((self.seed, int(self._epoch[0]), index)) % (2 ** 32)
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)  # timm's RandomErasing draws its noise from torch

    @property
    def num_broken(self) -> int:
        """Broken videos met so far (all workers)."""
        return self.broken_counter.broken

    def _read(self, vid: int, read: Callable[[VideoReader], T]) -> T:
        """``read(reader)`` on video ``vid``, opened and checked for length and truncation, closed after."""
        path = self.videos.path(vid)
        with open_video(path, self.backend) as r:
            if len(r) < self.min_frames:
                raise VideoDecodeError(path, f"too short: {len(r)} frames < {self.min_frames}")
            short = _short_of_container(r, self.training)
            if short:
                raise VideoDecodeError(path, short)
            return read(r)

    def _decode_with_retry(self, vid: int, index_fn: Callable[[int], List[int]]) -> Tuple[int, np.ndarray]:
        return self._read_with_retry(vid, lambda r: r.get_batch(index_fn(len(r))))

    def _read_with_retry(self, vid: int, read: Callable[[VideoReader], T]) -> Tuple[int, T]:
        """``(vid, read(reader))``; on failure log, count and try other random videos (bounded)."""
        c = self.broken_counter
        last_err = None
        for _ in range(self.max_retries + 1):
            try:
                out = self._read(vid, read)
                c.record_ok()
                return vid, out
            except VideoDecodeError as e:
                last_err = e
                c.record_broken(e.path, str(e))
            except Exception as e:  # never let an unexpected decoder error kill the worker
                last_err = e
                c.record_broken(self.videos.path(vid), f"{self.videos.path(vid)}: {type(e).__name__}: {e}")
            if c.broken >= 20 and c.broken > self.max_broken_ratio * c.loads:
                raise UserError(
                    f"{c.broken} of {c.loads} video loads failed (> max_broken_ratio={self.max_broken_ratio}) "
                    f"in {self.videos.list_path}; last error: {last_err}. "
                    f"Run tools/check_dataset.py on the list.")
            vid = random.randrange(len(self.videos))
        raise UserError(f"{self.max_retries + 1} consecutive videos failed to decode from "
                        f"{self.videos.list_path}; last error: {last_err}. The dataset looks broken: "
                        f"run tools/check_dataset.py on the list.")


@dataclass(frozen=True)
class ClipPlan:
    """What one pre-training item decodes and cuts, fixed before decoding: the frame indices, the region of those
    frames to decode (the box holding every crop) and the crops, in region coordinates."""

    indices: List[int]
    region: Region  # (top, left, height, width) in frame pixels
    crops: List[Crop]  # (top, left, height, width, flip), relative to the region

    @classmethod
    def around(cls, indices: List[int], crops: Sequence[Crop]) -> ClipPlan:
        """The plan for crops given in frame coordinates: the region is their bounding box."""
        top, left = min(c[0] for c in crops), min(c[1] for c in crops)
        region = (top, left, max(c[0] + c[2] for c in crops) - top, max(c[1] + c[3] for c in crops) - left)
        return cls(indices, region, [(t - top, x - left, h, w, f) for t, x, h, w, f in crops])


class PretrainVideoDataset(_VideoDatasetBase):
    """Pre-training items: VideoMAE temporal sampling + ``num_sample`` multi-scale crops (+ flip with ``--flip``).

    Each item is a :class:`video_transforms.CropItem`: the worker plans the clip (:meth:`plan`), decodes only the
    planned frames and the region holding the crops, and returns those uint8 pixels with the crops;
    ``datasets.multiple_samples_collate`` pads them into a :class:`video_transforms.CropBatch` and
    ``video_transforms.resize_crops`` resizes and flips the whole batch on the training device.
    """

    def __init__(self, videos: VideoList, *, num_frames: int, sampling_rate: int, input_size: int, flip: bool,
                 num_sample: int, video_backend: str, max_retries: int, max_broken_ratio: float):
        super().__init__(videos, video_backend, max_retries, max_broken_ratio)
        self.num_frames, self.sampling_rate, self.num_sample = num_frames, sampling_rate, max(1, num_sample)
        self.transform = PretrainTransform(input_size, flip=flip)

    def __len__(self) -> int:
        return len(self.videos)

    def plan(self, length: int, frame_size: Tuple[int, int]) -> ClipPlan:
        """This item's random choices for a video of ``length`` frames of ``frame_size``: the frames first, then
        each clip's crop and flip (VideoMAE's order; the RNGs are seeded per item by ``_seed_item``)."""
        indices = pretrain_indices(length, self.num_frames, self.sampling_rate)
        return ClipPlan.around(indices, [self.transform.draw(*frame_size) for _ in range(self.num_sample)])

    def _read_planned(self, r: VideoReader) -> Tuple[ClipPlan, np.ndarray]:
        plan = self.plan(len(r), r.frame_size())
        return plan, r.get_batch(plan.indices, plan.region)

    def __getitem__(self, index: int) -> CropItem:
        self._seed_item(index)
        _, (plan, pixels) = self._read_with_retry(index, self._read_planned)
        return CropItem(torch.from_numpy(pixels), torch.tensor(plan.crops, dtype=torch.int64), *self.transform.size)


class VideoClsDataset(_VideoDatasetBase):
    """Fine-tuning / evaluation dataset (see the module docstring for item formats).

    The options after ``video_backend`` belong to the training split (augmentation, clips per decode, the
    broken-video policy): ``mode='train'`` needs them all, validation and test do not read them.
    """

    def __init__(self, videos: VideoList, *, mode: str, sampling: str, num_frames: int, sampling_rate: int,
                 num_segments: int, input_size: int, short_side_size: int, test_num_segment: int,
                 test_num_crop: int, video_backend: str, aa: str | None = None, train_interpolation: str | None = None,
                 reprob: float | None = None, remode: str | None = None, recount: int | None = None,
                 flip: bool | None = None, num_sample: int | None = None, max_retries: int | None = None,
                 max_broken_ratio: float | None = None, aa_on_crop: bool = False):
        if mode not in ("train", "validation", "test"):
            raise ValueError(f"mode must be train/validation/test, got {mode!r}")
        if sampling not in ("dense", "segment"):
            raise ValueError(f"sampling must be 'dense' or 'segment', got {sampling!r}")
        if sampling == "dense" and num_segments != 1:
            raise ValueError("num_segments > 1 is only supported with segment sampling (SSV2 / --sparse_sample)")
        train_only = dict(aa=aa, train_interpolation=train_interpolation, reprob=reprob, remode=remode,
                          recount=recount, flip=flip, num_sample=num_sample, max_retries=max_retries,
                          max_broken_ratio=max_broken_ratio)
        missing = [k for k, v in train_only.items() if v is None]
        if mode == "train" and missing:
            raise ValueError(f"mode='train' needs {', '.join(missing)}")
        super().__init__(videos, video_backend, max_retries, max_broken_ratio)
        self.mode, self.sampling, self.training = mode, sampling, mode == "train"
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.clip_frames = num_frames * num_segments if sampling == "segment" else num_frames
        self.input_size, self.short_side_size = input_size, short_side_size
        self.test_num_segment, self.test_num_crop = max(1, test_num_segment), max(1, test_num_crop)
        self.num_sample = max(1, num_sample) if mode == "train" else 1
        if mode == "train":
            self.transform = TrainTransform(input_size, aa, train_interpolation, reprob, remode, recount, flip,
                                            aa_on_crop=aa_on_crop)
        else:
            self.transform = EvalTransform(short_side_size, input_size)
        self._cache: Tuple[Tuple[int, Tuple[int, ...]], np.ndarray] | None = None

    def __len__(self) -> int:
        n = len(self.videos)
        return n * self.test_num_segment * self.test_num_crop if self.mode == "test" else n

    def _train_index_fn(self, n: int) -> List[int]:
        if self.sampling == "segment":
            return segment_train_indices(n, self.clip_frames)
        return dense_train_indices(n, self.num_frames, self.sampling_rate)

    def __getitem__(self, index: int):
        if self.mode == "train":
            self._seed_item(index)
            vid, frames = self._decode_with_retry(index, self._train_index_fn)
            label = self.videos.label(vid)
            if self.num_sample == 1:
                return self.transform(frames), label, vid, {}
            clips = [self.transform(frames) for _ in range(self.num_sample)]
            return clips, [label] * self.num_sample, [vid] * self.num_sample, {}

        if self.mode == "validation":
            vid, seg, crop_idx = index, 0, 0
            if self.sampling == "segment":
                fn = lambda n: segment_center_indices(n, self.clip_frames)  # noqa: E731
            else:
                fn = lambda n: dense_center_indices(n, self.num_frames, self.sampling_rate)  # noqa: E731
            num_crops = 1
        else:
            per_video = self.test_num_segment * self.test_num_crop
            vid, rem = divmod(index, per_video)
            seg, crop_idx = divmod(rem, self.test_num_crop)
            if self.sampling == "segment":
                fn = lambda n: segment_test_indices(n, self.clip_frames, seg, self.test_num_segment)  # noqa: E731
            else:
                fn = lambda n: dense_test_indices(  # noqa: E731
                    n, self.num_frames, self.sampling_rate, seg, self.test_num_segment)
            num_crops = self.test_num_crop
        frames, reason = self._eval_frames(vid, seg, fn)
        if frames is None:  # placeholder so the batch collates; marked invalid, never scored
            clip = torch.zeros(3, self.clip_frames, self.input_size, self.input_size)
        else:
            clip = self.transform(frames, crop_idx, num_crops)
        label, video_id = self.videos.label(vid), self.videos.video_id(vid)
        info = {"valid": frames is not None, "path": self.videos.listed_path(vid), "line": self.videos.line(vid),
                "reason": reason}
        if self.mode == "validation":
            return clip, label, video_id, info
        return clip, label, video_id, seg, crop_idx, info

    def _eval_frames(self, vid: int, seg: int, fn: Callable[[int], List[int]]) -> Tuple[np.ndarray | None, str]:
        """``(frames, "")`` or ``(None, reason)``: evaluation never replaces a video by another one.

        Consecutive test items (crops of one segment) reuse the decoded frames."""
        if self._cache is not None and self._cache[0] == (vid, seg):
            return self._cache[1]
        path = self.videos.path(vid)
        try:
            frames, reason = self._read(vid, lambda r: r.get_batch(fn(len(r)))), ""
            self.broken_counter.record_ok()
        except Exception as e:
            reason = e.reason if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}"
            frames, reason = None, reason[:300]
            self.broken_counter.record_broken(path, f"{path}: {reason}", "excluded from evaluation")
        self._cache = ((vid, seg), (frames, reason))
        return frames, reason


# Containers whose frame index is the sample table: decord reads it and fails on a cut file, so with decord comparing
# with the declared duration adds nothing (and costs a second open, with PyAV). PyAV may index a cut one by demuxing
# what is left (its sample-table index no longer fits), so its readers, whose check is free, always compare.
_INDEXED_CONTAINERS = (".mp4", ".m4v", ".mov")


def _short_of_container(r: VideoReader, training: bool = False) -> str:
    """Why the open video ``r`` is truncated, or "" if it is not (or its container does not say).

    A demuxer indexes only the packets it finds, so a file cut short whose header keeps the full duration (e.g. a
    .webm) opens as a shorter, valid video; evaluating it would score a different clip than the listed video.
    decord readers need a second open with PyAV for it (6-9 ms a .webm item): skipped in ``training``, where a
    shorter video still trains (``--video_backend auto``, PyAV, checks every item for free).
    """
    if r.backend == "decord" and (training or os.path.splitext(r.path)[1].lower() in _INDEXED_CONTAINERS):
        return ""
    n = len(r)
    declared = r.declared_frames()
    return f"truncated: {n} decodable frames, the container declares {declared}" if declared > n else ""
