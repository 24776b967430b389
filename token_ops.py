"""Token operations shared by the model, the losses and the visualisation: clips to tubelet tokens and back,
which tokens are masked, gathering / scattering tokens, and the per-tubelet standardisation of pixel targets.

Everything is vectorised over the batch and free of host synchronisation; masked tokens are always handled in
ascending token order, which is the order the decoder predicts them in.
"""
from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange


def masked_indices(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Indices of the True entries of each row of ``mask``, ascending; every row has ``num_masked`` of them.

    A stable sort instead of ``nonzero`` keeps the shape static and avoids a device-to-host sync.
    """
    order = torch.argsort(mask.to(torch.uint8), dim=1, descending=True, stable=True)
    return order[:, :num_masked]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for ``x`` of shape ``[B, N, ...]``."""
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x[b, idx[b]] = values[b]``: the inverse of :func:`gather_tokens`."""
    return x.scatter(1, idx.reshape(*idx.shape, *([1] * (values.dim() - 2))).expand_as(values), values)


def patchify(videos: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """``[B, C, T, H, W] -> [B, N, t*p*p, C]`` with tokens in ``(t, h, w)`` order (VideoMAE's layout)."""
    return rearrange(videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
                     p0=tubelet_size, p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, grid: Sequence[int], patch_size: int, tubelet_size: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify`` followed by flattening ``(p c)``: ``[B, N, t*p*p*C] -> [B, C, T, H, W]``."""
    t, h, w = grid
    return rearrange(patches, "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)", t=t, h=h, w=w,
                     p0=tubelet_size, p1=patch_size, p2=patch_size, c=channels)


def tubelet_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tubelet, per-channel ``(mean, unbiased std + eps)`` over the ``t*p*p`` pixels of ``[B, N, t*p*p, C]``
    patches: VideoMAE's normalised-target statistics, shared by the targets and the visualisation's inverse."""
    mean = patches.mean(dim=-2, keepdim=True)
    std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return mean, std + eps


def normalize_tubelets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each tubelet of ``[B, N, t*p*p, C]`` patches per channel (see :func:`tubelet_stats`)."""
    mean, scale = tubelet_stats(patches, eps)
    return (patches - mean) / scale


def denormalize_tubelets(values: torch.Tensor, patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map standardised ``values`` back to pixels with the statistics of ``patches`` (same shape): the inverse of
    :func:`normalize_tubelets` for those patches."""
    mean, scale = tubelet_stats(patches, eps)
    return values * scale + mean
