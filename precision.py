"""Mixed precision and the optimizer step: autocast per ``--precision``, the loss scaler that does backward +
clip + step for every precision, and the sync-free watch for a non-finite loss.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping, Union

import torch
import torch.distributed as dist


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
    accumulation micro-steps; it is inf/NaN on a step the GradScaler skipped in fp16 (the meters count those steps
    as ``grad_norm_nonfinite`` and average the others, ``metric_logging.SmoothedValue``).
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
        """Collective under torch.distributed (every rank checks at the same steps): the earliest bad step of any
        rank, so that all ranks stop together instead of the others waiting in the next all-reduce."""
        first = self.first_bad
        if dist.is_available() and dist.is_initialized():
            never = torch.iinfo(first.dtype).max
            first = torch.where(first < 0, torch.full_like(first, never), first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == never, torch.full_like(first, -1), first)
        bad = int(first)
        if bad >= 0:
            raise NonFiniteLossError(
                f"loss is not finite at epoch {self.epoch}, step {bad} of {self.steps_per_epoch} (global step "
                f"{self.start_step + bad}); stopping. Try --precision bf16/fp32, a lower --lr, or --clip_grad.")
