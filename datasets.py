"""Video datasets for pre-training, fine-tuning and multi-view testing (VideoMAE-compatible lists and sampling).

List files (``read_list_file``): one video per line, ``path label`` (space separated, VideoMAE) or
``path,label`` (comma separated); an optional header line (``path label`` / ``path,label``), blank lines and
``#`` comments are skipped. Pre-training lists may omit the label; VideoMAE V2's ``path start total [label]``
is accepted too. Relative paths are joined to ``data_root``. Errors name ``file:line``.

Items:

* ``PretrainVideoDataset``: a ``video_transforms.CropItem``, the uint8 region of the sampled frames that holds the
  item's ``num_sample`` crops, and the crops (with flips); ``multiple_samples_collate`` makes a ``CropBatch`` and
  ``video_transforms.resize_crops`` gives the ``[B*K, 3, T, H, W]`` clips in ``[0, 1]`` on the training device.
* ``VideoClsDataset``:
    - ``mode='train'``: ``(clip, label, index, {})``; with ``num_sample=K>1``:
      ``([K clips], [K labels], [K indices], {})``, flattened by ``multiple_samples_collate``.
    - ``mode='validation'``: ``(clip, label, video_id, info)``, the centre clip and centre crop (deterministic).
    - ``mode='test'``: ``(clip, label, video_id, segment_idx, crop_idx, info)``; the dataset has
      ``len(list) * test_num_segment * test_num_crop`` items, ordered video-major, for merging per video.
  ``video_id`` is the path as written in the list (made unique with ``#L<line>`` if a path repeats). ``info`` is
  ``{"valid": bool, "path": path as written, "line": list line, "reason": "" or why it could not be decoded}``.

Temporal sampling (``sampling='dense'``, Kinetics/UCF/HMDB; ``'segment'``, SSv2 / ``--sparse_sample``) follows
VideoMAE; short videos clamp to the last frame as VideoMAE does.

Broken videos (missing / undecodable / truncated / too short): during training they are logged once per path,
counted in a shared-memory counter visible from the main process (``dataset.num_broken``,
``get_broken_count(dataset)``), and replaced by another random item; after ``max_retries`` consecutive
failures, or when more than ``max_broken_ratio`` of the loads (at least 20 failures) failed, a RuntimeError
stops the run. Validation/test never substitute anything: a broken video (also one whose decodable frames fall
short of the length its container declares, e.g. a cut-off .webm) gives an item with ``info["valid"] = False`` and
the reason; its clip is a zero placeholder only so that the batch collates, and ``engine_for_finetuning`` leaves
it out of every metric and names it (``unevaluated``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from cli import UserError
from video_io import BACKENDS, Region, VideoDecodeError, VideoReader, open_video, resolve_backend
from video_transforms import Crop, CropBatch, CropItem, EvalTransform, PretrainTransform, TrainTransform

logger = logging.getLogger(__name__)

DATASET_CLASSES = {"SSV2": 174, "Kinetics-400": 400, "UCF101": 101, "HMDB51": 51}
DATA_SETS = tuple(DATASET_CLASSES) + ("custom",)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------
# List files
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class VideoRecord:
    path: str  # as written in the list (also the video id, unless it repeats)
    full_path: str  # joined with data_root
    label: int | None
    line_no: int
    video_id: str


def _is_header(fields: List[str]) -> bool:
    low = [f.strip().lower() for f in fields]
    return low[0] in ("path", "video", "video_path", "filename", "file") or "label" in low[1:]


def read_list_file(list_path: str, data_root: str = "", require_label: bool = True,
                   errors: List[Tuple[int, str]] | None = None) -> List[VideoRecord]:
    """Parse a list file into records; raises ``ValueError("file:line: ...")`` on malformed lines.

    With ``errors`` (a list), malformed lines are appended to it as ``(line_no, message)`` and skipped instead
    (used by tools/check_dataset.py to report every bad line at once).
    """
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}")
    records: List[VideoRecord] = []
    seen: dict = {}
    first = True
    with open(list_path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = [x.strip() for x in line.split(",")] if "," in line else line.split()
            if first and _is_header(fields):
                first = False
                continue
            first = False
            try:
                path, label = _parse_fields(fields, line, list_path, line_no, require_label)
            except ValueError as e:
                if errors is None:
                    raise
                errors.append((line_no, str(e)))
                continue
            video_id = path if path not in seen else f"{path}#L{line_no}"
            seen[path] = line_no
            full = path if os.path.isabs(path) or not data_root else os.path.join(data_root, path)
            records.append(VideoRecord(path, full, label, line_no, video_id))
    if not records and errors is None:
        raise ValueError(f"{list_path}: no videos listed")
    return records


def _parse_fields(fields: List[str], line: str, list_path: str, line_no: int,
          require_label: bool) -> Tuple[str, int | None]:
    if len(fields) == 1:
        path, label_s = fields[0], None
    elif len(fields) == 2:
        path, label_s = fields
    elif len(fields) == 3:  # VideoMAE V2 pre-training: path start_idx total_frames
        path, label_s = fields[0], None
        _parse_int(fields[1], list_path, line_no, "start_idx")
        _parse_int(fields[2], list_path, line_no, "total_frames")
    elif len(fields) == 4:  # VideoMAE V2: path start_idx total_frames label
        path, label_s = fields[0], fields[3]
    else:
        raise ValueError(f"{list_path}:{line_no}: expected 'path label' (or 'path,label'), "
                         f"got {len(fields)} fields: {line[:200]!r}")
    if not path:
        raise ValueError(f"{list_path}:{line_no}: empty path")
    label = None if label_s is None else _parse_int(label_s, list_path, line_no, "label")
    if label is None and require_label:
        raise ValueError(f"{list_path}:{line_no}: missing label (expected 'path label'): {line[:200]!r}")
    return path, label


def _parse_int(s: str, list_path: str, line_no: int, what: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"{list_path}:{line_no}: {what} {s!r} is not an integer") from None


class VideoList:
    """Records stored as numpy arrays (no per-item Python objects, so DataLoader workers do not slowly copy
    the list through reference counting)."""

    def __init__(self, list_path: str, data_root: str = "", require_label: bool = True,
                 nb_classes: int | None = None):
        recs = read_list_file(list_path, data_root, require_label)
        if nb_classes is not None:
            for r in recs:
                if r.label is not None and not 0 <= r.label < nb_classes:
                    raise ValueError(f"{list_path}:{r.line_no}: label {r.label} outside [0, {nb_classes}) "
                                     f"for {r.path} (check --nb_classes / --data_set)")
        self.list_path = list_path
        self.paths = np.array([r.path for r in recs])
        self.full_paths = np.array([r.full_path for r in recs])
        self.video_ids = np.array([r.video_id for r in recs])
        self.labels = np.array([-1 if r.label is None else r.label for r in recs], dtype=np.int64)
        self.line_nos = np.array([r.line_no for r in recs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.full_paths)

    def path(self, i: int) -> str:
        return str(self.full_paths[i])

    def video_id(self, i: int) -> str:
        return str(self.video_ids[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def listed_path(self, i: int) -> str:
        """The path as written in the list (what a user searches the list for)."""
        return str(self.paths[i])

    def line(self, i: int) -> int:
        return int(self.line_nos[i])

    def max_label(self) -> int:
        return int(self.labels.max())


# ----------------------------------------------------------------------------------------------------------------
# Broken-video accounting, shared with DataLoader workers
# ----------------------------------------------------------------------------------------------------------------
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

    def record_broken(self, path: str, reason: str) -> None:
        s = self._slot()
        self.counts[0, s] += 1
        self.counts[1, s] += 1
        if path not in self._logged:
            self._logged.add(path)
            logger.warning("broken video skipped: %s", reason)

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


def get_broken_count(dataset: Any) -> int:
    """Number of broken videos met so far by ``dataset`` (or a Subset / ConcatDataset of video datasets)."""
    if hasattr(dataset, "num_broken"):
        return int(dataset.num_broken)
    if hasattr(dataset, "dataset"):
        return get_broken_count(dataset.dataset)
    if hasattr(dataset, "datasets"):
        return sum(get_broken_count(d) for d in dataset.datasets)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Temporal sampling (VideoMAE semantics). All return lists of frame indices in [0, length).
# ----------------------------------------------------------------------------------------------------------------
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
    start = int(seg_idx * room / (num_segs - 1)) if num_segs > 1 else room // 2
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


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
class _VideoDatasetBase(Dataset):
    def __init__(self, videos: VideoList, backend: str, max_retries: int, max_broken_ratio: float,
                 min_frames: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"unknown --video_backend {backend!r}, expected one of {BACKENDS}")
        self.videos = videos
        self.backend = resolve_backend(backend)
        self.max_retries = max_retries
        self.max_broken_ratio = max_broken_ratio
        self.min_frames = min_frames
        self.broken_counter = BrokenVideoCounter()
        self.seed: int | None = None  # set: augmentation is a function of (seed, epoch, index) only
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

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
        """``read(reader)`` on video ``vid``, opened and checked for length, closed after."""
        path = self.videos.path(vid)
        with open_video(path, self.backend) as r:
            if len(r) < self.min_frames:
                raise VideoDecodeError(path, f"too short: {len(r)} frames < {self.min_frames}")
            return read(r)

    def _decode(self, vid: int, index_fn: Callable[[int], List[int]]) -> np.ndarray:
        """Frames ``index_fn(len)`` of video ``vid``."""
        return self._read(vid, lambda r: r.get_batch(index_fn(len(r))))

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
    """Pre-training items: VideoMAE temporal sampling + ``num_sample`` multi-scale crops (+ flip unless SSv2).

    Each item is a :class:`video_transforms.CropItem`: the worker plans the clip (:meth:`plan`), decodes only the
    planned frames and the region holding the crops, and returns those uint8 pixels with the crops;
    ``multiple_samples_collate`` pads them into a :class:`video_transforms.CropBatch` and
    ``video_transforms.resize_crops`` resizes and flips the whole batch on the training device.
    """

    def __init__(self, list_path: Union[str, VideoList], data_root: str = "", num_frames: int = 16,
                 sampling_rate: int = 4, input_size: int = 224, flip: bool = True, num_sample: int = 1,
                 video_backend: str = "auto", max_retries: int = 10, max_broken_ratio: float = 0.5):
        videos = list_path if isinstance(list_path, VideoList) else VideoList(list_path, data_root, False)
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
    """Fine-tuning / evaluation dataset (see module docstring for item formats)."""

    def __init__(self, list_path: Union[str, VideoList], data_root: str = "", mode: str = "train",
                 nb_classes: int | None = None, sampling: str = "dense", num_frames: int = 16,
                 sampling_rate: int = 4, num_segments: int = 1, input_size: int = 224,
                 short_side_size: int = 224, test_num_segment: int = 5, test_num_crop: int = 3,
                 aa: str | None = "rand-m7-n4-mstd0.5-inc1", train_interpolation: str = "bicubic",
                 reprob: float = 0.25, remode: str = "pixel", recount: int = 1, flip: bool = True,
                 num_sample: int = 1, video_backend: str = "auto", max_retries: int = 10,
                 max_broken_ratio: float = 0.5):
        if mode not in ("train", "validation", "test"):
            raise ValueError(f"mode must be train/validation/test, got {mode!r}")
        if sampling not in ("dense", "segment"):
            raise ValueError(f"sampling must be 'dense' or 'segment', got {sampling!r}")
        if sampling == "dense" and num_segments != 1:
            raise ValueError("num_segments > 1 is only supported with segment sampling (SSV2 / --sparse_sample)")
        videos = list_path if isinstance(list_path, VideoList) else VideoList(list_path, data_root, True,
                                                                              nb_classes)
        super().__init__(videos, video_backend, max_retries, max_broken_ratio)
        self.mode, self.sampling = mode, sampling
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.clip_frames = num_frames * num_segments if sampling == "segment" else num_frames
        self.input_size, self.short_side_size = input_size, short_side_size
        self.test_num_segment, self.test_num_crop = max(1, test_num_segment), max(1, test_num_crop)
        self.num_sample = max(1, num_sample) if mode == "train" else 1
        if mode == "train":
            self.transform = TrainTransform(input_size, aa, train_interpolation, reprob, remode, recount, flip)
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

        def checked_fn(n: int) -> List[int]:
            short = _short_of_container(path, n)
            if short:
                raise VideoDecodeError(path, short)
            return fn(n)

        try:
            frames, reason = self._decode(vid, checked_fn), ""
            self.broken_counter.record_ok()
        except Exception as e:
            reason = e.reason if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}"
            frames, reason = None, reason[:300]
            self.broken_counter.record_broken(path, f"{path}: {reason}")
        self._cache = ((vid, seg), (frames, reason))
        return frames, reason


# Containers whose frame index is the sample table that both backends read: a cut file fails to open or to
# decode, so comparing with the declared length adds nothing (and would cost an extra open per video).
_INDEXED_CONTAINERS = (".mp4", ".m4v", ".mov")


def _short_of_container(path: str, n: int) -> str:
    """Why a video with ``n`` indexable frames is truncated, or "" if it is not (or the container does not say).

    A demuxer indexes only the packets it finds, so a file cut short whose header keeps the full duration (e.g. a
    .webm) opens as a shorter, valid video; evaluating it would score a different clip than the listed video.
    Allows 10% + 1 frame of slack for rounding and an audio track longer than the video.
    """
    if os.path.splitext(path)[1].lower() in _INDEXED_CONTAINERS:
        return ""
    import av

    try:
        with av.open(path) as c:
            s = c.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0)
            if s.frames:
                declared = int(s.frames)
            elif s.duration is not None and s.time_base is not None and rate:
                declared = round(float(s.duration * s.time_base) * rate)
            elif c.duration and rate:
                declared = round(c.duration / av.time_base * rate)
            else:
                return ""
    except Exception:  # unreadable header: the decode itself reports it
        return ""
    if n < 0.9 * declared - 1:
        return f"truncated: {n} decodable frames, the container declares {declared}"
    return ""


def collate_crops(items: Sequence[CropItem]) -> CropBatch:
    """Pre-training items -> one :class:`CropBatch`: regions zero-padded at the bottom/right to the batch's
    largest (a fixed shape for one transfer; the crops never reach the padding), crops numbered by item.

    Inside a DataLoader worker the pixels go straight into shared memory, as ``default_collate`` does, so the
    batch reaches the main process without another copy.
    """
    t = items[0].pixels.shape[0]
    h = max(it.pixels.shape[1] for it in items)
    w = max(it.pixels.shape[2] for it in items)
    shape = (len(items), t, h, w, 3)
    elem = items[0].pixels
    if get_worker_info() is not None:
        out = elem.new(elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)).view(shape)
    else:
        out = elem.new_empty(shape)
    for i, it in enumerate(items):
        ih, iw = it.pixels.shape[1:3]
        out[i, :, :ih, :iw] = it.pixels
        out[i, :, ih:] = 0
        out[i, :, :ih, iw:] = 0
    crops = torch.cat([torch.cat([torch.full((len(it.crops), 1), i), it.crops], 1) for i, it in enumerate(items)])
    return CropBatch(out, crops, items[0].out_h, items[0].out_w)


def multiple_samples_collate(batch: Sequence[Any]):
    """Collate for repeated sampling: items holding K clips become ``K * B`` rows.

    Pre-training items (:class:`CropItem`) -> :class:`CropBatch` (``collate_crops``; its ``N = B*K`` crops in item
    order); fine-tuning items ``([clips], [labels], [indices], {})`` -> ``(clips [B*K, ...], labels [B*K],
    indices [B*K], {})``. Items with a single clip are collated normally.
    """
    elem = batch[0]
    if isinstance(elem, CropItem):
        return collate_crops(batch)
    if isinstance(elem, torch.Tensor):
        return default_collate(batch)
    if isinstance(elem, tuple) and isinstance(elem[0], list):
        clips = torch.stack([c for item in batch for c in item[0]])
        labels = torch.tensor([lb for item in batch for lb in item[1]])
        indices = torch.tensor([i for item in batch for i in item[2]])
        return clips, labels, indices, {}
    return default_collate(batch)


# ----------------------------------------------------------------------------------------------------------------
# Builders and flags
# ----------------------------------------------------------------------------------------------------------------
def _nb_classes(args: argparse.Namespace) -> int:
    data_set = getattr(args, "data_set", "Kinetics-400")
    given = getattr(args, "nb_classes", None)
    if data_set not in DATA_SETS:
        raise ValueError(f"unknown --data_set {data_set!r}, expected one of {DATA_SETS}")
    if data_set == "custom":
        if not given:
            raise ValueError("--data_set custom needs --nb_classes")
        return int(given)
    known = DATASET_CLASSES[data_set]
    if given is not None and int(given) != known:
        raise ValueError(f"--nb_classes {given} does not match --data_set {data_set} ({known} classes)")
    return known


def build_pretraining_dataset(args: argparse.Namespace) -> PretrainVideoDataset:
    """Pre-training dataset from ``args.data_path`` (one list file; a folder means its ``train.csv``)."""
    path = args.data_path
    if os.path.isdir(path):
        path = os.path.join(path, "train.csv")
    ds = PretrainVideoDataset(
        path, data_root=getattr(args, "data_root", "") or "",
        num_frames=getattr(args, "num_frames", 16), sampling_rate=getattr(args, "sampling_rate", 4),
        input_size=getattr(args, "input_size", 224),
        flip=getattr(args, "data_set", "Kinetics-400") != "SSV2" and not getattr(args, "no_flip", False),
        num_sample=getattr(args, "num_sample", 1) or 1,
        video_backend=getattr(args, "video_backend", "auto"),
        max_retries=getattr(args, "max_retries", 10), max_broken_ratio=getattr(args, "max_broken_ratio", 0.5))
    ds.seed = getattr(args, "seed", None)
    return ds


# split -> (file in the --data_path folder, the flag naming the list explicitly)
SPLIT_LISTS = {"train": ("train.csv", "--train_list"), "validation": ("val.csv", "--val_list"),
               "test": ("test.csv", "--test_list")}


def resolve_split_list(mode: str, args: argparse.Namespace) -> str:
    """The list file a fine-tuning split reads: ``--{train,val,test}_list`` if given, else ``DATA_PATH/{split}.csv``.

    ``--data_path`` must be a folder: a single file would have to serve every split, and validating or testing on
    the training list reports numbers that mean nothing. Raises ``ValueError`` naming the flag.
    """
    fname, flag = SPLIT_LISTS[mode]
    explicit = getattr(args, flag[2:], None)
    if explicit:
        if not os.path.isfile(explicit):
            raise ValueError(f"{flag} {explicit}: no such file")
        return explicit
    data_path = getattr(args, "data_path", "") or ""
    if not data_path:
        raise ValueError(f"no {mode} list: pass --data_path DIR (a folder with {fname}) or {flag} FILE")
    if os.path.isfile(data_path):
        raise ValueError(f"--data_path {data_path} is a file; fine-tuning needs a folder with train.csv/val.csv/"
                         f"test.csv, or --train_list/--val_list/--test_list")
    if not os.path.isdir(data_path):
        raise ValueError(f"--data_path {data_path}: no such folder")
    path = os.path.join(data_path, fname)
    if not os.path.isfile(path):
        raise ValueError(f"--data_path {data_path} has no {fname}: add it or pass {flag} FILE")
    return path


def _note_unused_classes(videos: VideoList, nb_classes: int, args: argparse.Namespace) -> None:
    """A class count above the labels present is legal (a subset of a bigger label set) but often a typo."""
    present = videos.labels[videos.labels >= 0]
    if len(present) and int(present.max()) + 1 < nb_classes:
        given = getattr(args, "nb_classes", None)
        src = (f"--nb_classes {nb_classes}" if given
               else f"--data_set {getattr(args, 'data_set', '?')} ({nb_classes} classes)")
        print(f"Note: {src} but labels in {os.path.basename(videos.list_path)} only go up to {int(present.max())} "
              f"({len(np.unique(present))} classes present)")


def build_dataset(is_train: bool, test_mode: bool, args: argparse.Namespace) -> Tuple[VideoClsDataset, int]:
    """Fine-tuning / eval dataset for one split (see ``resolve_split_list``); returns (dataset, nb_classes)."""
    mode = "train" if is_train else ("test" if test_mode else "validation")
    path = resolve_split_list(mode, args)
    nb_classes = _nb_classes(args)
    data_set = getattr(args, "data_set", "Kinetics-400")
    sampling = "segment" if data_set == "SSV2" or getattr(args, "sparse_sample", False) else "dense"
    ds = VideoClsDataset(
        path, data_root=getattr(args, "data_root", "") or "", mode=mode, nb_classes=nb_classes,
        sampling=sampling, num_frames=getattr(args, "num_frames", 16),
        sampling_rate=getattr(args, "sampling_rate", 4), num_segments=getattr(args, "num_segments", 1),
        input_size=getattr(args, "input_size", 224), short_side_size=getattr(args, "short_side_size", 224),
        test_num_segment=getattr(args, "test_num_segment", 5), test_num_crop=getattr(args, "test_num_crop", 3),
        aa=getattr(args, "aa", "rand-m7-n4-mstd0.5-inc1"),
        train_interpolation=getattr(args, "train_interpolation", "bicubic"),
        reprob=getattr(args, "reprob", 0.25), remode=getattr(args, "remode", "pixel"),
        recount=getattr(args, "recount", 1),
        flip=data_set != "SSV2" and not getattr(args, "no_flip", False),
        num_sample=getattr(args, "num_sample", 1) or 1, video_backend=getattr(args, "video_backend", "auto"),
        max_retries=getattr(args, "max_retries", 10), max_broken_ratio=getattr(args, "max_broken_ratio", 0.5))
    ds.seed = getattr(args, "seed", None)  # augmentation from (seed, epoch, index): exact resume, any worker count
    if is_train:
        _note_unused_classes(ds.videos, nb_classes, args)
    return ds, nb_classes


def add_data_args(parser: argparse.ArgumentParser, pretrain: bool = False) -> argparse.ArgumentParser:
    """Add the data flags (VideoMAE names and defaults). Flags the parser already defines are left alone, so
    a program that defines e.g. ``--input_size`` with its model flags can still call this."""
    existing = set(parser._option_string_actions)  # noqa: SLF001 (argparse has no public query)
    g = parser.add_argument_group("data")

    def add(name: str, **kw):
        if name not in existing:
            g.add_argument(name, **kw)

    if pretrain:
        add("--data_path", default="", type=str, help="one list file (a folder means its train.csv)")
    else:
        add("--data_path", default="", type=str, help="folder with train.csv/val.csv/test.csv (not a single file)")
        for split, (fname, flag) in SPLIT_LISTS.items():
            add(flag, default=None, type=str, help=f"{split} list file, instead of DATA_PATH/{fname}")
    add("--data_root", default="", type=str, help="prefix for relative paths in the lists")
    add("--data_set", default="Kinetics-400", choices=list(DATA_SETS), type=str,
        help="dataset: sets the class count, SSv2's segment sampling and no-flip rule")
    add("--num_frames", default=16, type=int, help="frames per clip")
    add("--sampling_rate", default=4, type=int, help="frame stride for dense sampling")
    add("--input_size", default=224, type=int, help="crop size fed to the model")
    add("--num_sample", default=1 if pretrain else 2, type=int, help="repeated sampling: clips per decode")
    if not pretrain:  # classification, evaluation and fine-tuning augmentation
        add("--nb_classes", default=None, type=int, help="number of classes (default: from --data_set; "
            "required for custom)")
        add("--short_side_size", default=224, type=int, help="eval: resize the short side to this")
        add("--num_segments", default=1, type=int, help="segments for segment (TSN) sampling")
        add("--sparse_sample", action="store_true", default=False,
            help="segment (TSN/SSv2-style) sampling for non-SSV2 sets")
        add("--test_num_segment", default=5, type=int, help="multi-view test: temporal views per video")
        add("--test_num_crop", default=3, type=int, help="multi-view test: spatial crops per view")
        add("--aa", default="rand-m7-n4-mstd0.5-inc1", type=str, help="RandAugment policy ('none' to disable)")
        add("--train_interpolation", default="bicubic", type=str, help="RandAugment resample filter")
        add("--reprob", default=0.25, type=float, help="random erasing probability (tube)")
        add("--remode", default="pixel", type=str, help="random erasing fill mode (timm)")
        add("--recount", default=1, type=int, help="random erasing count (timm)")
    add("--no_flip", action="store_true", default=False, help="disable horizontal flip (always off for SSV2)")
    add("--video_backend", default="auto", choices=list(BACKENDS), type=str,
        help="auto: PyAV when installed (exact frames, decodes only the crop region), else decord")
    add("--num_workers", default=10, type=int, help="DataLoader worker processes per training process")
    add("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    add("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory in the DataLoader")
    add("--max_retries", default=10, type=int, help="broken videos: consecutive replacements before failing")
    add("--max_broken_ratio", default=0.5, type=float,
        help="stop when more than this fraction of video loads failed (after 20 failures)")
    if "--pin_mem" not in existing:
        parser.set_defaults(pin_mem=True)
    return parser
