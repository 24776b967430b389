"""Small helpers every part of the project shares: seeding, unwrapping models and their state dicts, atomic
file writes, and plain-JSON arguments. The bigger shared roles have their own modules: ``distributed``,
``precision``, ``checkpointing``, ``metric_logging``, ``optim_factory``, ``training``.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler before ours below (atexit runs LIFO)
import os
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from timm.utils import unwrap_model

from distributed import get_rank


PathLike = Union[str, os.PathLike]



def setup_seed(seed: int) -> int:
    """Seed torch, numpy and random with ``seed + rank`` (else all ranks draw the same augmentations)."""
    s = int(seed) + get_rank()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch does not reseed numpy/random per worker, so derive them here; stop
    signals are left to the main process (``preemption``), and the stall watchdog may ask for the stacks."""
    from preemption import ignore_stop_signals
    from stall_watchdog import enable_in_worker

    ignore_stop_signals()
    enable_in_worker()
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def _kill_workers_left_at_exit() -> None:
    """Kill DataLoader workers still alive when the interpreter exits.

    They are alive then only after a crash (the exception's traceback keeps the loader's iterator), and they ignore
    SIGTERM (``seed_worker``), so multiprocessing's own exit handler, which sends SIGTERM to daemonic children and
    then joins them, would wait for them forever: the crashed program would hang instead of exiting. torch's SIGCHLD
    handler is reset first: it would report each killed worker as a second, misleading error ("DataLoader worker
    (pid N) is killed by signal"), possibly in the middle of this loop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


atexit.register(_kill_workers_left_at_exit)


def worker_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The DataLoader keywords of the worker flags (``--num_workers``, ``--worker_start_method``: None is the
    platform's default, ``--prefetch_factor``) with ``seed_worker``; DataLoader refuses the last two without
    workers."""
    if args.num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": args.num_workers, "worker_init_fn": seed_worker,
            "multiprocessing_context": args.worker_start_method, "prefetch_factor": args.prefetch_factor}


def seed_step(seed: int, iteration: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random from (seed, rank, global iteration) before a training step.

    The step's own randomness (dropout, drop path, mixup) then depends on nothing that happened before it: not on
    how many DataLoader iterators drew a base seed, not on a visualisation in between, and not on whether the run
    was interrupted and resumed there. That is what makes resuming mid-epoch bit-exact.
    """
    state = np.random.SeedSequence([int(seed) % 2**32, get_rank(), int(iteration)]).generate_state(2, np.uint64)
    torch.manual_seed(int(state[0]) % 2**63)
    np.random.seed(int(state[1]) % 2**32)
    random.seed(int(state[1]))



def strip_key_prefixes(key: str, prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> str:
    """Remove wrapper prefixes repeatedly, so ``module._orig_mod.x`` becomes ``x``."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def strip_state_dict_prefixes(state_dict: Mapping[str, Any],
                              prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict[str, Any]:
    """Remove wrapper prefixes from every key (see ``strip_key_prefixes``)."""
    return {strip_key_prefixes(k, prefixes): v for k, v in state_dict.items()}


def get_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with wrapper prefixes removed, so checkpoints load into a bare model."""
    return strip_state_dict_prefixes(unwrap_model(model).state_dict())


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)



def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


_UMASK: int | None = None


def _get_umask() -> int:
    """Process umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def _atomic_write(path: Path, write_fn: Callable[[io.BufferedWriter], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_get_umask())  # mkstemp gives 0600; match a plain open()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file via temp file + fsync + rename (results, rewritten logs, feature shards): never half-written."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save via temp file + fsync + rename: a crash mid-save leaves the old file, never a torn one."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _atomic_copy(src: Path, dst: Path) -> None:
    def _copy(f: io.BufferedWriter) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=16 * 1024 * 1024)
    _atomic_write(dst, _copy)


def plain_args(args: Any) -> dict[str, Any]:
    """The arguments as plain JSON-able values (saved in checkpoints and args.json)."""
    d = vars(args) if not isinstance(args, Mapping) else dict(args)

    def conv(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        return str(v)
    return {k: conv(v) for k, v in d.items() if not k.startswith("_")}
