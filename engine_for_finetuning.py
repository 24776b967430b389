"""One epoch of supervised training (fine-tuning, and the probes' training): mixup, EMA, gradient accumulation,
and the DeepSpeed engine's own backward / step. Validation and the multi-view test are in ``evaluation``."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from timm.utils import unwrap_model

import metric_logging
from precision import autocast
from preemption import GracefulStop
from training import Optimisation, TrainEpoch


def train_one_epoch(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    data_loader: Iterable, optim: Optimisation, device: torch.device, epoch: int, args: Any, *,
                    model_ema: Any = None, mixup_fn: Callable | None = None,
                    log_writer: metric_logging.TensorboardLogger | None = None, deepspeed_engine: bool = False,
                    first_step: int = 0, meters: metric_logging.MetricLogger | None = None,
                    stop: GracefulStop | None = None) -> tuple[dict[str, float] | None, int]:
    """One epoch of supervised training; returns ``(averaged meters or None when stopped, optimizer steps done)``
    (see ``training.TrainEpoch`` for resuming inside an epoch and stopping early).

    ``optim.optimizer`` is the torch optimizer whose groups carry ``lr_scale`` (also under DeepSpeed, where it is
    the client optimizer the engine wraps), so the per-step lr / weight-decay schedules are applied the same way on
    both paths. With ``args.accum_iter`` > 1, gradients of that many batches make one step (DDP skips the
    all-reduce on the accumulation micro-steps). With ``deepspeed_engine`` the model is a DeepSpeed engine that
    does backward, accumulation, clipping and the step itself.
    """
    run = TrainEpoch(model, data_loader, optim, args, epoch, device, first_step=first_step, meters=meters, stop=stop)
    optimizer, accum = optim.optimizer, args.accum_iter
    ds_dtype = _deepspeed_input_dtype(model) if deepspeed_engine else None
    ema_target = unwrap_model(model)

    if not deepspeed_engine:
        optimizer.zero_grad(set_to_none=True)
    for it, step, global_step, update, batch in run:
        samples = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        hard_targets = targets
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        if deepspeed_engine:
            output = model(samples.to(ds_dtype) if ds_dtype is not None else samples)
            loss = criterion(output.float(), targets)
            model.backward(loss)
            model.step()
            grad_norm = _deepspeed_grad_norm(model) if update else None
        else:
            with run.grad_sync(update):
                with autocast(device, args.precision):
                    output = model(samples)
                loss = criterion(output.float(), targets)
                grad_norm = optim.loss_scaler(loss / accum, optimizer, clip_grad=args.clip_grad, update_grad=update)
            if update:
                optimizer.zero_grad(set_to_none=True)
        if update and model_ema is not None:
            model_ema.update(ema_target)  # the fixed decay from the first step, as VideoMAE's timm ModelEma

        stats: dict[str, Any] = dict(loss=loss.detach(), grad_norm=grad_norm)
        if mixup_fn is None:
            stats["class_acc"] = (output.detach().argmax(-1) == hard_targets).float().mean()
        lr_stats = run.record(it, step, loss, **stats)
        if log_writer is not None and update:
            avg = run.step_average()  # over the step's --update_freq batches
            log_writer.update(head="loss", step=global_step, loss=avg["loss"], class_acc=avg.get("class_acc"))
            log_writer.update(head="opt", step=global_step, lr=lr_stats["lr"], min_lr=lr_stats["min_lr"],
                              weight_decay=lr_stats["weight_decay"], grad_norm=grad_norm)
    return run.finish()


def _deepspeed_input_dtype(engine: Any) -> torch.dtype | None:
    """DeepSpeed casts the model for fp16/bf16 but not the inputs (it does not autocast)."""
    if getattr(engine, "fp16_enabled", lambda: False)():
        return torch.float16
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    return None


def _deepspeed_grad_norm(engine: Any) -> torch.Tensor | None:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
