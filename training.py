"""The training scaffold shared by pre-training and fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from distributed import init_distributed_mode, is_main_process
from precision import resolve_precision
from utils import atomic_write_text, plain_args, seed_step, setup_seed
if TYPE_CHECKING:
    from metric_logging import MetricLogger


def record_args(args: argparse.Namespace, summary: Sequence[str]) -> None:
    """All arguments to ``OUTPUT_DIR/args.json`` (rank 0, atomic); the terminal gets the ``summary`` flags only."""
    if is_main_process() and getattr(args, "output_dir", None):
        path = Path(args.output_dir) / "args.json"
        atomic_write_text(path, json.dumps(plain_args(args), indent=1, sort_keys=True) + "\n")
        shown = "  ".join(f"{k}={getattr(args, k)}" for k in summary if hasattr(args, k))
        print(f"Run: {shown}\nAll arguments: {path}")


def setup_run(args: argparse.Namespace) -> torch.device:
    """Everything a training program does before building data and model: processes, device, precision
    (default bf16 on GPU, fp32 on CPU), seeds, fast CUDA math, output and TensorBoard folders.

    A run without ``--output_dir`` is refused: it would train and keep nothing (no checkpoint, log or results).
    """
    if not getattr(args, "output_dir", None):
        from cli import UserError
        raise UserError("--output_dir is required: it receives the checkpoints (resumable), log.txt, args.json, "
                        "TensorBoard logs and results; e.g. --output_dir output/my_run")
    init_distributed_mode(args)
    device = torch.device(args.device)
    if getattr(args, "precision", None) is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    args.precision = resolve_precision(args.precision, device)
    setup_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(args, "output_dir", None):
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if getattr(args, "log_dir", None) is None:
            args.log_dir = os.path.join(args.output_dir, "tensorboard")
    return device


class ScheduledEpoch:
    """One epoch of ``(iteration, step, global_step, update, batch)``, with gradient accumulation, that can start
    at an optimizer step other than 0 (a mid-epoch resume) and stop early when the run is asked to stop.

    ``accum`` batches make one optimizer step; the step's lr and weight decay are set from the per-step schedules
    at its first batch, and ``update`` is True on its last. A trailing partial step is dropped. Each batch's
    randomness is seeded from (seed, rank, global iteration) (``seed_step``). ``data_loader`` yields the epoch's
    batches from ``first_step`` on. After each optimizer step but the last, ``stop.poll()`` (collective) decides
    whether all ranks stop there; then ``stopped`` is True and ``completed_steps`` says how many steps were done.
    """

    def __init__(self, data_loader: Iterable[Any], metric_logger: MetricLogger, optimizer: torch.optim.Optimizer,
                 lr_schedule: np.ndarray, wd_schedule: np.ndarray, *, start_step: int, steps_per_epoch: int,
                 accum: int, print_freq: int, header: str, seed: int, first_step: int = 0, stop: Any = None) -> None:
        self.data_loader, self.metric_logger, self.optimizer = data_loader, metric_logger, optimizer
        self.lr_schedule, self.wd_schedule = lr_schedule, wd_schedule
        self.start_step, self.steps_per_epoch, self.accum = start_step, steps_per_epoch, accum
        self.print_freq, self.header, self.seed, self.stop = print_freq, header, seed, stop
        self.first_step = self.completed_steps = int(first_step)
        self.stopped = False

    def __iter__(self) -> Iterator[tuple[int, int, int, bool, Any]]:
        from optim_factory import apply_schedule

        accum = self.accum
        it = self.first_step * accum - 1
        for batch in self.metric_logger.log_every(self.data_loader, self.print_freq, self.header):
            it += 1
            step = it // accum
            if step >= self.steps_per_epoch:
                break
            global_step = self.start_step + step
            seed_step(self.seed, self.start_step * accum + it)
            if it % accum == 0:
                apply_schedule(self.optimizer, lr=float(self.lr_schedule[global_step]),
                               weight_decay=float(self.wd_schedule[global_step]))
            update = (it + 1) % accum == 0
            yield it, step, global_step, update, batch
            if update:
                self.completed_steps = step + 1
                if (self.stop is not None and self.completed_steps < self.steps_per_epoch
                        and self.stop.poll()):
                    self.stopped = True
                    return
