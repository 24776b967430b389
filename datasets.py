"""Datasets as the programs name them: list files, splits and class counts, the data flags and the builders.

List files (``read_list_file``): one video per line, ``path label`` (space separated, VideoMAE) or
``path,label`` (comma separated), UTF-8 (a byte-order mark is dropped); an optional header line (``path label`` /
``path,label``), blank lines and ``#`` comments are skipped (a line starting with ``#`` whose first field names an
existing file or folder is a video: HMDB51 has names starting with ``#``). Pre-training lists may omit the label;
VideoMAE V2's ``path start total [label]`` (pre-training) and ``folder total label`` (fine-tuning on raw frames)
are accepted too, their counts unused. A path may name a folder of frame images instead of a video file
(``frame_folders``). Relative paths are joined to ``data_root``. Errors name ``file:line``.

``build_pretraining_dataset`` / ``build_dataset`` read the list the flags name into a :class:`VideoList` and make
the ``video_datasets`` dataset (item formats and broken videos are described there, temporal sampling in
``frame_sampling``); ``multiple_samples_collate`` batches their items and ``get_broken_count`` counts the broken
videos they met. Every data default is its flag's (``add_data_args``).
"""
from __future__ import annotations

import argparse
import codecs
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import default_collate

from cli import UserError, at_least, has_option
from resume import data_fingerprint
from video_datasets import PretrainVideoDataset, VideoClsDataset
from video_io import BACKENDS, DEFAULT_BACKEND
from video_transforms import RESAMPLE_FILTERS, CropBatch, CropItem, randaugment_policy

DATASET_CLASSES = {"SSV2": 174, "Kinetics-400": 400, "UCF101": 101, "HMDB51": 51}
DATA_SETS = tuple(DATASET_CLASSES) + ("custom",)


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


def _join_root(data_root: str, path: str) -> str:
    return path if os.path.isabs(path) or not data_root else os.path.join(data_root, path)


def list_lines(list_path: str) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` for every line of a list file: UTF-8, with the byte-order mark some editors put
    first dropped (else it sticks to the first path); a line in another encoding is a ``cli.UserError`` naming
    ``file:line``, not a bare ``UnicodeDecodeError``."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}")
    with open(list_path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for line_no, raw in enumerate(data.splitlines(), start=1):
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if data[4:8] == b"ftyp" or data[:4] in (b"\x1a\x45\xdf\xa3", b"RIFF"):  # MP4/MOV, WebM/MKV, AVI
                raise UserError(f"{list_path} is a video, not a list: a list names one video per line ('path "
                                f"label'); see DATASET.md") from None
            raise UserError(f"{list_path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); save the list as UTF-8") from None


def read_list_file(list_path: str, data_root: str = "", require_label: bool = True,
                   errors: List[Tuple[int, str]] | None = None) -> List[VideoRecord]:
    """Parse a list file into records; raises ``ValueError("file:line: ...")`` on malformed lines.

    With ``errors`` (a list), malformed lines are appended to it as ``(line_no, message)`` and skipped instead
    (used by tools/check_dataset.py to report every bad line at once).
    """
    records: List[VideoRecord] = []
    seen: dict = {}
    first = True
    for line_no, raw in list_lines(list_path):
        line = raw.strip()
        if not line:
            continue
        fields = [x.strip() for x in line.split(",")] if "," in line else line.split()
        if line.startswith("#") and not os.path.exists(_join_root(data_root, fields[0])):
            continue  # a comment (a '#' line naming an existing file or folder is a video: HMDB51 has such names)
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
        while video_id in seen:  # a listed path may itself read like a generated id: every id stays unique
            video_id += "#"
        seen[path] = seen[video_id] = line_no
        records.append(VideoRecord(path, _join_root(data_root, path), label, line_no, video_id))
    if not records and errors is None:
        raise ValueError(f"{list_path}: no videos listed")
    return records


def _parse_fields(fields: List[str], line: str, list_path: str, line_no: int,
          require_label: bool) -> Tuple[str, int | None]:
    try:
        return _parse_fields_of(fields, line, list_path, line_no, require_label)
    except ValueError as e:
        if len(fields) > 2 and "," not in line:  # split at spaces: a path with spaces reads as several fields
            raise ValueError(f"{e} (a path with spaces? write the line as 'path,label')") from None
        raise


def _parse_fields_of(fields: List[str], line: str, list_path: str, line_no: int,
                     require_label: bool) -> Tuple[str, int | None]:
    if len(fields) == 1:
        path, label_s = fields[0], None
    elif len(fields) == 2:
        path, label_s = fields
    elif len(fields) == 3 and require_label:  # VideoMAE V2 fine-tuning on raw frames: folder total_frames label
        path, label_s = fields[0], fields[2]
        _parse_int(fields[1], list_path, line_no, "total_frames")
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


def check_labels(source: str, rows: Iterable[Tuple[int, int, str]], nb_classes: int) -> None:
    """``cli.UserError`` naming ``source:line`` and the path of the first ``(line, label, path)`` whose label is
    outside ``[0, nb_classes)``: a wrong class count or list would otherwise fail later as an index error (or
    silently score against the wrong classes)."""
    for line_no, label, path in rows:
        if not 0 <= label < nb_classes:
            raise UserError(f"{source}:{line_no}: label {label} outside [0, {nb_classes}) for {path} "
                            f"(check --nb_classes / --data_set)")


class VideoList:
    """Records stored as numpy arrays (no per-item Python objects, so DataLoader workers do not slowly copy
    the list through reference counting)."""

    def __init__(self, list_path: str, data_root: str = "", require_label: bool = True,
                 nb_classes: int | None = None):
        recs = read_list_file(list_path, data_root, require_label)
        if nb_classes is not None:
            check_labels(list_path, ((r.line_no, r.label, r.path) for r in recs if r.label is not None), nb_classes)
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

    def fingerprint(self) -> str:
        """``resume.data_fingerprint`` of the listed paths and labels."""
        return data_fingerprint(self.paths.tolist(), self.labels.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Builders and flags
# ----------------------------------------------------------------------------------------------------------------
def class_count(data_set: str, nb_classes: int | None) -> int:
    """The number of classes of ``--data_set`` (``custom``: ``--nb_classes``); ValueError if the two disagree."""
    if data_set not in DATA_SETS:
        raise ValueError(f"unknown --data_set {data_set!r}, expected one of {DATA_SETS}")
    if data_set == "custom":
        if not nb_classes:
            raise ValueError("--data_set custom needs --nb_classes")
        return int(nb_classes)
    known = DATASET_CLASSES[data_set]
    if nb_classes is not None and int(nb_classes) != known:
        raise ValueError(f"--nb_classes {nb_classes} does not match --data_set {data_set} ({known} classes)")
    return known


def _flip(args: argparse.Namespace, pretrain: bool) -> bool:
    """Horizontal flips. Pre-training: only with ``--flip`` (VideoMAE and AdaMAE flip nothing; no labels, so any
    set). Fine-tuning: on unless ``--no_flip``, never for SSV2 (its labels say left from right)."""
    if pretrain:
        return args.flip
    return args.data_set != "SSV2" and not args.no_flip


def build_pretraining_dataset(args: argparse.Namespace) -> PretrainVideoDataset:
    """Pre-training dataset from ``args.data_path`` (one list file; a folder means its ``train.csv``).

    ``args``: the flags of ``add_data_args(pretrain=True)`` and the program's ``--seed``."""
    path = args.data_path
    if os.path.isdir(path):
        path = os.path.join(path, "train.csv")
    ds = PretrainVideoDataset(
        VideoList(path, args.data_root, require_label=False), num_frames=args.num_frames,
        sampling_rate=args.sampling_rate, input_size=args.input_size, flip=_flip(args, pretrain=True),
        num_sample=args.num_sample, video_backend=args.video_backend, max_retries=args.max_retries,
        max_broken_ratio=args.max_broken_ratio)
    ds.seed = args.seed
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
    explicit = getattr(args, flag[2:])
    if explicit:
        if not os.path.isfile(explicit):
            raise ValueError(f"{flag} {explicit}: no such file")
        return explicit
    data_path = args.data_path
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
        src = f"--nb_classes {nb_classes}" if args.nb_classes else f"--data_set {args.data_set} ({nb_classes} classes)"
        print(f"Note: {src} but labels in {os.path.basename(videos.list_path)} only go up to {int(present.max())} "
              f"({len(np.unique(present))} classes present)")


def build_dataset(is_train: bool, test_mode: bool, args: argparse.Namespace) -> Tuple[VideoClsDataset, int]:
    """Fine-tuning / eval dataset for one split (see ``resolve_split_list``); returns (dataset, nb_classes).

    ``args``: the flags of ``add_data_args(pretrain=False)`` and the program's ``--seed``."""
    mode = "train" if is_train else ("test" if test_mode else "validation")
    path = resolve_split_list(mode, args)
    nb_classes = class_count(args.data_set, args.nb_classes)
    sampling = "segment" if args.data_set == "SSV2" or args.sparse_sample else "dense"
    ds = VideoClsDataset(
        VideoList(path, args.data_root, True, nb_classes), mode=mode, sampling=sampling, num_frames=args.num_frames,
        sampling_rate=args.sampling_rate, num_segments=args.num_segments, input_size=args.input_size,
        short_side_size=args.short_side_size, test_num_segment=args.test_num_segment,
        test_num_crop=args.test_num_crop, video_backend=args.video_backend, aa=args.aa,
        train_interpolation=args.train_interpolation, reprob=args.reprob, remode=args.remode, recount=args.recount,
        flip=_flip(args, pretrain=False), num_sample=args.num_sample, max_retries=args.max_retries,
        max_broken_ratio=args.max_broken_ratio, aa_on_crop=args.aa_on_crop)
    ds.seed = args.seed  # augmentation from (seed, epoch, index): exact resume, any worker count
    if is_train:
        _note_unused_classes(ds.videos, nb_classes, args)
    return ds, nb_classes


def add_data_args(parser: argparse.ArgumentParser, pretrain: bool = False) -> argparse.ArgumentParser:
    """Add the data flags (VideoMAE names and defaults). Flags the parser already defines are left alone, so
    a program that defines e.g. ``--input_size`` with its model flags can still call this."""
    pin_mem_defined = has_option(parser, "--pin_mem")
    g = parser.add_argument_group("data")

    def add(name: str, **kw):
        if not has_option(parser, name):
            g.add_argument(name, **kw)

    if pretrain:
        add("--data_path", default="", type=str, help="one list file (a folder means its train.csv)")
    else:
        add("--data_path", default="", type=str, help="folder with train.csv/val.csv/test.csv (not a single file)")
        for split, (fname, flag) in SPLIT_LISTS.items():
            add(flag, default=None, type=str, help=f"{split} list file, instead of DATA_PATH/{fname}")
    add("--data_root", default="", type=str, help="prefix for relative paths in the lists")
    add("--data_set", default="Kinetics-400", choices=list(DATA_SETS), type=str,
        help="recorded with the run; pre-training samples every set alike (dense, no flip unless --flip)" if pretrain
        else "dataset: sets the class count, SSv2's segment sampling and no-flip rule")
    add("--num_frames", default=16, type=at_least(1), help="frames per clip")
    add("--sampling_rate", default=4, type=at_least(1), help="frame stride for dense sampling")
    add("--input_size", default=224, type=at_least(1), help="crop size fed to the model")
    add("--num_sample", default=1 if pretrain else 2, type=at_least(1), help="repeated sampling: clips per decode")
    if not pretrain:  # classification, evaluation and fine-tuning augmentation
        add("--nb_classes", default=None, type=int, help="number of classes (default: from --data_set; "
            "required for custom)")
        add("--short_side_size", default=224, type=at_least(1), help="eval: resize the short side to this")
        add("--num_segments", default=1, type=at_least(1), help="segments for segment (TSN) sampling")
        add("--sparse_sample", action="store_true", default=False,
            help="segment (TSN/SSv2-style) sampling for non-SSV2 sets")
        add("--test_num_segment", default=5, type=at_least(1), help="multi-view test: temporal views per video")
        add("--test_num_crop", default=3, type=at_least(1), help="multi-view test: spatial crops per view")
        add("--aa", default="rand-m7-n4-mstd0.5-inc1", type=randaugment_policy,
            help="RandAugment policy ('none' to disable)")
        add("--train_interpolation", default="bicubic", choices=RESAMPLE_FILTERS, help="RandAugment resample filter")
        add("--aa_on_crop", action="store_true",
            help="RandAugment on the crop resized to --input_size, not on the whole frames (VideoMAE): about 3x "
                 "cheaper per clip on 320p video, but rotations and shears fill more of every clip")
        add("--reprob", default=0.25, type=float, help="random erasing probability (tube)")
        add("--remode", default="pixel", choices=["pixel", "rand", "const"], help="random erasing fill (timm)")
        add("--recount", default=1, type=int, help="random erasing count (timm)")
    if pretrain:
        add("--flip", action="store_true", default=False,
            help="horizontal flips with p=0.5 (VideoMAE and AdaMAE pre-train without; labels are unused, so any set)")
    else:
        add("--no_flip", action="store_true", default=False, help="disable horizontal flip (always off for SSV2)")
    add("--video_backend", default=DEFAULT_BACKEND, choices=list(BACKENDS), type=str,
        help="auto: PyAV when installed (exact frames, decodes only the crop region), else decord")
    add("--num_workers", default=10, type=at_least(0), help="DataLoader worker processes per training process")
    add("--worker_start_method", default=None, choices=["fork", "spawn", "forkserver"],
        help="how workers start (default: the platform's, fork on Linux, spawn on macOS); spawn and forkserver "
             "start clean processes, for a library that is not fork-safe (workers hang): slower start, same clips")
    add("--prefetch_factor", default=2, type=at_least(1),
        help="batches each DataLoader worker prepares ahead (torch's default); host memory holds about num_workers "
             "x prefetch_factor batches of uint8 pixels: lower it when that is too much")
    add("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    add("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory in the DataLoader")
    add("--max_retries", default=10, type=at_least(0), help="broken videos: consecutive replacements before failing")
    add("--max_broken_ratio", default=0.5, type=float,
        help="stop when more than this fraction of video loads failed (after 20 failures)")
    if not pin_mem_defined:
        parser.set_defaults(pin_mem=True)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Batches and broken videos, for the programs' DataLoaders
# ----------------------------------------------------------------------------------------------------------------
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


def get_broken_count(dataset: Any) -> int:
    """Number of broken videos met so far by ``dataset`` (or a Subset / ConcatDataset of video datasets)."""
    if hasattr(dataset, "num_broken"):
        return int(dataset.num_broken)
    if hasattr(dataset, "dataset"):
        return get_broken_count(dataset.dataset)
    if hasattr(dataset, "datasets"):
        return sum(get_broken_count(d) for d in dataset.datasets)
    return 0
