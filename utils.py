"""Shared training infrastructure for pre-training and fine-tuning.

Nothing here knows about models or data: it covers distributed start-up (plain python, torchrun, SLURM),
optimizer parameter groups, per-iteration schedules, mixed precision, atomic checkpoints with auto-resume,
and logging. No environment variable is read at import time, so ``python script.py`` needs no launcher.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

if TYPE_CHECKING:
    from metric_logging import MetricLogger

__all__ = [
    # distributed
    "DistEnv", "add_distributed_args", "parse_slurm_nodelist", "resolve_distributed_env",
    "init_distributed_mode",
    "setup_for_distributed", "is_dist_avail_and_initialized", "get_rank", "get_world_size", "is_main_process",
    "barrier", "all_reduce_mean", "setup_seed", "seed_worker", "cleanup",
    # precision
    "autocast", "resolve_precision", "get_grad_norm_", "LossScaler",
    # checkpoints
    "CheckpointError", "NonFiniteCheckpointError", "ResumeInfo", "atomic_torch_save", "save_checkpoint",
    "load_checkpoint_file", "auto_load_model",
    # misc
    "unwrap_model", "strip_state_dict_prefixes", "get_model_state_dict", "count_parameters",
]

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT_VERSION = 1
DEFAULT_MASTER_PORT = 29500


# ----------------------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------------------

@dataclass
class DistEnv:
    """Where this process sits in the job, as resolved from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None
    source: str  # "torchrun" | "slurm" | "itp"


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions  # noqa: SLF001 - argparse has no public lookup


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the launcher-related flags; both ``--local_rank`` and torch>=2's ``--local-rank`` are accepted.

    The value of ``--local_rank`` is ignored (LOCAL_RANK from the environment wins); it only exists so that
    ``torch.distributed.launch`` does not make argparse fail. Options the caller already defined are skipped.
    """
    group = parser.add_argument_group("distributed")
    if not _has_option(parser, "--world_size"):
        group.add_argument("--world_size", default=1, type=int, help="number of processes (from launcher)")
    if not _has_option(parser, "--local_rank"):
        group.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                           help="ignored; accepted for torch.distributed.launch compatibility")
    if not _has_option(parser, "--dist_url"):
        group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    if not _has_option(parser, "--dist_timeout"):
        group.add_argument("--dist_timeout", default=30, type=float,
                           help="minutes a collective may wait before the job fails (instead of hanging)")
    if not _has_option(parser, "--dist_on_itp"):
        group.add_argument("--dist_on_itp", action="store_true", help="use OpenMPI OMPI_COMM_WORLD_* vars")
    if not _has_option(parser, "--device"):
        group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           help="device to train on (cuda or cpu)")
    if not _has_option(parser, "--seed"):
        group.add_argument("--seed", default=0, type=int, help="base seed; each rank uses seed + rank")
    return parser


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in node list")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(item)
    return out


def _expand_host(expr: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", expr)
    if m is None:
        return [expr]
    prefix, suffix = expr[: m.start()], expr[m.end():]
    return [h for v in _expand_range_list(m.group(1)) for h in _expand_host(prefix + v + suffix)]


def parse_slurm_nodelist(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """Expand SLURM's compact host list (``node[001-004,7],gpu5``) in order, keeping zero padding.

    Parsed in Python so that compute nodes without the SLURM client tools still work;
    ``scontrol show hostnames`` is only the fallback for forms this parser rejects.
    """
    try:
        hosts = [h for part in _split_top_level(nodelist) for h in _expand_host(part)]
        if hosts:
            return hosts
        raise ValueError(f"empty node list {nodelist!r}")
    except ValueError:
        if use_scontrol and shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout
            hosts = [h for h in out.split() if h]
            if hosts:
                return hosts
        raise


def resolve_distributed_env(environ: Mapping[str, str] | None = None, dist_on_itp: bool = False,
                            use_scontrol: bool = True) -> DistEnv | None:
    """Work out rank/world/local rank and rendezvous address from the launcher's variables, or None if alone.

    torchrun's variables win over SLURM's, so ``srun torchrun ...`` (one torchrun per node) uses torchrun's
    ranks.
    A SLURM step with a single task is treated as non-distributed (interactive ``python`` inside ``salloc``).
    """
    env = os.environ if environ is None else environ
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dist_on_itp:
        rank = int(env["OMPI_COMM_WORLD_RANK"])
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        return DistEnv(rank, world, local, env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "itp")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else rank % max(1, n_gpu)
        return DistEnv(rank, world, local, env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env:
        world_str = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        world = int(world_str)
        if world <= 1:
            return None
        rank = int(env["SLURM_PROCID"])
        local = int(env["SLURM_LOCALID"]) if "SLURM_LOCALID" in env else rank % max(1, n_gpu)
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                        or env.get("SLURM_NODELIST"))
            if not nodelist:
                raise RuntimeError("SLURM job without MASTER_ADDR and without SLURM_*NODELIST: cannot "
                                   "find the rendezvous host; export MASTER_ADDR")
            addr = parse_slurm_nodelist(nodelist, use_scontrol=use_scontrol)[0]
        port = env.get("MASTER_PORT")
        if not port:
            job_id = env.get("SLURM_JOB_ID", "")
            # Derive from the job id so that two jobs sharing a node do not collide on the same port.
            port = str(15000 + int(job_id) % 20000) if job_id.isdigit() else str(DEFAULT_MASTER_PORT)
        return DistEnv(rank, world, local, addr, port, "slurm")
    return None


_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks so logs are not multiplied; ``print(..., force=True)`` still
    prints."""

    def _print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = _print


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Initialise the process group from torchrun / SLURM / OpenMPI variables, or set up a single process.

    Sets ``args.rank``, ``args.world_size``, ``args.local_rank``, ``args.gpu`` (the CUDA index: local rank
    modulo the visible GPUs, for clusters that bind one GPU per task), ``args.distributed`` and
    ``args.dist_backend`` (``nccl`` for CUDA devices, ``gloo`` otherwise; None when not distributed).
    """
    info = resolve_distributed_env(dist_on_itp=getattr(args, "dist_on_itp", False))
    device = str(getattr(args, "device", "cuda" if torch.cuda.is_available() else "cpu"))
    if info is None or info.world_size < 1:
        print("Not using distributed mode")
        args.rank, args.world_size, args.distributed, args.dist_backend = 0, 1, False, None
        args.gpu = args.local_rank = 0
        setup_for_distributed(True)
        return

    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if info.master_addr:
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
    if info.master_port:
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
    dist_url = getattr(args, "dist_url", None) or "env://"
    if info.source == "itp" and dist_url == "env://":
        dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"

    args.rank, args.world_size, args.distributed = info.rank, info.world_size, True
    args.gpu = args.local_rank = info.local_rank
    use_cuda = torch.cuda.is_available() and device.startswith("cuda")
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        args.gpu = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
    if is_dist_avail_and_initialized():  # called twice (e.g. by a wrapper script): keep the existing group
        setup_for_distributed(info.rank == 0)
        return
    timeout = datetime.timedelta(minutes=float(getattr(args, "dist_timeout", 30) or 30))
    _builtin_print(f"| distributed init ({info.source}): rank {info.rank}/{info.world_size}, local rank "
                   f"{info.local_rank}, backend {args.dist_backend}, url {dist_url}", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url, world_size=info.world_size,
                            rank=info.rank, timeout=timeout)
    barrier()
    setup_for_distributed(info.rank == 0)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _collective_device() -> torch.device:
    """NCCL only reduces CUDA tensors; gloo wants CPU ones."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Barrier that is a no-op without a process group (so single-process runs never hang or crash)."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(x: Union[torch.Tensor, float, int]) -> Union[torch.Tensor, float]:
    """Mean over ranks; a tensor in gives a tensor out (no host sync), a number in gives a float out."""
    if isinstance(x, torch.Tensor):
        if not is_dist_avail_and_initialized():
            return x
        dev = _collective_device()
        t = x.detach().to(dev, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, copy=True)
        dist.all_reduce(t)
        return (t / get_world_size()).to(x.device)
    if not is_dist_avail_and_initialized():
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group). Collective."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def setup_seed(seed: int) -> int:
    """Seed torch, numpy and random with ``seed + rank`` (else all ranks draw the same augmentations)."""
    s = int(seed) + get_rank()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch does not reseed numpy/random per worker, so derive them here; stop
    signals are left to the main process (``preemption``)."""
    from preemption import ignore_stop_signals

    ignore_stop_signals()
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


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


def cleanup() -> None:
    """Destroy the process group at exit so NCCL does not warn about leaked communicators."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type if not isinstance(device, str) else device.split(":")[0]


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """Validate ``precision``; fall back from bf16 to fp16 (with a message) on GPUs without bf16 support."""
    precision = str(precision).lower()
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and _device_type(device) == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        print("bf16 is not supported on this GPU; using fp16 autocast with a GradScaler instead")
        return "fp16"
    return precision


def autocast(device_type: Union[str, torch.device],
             precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` (fp32 is a no-op); accepts 'cuda:0' style devices."""
    precision = str(precision).lower()
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device_type), dtype=_PRECISIONS[precision])


def get_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
                   norm_type: float = 2.0) -> torch.Tensor:
    """Total gradient norm as a tensor (no host sync); 0 when no parameter has a gradient."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    device = grads[0].device
    if norm_type == math.inf:
        return torch.stack([g.abs().max().to(device) for g in grads]).max()
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type).to(device) for g in grads])
    return torch.linalg.vector_norm(norms, norm_type)


class LossScaler:
    """Backward + (accumulate) + unscale + clip/measure + step + scaler update, for every precision.

    fp16 uses a real ``torch.amp.GradScaler``; bf16/fp32 use a disabled one so the call is a plain
    backward/step with the same interface. The returned grad norm is a tensor (no ``.item()``), None on
    accumulation micro-steps. ``num_nonfinite`` counts steps whose grad norm was inf/NaN (skipped by the
    GradScaler in fp16), as a tensor, so the log can tell a skipped step from a divergence.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, precision: str = "fp16", device_type: Union[str, torch.device] = "cuda",
                 init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.precision = str(precision).lower()
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.device_type = _device_type(device_type)
        self.enabled = self.precision == "fp16"
        self._scaler = torch.amp.GradScaler(self.device_type, enabled=self.enabled, init_scale=init_scale,
                                            growth_interval=growth_interval)
        self.num_nonfinite: torch.Tensor | None = None

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
                 parameters: Iterable[torch.Tensor] | None = None, create_graph: bool = False,
                 update_grad: bool = True) -> torch.Tensor | None:
        """Backward ``loss``; when ``update_grad`` also unscale, clip (``clip_grad``) or measure, and step.

        Divide the loss by the accumulation count yourself; call with ``update_grad=False`` on the micro-steps
        that should only accumulate. ``optimizer.zero_grad()`` stays the caller's job (after an update step).
        """
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        if parameters is None:
            parameters = [p for g in optimizer.param_groups for p in g["params"]]
        else:
            parameters = list(parameters)
        self._scaler.unscale_(optimizer)  # no-op when disabled
        if clip_grad is not None and clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, float(clip_grad))
        else:
            norm = get_grad_norm_(parameters)
        nonfinite = (~torch.isfinite(norm)).to(torch.int64)
        self.num_nonfinite = nonfinite if self.num_nonfinite is None else self.num_nonfinite + nonfinite.to(
            self.num_nonfinite.device)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def get_scale(self) -> float:
        """Current loss scale (1.0 when disabled). Syncs with the device: call it on logging steps only."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def get_scale_tensor(self) -> torch.Tensor:
        """Current loss scale as a tensor (no sync), for lazy meters such as ``MetricLogger.update``."""
        scale = getattr(self._scaler, "_scale", None)  # GradScaler keeps it on the device once used
        if self.enabled and isinstance(scale, torch.Tensor):
            return scale.detach().reshape(())
        return torch.tensor(self.get_scale())

    def state_dict(self) -> dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a GradScaler state; an empty state (saved by a bf16/fp32 run) keeps the fresh fp16 scale."""
        if self.enabled and not state_dict:
            print("LossScaler: checkpoint has no GradScaler state (saved without fp16); using a fresh scale")
            return
        self._scaler.load_state_dict(dict(state_dict))


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not look like one of ours."""


class NonFiniteCheckpointError(ValueError):
    """Refused to save weights containing NaN/Inf: resuming from them would only continue a diverged run."""


@dataclass
class ResumeInfo:
    """What ``auto_load_model`` restored; ``path`` is None when training starts from scratch."""

    path: str | None = None
    epoch: int = -1
    start_epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0  # > 0: the run stopped inside ``start_epoch`` after this many optimizer steps
    rank_state: dict[str, Any] | None = None  # this rank's saved in-epoch state (meters) for a mid-epoch resume
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return self.path is not None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``module``) and torch.compile (``_orig_mod``) wrappers, in any order."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # noqa: SLF001 - torch.compile's OptimizedModule
        else:
            return model


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


def _ema_module(model_ema: Any) -> nn.Module:
    # timm ModelEma keeps the copy in .ema; ModelEmaV2/V3 in .module.
    for attr in ("module", "ema"):
        m = getattr(model_ema, attr, None)
        if isinstance(m, nn.Module):
            return m
    return model_ema


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


def _nonfinite_keys(state_dict: Mapping[str, Any]) -> list[str]:
    bad = []
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() \
                and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(args: argparse.Namespace, epoch: int, model_without_ddp: nn.Module,
                    optimizer: torch.optim.Optimizer | None, loss_scaler: LossScaler | None,
                    global_step: int, extra: Mapping[str, Any] | None = None, model_ema: Any = None,
                    tag: str | None = None, step_in_epoch: int | None = None,
                    rank_state: Mapping[str, Any] | None = None) -> list[str]:
    """Write ``checkpoint-{epoch}.pth`` (every ``args.save_ckpt_freq`` epochs and at the last) and, always,
    ``checkpoint-latest.pth`` into ``args.output_dir``; with ``tag`` only ``checkpoint-{tag}.pth``
    (e.g. 'best'). With ``step_in_epoch`` (a stop inside ``epoch`` after that many optimizer steps) only
    ``checkpoint-latest.pth``, marked so that resuming continues that epoch at that step.

    Collective: call it on every rank. All ranks check the weights for NaN/Inf (so all raise together) and
    gather their RNG states and ``rank_state`` (e.g. the epoch's meters so far); only rank 0 writes, atomically.
    Returns the paths written (empty on other ranks).
    ``extra`` entries go to the top level (e.g. ``{'kind': 'pretrain', 'best_acc1': 81.2}``).
    """
    output_dir = getattr(args, "output_dir", None)
    if not output_dir:
        print("save_checkpoint: args.output_dir is empty, nothing saved")
        return []
    model_sd = get_model_state_dict(model_without_ddp)
    ema_sd = get_model_state_dict(_ema_module(model_ema)) if model_ema is not None else None
    bad = _nonfinite_keys(model_sd) + [f"model_ema.{k}" for k in (_nonfinite_keys(ema_sd) if ema_sd else [])]
    if bad:
        raise NonFiniteCheckpointError(
            f"refusing to save epoch {epoch}: {len(bad)} weight tensor(s) contain NaN/Inf (first: "
            f"{', '.join(bad[:5])}); the run has diverged, resume from the previous checkpoint instead")

    gathered = all_gather_objects({"rng": _rng_state(), "state": dict(rank_state) if rank_state else None})
    if not is_main_process():
        return []
    rng_states = [g["rng"] for g in gathered]

    ckpt: dict[str, Any] = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": "train_state",
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "model": model_sd,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "args": plain_args(args),
        "rng_state": rng_states,
    }
    if step_in_epoch is not None:
        ckpt["step_in_epoch"] = int(step_in_epoch)
        ckpt["rank_state"] = [g["state"] for g in gathered]
    if ema_sd is not None:
        ckpt["model_ema"] = ema_sd
    if extra:
        ckpt.update(dict(extra))

    out = Path(output_dir)
    written: list[str] = []
    if tag is not None or step_in_epoch is not None:
        path = out / f"checkpoint-{tag if tag is not None else 'latest'}.pth"
        atomic_torch_save(ckpt, path)
        return [str(path)]
    freq = int(getattr(args, "save_ckpt_freq", 1) or 1)
    epochs = getattr(args, "epochs", None)
    is_last = epochs is not None and epoch + 1 >= int(epochs)
    latest = out / "checkpoint-latest.pth"
    if (epoch + 1) % freq == 0 or is_last:
        numbered = out / f"checkpoint-{epoch}.pth"
        atomic_torch_save(ckpt, numbered)
        _atomic_copy(numbered, latest)  # one serialisation, two files
        written += [str(numbered), str(latest)]
    else:
        atomic_torch_save(ckpt, latest)
        written.append(str(latest))
    return written


def load_checkpoint_file(path: PathLike) -> dict[str, Any]:
    """Load one of our checkpoints (or a URL); a torn/unreadable file raises a CheckpointError naming it."""
    path = str(path)
    try:
        if path.startswith(("https://", "http://")):
            ckpt = torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=False,
                                                      weights_only=False)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any decode failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} is truncated or unreadable ({type(e).__name__}: {e}); "
                              f"it was probably cut short by a crash during saving") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry (keys: "
                              f"{sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


def _find_auto_resume_candidates(output_dir: Path) -> tuple[Path | None, list[tuple[int, Path]]]:
    latest = output_dir / "checkpoint-latest.pth"
    numbered = []
    for p in output_dir.glob("checkpoint-*.pth"):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    numbered.sort(key=lambda t: t[0], reverse=True)
    return (latest if latest.is_file() else None), numbered


def _restore(ckpt: Mapping[str, Any], path: str, args: argparse.Namespace, model_without_ddp: nn.Module,
             optimizer: torch.optim.Optimizer | None, loss_scaler: LossScaler | None, model_ema: Any
             ) -> ResumeInfo:
    unwrap_model(model_without_ddp).load_state_dict(strip_state_dict_prefixes(ckpt["model"]), strict=True)
    info = ResumeInfo(path=path, start_epoch=int(getattr(args, "start_epoch", 0) or 0))
    if model_ema is not None and ckpt.get("model_ema") is not None:
        _ema_module(model_ema).load_state_dict(strip_state_dict_prefixes(ckpt["model_ema"]), strict=True)
    if "epoch" in ckpt and ckpt.get("optimizer") is not None:
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if loss_scaler is not None and ckpt.get("scaler") is not None:
            loss_scaler.load_state_dict(ckpt["scaler"])
        info.epoch = int(ckpt["epoch"])
        info.step_in_epoch = int(ckpt.get("step_in_epoch") or 0)
        info.start_epoch = info.epoch + (0 if info.step_in_epoch else 1)
        args.start_epoch = info.start_epoch
        states = ckpt.get("rank_state")
        if info.step_in_epoch and isinstance(states, list) and len(states) == get_world_size():
            info.rank_state = states[get_rank()]
        if ckpt.get("global_step") is not None:
            info.global_step = int(ckpt["global_step"])
        else:
            per_ep = int(getattr(args, "num_training_steps_per_epoch", 0) or 0)
            info.global_step = info.start_epoch * per_ep
            print(f"checkpoint {path} has no global_step; assuming {info.global_step}")
        rng = ckpt.get("rng_state")
        if isinstance(rng, list) and rng:
            if len(rng) == get_world_size():
                _set_rng_state(rng[get_rank()])
            elif get_rank() == 0:
                _set_rng_state(rng[0])
            else:
                _builtin_print(f"[rank {get_rank()}] RNG state saved with world size {len(rng)}; keeping "
                               f"seeded RNG")
        elif isinstance(rng, Mapping):
            _set_rng_state(rng)
    info.extra = {k: v for k, v in ckpt.items() if k not in {"model", "model_ema", "optimizer", "scaler",
                                                            "rng_state", "args"}}
    where = f", step {info.step_in_epoch} of epoch {info.start_epoch}" if info.step_in_epoch else ""
    print(f"Resumed from {path}: epoch {info.epoch}, start_epoch {info.start_epoch}, "
          f"global_step {info.global_step}{where}")
    return info


def auto_load_model(args: argparse.Namespace, model_without_ddp: nn.Module,
                    optimizer: torch.optim.Optimizer | None, loss_scaler: LossScaler | None,
                    model_ema: Any = None) -> ResumeInfo:
    """Resume model/optimizer/scaler/EMA/RNG and set ``args.start_epoch``; the info has ``global_step``.

    ``args.resume`` (path, URL, or 'auto') wins and must load; otherwise with ``args.auto_resume`` (default
    True) the newest readable checkpoint in ``args.output_dir`` is used: ``checkpoint-latest.pth`` or
    ``checkpoint-N.pth`` by stored epoch, falling back past truncated files with a message naming each one.
    """
    if getattr(args, "start_epoch", None) is None:
        args.start_epoch = 0
    resume = getattr(args, "resume", None) or ""
    if resume and resume != "auto":
        ckpt = load_checkpoint_file(resume)
        return _restore(ckpt, resume, args, model_without_ddp, optimizer, loss_scaler, model_ema)
    if not (resume == "auto" or getattr(args, "auto_resume", True)):
        return ResumeInfo(start_epoch=int(args.start_epoch))
    output_dir = getattr(args, "output_dir", None)
    if not output_dir or not Path(output_dir).is_dir():
        return ResumeInfo(start_epoch=int(args.start_epoch))

    from resume import check_run_config

    latest, numbered = _find_auto_resume_candidates(Path(output_dir))
    # (progress, prefer, path, preloaded): a mid-epoch latest (epoch e, step k) comes after checkpoint-{e-1}.
    candidates: list[tuple[float, int, Path, dict[str, Any] | None]] = []
    if latest is not None:
        try:
            ck = load_checkpoint_file(latest)
            progress = int(ck.get("epoch", -1)) + (0.5 if ck.get("step_in_epoch") else 1.0)
            candidates.append((progress, 1, latest, ck))
        except CheckpointError as e:
            _builtin_print(f"[auto_resume] WARNING: {e}; falling back to the previous numbered checkpoint")
    candidates += [(n + 1.0, 0, p, None) for n, p in numbered]
    candidates.sort(key=lambda t: (t[0], t[1]), reverse=True)
    for _, _, path, ck in candidates:
        if ck is None:
            try:
                ck = load_checkpoint_file(path)
            except CheckpointError as e:
                _builtin_print(f"[auto_resume] WARNING: {e}; falling back to the previous checkpoint")
                continue
        check_run_config(ck.get("args"), args, str(path))
        return _restore(ck, str(path), args, model_without_ddp, optimizer, loss_scaler, model_ema)
    if candidates or latest is not None:
        _builtin_print(f"[auto_resume] WARNING: no readable checkpoint in {output_dir}; starting fresh")
    return ResumeInfo(start_epoch=int(args.start_epoch))


def record_args(args: argparse.Namespace, summary: Sequence[str]) -> None:
    """All arguments to ``OUTPUT_DIR/args.json`` (rank 0, atomic); the terminal gets the ``summary`` flags only."""
    if is_main_process() and getattr(args, "output_dir", None):
        path = Path(args.output_dir) / "args.json"
        atomic_write_text(path, json.dumps(plain_args(args), indent=1, sort_keys=True) + "\n")
        shown = "  ".join(f"{k}={getattr(args, k)}" for k in summary if hasattr(args, k))
        print(f"Run: {shown}\nAll arguments: {path}")


# ----------------------------------------------------------------------------------------------------
# Shared by the training programs
# ----------------------------------------------------------------------------------------------------

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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the epoch and step."""


class NonFiniteLossWatch:
    """Remembers, on the device, the first step of an epoch whose loss was not finite.

    ``update`` is sync-free, so it can run every step; ``check`` reads the flag back (call it on logging steps and
    at the end of the epoch) and raises ``NonFiniteLossError`` naming the epoch and step.
    """

    def __init__(self, epoch: int, steps_per_epoch: int, start_step: int, device: torch.device) -> None:
        self.epoch, self.steps_per_epoch, self.start_step = epoch, steps_per_epoch, start_step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self) -> None:
        bad = int(self.first_bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f"loss is not finite at epoch {self.epoch}, step {bad} of {self.steps_per_epoch} (global step "
                f"{self.start_step + bad}); stopping. Try --precision bf16/fp32, a lower --lr, or --clip_grad.")


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
