"""Pre-training targets and losses: pixel reconstruction and AdaMAE's sampling (REINFORCE-style) loss.

Everything is vectorised over the batch and free of host synchronisation; masked tokens are always handled in
ascending token order, which is the order the decoder predicts them in.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


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


def unnormalize(videos: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``[B, 3, T, H, W]`` clips, giving pixels in ``[0, 1]``."""
    shape = (1, -1, 1, 1, 1)
    mean_t = torch.as_tensor(mean, device=videos.device, dtype=torch.float32).view(shape)
    std_t = torch.as_tensor(std, device=videos.device, dtype=torch.float32).view(shape)
    return videos.float() * std_t + mean_t


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


def pixel_targets(videos: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                  eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets ``[B, N, t*p*p*3]`` from ImageNet-normalised clips (see ``pixel_targets01``)."""
    return pixel_targets01(unnormalize(videos), patch_size, tubelet_size, normalize, eps)


def pixel_targets01(videos01: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets ``[B, N, t*p*p*3]`` from clips in ``[0, 1]``.

    With ``normalize`` each tubelet is standardised per channel over its ``t*p*p`` pixels (mean and unbiased std,
    ``eps`` 1e-6), VideoMAE's and AdaMAE's default; otherwise raw ``[0, 1]`` pixels.
    """
    with torch.no_grad():
        patches = patchify(videos01.float(), patch_size, tubelet_size)
        if normalize:
            mean = patches.mean(dim=-2, keepdim=True)
            std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
            patches = (patches - mean) / (std + eps)
        return patches.flatten(2)


def reconstruction_error(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse") -> torch.Tensor:
    """Per-token error ``[B, N_masked]``: mean squared (paper default) or mean absolute (ablation (d))."""
    pred = pred.float()
    if loss_type == "mse":
        return F.mse_loss(pred, target, reduction="none").mean(-1)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none").mean(-1)
    raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")


def sampling_loss(log_probs: torch.Tensor, mask: torch.Tensor, token_error: torch.Tensor) -> torch.Tensor:
    """AdaMAE's sampling loss, ``mean_b [ -mean_{i masked} log p_i * err_i ]`` (unweighted).

    The error is a detached reward: minimising this raises the probability of masked tokens the decoder
    reconstructed badly, so the sampler picks such tokens as visible next time. No gradient flows through the
    without-replacement draw itself (it is not differentiable); this surrogate is AdaMAE's, scored under a single
    categorical over all N tokens, with no baseline. ``log_probs`` must be a ``log_softmax`` output (stable where
    ``log(softmax)`` would give ``-inf``).
    """
    idx = masked_indices(mask, token_error.shape[1])
    logp_masked = torch.gather(log_probs.float(), 1, idx)
    return -(logp_masked * token_error.detach().float()).mean(dim=1).mean()
