"""DeepSpeed glue for fine-tuning (``--enable_deepspeed``): the engine's config from our flags, start-up, and its
checkpoint folders behind the interface of ``checkpointing.Checkpointer``.

The engine wraps our own optimizer (timm AdamW with the layer-decay groups), so both paths run the same recipe and
no DeepSpeed CUDA op has to be built.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
from typing import Any

import torch

import distributed
from checkpointing import CheckpointError, ResumeInfo, keeps_epoch, refuse_to_start_over_on
from distributed import all_gather_objects, get_rank, get_world_size
from resume import check_run_config
from utils import get_model_state_dict, plain_args


def build_deepspeed_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for this run: batch sizes, accumulation, clipping, precision and ZeRO stage.

    The optimizer is not described here: the engine wraps our own (timm AdamW with the layer-decay groups, the
    ``--opt_betas`` / ``--opt_eps`` / weight decay of the command line), so the DeepSpeed and the plain path run
    the same recipe and no DeepSpeed CUDA op has to be built.
    """
    cfg: dict[str, Any] = {
        "train_batch_size": args.batch_size * args.accum_iter * world_size,
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.accum_iter,
        "steps_per_print": 1000,
        "gradient_clipping": float(args.clip_grad or 0.0),
        "zero_optimization": {"stage": int(args.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if args.precision == "fp16":
        # VideoMAE's DeepSpeed loss scaling: dynamic, from 2^7, doubled after 128 overflow-free steps
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 7, "loss_scale_window": 128,
                       "hysteresis": 2, "min_loss_scale": 1}
    elif args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_deepspeed(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                   ) -> Any:
    """Wrap ``model`` / ``optimizer`` in a DeepSpeed engine (process group reused, or a 1-process one created)."""
    try:
        import deepspeed
    except ImportError as e:
        raise SystemExit("--enable_deepspeed needs DeepSpeed: pip install -r requirements-deepspeed.txt "
                         f"(on CPU also export DS_ACCELERATOR=cpu) [{type(e).__name__}: {e}]") from e
    if not distributed.is_dist_avail_and_initialized():
        # DeepSpeed always wants a process group; make a 1-process one as torchrun would.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if args.device.startswith("cuda") else "gloo")
    if args.deepspeed_config:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            config = json.load(f)
    else:
        config = build_deepspeed_config(args, distributed.get_world_size())
    if args.output_dir and distributed.is_main_process():
        with open(os.path.join(args.output_dir, "deepspeed_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if engine.gradient_accumulation_steps() != args.accum_iter:
        raise ValueError(f"DeepSpeed uses {engine.gradient_accumulation_steps()} accumulation steps but "
                         f"--update_freq is {args.accum_iter}")
    print(f"DeepSpeed {deepspeed.__version__}: ZeRO stage {config.get('zero_optimization', {}).get('stage', 0)}, "
          f"precision {args.precision}, config {json.dumps(config)}")
    return engine


class DeepSpeedCheckpointer:
    """``checkpointing.Checkpointer``'s interface over DeepSpeed checkpoint folders: ``checkpoint-{epoch}`` after
    every epoch (kept every ``--save_ckpt_freq`` epochs and at the last; another epoch's folder is removed once the
    next one is written, so the ``latest`` tag always names a complete folder, as ``checkpoint-latest.pth`` does on
    the plain path), ``checkpoint-{tag}`` (``best``) and, for a stop inside an epoch, ``checkpoint-{epoch}-step{k}``;
    each carries the resume state of the plain path (epoch, step within the epoch, every rank's meters, EMA, the
    run's arguments for the flag-drift check, ``extra``)."""

    def __init__(self, args: argparse.Namespace, engine: Any, model_ema: Any = None, enabled: bool = True,
                 **extra: Any) -> None:
        self.args, self.engine, self.model_ema, self.enabled, self.extra = args, engine, model_ema, enabled, extra
        self._transient: str | None = None  # the folder the next epoch or step save replaces

    def save(self, epoch: int, global_step: int, tag: str | None = None, step_in_epoch: int | None = None,
             rank_state: dict[str, Any] | None = None) -> list[str]:
        """Collective; returns the folder written (on every rank), or nothing with ``--no_save_ckpt``."""
        args = self.args
        if step_in_epoch is None and not self.enabled:
            return []
        client_state: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "args": plain_args(args),
                                        **self.extra}
        if self.model_ema is not None:
            client_state["model_ema"] = get_model_state_dict(self.model_ema.module)
        if step_in_epoch is not None:
            client_state.update(step_in_epoch=int(step_in_epoch), rank_state=all_gather_objects(rank_state))
            tag = f"{epoch}-step{step_in_epoch}"
        name = f"checkpoint-{tag if tag is not None else epoch}"
        path = os.path.join(args.output_dir, name)
        resumable = tag is None or step_in_epoch is not None
        self.engine.save_checkpoint(args.output_dir, tag=name, client_state=client_state, save_latest=resumable)
        if resumable:  # save_checkpoint ends with a barrier: every rank has written the new folder
            old = self._transient
            self._transient = None if step_in_epoch is None and keeps_epoch(args, epoch) else path
            if old is not None and os.path.abspath(old) != os.path.abspath(path) and get_rank() == 0:
                shutil.rmtree(old, ignore_errors=True)
        return [path]

    def resume(self) -> ResumeInfo:
        """Resume from ``--resume`` (a DeepSpeed folder) or the ``latest`` tag in ``--output_dir`` (refusing a run
        with other run-defining flags, as the plain path does); sets ``args.start_epoch``."""
        args = self.args
        load_dir, tag = None, None
        if args.resume:
            load_dir, tag = os.path.dirname(os.path.abspath(args.resume)), os.path.basename(os.path.normpath(
                args.resume))
        elif args.auto_resume and os.path.isfile(os.path.join(args.output_dir, "latest")):
            load_dir = args.output_dir
        elif not args.auto_resume:
            refuse_to_start_over_on(args.output_dir)
        if load_dir is None:
            return ResumeInfo(start_epoch=args.start_epoch)
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load a checkpoint from {load_dir} (tag {tag})")
        folder = os.path.dirname(str(path))
        m = re.fullmatch(r"checkpoint-(\d+)(-step\d+)?", os.path.basename(folder))
        if not args.resume and m and (m.group(2) or not keeps_epoch(args, int(m.group(1)))):
            self._transient = folder  # the run's own latest-only folder (auto-resumed): replaced by the next save
        if not args.resume:
            check_run_config(client_state.get("args"), args, str(path))
        if self.model_ema is not None and client_state.get("model_ema") is not None:
            self.model_ema.module.load_state_dict(client_state["model_ema"])
        step = int(client_state.get("step_in_epoch") or 0)
        info = ResumeInfo(path=str(path), epoch=int(client_state["epoch"]), step_in_epoch=step,
                          global_step=int(client_state.get("global_step") or 0),
                          extra={k: v for k, v in client_state.items() if k in ("best_acc1",)})
        info.start_epoch = args.start_epoch = info.epoch + (0 if step else 1)
        states = client_state.get("rank_state")
        if step and isinstance(states, list) and len(states) == get_world_size():
            info.rank_state = states[get_rank()]
        print(f"Resumed from {path}: epoch {info.epoch}, start_epoch {args.start_epoch}, global_step "
              f"{info.global_step}" + (f", step {step} of epoch {info.start_epoch}" if step else ""))
        return info
