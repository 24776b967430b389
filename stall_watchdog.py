"""Stall watchdog: a run that stops making progress says where it waits instead of hanging silently.

Training and evaluation loops call :func:`beat` once per batch. When no beat comes for ``--stall_minutes``, a
daemon thread of each process prints one line naming the rank, how long and after what it has been stuck, then
every thread's Python stack (``faulthandler``), and asks its DataLoader workers for theirs. A collective that one
rank never joined, a worker stuck in a decoder, or a deadlock then shows up in the log with its stack, as users of
VideoMAE-style code asked (decord hangs, NCCL timeouts). The report repeats every ``--stall_minutes`` while the
stall lasts; the run itself is left alone (``--dist_timeout`` or the user decides when to give up).

Workers answer SIGUSR2 with the stack of their main thread, where the dataset's code and the decoder run, through
``faulthandler``'s C handler, which works even while the worker is inside a C call such as a decoder. The signal
goes to that thread (``tgkill``) and only that thread's stack is printed: a C signal handler that walks the stacks
of the worker's other threads while they run (the one that hands batches' shared memory to the main process) could
crash the worker, and with it the run (seen in a test, once in a few runs on a loaded machine). Only children that
handle SIGUSR2 (``/proc/<pid>/status``, Linux) are asked, so no other child process is ever killed by the signal.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time

_WORKER_SIGNAL = getattr(signal, "SIGUSR2", None)  # absent on Windows: workers are then not asked
_watchdog: _Watchdog | None = None


class _Watchdog(threading.Thread):
    def __init__(self, seconds: float, rank: int) -> None:
        super().__init__(name="stall-watchdog", daemon=True)
        self.seconds, self.rank = seconds, rank
        self.last_beat, self.loop, self.index = time.monotonic(), "start-up", None
        self.beaten = threading.Event()

    def run(self) -> None:
        while True:
            if self.beaten.wait(self.seconds):
                self.beaten.clear()
            elif time.monotonic() - self.last_beat >= self.seconds:
                self.report()

    def report(self) -> None:
        stuck = time.monotonic() - self.last_beat
        stuck_text = f"{stuck:.0f} s" if stuck < 120 else f"{stuck / 60:.1f} min"
        workers = _workers_that_dump()
        where = self.loop if self.index is None else f"{self.loop} {self.index}"
        sys.stderr.write(f"[rank {self.rank}] stall watchdog: no progress for {stuck_text}, since {where}. "
                         f"Python stacks of this process follow, then those of its {len(workers)} DataLoader "
                         f"worker(s) {workers}. The run keeps waiting (--stall_minutes 0 turns this off).\n")
        sys.stderr.flush()
        fd = _stderr_fd()
        if fd is not None:  # called from Python code (GIL held): walking every thread's frames is safe here
            faulthandler.dump_traceback(file=fd, all_threads=True)
        for pid in workers:
            try:
                _signal_main_thread(pid, _WORKER_SIGNAL)
            except OSError:  # the worker ended meanwhile
                pass


def start(minutes: float, rank: int) -> None:
    """Watch this process from now on (once per process; ``minutes <= 0``: off)."""
    global _watchdog
    if minutes > 0 and _watchdog is None:
        _watchdog = _Watchdog(minutes * 60, rank)
        _watchdog.start()


def beat(loop: str, index: int) -> None:
    """Progress: ``loop`` finished its batch ``index`` (reported as e.g. ``"Epoch: [3] step 120"``). Nothing is
    formatted here, so it costs next to nothing per batch."""
    w = _watchdog
    if w is not None:
        w.last_beat, w.loop, w.index = time.monotonic(), loop, index
        w.beaten.set()


def enable_in_worker() -> None:
    """In a DataLoader worker: print the stack of the thread the watchdog's SIGUSR2 interrupts (the main one) to
    stderr; it is not running meanwhile, so reading its frames is safe (see the module docstring).

    Without a file descriptor for stderr (``_stderr_fd``) the worker simply cannot dump."""
    fd = _stderr_fd()
    if _WORKER_SIGNAL is not None and fd is not None:
        faulthandler.register(_WORKER_SIGNAL, file=fd, all_threads=False)


def _stderr_fd() -> int | None:
    """The file descriptor faulthandler writes to: ``sys.stderr``'s, else (a notebook, a captured stream) the
    process's original stderr's, else None."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            return stream.fileno()
        except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is a ValueError and an OSError
            continue
    return None


def _signal_main_thread(pid: int, sig: int) -> None:
    """``sig`` to the main thread of process ``pid`` (its thread id is ``pid``) with glibc's ``tgkill``; where there
    is none, to the process (the kernel then picks a thread, whose own stack is what gets printed)."""
    try:
        import ctypes

        tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    except (OSError, AttributeError):  # not glibc >= 2.30 (musl, macOS)
        tgkill = None
    if tgkill is None or tgkill(pid, pid, int(sig)) != 0:
        os.kill(pid, sig)


def _workers_that_dump() -> list[int]:
    """This process's multiprocessing children that have ``enable_in_worker``'s handler (Linux; else none)."""
    if _WORKER_SIGNAL is None:
        return []
    try:
        children = multiprocessing.active_children()
    except RuntimeError:  # the main thread started or reaped a worker meanwhile: ask again next report
        return []
    pids = []
    for child in children:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        except (OSError, StopIteration, ValueError):
            continue
        if caught >> (int(_WORKER_SIGNAL) - 1) & 1:
            pids.append(child.pid)
    return pids
