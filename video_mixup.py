"""Mixup / CutMix for video clips ``[B, C, T, H, W]``.

timm's ``Mixup`` assumes images: its CutMix box is written as ``x[:, :, y0:y1, x0:x1]``, which on a 5-D clip cuts
over (T, H) while lambda is computed from (H, W) (AdaMAE's bug). Folding time into channels, ``[B, C*T, H, W]``,
makes the box a spatial one shared by every frame, with lambda equal to the box's area fraction.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup

__all__ = ["VideoMixup", "build_mixup"]


class VideoMixup(Mixup):
    """timm ``Mixup`` whose CutMix box is one H x W region applied to all frames of a clip."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5:
            return super().__call__(x, target)
        b, c, t, h, w = x.shape
        folded = x.contiguous().view(b, c * t, h, w)  # timm mixes in place; keep a view of the clip's storage
        folded, target = super().__call__(folded, target)
        return folded.view(b, c, t, h, w), target


def build_mixup(args: Any, num_classes: int) -> VideoMixup | None:
    """``VideoMixup`` from the VideoMAE flags, or None when ``--mixup``, ``--cutmix`` and ``--cutmix_minmax`` are
    all off. Label smoothing is folded into the mixed targets (timm's convention)."""
    active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if not active:
        return None
    return VideoMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
