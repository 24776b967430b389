"""Training-loop logging: meters that read device tensors back only when printed, the progress line with data vs
compute time, TensorBoard scalars buffered the same way, and the one-JSON-line-per-epoch ``log.txt``."""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.distributed as dist

import stall_watchdog
from distributed import barrier, collective_device, is_dist_avail_and_initialized, is_main_process
from utils import PathLike

__all__ = ["SmoothedValue", "MetricLogger", "TensorboardLogger", "write_log_line"]

Number = Union[float, int, torch.Tensor]
_MAX_PENDING = 1024


class SmoothedValue:
    """Windowed and global statistics; tensors are kept as-is and read to host only when printed.

    Non-finite values are counted in ``nonfinite`` and left out of the statistics: an fp16 step that the GradScaler
    skipped (inf/NaN gradient norm) would otherwise turn the epoch's average grad norm into inf/NaN. A non-finite
    loss stops the run on its own (``precision.NonFiniteLossWatch``), so nothing is hidden by this.
    """

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.nonfinite = 0
        self._pending: list[tuple[torch.Tensor, int]] = []

    def update(self, value: Number, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"SmoothedValue takes scalars, got a tensor of shape {tuple(value.shape)}")
            self._pending.append((value.detach().reshape(()), n))
            if len(self._pending) >= _MAX_PENDING:
                self._materialize()
            return
        self._push(float(value), n)

    def _push(self, v: float, n: int) -> None:
        if not math.isfinite(v):
            self.nonfinite += n
            return
        self.deque.append(v)
        self.count += n
        self.total += v * n

    def _materialize(self) -> None:
        """One device->host copy for all pending tensors (per device), instead of one sync per step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_dev: dict[torch.device, list[int]] = defaultdict(list)
        for i, (t, _) in enumerate(pending):
            by_dev[t.device].append(i)
        values = [0.0] * len(pending)
        for idx in by_dev.values():
            host = torch.stack([pending[i][0].to(torch.float64) for i in idx]).cpu().tolist()
            for i, v in zip(idx, host):
                values[i] = v
        for v, (_, n) in zip(values, pending):
            self._push(v, n)

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (not the window): global_avg becomes the all-rank average."""
        self._materialize()
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total, self.nonfinite], dtype=torch.float64, device=collective_device())
        barrier()
        dist.all_reduce(t)
        self.count, self.total, self.nonfinite = int(t[0].item()), float(t[1].item()), int(t[2].item())

    @property
    def median(self) -> float:
        self._materialize()
        return float(np.median(list(self.deque))) if self.deque else float("nan")

    @property
    def avg(self) -> float:
        self._materialize()
        return float(np.mean(list(self.deque))) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        self._materialize()
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self) -> float:
        self._materialize()
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
        self._materialize()
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)

    def state_dict(self) -> dict[str, Any]:
        self._materialize()
        return {"window": list(self.deque), "total": self.total, "count": self.count, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = []
        self.deque.clear()
        self.deque.extend(float(v) for v in state["window"])
        self.total, self.count = float(state["total"]), int(state["count"])
        self.nonfinite = int(state.get("nonfinite", 0))


class MetricLogger:
    """Named meters plus ``log_every``, which prints progress, ETA, data vs step time and peak CUDA memory."""

    def __init__(self, delimiter: str = "  ", window_size: int = 20, data_wait_warning: float = 0.2) -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter
        self.data_wait_warning = data_wait_warning  # warn at the end of a loop that waited longer than this share
        self.steady: dict[str, float] = {}  # after a loop: seconds per iteration and waiting, its first one left out

    def update(self, **kwargs: Number | None) -> None:
        """Record values; tensors are not synced here. ``None`` is skipped (e.g. accumulation steps)."""
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v if isinstance(v, torch.Tensor) else float(v))

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        """Each meter's average over its finite values, plus ``{name}_nonfinite`` (how many were not finite: for
        ``grad_norm`` in fp16, the steps the GradScaler skipped) where there were any."""
        out = {k: m.global_avg for k, m in self.meters.items()}
        out.update({f"{k}_nonfinite": m.nonfinite for k, m in self.meters.items() if m.nonfinite})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The meters so far, so that an epoch resumed mid-way reports the same averages as an uninterrupted one."""
        return {k: m.state_dict() for k, m in self.meters.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            self.meters[k].load_state_dict(v)

    def log_every(self, iterable: Iterable[Any], print_freq: int, header: str | None = None) -> Iterator[Any]:
        header = header or ""
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        print_freq = max(1, int(print_freq))
        step_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        self.step_time, self.data_time = step_time, data_time  # readable by the loop body (e.g. TensorBoard)
        width = len(str(total)) if total else 1
        start = end = time.time()
        use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        i = 0
        first_wait = first_step = 0.0
        self.steady = {}
        beat_name = f"{header} step".strip()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            stall_watchdog.beat(beat_name, i)
            if i == 0:
                first_wait, first_step = data_time.total, step_time.total
            last = total is not None and i == total - 1
            if i % print_freq == 0 or last:
                parts = [header, f"[{i:>{width}}/{total}]" if total else f"[{i}]"]
                if total:
                    eta = step_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
                parts.append(str(self))
                parts.append(f"time: {step_time.avg:.4f}s (data {data_time.avg:.4f}s, "
                             f"compute {max(step_time.avg - data_time.avg, 0.0):.4f}s)")
                if use_cuda:
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        total_time = time.time() - start
        n = (i + 1) if total is None else max(total, 1)
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / n:.4f} s / it)", flush=True)
        # The first iteration waits for the workers to start and fill the pipeline (each worker builds a whole
        # batch): the steady state is the rest, what a long epoch is made of.
        waited, spent = data_time.total - first_wait, step_time.total - first_step
        self.steady = {"steady_step_time": spent / i, "steady_data_time": waited / i} if i > 0 else {}
        if i > 0 and waited > self.data_wait_warning * spent:
            print(f"{header} WARNING: {100 * waited / spent:.0f}% of the time was spent waiting for data: the GPU/CPU "
                  "is input-bound. See PRETRAIN.md, \"Data loading at GPU speed\": raise --num_workers, use "
                  "--num_sample > 1, prepare the videos with tools/prepare_videos.py.", flush=True)


class TensorboardLogger:
    """TensorBoard scalars under ``{head}/{key}``; a no-op on ranks other than 0.

    Tensor values are buffered and read to host in one go at ``flush()`` (or when the buffer fills), so
    calling ``update`` every step does not force a device sync every step.
    """

    def __init__(self, log_dir: PathLike | None, buffer_size: int = 256, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard then discards what the interrupted run had
        logged from that step on, so no step appears twice."""
        self.writer = None
        self.step = 0
        self.buffer_size = int(buffer_size)
        self._pending: list[tuple[str, torch.Tensor, int]] = []
        if log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step or None)

    def set_step(self, step: int | None = None) -> None:
        self.step = int(step) if step is not None else self.step + 1

    def update(self, head: str = "scalar", step: int | None = None, **kwargs: Number | None) -> None:
        if self.writer is None:
            return
        step = self.step if step is None else int(step)
        for k, v in kwargs.items():
            if v is None:
                continue
            tag = f"{head}/{k}"
            if isinstance(v, torch.Tensor):
                self._pending.append((tag, v.detach().reshape(()), step))
            else:
                self.writer.add_scalar(tag, float(v), step)
        if len(self._pending) >= self.buffer_size:
            self._drain()

    def _drain(self) -> None:
        if not self._pending or self.writer is None:
            self._pending = []
            return
        pending, self._pending = self._pending, []
        values = [float(t.item()) if t.device.type == "cpu" else None for _, t, _ in pending]
        gpu_idx = [i for i, v in enumerate(values) if v is None]
        if gpu_idx:
            host = torch.stack([pending[i][1].to(torch.float64) for i in gpu_idx]).cpu().tolist()
            for i, v in zip(gpu_idx, host):
                values[i] = v
        for (tag, _, step), v in zip(pending, values):
            self.writer.add_scalar(tag, v, step)

    def add_images(self, tag: str, images: Union[torch.Tensor, np.ndarray], step: int | None = None,
                   dataformats: str = "NCHW") -> None:
        if self.writer is not None:
            step = self.step if step is None else int(step)
            self.writer.add_images(tag, images, step, dataformats=dataformats)

    def flush(self) -> None:
        if self.writer is not None:
            self._drain()
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.writer = None


def _json_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # keep log.txt strict JSON
    return v


def process_memory_mb() -> dict[str, float]:
    """Memory of this process and of its DataLoader workers (their sum), in MB: the proportional set size, which
    counts a page shared by n processes as 1/n in each, so forked workers' copy-on-write pages are not counted
    twice. Logged every epoch: worker memory that keeps growing is a leak (a decoder, or copy-on-read of Python
    objects in the data set), the common way video training runs get killed. Linux only (``/proc``); {} elsewhere.
    """
    main = _pss_mb("self")
    if main is None:
        return {}
    workers = [_pss_mb(str(p.pid)) for p in multiprocessing.active_children()]
    return {"memory_main_mb": round(main, 1), "memory_workers_mb": round(sum(w for w in workers if w), 1)}


def _pss_mb(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def write_log_line(output_dir: PathLike | None, stats: Mapping[str, Any], filename: str = "log.txt") -> None:
    """Append one JSON line to ``output_dir/log.txt`` (rank 0 only), flushed so a crash keeps past epochs."""
    if not output_dir or not is_main_process():
        return
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({str(k): _json_value(v) for k, v in stats.items()}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
