"""The training scaffold shared by pre-training, fine-tuning and probing.

A program builds its data set and model, then uses the same pieces here: ``setup_run`` (processes, device,
precision, seeds, folders), ``build_train_loader`` (shuffled, resumable, whole steps only), ``build_optimisation``
(lr scaling, optimizer, loss scaler, per-step schedules), ``wrap_model`` (compile + DDP), ``TrainEpoch`` (the
engines' common set-up and wrap-up around their own step) and ``run_epochs`` (the epoch loop: checkpoint, log,
stop on a signal with a resumable checkpoint and exit 75).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import metric_logging
import optim_factory
import stall_watchdog
from cli import UserError, at_least, json_object, make_output_dir
from datasets import get_broken_count
from distributed import all_reduce_mean, get_world_size, init_distributed_mode, is_main_process
from precision import LossScaler, NonFiniteLossWatch, resolve_precision
from preemption import GracefulStop, exit_preempted
from resume import ResumableSampler, start_epoch_data
from utils import atomic_write_text, plain_args, seed_step, setup_seed, worker_kwargs


def setup_run(args: argparse.Namespace) -> torch.device:
    """Everything a training program does before building data and model: processes, device, precision
    (default bf16 on GPU, fp32 on CPU), seeds, fast CUDA math, output and TensorBoard folders.

    A run without ``--output_dir`` is refused: it would train and keep nothing (no checkpoint, log or results).
    """
    if not args.output_dir:
        raise UserError("--output_dir is required: it receives the checkpoints (resumable), log.txt, args.json, "
                        "TensorBoard logs and results; e.g. --output_dir output/my_run")
    init_distributed_mode(args)
    stall_watchdog.start(args.stall_minutes, args.rank)
    device = torch.device(args.device)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    args.precision = resolve_precision(args.precision, device)
    setup_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    make_output_dir(args.output_dir, "--output_dir")
    if args.log_dir is None:
        args.log_dir = os.path.join(args.output_dir, "tensorboard")
    return device


def record_args(args: argparse.Namespace, summary: Sequence[str]) -> None:
    """All arguments to ``OUTPUT_DIR/args.json`` (rank 0, atomic); the terminal gets the ``summary`` flags only.
    Called once auto-resume has accepted the run, so a refused run never rewrites the folder's args.json."""
    if is_main_process():
        path = Path(args.output_dir) / "args.json"
        atomic_write_text(path, json.dumps(plain_args(args), indent=1, sort_keys=True) + "\n")
        shown = "  ".join(f"{k}={getattr(args, k)}" for k in summary if hasattr(args, k))
        print(f"Run: {shown}\nAll arguments: {path}")


@dataclass
class TrainData:
    """The training set with its resumable sampler, its loader and the optimizer steps one epoch makes."""

    dataset: Any
    sampler: ResumableSampler
    loader: DataLoader
    steps_per_epoch: int


def build_train_loader(dataset: Any, args: argparse.Namespace, device: torch.device,
                       collate_fn: Callable | None = None) -> TrainData:
    """Shuffled loader over whole batches; sets ``args.num_training_steps_per_epoch`` and ``args.train_data_sha256``
    (``dataset.fingerprint()``: auto-resume compares it, and it is saved with the run's arguments).

    DistributedSampler also for one process: the order of clips is then the same for any number of processes
    (and ``ResumableSampler`` can skip into an epoch). Refuses a set too small for one optimizer step.
    """
    world = get_world_size()
    # drop_last: no clip repeated to even out the ranks, so the steps per epoch are len(dataset) // total batch for
    # any number of processes (VideoMAE's count; padding could add a step, and lengthen the schedule, on 2 processes)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=args.rank, shuffle=True, seed=args.seed,
                               drop_last=True)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
                        persistent_workers=args.num_workers > 0, collate_fn=collate_fn, **worker_kwargs(args))
    steps = len(loader) // args.accum_iter
    if steps == 0:
        raise UserError(f"{len(dataset)} videos give no full step of --batch_size {args.batch_size} x "
                        f"--update_freq {args.accum_iter} x {world} processes; lower --batch_size or add data")
    args.num_training_steps_per_epoch = steps
    args.train_data_sha256 = dataset.fingerprint()
    return TrainData(dataset, sampler, loader, steps)


@dataclass
class Optimisation:
    """What drives the weights: the optimizer, the loss scaler, and the per-optimizer-step lr / wd schedules."""

    optimizer: torch.optim.Optimizer
    loss_scaler: LossScaler
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray


def build_optimisation(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int, device: torch.device,
                       **optimizer_kwargs: Any) -> Optimisation:
    """Linear lr scaling for the total batch (``batch_size x update_freq x processes``), the optimizer over
    ``model``'s parameter groups, the loss scaler for ``args.precision`` and the cosine schedules."""
    world = get_world_size()
    optim_factory.scale_lr(args, args.batch_size * args.accum_iter * world,
                           detail=f"batch_size {args.batch_size} x update_freq {args.accum_iter} x world {world}")
    optimizer = optim_factory.create_optimizer(args, model, **optimizer_kwargs)
    steps = max(steps_per_epoch, 1)
    lr_schedule = optim_factory.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps, args.warmup_epochs,
                                                 start_warmup_value=args.warmup_lr, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = optim_factory.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps)
    return Optimisation(optimizer, LossScaler(args.precision, device.type), lr_schedule, wd_schedule)


def wrap_model(model: nn.Module, args: argparse.Namespace, device: torch.device, compile_model: bool = False
               ) -> nn.Module:
    """``torch.compile`` (when asked) and DistributedDataParallel (when distributed) around ``model``.

    DDP broadcasts rank 0's buffers before every forward only when the model has buffers that training changes
    (persistent ones, e.g. a probe's BatchNorm statistics); the others are constant tables (sinusoid position
    embeddings), identical on every rank, whose broadcast cost ViT-B 7 MB per micro-batch."""
    if compile_model:
        model = torch.compile(model)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None,
                                                    broadcast_buffers=bool(persistent_buffers(model)))
    return model


def persistent_buffers(model: nn.Module) -> list[str]:
    """Names of ``model``'s buffers that its state_dict holds (non-persistent ones are rebuilt, never saved)."""
    state = model.state_dict(keep_vars=True)
    return [name for name, _ in model.named_buffers() if name in state]


class _Taken:
    """The first ``n`` items of ``iterable``, with a length (``log_every`` shows progress against it)."""

    def __init__(self, iterable: Iterable[Any], n: int) -> None:
        self.iterable, self.n = iterable, n

    def __len__(self) -> int:
        try:
            return min(self.n, len(self.iterable))  # type: ignore[arg-type]
        except TypeError:
            return self.n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.iterable, self.n)


class TrainEpoch:
    """One epoch of ``(iteration, step, global_step, update, batch)`` around an engine's own step.

    ``args.accum_iter`` batches make one optimizer step; the step's lr and weight decay are set from the schedules
    at its first batch, and ``update`` is True on its last. A trailing partial step is dropped. Each batch's
    randomness is seeded from (seed, rank, global iteration) (``seed_step``). The loader yields the epoch's batches
    from ``first_step`` on (a mid-epoch resume, with the interrupted run's ``meters``). After each optimizer step
    but the last, ``stop.poll()`` (collective) decides whether all ranks stop there. ``record`` keeps the meters
    and the sync-free non-finite-loss watch; ``finish`` returns ``(averaged meters or None when stopped, steps
    done)``.
    """

    def __init__(self, model: nn.Module, loader: Iterable[Any], optim: Optimisation, args: argparse.Namespace,
                 epoch: int, device: torch.device, *, first_step: int = 0,
                 meters: metric_logging.MetricLogger | None = None, stop: GracefulStop | None = None,
                 lr_keys: Sequence[str] = ("lr", "min_lr", "weight_decay")) -> None:
        model.train()
        self.model, self.loader, self.optim, self.stop = model, loader, optim, stop
        self.accum, self.print_freq, self.seed = args.accum_iter, args.print_freq, args.seed
        self.steps_per_epoch = args.num_training_steps_per_epoch
        self.start_step = epoch * self.steps_per_epoch
        self.header = f"Epoch: [{epoch}]"
        self.meters = meters if meters is not None else metric_logging.MetricLogger(delimiter="  ")
        self.watch = NonFiniteLossWatch(epoch, self.steps_per_epoch, self.start_step, device)
        self.first_step = self.completed_steps = int(first_step)
        self.stopped = False
        self.lr_keys = tuple(lr_keys)
        # Benchmarks set args.sync_each_step: the host then waits for the GPU at the end of each step, so the time it
        # next waits for data is time the GPU idles (without it, the host's wait overlaps the GPU still working).
        self.sync = bool(getattr(args, "sync_each_step", False)) and device.type == "cuda"

    def __iter__(self) -> Iterator[tuple[int, int, int, bool, Any]]:
        accum = self.accum
        it = self.first_step * accum - 1
        # Whole steps only: a trailing partial step is neither fetched nor counted in the progress line and ETA
        # (breaking out of log_every for it also lost the epoch's timing summary).
        batches = _Taken(self.loader, (self.steps_per_epoch - self.first_step) * accum)
        for batch in self.meters.log_every(batches, self.print_freq, self.header):
            it += 1
            step = it // accum
            global_step = self.start_step + step
            seed_step(self.seed, self.start_step * accum + it)
            if it % accum == 0:
                optim_factory.apply_schedule(self.optim.optimizer, lr=float(self.optim.lr_schedule[global_step]),
                                             weight_decay=float(self.optim.wd_schedule[global_step]))
            update = (it + 1) % accum == 0
            yield it, step, global_step, update, batch
            if self.sync:
                torch.cuda.synchronize()
            if update:
                self.completed_steps = step + 1
                if (self.stop is not None and self.completed_steps < self.steps_per_epoch
                        and self.stop.poll()):
                    self.stopped = True
                    return

    def record(self, it: int, step: int, loss: torch.Tensor, /, **meters: Any) -> dict[str, float]:
        """Note the loss for the non-finite watch (read back on logging steps) and update the meters with
        ``meters`` plus the optimizer's ``lr_keys``; returns the optimizer's lr statistics."""
        if it % self.accum == 0:
            self._step_sums: dict[str, list[Any]] = {}
        for k, v in meters.items():
            if v is not None:  # lazily, on the device: a running sum and count per key
                total = self._step_sums.get(k)
                self._step_sums[k] = [v, 1] if total is None else [total[0] + v, total[1] + 1]
        self.watch.update(loss, step)
        lr_stats = optim_factory.get_lr_stats(self.optim.optimizer)
        self.meters.update(**meters, **{k: lr_stats[k] for k in self.lr_keys})
        if it % self.print_freq == 0:
            self.watch.check()
        return lr_stats

    def grad_sync(self, update: bool) -> contextlib.AbstractContextManager:
        """Around a batch's forward and backward: DDP all-reduces the gradients only on an optimizer step's last
        batch (``update``); the others accumulate locally, with the same result."""
        if update or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def step_average(self) -> dict[str, Any]:
        """The current optimizer step's ``record``ed values averaged over its ``--update_freq`` batches (on this
        process), for per-step logs: the last batch alone would be 1/N of the step."""
        return {k: total / n for k, (total, n) in self._step_sums.items()}

    def finish(self, **extra: Any) -> tuple[dict[str, float] | None, int]:
        """Check the loss once more; unless stopped, average the meters over processes (plus ``extra``)."""
        self.watch.check()
        if self.stopped:
            return None, self.completed_steps
        self.meters.synchronize_between_processes()
        averages = {**self.meters.global_averages(), **extra}
        print("Averaged stats:", "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
        return averages, self.completed_steps


def run_epochs(args: argparse.Namespace, data: TrainData, resumed: Any, checkpointer: Any,
               train_epoch: Callable[[int, int, metric_logging.MetricLogger], tuple[dict[str, float] | None, int]],
               stop: GracefulStop, log_writer: metric_logging.TensorboardLogger | None,
               after_epoch: Callable[[int, dict[str, float]], dict[str, Any]] | None = None,
               log_extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Epochs ``args.start_epoch .. args.epochs - 1``: train (``train_epoch(epoch, first_step, meters)``), run
    ``after_epoch`` (validation, pictures; its dict joins the epoch's log.txt record), log, save
    (``checkpointer.save``). A stop signal inside an epoch saves a mid-epoch checkpoint; one between epochs stops
    after the epoch's checkpoint; either way the run exits 75 with the command to resume. Returns the last epoch's
    meters.
    """
    stats: dict[str, float] = {}
    steps = data.steps_per_epoch
    for epoch in range(args.start_epoch, args.epochs):
        first_step, meters = start_epoch_data(epoch, resumed, args, data.sampler, data.dataset)
        # The epoch's broken videos so far: this process's workers count from the start of this process, and a
        # run resumed inside the epoch carries on from the count its checkpoint saved.
        carried = int((resumed.rank_state or {}).get("broken", 0)) if first_step else 0
        broken_before = get_broken_count(data.dataset) - carried
        epoch_stats, done = train_epoch(epoch, first_step, meters)
        if epoch_stats is None:  # stopped by a signal inside the epoch
            written = checkpointer.save(epoch, epoch * steps + done, step_in_epoch=done,
                                        rank_state={"meters": meters.state_dict(),
                                                    "broken": get_broken_count(data.dataset) - broken_before})
            _exit_stopped(stop, log_writer, f"in epoch {epoch} after step {done} of {steps}", written[:1])
        stats = epoch_stats
        # Rank 0's, which writes log.txt; before validation, whose workers are not the run's.
        memory = metric_logging.process_memory_mb() if is_main_process() else {}
        if memory:
            print(f"Memory (PSS): main process {memory['memory_main_mb']:.0f} MB, DataLoader workers "
                  f"{memory['memory_workers_mb']:.0f} MB")
        # The epoch's failed loads (each replaced by another video), on every rank: collective.
        broken = round(all_reduce_mean(float(get_broken_count(data.dataset) - broken_before)) * get_world_size())
        record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "broken_videos": broken,
                  **(log_extra or {}), **memory}
        if after_epoch is not None:
            record.update(after_epoch(epoch, stats))
        metric_logging.write_log_line(args.output_dir, record)
        if log_writer is not None:
            log_writer.flush()
        # Saved last, so that what the checkpoint says (best accuracy so far) includes this epoch's validation and a
        # run that dies before the save redoes the whole epoch (its log record is trimmed on resume), rather than
        # resuming after an epoch whose validation and log record never happened.
        written = checkpointer.save(epoch, (epoch + 1) * steps)
        if epoch + 1 < args.epochs and stop.sync():
            _exit_stopped(stop, log_writer, f"at the end of epoch {epoch}", written[-1:])
    return stats


def _exit_stopped(stop: GracefulStop, log_writer: metric_logging.TensorboardLogger | None, where: str,
                  written: list[str]) -> None:
    if log_writer is not None:
        log_writer.close()
    exit_preempted(stop, where, written[0] if written else None)


def add_run_args(parser: argparse.ArgumentParser, *, batch_size: int | None, epochs: int | None,
                 save_ckpt_freq: int, batch_help: str) -> argparse._ArgumentGroup:
    """The flags every training program has: batch, epochs, accumulation, checkpoint frequency, logging,
    precision (group "run", returned for the program's own additions)."""
    g = parser.add_argument_group("run")
    g.add_argument("--batch_size", default=batch_size, type=at_least(1), help=batch_help)
    g.add_argument("--epochs", default=epochs, type=at_least(1), help="number of training epochs")
    g.add_argument("--update_freq", "--accum_iter", default=1, type=at_least(1), dest="accum_iter",
                   help="gradient accumulation: batches per optimizer step")
    g.add_argument("--save_ckpt_freq", default=save_ckpt_freq, type=at_least(1),
                   help="keep checkpoint-{epoch}.pth every N epochs (checkpoint-latest.pth is rewritten every epoch)")
    g.add_argument("--print_freq", default=10, type=at_least(1), help="print the meters every N iterations")
    g.add_argument("--stall_minutes", default=20.0, type=at_least(0, float),
                   help="when no batch finishes for this long, print where every thread and DataLoader worker of "
                        "the process waits (stall_watchdog; repeats while stuck, the run goes on); 0: off")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on GPUs that support it, else fp16; fp32 on CPU")
    return g


def add_model_args(parser: argparse.ArgumentParser, *, model: str, models: Sequence[str], drop_path: float,
                   kwargs_example: str) -> argparse._ArgumentGroup:
    """The model flags both programs have (group "model", returned for the program's own additions); ``models``:
    the names the program builds."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model, choices=list(models), metavar="MODEL",
                   help=f"{', '.join(models)} (sizes: README, Models)")
    g.add_argument("--tubelet_size", default=2, type=at_least(1), help="frames per token (tubelet depth)")
    g.add_argument("--drop_path", default=drop_path, type=float, help="stochastic depth rate")
    g.add_argument("--use_checkpoint", "--with_checkpoint", action="store_true", dest="use_checkpoint",
                   help="gradient checkpointing in every block")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--model_kwargs", default="{}", type=json_object,
                   help=f"extra JSON keyword arguments for the model constructor, e.g. '{kwargs_example}'")
    return g


def add_output_args(parser: argparse.ArgumentParser, title: str, output_help: str) -> argparse._ArgumentGroup:
    """Where a run writes and how it resumes (group ``title``, returned for the program's own additions)."""
    g = parser.add_argument_group(title)
    g.add_argument("--output_dir", default="", help=f"required: {output_help}")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs (default: OUTPUT_DIR/tensorboard)")
    g.add_argument("--resume", default="", help="checkpoint to resume from (other flags allowed: no drift check)")
    g.add_argument("--auto_resume", default=True, action=argparse.BooleanOptionalAction,
                   help="resume from the newest checkpoint in --output_dir")
    g.add_argument("--start_epoch", default=0, type=at_least(0),
                   help="first epoch (set by resuming; rarely needed by hand)")
    return g
