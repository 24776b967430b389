"""One epoch of pre-training steps (the step's loss is ``losses.pretrain_losses``), the clips' way onto the device,
and the mask noise that makes a 2-process run equal a 1-process one.

Nothing here reads a tensor back to the host except on logging steps, so GPU steps queue without waiting.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from timm.utils import unwrap_model

import distributed
import metric_logging
from precision import autocast, get_grad_norm_
from preemption import GracefulStop
from training import Optimisation, TrainEpoch
from losses import pretrain_losses
from masking_generator import motion_coverage, motion_energy, sampler_health
from video_transforms import CropBatch, resize_crops


def mask_noise(seed: int, iteration: int, batch: int, num_tokens: int, device: torch.device, num_sample: int = 1,
               world: int | None = None, rank: int | None = None) -> torch.Tensor:
    """Uniform draws for the masks of this process's ``batch`` clips (``num_sample`` per video, consecutive) at a
    given iteration.

    Every process draws the same ``[videos * world, num_sample, N]`` table from a generator seeded by (seed,
    iteration) and keeps the videos ``rank::world``, which are exactly the global-batch positions that
    DistributedSampler's interleaving gives it. Masks thus depend on a clip's place in the global batch, not on how
    many processes share it: a 2-process run takes the same steps as a 1-process run with the same total batch
    (the sampler's dropout, drawn by each process, aside). ``world`` / ``rank`` default to this process's.
    """
    world = distributed.get_world_size() if world is None else world
    rank = distributed.get_rank() if rank is None else rank
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + iteration) % (2 ** 63))
    table = torch.rand(batch // num_sample * world, num_sample, num_tokens, generator=gen, device=device)
    return table[rank::world].reshape(batch, num_tokens)


def clips_to_device(batch: CropBatch | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch from the loader as clips in ``[0, 1]`` on ``device``: a :class:`CropBatch` is cropped, resized and
    flipped there (``resize_crops``); a tensor of ``[0, 1]`` clips is only moved."""
    if isinstance(batch, CropBatch):
        return resize_crops(batch, device)
    return batch.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, data_loader: Iterable, optim: Optimisation, device: torch.device, epoch: int,
                    args: Any, *, log_writer: metric_logging.TensorboardLogger | None = None,
                    broken_count: Callable[[], int] | None = None, first_step: int = 0,
                    meters: metric_logging.MetricLogger | None = None, stop: GracefulStop | None = None
                    ) -> tuple[dict[str, float] | None, int]:
    """One epoch of pre-training; returns ``(averaged meters or None when stopped, optimizer steps done)`` (see
    ``training.TrainEpoch`` for accumulation, resuming inside an epoch and stopping early).

    The non-finite-loss check is deferred to logging steps and the epoch end (a sticky device flag), so the step
    itself never waits on the host.
    """
    run = TrainEpoch(model, data_loader, optim, args, epoch, device, first_step=first_step, meters=meters, stop=stop,
                     lr_keys=("lr", "weight_decay"))
    optimizer, loss_scaler, accum = optim.optimizer, optim.loss_scaler, args.accum_iter
    unwrapped = unwrap_model(model)
    patch, tubelet = unwrapped.patch_size, unwrapped.tubelet_size
    sampler_params = unwrapped.sampler_parameters()

    optimizer.zero_grad(set_to_none=True)
    for it, step, global_step, update, videos in run:
        videos = clips_to_device(videos, device)
        noise = mask_noise(args.seed, run.start_step * accum + it, videos.shape[0], unwrapped.num_patches, device,
                           args.num_sample)
        with run.grad_sync(update):
            with autocast(device, args.precision):
                out = pretrain_losses(model, videos, patch, tubelet, args.normalize_target, args.loss_type,
                                      args.sampling_loss_weight, noise, args.sampling_log_prob)
            grad_norm = loss_scaler(out.loss / accum, optimizer, clip_grad=args.clip_grad, update_grad=update)
        # The sampler's share, from the gradients just applied (unscaled; clipped when --clip_grad is set).
        sampler_grad_norm = get_grad_norm_(sampler_params) if update and sampler_params else None
        if update:
            optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            stats = dict(loss=out.loss.detach(), loss_rec=out.reconstruction.detach(),
                         loss_samp=out.sampling.detach(), grad_norm=grad_norm)
            if out.probs is not None:
                entropy, max_prob = sampler_health(out.probs)
                energy = motion_energy(videos, patch, tubelet)
                stats.update(sampler_entropy=entropy, sampler_max_prob=max_prob,
                             motion_coverage=motion_coverage(out.mask, energy), sampler_grad_norm=sampler_grad_norm)
        lr_stats = run.record(it, step, out.loss, **stats)
        if log_writer is not None and update:
            avg = run.step_average()  # over the step's --update_freq batches
            log_writer.update(head="loss", step=global_step, loss=avg["loss"], loss_reconstruction=avg["loss_rec"],
                              loss_sampling=avg["loss_samp"])
            log_writer.update(head="opt", step=global_step, lr=lr_stats["lr"], min_lr=lr_stats["min_lr"],
                              weight_decay=lr_stats["weight_decay"], grad_norm=grad_norm)
            if "sampler_entropy" in avg:
                log_writer.update(head="sampler", step=global_step, entropy=avg["sampler_entropy"],
                                  max_prob=avg["sampler_max_prob"], motion_coverage=avg["motion_coverage"],
                                  grad_norm=sampler_grad_norm)
            if step % args.print_freq == 0:  # optimizer steps: `it` is never a multiple on update iterations when
                # --update_freq and --print_freq share a factor
                log_writer.update(head="opt", step=global_step, loss_scale=loss_scaler.get_scale())
                log_writer.update(head="data", step=global_step, data_time=run.meters.data_time.avg,
                                  broken_videos=broken_count() if broken_count else 0)
    # Seconds per iteration, and the part of it spent waiting for the data loader (this process).
    extra = dict(step_time=run.meters.step_time.global_avg, data_time=run.meters.data_time.global_avg,
                 **run.meters.steady)
    return run.finish(**extra)  # the epoch's broken videos, over all ranks: training.run_epochs
