"""Pre-training targets and losses: pixel reconstruction and AdaMAE's sampling (REINFORCE-style) loss, and
:func:`pretrain_losses`, the loss of one pre-training step (``mean reconstruction error + w * sampling loss``;
w = 1e-4 by default).

Everything is vectorised over the batch and free of host synchronisation. Masked tokens are addressed by the
indices the model's forward carries (``PretrainOutput.masked_idx``, ascending, the decoder's order), so one
mask's indices are computed once per step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.distributions.utils import probs_to_logits

from token_ops import gather_tokens, normalize_tubelets, patchify
from video_transforms import normalize_clips

if TYPE_CHECKING:
    from modeling_pretrain import PretrainOutput


def unnormalize(videos: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``[B, 3, T, H, W]`` clips, giving pixels in ``[0, 1]``."""
    shape = (1, -1, 1, 1, 1)
    mean_t = torch.as_tensor(mean, device=videos.device, dtype=torch.float32).view(shape)
    std_t = torch.as_tensor(std, device=videos.device, dtype=torch.float32).view(shape)
    return videos.float() * std_t + mean_t


def pixel_targets(videos: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                  eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets ``[B, N, t*p*p*3]`` from ImageNet-normalised clips (see ``pixel_targets01``)."""
    return pixel_targets01(unnormalize(videos), patch_size, tubelet_size, normalize, eps)


def pixel_targets01(videos01: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets ``[B, N, t*p*p*3]`` from clips in ``[0, 1]``.

    With ``normalize`` each tubelet is standardised per channel over its ``t*p*p`` pixels (mean and unbiased std,
    ``eps`` 1e-6; ``token_ops.normalize_tubelets``), VideoMAE's and AdaMAE's default; otherwise raw ``[0, 1]``
    pixels.
    """
    with torch.no_grad():
        patches = patchify(videos01.float(), patch_size, tubelet_size)
        if normalize:
            patches = normalize_tubelets(patches, eps)
        return patches.flatten(2)


def reconstruction_error(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse") -> torch.Tensor:
    """Per-token error ``[B, N_masked]``: mean squared (paper default) or mean absolute (ablation (d))."""
    pred = pred.float()
    if loss_type == "mse":
        return F.mse_loss(pred, target, reduction="none").mean(-1)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none").mean(-1)
    raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")


def masked_token_error(out: PretrainOutput, target: torch.Tensor, loss_type: str = "mse") -> torch.Tensor:
    """Per-token error ``[B, N_masked]`` of the model's predictions against the masked tokens of ``target``
    ``[B, N, D]`` (all tokens), picked with the indices the forward carries; training and the visualisation
    both score predictions with this."""
    return reconstruction_error(out.pred, gather_tokens(target, out.masked_idx), loss_type)


def sampling_loss(log_probs: torch.Tensor, masked_idx: torch.Tensor, token_error: torch.Tensor) -> torch.Tensor:
    """AdaMAE's sampling loss, ``mean_b [ -mean_{i masked} log p_i * err_i ]`` (unweighted).

    The error is a detached reward: minimising this raises the probability of masked tokens the decoder
    reconstructed badly, so the sampler picks such tokens as visible next time. No gradient flows through the
    without-replacement draw itself (it is not differentiable); this surrogate is AdaMAE's, scored under a single
    categorical over all N tokens, with no baseline. ``log_probs`` are ``sampler_log_probs``; ``masked_idx``
    ``[B, N_masked]`` orders the masked tokens as ``token_error`` does (ascending, ``PretrainOutput.masked_idx``).
    """
    logp_masked = torch.gather(log_probs.float(), 1, masked_idx)
    return -(logp_masked * token_error.detach().float()).mean(dim=1).mean()


SAMPLING_LOG_PROBS = ("categorical", "log_softmax")


def sampler_log_probs(log_probs: torch.Tensor, kind: str = "categorical") -> torch.Tensor:
    """The ``log p`` the sampling loss scores: ``log_softmax`` as given, or AdaMAE's (``categorical``):
    ``torch.distributions.Categorical(probs=p).log_prob``, whose log of the probabilities clamped to
    ``[eps, 1 - eps]`` (float32 eps 1.2e-7) caps ``-log p`` near 15.9 and gives such tokens no gradient. The two
    agree while every ``p >= 1.2e-7``."""
    if kind == "log_softmax":
        return log_probs.float()
    if kind != "categorical":
        raise ValueError(f"sampling log-prob must be one of {SAMPLING_LOG_PROBS}, got {kind!r}")
    p = log_probs.float().exp()
    return probs_to_logits(p / p.sum(-1, keepdim=True))


class StepLosses(NamedTuple):
    loss: torch.Tensor            # what is back-propagated
    reconstruction: torch.Tensor  # mean per-token error over masked tokens
    sampling: torch.Tensor        # weighted sampling loss (0 without a sampler)
    probs: torch.Tensor | None
    mask: torch.Tensor


def pretrain_losses(model: nn.Module, videos: torch.Tensor, patch_size: int, tubelet_size: int,
                    normalize_target: bool = True, loss_type: str = "mse",
                    sampling_loss_weight: float = 1e-4, noise: torch.Tensor | None = None,
                    log_prob: str = "categorical") -> StepLosses:
    """Forward ``model`` (possibly DDP-wrapped) on clips in ``[0, 1]`` and compute both losses.

    The model sees the ImageNet-normalised clips; targets come from the ``[0, 1]`` pixels themselves, in fp32
    outside the graph; the forward itself follows any enclosing autocast. ``noise`` (see
    ``engine_for_pretraining.mask_noise``) drives the mask sampling when given; ``log_prob`` is the sampling
    loss's ``log p`` (``sampler_log_probs``).
    """
    target = pixel_targets01(videos, patch_size, tubelet_size, normalize=normalize_target)
    out = model(normalize_clips(videos), noise=noise)
    err = masked_token_error(out, target, loss_type)
    rec = err.mean()
    if out.log_probs is not None:
        samp = sampling_loss_weight * sampling_loss(sampler_log_probs(out.log_probs, log_prob), out.masked_idx, err)
    else:
        samp = torch.zeros((), device=rec.device)
    return StepLosses(rec + samp, rec, samp, out.probs, out.mask)
