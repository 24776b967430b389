"""One pre-training step's loss, and one epoch of pre-training steps.

The loss is ``mean reconstruction error + w * sampling loss`` (AdaMAE; w = 1e-4 by default). Nothing here reads a
tensor back to the host except on logging steps, so GPU steps queue without waiting.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from losses import gather_tokens, masked_indices, pixel_targets, reconstruction_error, sampling_loss


class StepLosses(NamedTuple):
    loss: torch.Tensor            # what is back-propagated
    reconstruction: torch.Tensor  # mean per-token error over masked tokens
    sampling: torch.Tensor        # weighted sampling loss (0 without a sampler)
    probs: Optional[torch.Tensor]
    mask: torch.Tensor


def pretrain_losses(model: nn.Module, videos: torch.Tensor, patch_size: int, tubelet_size: int,
                    normalize_target: bool = True, loss_type: str = "mse",
                    sampling_loss_weight: float = 1e-4) -> StepLosses:
    """Forward ``model`` (possibly DDP-wrapped) on ImageNet-normalised clips and compute both losses.

    Targets are built in fp32 outside the graph; the forward itself follows any enclosing autocast.
    """
    target = pixel_targets(videos, patch_size, tubelet_size, normalize=normalize_target)
    out = model(videos)
    pred, probs, mask = out
    target = gather_tokens(target, masked_indices(mask, pred.shape[1]))
    err = reconstruction_error(pred, target, loss_type)
    rec = err.mean()
    if out.log_probs is not None:
        samp = sampling_loss_weight * sampling_loss(out.log_probs, mask, err)
    else:
        samp = torch.zeros((), device=rec.device)
    return StepLosses(rec + samp, rec, samp, probs, mask)
