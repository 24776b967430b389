"""One pre-training step's loss, and one epoch of pre-training steps.

The loss is ``mean reconstruction error + w * sampling loss`` (AdaMAE; w = 1e-4 by default). Nothing here reads a
tensor back to the host except on logging steps, so GPU steps queue without waiting.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

import utils
import optim_factory
import metric_logging
from losses import gather_tokens, masked_indices, pixel_targets01, reconstruction_error, sampling_loss
from masking_generator import motion_coverage, motion_energy, sampler_health
from video_transforms import CropBatch, normalize_clips, resize_crops


class StepLosses(NamedTuple):
    loss: torch.Tensor            # what is back-propagated
    reconstruction: torch.Tensor  # mean per-token error over masked tokens
    sampling: torch.Tensor        # weighted sampling loss (0 without a sampler)
    probs: torch.Tensor | None
    mask: torch.Tensor


def mask_noise(seed: int, iteration: int, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Uniform draws for the masks of this process's ``batch`` clips at a given iteration.

    Every process draws the same ``[batch * world, N]`` table from a generator seeded by (seed, iteration) and
    keeps rows ``rank::world``, which are exactly the global-batch positions that DistributedSampler's
    interleaving gives it. Masks thus depend on a clip's place in the global batch, not on how many processes
    share it: a 2-process run takes the same steps as a 1-process run with the same total batch.
    """
    world, rank = utils.get_world_size(), utils.get_rank()
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + iteration) % (2 ** 63))
    return torch.rand(batch * world, num_tokens, generator=gen, device=device)[rank::world]


def clips_to_device(batch: CropBatch | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch from the loader as clips in ``[0, 1]`` on ``device``: a :class:`CropBatch` is cropped, resized and
    flipped there (``resize_crops``); a tensor of ``[0, 1]`` clips is only moved."""
    if isinstance(batch, CropBatch):
        return resize_crops(batch, device)
    return batch.to(device, non_blocking=True)


def pretrain_losses(model: nn.Module, videos: torch.Tensor, patch_size: int, tubelet_size: int,
                    normalize_target: bool = True, loss_type: str = "mse",
                    sampling_loss_weight: float = 1e-4, noise: torch.Tensor | None = None) -> StepLosses:
    """Forward ``model`` (possibly DDP-wrapped) on clips in ``[0, 1]`` and compute both losses.

    The model sees the ImageNet-normalised clips; targets come from the ``[0, 1]`` pixels themselves, in fp32
    outside the graph; the forward itself follows any enclosing autocast. ``noise`` (see ``mask_noise``) drives
    the mask sampling when given.
    """
    target = pixel_targets01(videos, patch_size, tubelet_size, normalize=normalize_target)
    out = model(normalize_clips(videos), noise=noise)
    pred, probs, mask = out
    target = gather_tokens(target, masked_indices(mask, pred.shape[1]))
    err = reconstruction_error(pred, target, loss_type)
    rec = err.mean()
    if out.log_probs is not None:
        samp = sampling_loss_weight * sampling_loss(out.log_probs, mask, err)
    else:
        samp = torch.zeros((), device=rec.device)
    return StepLosses(rec + samp, rec, samp, probs, mask)


def train_one_epoch(model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: utils.LossScaler, args: Any,
                    start_step: int, lr_schedule: np.ndarray, wd_schedule: np.ndarray,
                    log_writer: metric_logging.TensorboardLogger | None = None,
                    broken_count: Any = None, steps_per_epoch: int | None = None, first_step: int = 0,
                    metric_logger: metric_logging.MetricLogger | None = None, stop: Any = None
                    ) -> tuple[dict[str, float] | None, int]:
    """One epoch of pre-training; returns ``(averaged meters, optimizer steps done)``.

    ``start_step`` is the global optimizer-step index at the start of the epoch; the lr / weight-decay schedules
    are indexed per optimizer step. With ``args.accum_iter`` > 1 gradients of that many batches are accumulated
    per step. The non-finite-loss check is deferred to logging steps and the epoch end (a sticky device flag),
    so the step itself never waits on the host. A resumed epoch starts at ``first_step`` with the interrupted
    run's ``metric_logger``; when ``stop`` ends the epoch early the meters are returned as None (the caller saves
    ``metric_logger`` unreduced) with the number of steps done.
    """
    model.train()
    unwrapped = utils.unwrap_model(model)
    patch, tubelet = unwrapped.patch_size, unwrapped.tubelet_size
    accum = max(1, int(getattr(args, "accum_iter", 1)))
    print_freq = int(getattr(args, "print_freq", 10))
    if steps_per_epoch is None:
        steps_per_epoch = len(data_loader) // accum  # type: ignore[arg-type]
    metric_logger = metric_logger if metric_logger is not None else metric_logging.MetricLogger(delimiter="  ")
    watch = utils.NonFiniteLossWatch(epoch, steps_per_epoch, start_step, device)
    epoch_iter = utils.ScheduledEpoch(data_loader, metric_logger, optimizer, lr_schedule, wd_schedule,
                                      start_step=start_step, steps_per_epoch=steps_per_epoch, accum=accum,
                                      print_freq=print_freq, header=f"Epoch: [{epoch}]", seed=args.seed,
                                      first_step=first_step, stop=stop)

    optimizer.zero_grad(set_to_none=True)
    for it, step, global_step, update, videos in epoch_iter:
        videos = clips_to_device(videos, device)
        noise = mask_noise(args.seed, start_step * accum + it, videos.shape[0], unwrapped.num_patches, device)
        with utils.autocast(device, args.precision):
            out = pretrain_losses(model, videos, patch, tubelet, args.normalize_target, args.loss_type,
                                  args.sampling_loss_weight, noise)
        watch.update(out.loss, step)
        grad_norm = loss_scaler(out.loss / accum, optimizer, clip_grad=args.clip_grad, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            stats = dict(loss=out.loss.detach(), loss_rec=out.reconstruction.detach(),
                         loss_samp=out.sampling.detach(), grad_norm=grad_norm)
            if out.probs is not None:
                entropy, max_prob = sampler_health(out.probs)
                energy = motion_energy(videos, patch, tubelet)
                stats.update(sampler_entropy=entropy, sampler_max_prob=max_prob,
                             motion_coverage=motion_coverage(out.mask, energy))
        lr_stats = optim_factory.get_lr_stats(optimizer)
        metric_logger.update(**stats, lr=lr_stats["lr"], weight_decay=lr_stats["weight_decay"])
        if it % print_freq == 0:
            watch.check()
        if log_writer is not None and update:
            log_writer.update(head="loss", step=global_step, loss=stats["loss"], loss_reconstruction=stats["loss_rec"],
                              loss_sampling=stats["loss_samp"])
            log_writer.update(head="opt", step=global_step, lr=lr_stats["lr"], min_lr=lr_stats["min_lr"],
                              weight_decay=lr_stats["weight_decay"], grad_norm=grad_norm)
            if "sampler_entropy" in stats:
                log_writer.update(head="sampler", step=global_step, entropy=stats["sampler_entropy"],
                                  max_prob=stats["sampler_max_prob"], motion_coverage=stats["motion_coverage"])
            if it % print_freq == 0:
                log_writer.update(head="opt", step=global_step, loss_scale=loss_scaler.get_scale())
                log_writer.update(head="data", step=global_step, data_time=metric_logger.data_time.avg,
                                  broken_videos=broken_count() if broken_count else 0)
    watch.check()
    if epoch_iter.stopped:
        return None, epoch_iter.completed_steps
    metric_logger.synchronize_between_processes()
    averages = metric_logger.global_averages()
    # Seconds per iteration, and the part of it spent waiting for the data loader (this process).
    averages.update(step_time=metric_logger.step_time.global_avg, data_time=metric_logger.data_time.global_avg)
    if broken_count:
        averages["broken_videos"] = broken_count()
    print("Averaged stats:", "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
    return averages, epoch_iter.completed_steps
