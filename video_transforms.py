"""Clip transforms on torch tensors: ``uint8 [T, H, W, C]`` frames in, ``float32 [3, T, H, W]`` out.

Why this layout: decoders return ``[T, H, W, C]`` uint8; ``permute(0, 3, 1, 2)`` gives a channels-last
``[T, C, H, W]`` view without a copy, and torch's uint8 bilinear resize is fastest on exactly that layout. Crops
are slices (no copy). The resizes are VideoMAE's: pre-training's antialiased (PIL's, on uint8), evaluation's
bilinear without antialiasing (OpenCV's, on uint8), fine-tuning's on the normalised floats of the crop (its
``F.interpolate``).

All random choices use Python's ``random`` module (seeded per item by the datasets) and are drawn once per clip,
so every frame gets the same crop / flip / RandAugment ops / erase box. Pre-training draws in the workers and
resizes on the training device (:class:`PretrainTransform`, :func:`resize_crops`); fine-tuning and evaluation
transform whole clips in the workers.

Building blocks: :func:`multi_scale_crop_params` (VideoMAE's GroupMultiScaleCrop semantics),
:func:`random_resized_crop_params`, :func:`short_side_resize`, :func:`spatial_crop` (centre / three-crop),
:func:`normalize`, :class:`ClipRandAugment` (timm RandAugment, consistent over frames) and
:class:`ClipRandomErasing` (timm RandomErasing, as a tube). Pipelines: :class:`PretrainTransform`,
:class:`TrainTransform`, :class:`EvalTransform`.
"""
from __future__ import annotations

import argparse
import math
import random
from typing import NamedTuple, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTI_SCALES = (1, 0.875, 0.75, 0.66)  # crop scales of VideoMAE's GroupMultiScaleCrop (pre-training)
RESIZED_CROP_SCALE = (0.08, 1.0)  # Inception crop (fine-tuning): area fraction and aspect ratio ranges
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)

Frames = Union[torch.Tensor, np.ndarray]


def _to_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def as_tchw(frames: Frames) -> torch.Tensor:
    """``[T, H, W, C]`` uint8 array/tensor -> ``[T, C, H, W]`` channels-last view (no copy)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2)


def resize(x: torch.Tensor, size: Tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``[T, C, H, W]`` (uint8 or float) to ``size=(h, w)``; antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def short_side_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the short side is ``size`` (aspect ratio kept) and the long side ``int(long * size / short)``
    (truncated, as VideoMAE's eval ``Resize`` and Hugging Face's ``shortest_edge`` compute it). Bilinear without
    antialiasing, as VideoMAE's ``Resize`` (OpenCV's ``INTER_LINEAR`` on decord's arrays): on uint8 frames within
    one grey level of OpenCV (measured; an antialiased resize differs by 4-17 levels on average when shrinking
    320 -> 224)."""
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = size, max(1, int(size * w / h))
    else:
        nh, nw = max(1, int(size * h / w)), size
    return resize(x, (nh, nw), antialias=False)


def crop(x: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    return x[..., top:top + h, left:left + w]


def multi_scale_crop_params(
    height: int,
    width: int,
    out_size: Tuple[int, int],
    scales: Sequence[float] = MULTI_SCALES,
    max_distort: int = 1,
    more_fix_crop: bool = True,
    rng: random.Random = random,
) -> Tuple[int, int, int, int]:
    """VideoMAE's ``GroupMultiScaleCrop(fix_crop=True)``: returns ``(top, left, crop_h, crop_w)``.

    Crop sides are ``int(min_side * s)`` for each scale, snapped to the output size when within 3 px; the
    (w, h) pair is drawn among scale pairs at most ``max_distort`` steps apart; the offset is one of the 5 (or 13
    with ``more_fix_crop``) fixed positions on a quarter grid.
    """
    out_h, out_w = out_size
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    crop_hs = [out_h if abs(s - out_h) < 3 else s for s in sizes]
    crop_ws = [out_w if abs(s - out_w) < 3 else s for s in sizes]
    pairs = [(cw, ch) for i, ch in enumerate(crop_hs) for j, cw in enumerate(crop_ws) if abs(i - j) <= max_distort]
    cw, ch = rng.choice(pairs)
    cw, ch = max(1, min(cw, width)), max(1, min(ch, height))
    ws, hs = (width - cw) // 4, (height - ch) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)]
    if more_fix_crop:
        offsets += [(0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
                    (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    left, top = rng.choice(offsets)
    return top, left, ch, cw


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: Tuple[float, float] = RESIZED_CROP_RATIO,
    rng: random.Random = random,
) -> Tuple[int, int, int, int]:
    """Inception-style crop box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ratio,
    10 tries, then a centre crop clamped to ``ratio`` (as VideoMAE's ``random_resized_crop``)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def spatial_crop(x: torch.Tensor, size: int, crop_idx: int = 1, num_crops: int = 3) -> torch.Tensor:
    """Square ``size`` crop number ``crop_idx`` of ``num_crops`` spread evenly along the long side and centred on
    the short side (left/centre/right or top/centre/bottom for 3). Frames smaller than ``size`` are first resized
    up. Offsets are VideoMAE's to the pixel: ``int(crop_idx * (long - size) / (num_crops - 1))`` for the test views,
    and for ``num_crops == 1`` (validation) its ``CenterCrop``, ``int(round((side - size) / 2))`` on both axes (no
    division by zero); the two centres differ by a pixel when ``long - size`` is odd and rounds up."""
    h, w = x.shape[-2:]
    if min(h, w) < size:
        x = short_side_resize(x, size)
        h, w = x.shape[-2:]
    if num_crops <= 1:  # VideoMAE's CenterCrop, both axes
        return crop(x, int(round((h - size) / 2)), int(round((w - size) / 2)), size, size)
    along = int(crop_idx * (1.0 * (max(h, w) - size) / (num_crops - 1)))
    top, left = (along, (w - size) // 2) if h >= w else ((h - size) // 2, along)
    return crop(x, top, left, size, size)


def normalize_clips(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Clips ``[..., C, T, H, W]``, uint8 (0..255) or float in ``[0, 1]`` -> float32 ``(x01 - mean) / std``, on
    their own device. The one ImageNet normalisation (fine-tuning workers, the pre-training model input)."""
    shape = (-1, 1, 1, 1)
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape) * scale
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape) * scale
    return x.to(torch.float32, copy=True).mul_(1.0 / s).add_(-m / s)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """``[T, C, H, W]`` uint8 (0..255) -> contiguous ``float32 [C, T, H, W]``, ``(x / 255 - mean) / std``."""
    return normalize_clips(x.permute(1, 0, 2, 3).contiguous(), mean, std)


RESAMPLE_FILTERS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")  # timm's (PIL) names


def randaugment_policy(text: str) -> str:
    """argparse type of ``--aa``: a timm RandAugment string or 'none'; anything else (timm only asserts) is one
    line naming the flag."""
    if text.lower() in ("none", ""):
        return text
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(text, {"translate_const": 100})
    except (AssertionError, ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a RandAugment policy such as 'rand-m7-n4-mstd0.5-inc1', or "
                                         f"'none'; got {text!r}") from None
    return text


class ClipRandAugment:
    """timm's ``rand_augment_transform`` applied with the same ops and magnitudes to every frame of a clip.

    timm draws the ops with ``np.random`` and each op's probability / magnitude / sign with Python's
    ``random``. We snapshot both generator states, restore them before every frame, and leave them in the
    state after one application: each frame therefore sees exactly the same draws (temporally consistent,
    as VideoMAE's video RandAugment), the generators still advance once per clip, and timm's op code is used
    unchanged. Tiling frames into one image would be cheaper but wrong for geometric ops (rotate/shear/
    translate would move content across tiles). Runs on whole decoded frames via PIL, which timm needs.
    """

    def __init__(self, config_str: str, input_size: int, interpolation: str):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        # VideoMAE's create_random_augment: translations relative to the crop size, timm's grey (128) fill
        hparams: dict = dict(translate_const=int(0.45 * input_size))
        if interpolation and interpolation != "random":
            hparams["interpolation"] = str_to_pil_interp(interpolation)
        self.config_str = config_str
        self.op = rand_augment_transform(config_str, hparams)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, C, H, W]`` uint8 -> ``[T, C, H, W]`` uint8 (channels-last)."""
        from PIL import Image

        frames = x.permute(0, 2, 3, 1).numpy()  # [T, H, W, C] view
        py_state, np_state = random.getstate(), np.random.get_state()
        out = []
        for f in frames:
            random.setstate(py_state)
            np.random.set_state(np_state)
            out.append(np.asarray(self.op(Image.fromarray(np.ascontiguousarray(f)))))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"ClipRandAugment({self.config_str!r})"


class ClipRandomErasing:
    """timm's ``RandomErasing`` as a tube: one box, erased in every frame.

    The normalised clip ``[C, T, H, W]`` is viewed as one ``[C*T, H, W]`` image, so timm draws a single box (and
    count) for the whole clip and fills it in every frame (per-pixel noise in 'pixel' mode), as VideoMAE's
    ``cube=True`` erasing.
    """

    def __init__(self, probability: float, mode: str, max_count: int):
        from timm.data.random_erasing import RandomErasing

        self.op = RandomErasing(probability=probability, mode=mode, max_count=max_count, num_splits=0,
                                device="cpu")

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        c, t, h, w = clip.shape
        self.op(clip.view(c * t, h, w))  # in place
        return clip


Crop = Tuple[int, int, int, int, bool]  # (top, left, height, width, flip)


class PretrainTransform:
    """Pre-training augmentation: multi-scale crop -> resize to ``input_size`` -> optional flip.

    Split in two so that no worker resizes anything: :meth:`draw` makes a clip's random choices in the DataLoader
    worker (which then decodes only the region holding the crops), and :func:`resize_crops` cuts, resizes and
    flips whole batches on the training device. ``flip`` is off by default (``--flip``): VideoMAE and AdaMAE
    pre-train without flips.
    """

    def __init__(self, input_size: Union[int, Sequence[int]], flip: bool, scales: Sequence[float] = MULTI_SCALES):
        self.size = _to_size(input_size)
        self.scales = tuple(scales)
        self.flip = flip

    def draw(self, height: int, width: int) -> Crop:
        """This clip's random choices for ``height x width`` frames: the crop box, then the flip (in that order,
        from ``random``, as VideoMAE's GroupMultiScaleCrop and flip)."""
        top, left, ch, cw = multi_scale_crop_params(height, width, self.size, self.scales)
        return top, left, ch, cw, bool(self.flip and random.random() < 0.5)


class CropItem(NamedTuple):
    """One pre-training item as a worker returns it: the decoded region and the crops to cut from it."""

    pixels: torch.Tensor  # uint8 [T, h, w, 3]: the region of the sampled frames that holds every crop
    crops: torch.Tensor   # int64 [K, 5]: (top, left, height, width, flip) in region pixels, one row per clip
    out_h: int            # the size the crops are resized to
    out_w: int


class CropBatch(NamedTuple):
    """A batch of :class:`CropItem` (``datasets.collate_crops``): regions zero-padded to the batch's largest."""

    pixels: torch.Tensor  # uint8 [B, T, H, W, 3]
    crops: torch.Tensor   # int64 [N, 6]: (item, top, left, height, width, flip), clips in item order
    out_h: int
    out_w: int


def resize_crops(batch: CropBatch, device: torch.device) -> torch.Tensor:
    """The clips of ``batch`` on ``device``: ``float32 [N, 3, T, out_h, out_w]`` in ``[0, 1]``.

    Each crop is resized as the workers used to do it (bilinear, antialiased when shrinking), then flipped. On a
    CPU that is the same uint8 resize, so the clips are exactly the former ones; GPUs resize in float (torch has
    no uint8 antialiased resize there) and round to whole grey levels, which keeps every pixel within one level
    of the uint8 resize (whose fixed-point weights differ from exact ones by up to a level; tested). Crops of one
    size are stacked (one batched copy on a GPU) and resized with one ``interpolate``: a multi-scale crop has only
    a few sizes, so a batch costs a few kernels. Only ``batch.crops`` is read on the host, so nothing waits for
    the device.
    """
    pixels = batch.pixels.to(device, non_blocking=True)
    crops = batch.crops
    _, t, _, _, c = pixels.shape
    size = (batch.out_h, batch.out_w)
    out = torch.empty(len(crops), c, t, *size, device=device)
    for h, w in torch.unique(crops[:, 3:5], dim=0).tolist():
        rows = ((crops[:, 3] == h) & (crops[:, 4] == w)).nonzero()[:, 0]
        x = torch.stack([pixels[i, :, y:y + h, x0:x0 + w] for i, y, x0 in crops[rows, :3].tolist()])
        x = x.view(-1, h, w, c).permute(0, 3, 1, 2)  # [G*T, 3, h, w], channels-last: the fast resize layout
        y = resize(x if x.device.type == "cpu" else x.float(), size).float().round_().reshape(len(rows), t, c, *size)
        flipped = _index_to(crops[rows, 5].nonzero()[:, 0], device)
        y[flipped] = y[flipped].flip(-1)
        out[_index_to(rows, device)] = y.transpose(1, 2)
    return out.div_(255.0)


def _index_to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device`` without waiting: a copy from pageable memory to a GPU blocks the host until
    the GPU has run everything queued before it (the previous step's backward); from pinned memory it does not."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


class TrainTransform:
    """Fine-tuning train, VideoMAE's ``_aug_frame``: RandAugment on the whole frames -> normalise -> random resized
    crop, bilinear resize of the normalised floats (no antialiasing, as its ``F.interpolate``) -> flip -> tube
    erasing. Normalising only the crop's pixels before the resize is the same arithmetic (per-channel affine
    maps commute with bilinear weights), to float rounding.

    ``aa_on_crop`` (``--aa_on_crop``, off by default): RandAugment on the crop once resized to ``input_size``
    (uint8), not on the whole frames: about 3x cheaper per clip on 320p video (benchmarks/
    bench_finetune_transform.py), but rotations and shears then fill more of every clip than in VideoMAE.
    """

    def __init__(self, input_size: int, aa: str | None, interpolation: str, reprob: float, remode: str,
                 recount: int, flip: bool, scale: Tuple[float, float] = RESIZED_CROP_SCALE,
                 ratio: Tuple[float, float] = RESIZED_CROP_RATIO, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, aa_on_crop: bool = False):
        self.size = _to_size(input_size)
        self.scale, self.ratio, self.flip, self.aa_on_crop = scale, ratio, flip, aa_on_crop
        self.mean, self.std = mean, std
        use_aa = bool(aa) and str(aa).lower() not in ("none", "")
        self.rand_aug = ClipRandAugment(aa, self.size[0], interpolation) if use_aa else None
        self.erase = ClipRandomErasing(reprob, remode, recount) if reprob > 0 else None

    def __call__(self, frames: Frames) -> torch.Tensor:
        x = as_tchw(frames)
        if self.rand_aug is not None and not self.aa_on_crop:
            x = self.rand_aug(x)
        top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], self.scale, self.ratio)
        if self.aa_on_crop:
            x = resize(crop(x, top, left, h, w), self.size, antialias=False)
            clip = normalize(self.rand_aug(x) if self.rand_aug is not None else x, self.mean, self.std)
        else:
            clip = resize(normalize(crop(x, top, left, h, w), self.mean, self.std), self.size, antialias=False)
        if self.flip and random.random() < 0.5:
            clip = clip.flip(-1)
        if self.erase is not None:
            clip = self.erase(clip)
        return clip


class EvalTransform:
    """Validation / test: short-side resize to ``short_side_size``, then crop ``crop_idx`` of ``num_crops``
    ``crop_size`` squares (``num_crops=1``: centre crop), normalise."""

    def __init__(self, short_side_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.short_side_size = short_side_size
        self.crop_size = crop_size
        self.mean, self.std = mean, std

    def __call__(self, frames: Frames, crop_idx: int = 0, num_crops: int = 1) -> torch.Tensor:
        x = short_side_resize(as_tchw(frames), self.short_side_size)
        x = spatial_crop(x, self.crop_size, crop_idx, num_crops)
        return normalize(x, self.mean, self.std)
