"""Stop a training run cleanly on SIGTERM / SIGINT / SIGUSR1 so it can resume exactly.

SLURM preempts with SIGTERM (and can send SIGUSR1 before the time limit with ``--signal=USR1@300``), Ctrl-C sends
SIGINT. The first signal only sets a flag: the training loop finishes the optimizer step it is in, every rank agrees
on the step at which to stop, a mid-epoch checkpoint is written, and the program exits with ``PREEMPTED_EXIT_CODE``
(the SLURM launchers requeue the job on it). A second signal exits at once without saving.

Agreement costs no wait per step: each rank starts a non-blocking all-reduce (MAX) of its flag on a CPU (gloo)
group after a step and reads it one step later, so all ranks stop after the same step, at most one step after the
signal. A repeated SIGTERM within ``DUPLICATE_WINDOW_S`` seconds counts as one: under ``srun torchrun`` the ranks get
SLURM's SIGTERM and torchrun's forwarded copy.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the run resumes from its checkpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 5.0


def ignore_stop_signals() -> None:
    """For DataLoader workers: the main process decides when to stop, and a worker killed by the signal SLURM or
    Ctrl-C sends to the whole process group would only turn a clean stop into a crash."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class GracefulStop:
    """Signal handlers plus the cross-rank agreement on when to stop (see the module docstring)."""

    def __init__(self, install: bool = True) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._group = None
        self._previous: dict[int, object] = {}
        if dist.is_available() and dist.is_initialized():
            # A CPU group so that reading the flag never waits for the GPU's queued work.
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if install and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = name, now
            _say(f"[rank {_rank()}] {name} received: finishing the current step, then saving a checkpoint to resume "
                 f"from (send it again to exit at once without saving)")
            return
        if name == "SIGTERM" == self.signal_name and now - self._first_at < DUPLICATE_WINDOW_S:
            return  # the launcher's forwarded copy of the same preemption
        _say(f"[rank {_rank()}] second signal ({name}): exiting now without saving")
        os._exit(128 + signum)

    def poll(self) -> bool:
        """Collective, once per optimizer step on every rank: True when all ranks must stop after this step."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
            self._pending = None
        if agreed:
            return True
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def sync(self) -> bool:
        """Collective, blocking: did any rank receive a signal? (At epoch ends, where no step follows.)"""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def barrier(self) -> None:
        """All ranks meet (on the CPU group): e.g. none leaves before rank 0 has written the checkpoint."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=self._group)

    def restore(self) -> None:
        """Put back the previous handlers (for in-process callers such as tests)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}


def _say(text: str) -> None:
    # Straight to stderr: on ranks other than 0 ``print`` is silenced (distributed.setup_for_distributed).
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def exit_preempted(stop: GracefulStop, where: str, checkpoint: str | None) -> None:
    """Print where the run stopped and how to resume, then exit with ``PREEMPTED_EXIT_CODE`` (every rank)."""
    if _rank() == 0:
        saved = f"checkpoint {checkpoint}" if checkpoint else "the last checkpoint"
        print(f"Stopped by {stop.signal_name or 'a signal on another rank'} {where}; saved {saved}. Resume: run the "
              f"same command again (auto-resume continues from it). Exit status {PREEMPTED_EXIT_CODE}.",
              flush=True)
    if dist.is_available() and dist.is_initialized():
        # No rank leaves before rank 0 has written the checkpoint: a launcher such as torchrun terminates the
        # others as soon as one exits. The handlers stay installed until the process ends, for the same reason.
        stop.barrier()
        dist.destroy_process_group()
    raise SystemExit(PREEMPTED_EXIT_CODE)
