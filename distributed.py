"""Process-group start-up (plain python, torchrun, SLURM, OpenMPI) and the few collectives the programs use.

No environment variable is read at import time, so ``python script.py`` needs no launcher. Every helper is a no-op
(or the identity) without a process group, so single-process runs take the same code path.
"""
from __future__ import annotations

import argparse
import builtins
import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch
import torch.distributed as dist

from cli import has_option


DEFAULT_MASTER_PORT = 29500


@dataclass
class DistEnv:
    """Where this process sits in the job, as resolved from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None
    source: str  # "torchrun" | "slurm" | "itp"


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the launcher-related flags; both ``--local_rank`` and torch>=2's ``--local-rank`` are accepted.

    The value of ``--local_rank`` is ignored (LOCAL_RANK from the environment wins); it only exists so that
    ``torch.distributed.launch`` does not make argparse fail. Options the caller already defined are skipped.
    """
    group = parser.add_argument_group("distributed")
    if not has_option(parser, "--world_size"):
        group.add_argument("--world_size", default=1, type=int, help="number of processes (from launcher)")
    if not has_option(parser, "--local_rank"):
        group.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                           help="ignored; accepted for torch.distributed.launch compatibility")
    if not has_option(parser, "--dist_url"):
        group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    if not has_option(parser, "--dist_timeout"):
        group.add_argument("--dist_timeout", default=30, type=float,
                           help="minutes a collective may wait before the job fails (instead of hanging)")
    if not has_option(parser, "--dist_on_itp"):
        group.add_argument("--dist_on_itp", action="store_true", help="use OpenMPI OMPI_COMM_WORLD_* vars")
    if not has_option(parser, "--device"):
        group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           help="device to train on (cuda or cpu)")
    if not has_option(parser, "--seed"):
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
    info = resolve_distributed_env(dist_on_itp=args.dist_on_itp)
    device = str(args.device)
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
    dist_url = args.dist_url
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
    timeout = datetime.timedelta(minutes=float(args.dist_timeout))
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


def collective_device() -> torch.device:
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
        dev = collective_device()
        t = x.detach().to(dev, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, copy=True)
        dist.all_reduce(t)
        return (t / get_world_size()).to(x.device)
    if not is_dist_avail_and_initialized():
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def broadcast_module(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Rank ``src``'s parameters and buffers (or buffers only) on every rank, as DDP does to the module it wraps
    (models start from per-rank seeds; BatchNorm statistics drift apart after DDP's last forward). Collective; a
    no-op without a process group."""
    if not is_dist_avail_and_initialized():
        return
    dev = collective_device()
    with torch.no_grad():
        for t in [*([] if buffers_only else module.parameters()), *module.buffers()]:
            x = t.detach().to(dev)  # a CPU copy (--model_ema_force_cpu) travels through the backend's device
            dist.broadcast(x, src)
            t.copy_(x)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group). Collective."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    """Destroy the process group at exit so NCCL does not warn about leaked communicators."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
