"""Optimisation: the optimizer over weight-decay / layer-decay parameter groups, the linear lr scaling rule, the
per-step cosine schedules and their flags (one definition for both programs)."""
from __future__ import annotations

import argparse
import fnmatch
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from timm.utils import unwrap_model

from cli import at_least


__all__ = ["add_optimizer_args", "create_optimizer", "scale_lr", "cosine_scheduler", "apply_schedule", "get_lr_stats"]


def _matches_skip(name: str, skip: Iterable[str]) -> bool:
    for s in skip:
        if name == s or name.endswith("." + s) or fnmatch.fnmatchcase(name, s):
            return True
    return False


def create_optimizer(args: argparse.Namespace, model: nn.Module, skip_list: Iterable[str] | None = None,
                     layer_decay: float | None = None, verbose: bool = True) -> torch.optim.Optimizer:
    """Build the optimizer (timm registry, AdamW by default) over weight-decay / layer-decay parameter groups.

    Every group carries ``lr_scale`` and ``weight_decay`` so that ``apply_schedule`` can drive them per step.
    1-D parameters, ``*.bias`` and names in ``skip_list`` (default: ``model.no_weight_decay()``; a name
    matches exactly, as a dotted suffix, or as a glob) get no weight decay. Layer decay (``layer_decay`` < 1) uses
    timm's ``param_groups_layer_decay``, i.e. ``model.group_matcher(coarse=False)``.
    Reads ``args.opt`` ('adamw'), ``args.lr``, ``args.weight_decay``, ``args.opt_eps``, ``args.opt_betas``,
    ``args.momentum``.
    """
    from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

    model = unwrap_model(model)
    if skip_list is None:
        skip_list = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip_list = tuple(skip_list)
    weight_decay = float(args.weight_decay)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Expand our matching rule into exact names for timm (its fnmatch would miss "encoder.pos_embed").
    no_wd_names = [n for n, p in named if n.endswith(".bias") or _matches_skip(n, skip_list)]
    if layer_decay is not None and float(layer_decay) < 1.0:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_wd_names,
                                          layer_decay=float(layer_decay))
    else:
        # Always build groups, even with weight_decay == 0, so that lr_scale exists (VideoMAE's KeyError).
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_wd_names)

    id2name = {id(p): n for n, p in named}
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["weight_decay"] = float(g["weight_decay"])
        g["wd_enabled"] = g["weight_decay"] > 0  # survives a weight-decay schedule that reaches 0
        if "group_name" not in g:
            g["group_name"] = f"scale_{g['lr_scale']:.4g}_{'decay' if g['wd_enabled'] else 'no_decay'}"

    kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        kwargs["eps"] = float(args.opt_eps)
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(float(b) for b in args.opt_betas)
    opt_name = args.opt
    optimizer = create_optimizer_v2(groups, opt=opt_name, lr=float(args.lr), weight_decay=weight_decay,
                                    momentum=float(args.momentum), **kwargs)
    if verbose:
        lines = [f"Optimizer {opt_name}: lr {float(args.lr):.3e}, weight_decay {weight_decay}, "
                 f"layer_decay {layer_decay}, {len(optimizer.param_groups)} groups"]
        for g in optimizer.param_groups:
            names = [id2name.get(id(p), "?") for p in g["params"]]
            shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"  {g.get('group_name', '?'):<24} lr_scale {g['lr_scale']:.4g}  "
                         f"wd {g['weight_decay']:g}"
                         f"  {len(names)} tensors / {sum(p.numel() for p in g['params']):,} params: {shown}")
        print("\n".join(lines))
    return optimizer


def scale_lr(args: argparse.Namespace, total_batch: int, base_batch: int = 256, detail: str = "") -> float:
    """Apply the linear scaling rule ``lr = base_lr * total_batch / 256`` (also min_lr, warmup_lr) and say so.

    ``total_batch`` is ``batch_size x update_freq x processes`` (``detail`` spells it out in the message). The
    unscaled values are kept in ``args.base_lr`` / ``base_min_lr`` / ``base_warmup_lr`` so calling this twice does
    not scale twice.
    """
    factor = float(total_batch) / float(base_batch)
    for name in ("lr", "min_lr", "warmup_lr"):
        base_name = f"base_{name}"
        if getattr(args, base_name, None) is None:  # set here, on the first call
            setattr(args, base_name, float(getattr(args, name)))
        setattr(args, name, getattr(args, base_name) * factor)
    print(f"LR scaling: base lr {args.base_lr:.3e} x total batch {total_batch} / {base_batch} = lr {args.lr:.3e}"
          + (f" ({detail})" if detail else "") + f"; min_lr {args.min_lr:.3e}, warmup_lr {args.warmup_lr:.3e}")
    return float(args.lr)


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0.0, warmup_steps: int = -1
                     ) -> np.ndarray:
    """Per-iteration linear warm-up (``linspace(start, base)``, end point included) then cosine to ``final``.

    Numpy rather than timm's CosineLRScheduler: timm's warm-up ramp excludes the end point, so it cannot
    reproduce VideoMAE's curve exactly; the same function also drives the weight-decay schedule. Unlike
    VideoMAE this does not assert when ``warmup_steps > 0`` with ``warmup_epochs == 0``, and clamps a warm-up
    longer than the run.
    """
    total = max(0, int(epochs) * int(niter_per_ep))
    warmup_iters = int(warmup_steps) if warmup_steps is not None and warmup_steps > 0 \
        else int(round(warmup_epochs * niter_per_ep))
    warmup_iters = min(max(0, warmup_iters), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    n = total - warmup_iters
    i = np.arange(n, dtype=np.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == total
    return schedule


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float | None = None,
                   weight_decay: float | None = None) -> None:
    """Per-step update: ``lr * lr_scale`` for every group; ``weight_decay`` only for groups that decay."""
    for g in optimizer.param_groups:
        if lr is not None:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g.get("wd_enabled", g["weight_decay"] > 0):
            g["weight_decay"] = weight_decay


def get_lr_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Max/min lr and the decaying groups' weight decay, for the ``opt/*`` log entries."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    wds = [g["weight_decay"] for g in optimizer.param_groups if g.get("wd_enabled", g["weight_decay"] > 0)]
    return {"lr": max(lrs), "min_lr": min(lrs), "weight_decay": max(wds) if wds else 0.0}


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float, min_lr: float, warmup_lr: float,
                       warmup_epochs: int) -> argparse._ArgumentGroup:
    """Optimizer and schedule flags (VideoMAE's names) with each program's own defaults."""
    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw", type=str, help="optimizer name in timm's registry")
    g.add_argument("--opt_eps", default=1e-8, type=float, help="optimizer epsilon")
    g.add_argument("--opt_betas", default=None, type=float, nargs="+", help="e.g. 0.9 0.95")
    g.add_argument("--clip_grad", default=None, type=float,
                   help="clip the gradient norm to this value (default: no clipping, the norm is only measured)")
    g.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (only for --opt sgd / momentum)")
    g.add_argument("--weight_decay", default=0.05, type=float,
                   help="weight decay (constant, or the start of a cosine schedule with --weight_decay_end)")
    g.add_argument("--weight_decay_end", default=None, type=float,
                   help="cosine weight-decay target (default: constant)")
    g.add_argument("--lr", default=lr, type=float, help="base lr; the run uses lr * total_batch / 256")
    g.add_argument("--warmup_lr", default=warmup_lr, type=float, help="warm-up start (scaled like --lr)")
    g.add_argument("--min_lr", default=min_lr, type=float, help="final lr (scaled like --lr)")
    g.add_argument("--warmup_epochs", default=warmup_epochs, type=at_least(0), help="linear warm-up epochs")
    g.add_argument("--warmup_steps", default=-1, type=int, help="overrides --warmup_epochs when > 0")
    return g
