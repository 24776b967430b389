"""Training checkpoints: atomic save (rank 0, every rank's RNG and in-epoch state gathered), reading one back,
and auto-resume from the newest readable checkpoint in ``--output_dir``.
"""
from __future__ import annotations

import argparse
import datetime
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from distributed import _builtin_print, all_gather_objects, get_rank, get_world_size, is_main_process
from precision import LossScaler
from timm.utils import unwrap_model

from utils import (PathLike, _atomic_copy, atomic_torch_save, get_model_state_dict, plain_args,
                   strip_state_dict_prefixes)


CHECKPOINT_FORMAT_VERSION = 1


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


def keeps_epoch(args: argparse.Namespace, epoch: int) -> bool:
    """Whether ``epoch``'s checkpoint is kept as ``checkpoint-{epoch}`` (every ``--save_ckpt_freq`` epochs and the
    last); the others are only the latest, replaced by the next."""
    return (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 >= args.epochs


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
    model_sd = get_model_state_dict(model_without_ddp)
    ema_sd = get_model_state_dict(unwrap_model(model_ema)) if model_ema is not None else None
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

    out = Path(args.output_dir)
    written: list[str] = []
    if tag is not None or step_in_epoch is not None:
        path = out / f"checkpoint-{tag if tag is not None else 'latest'}.pth"
        atomic_torch_save(ckpt, path)
        return [str(path)]
    latest = out / "checkpoint-latest.pth"
    if keeps_epoch(args, epoch):
        numbered = out / f"checkpoint-{epoch}.pth"
        atomic_torch_save(ckpt, numbered)
        _atomic_copy(numbered, latest)  # one serialisation, two files
        written += [str(numbered), str(latest)]
    else:
        atomic_torch_save(ckpt, latest)
        written.append(str(latest))
    return written


def torch_load(path: PathLike) -> Any:
    """``torch.load`` of a file or URL onto the CPU. A missing file raises FileNotFoundError, a torn or unreadable
    one a CheckpointError naming it: the one reader of checkpoint files (``checkpoint_loading`` uses it too)."""
    path = str(path)
    if Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file in it (e.g. "
                              f"{Path(path) / 'checkpoint-latest.pth'})")
    try:
        if path.startswith(("https://", "http://")):
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=False, weights_only=False)
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any decode failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} is truncated or unreadable ({type(e).__name__}: {e}); "
                              f"it was probably cut short by a crash during saving") from e


def load_checkpoint_file(path: PathLike) -> dict[str, Any]:
    """One of our training checkpoints (file or URL), which must hold ``model``."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry (keys: "
                              f"{sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


RUN_KINDS = ("pretrain", "finetune", "probe")  # the programs' checkpoint kinds


def refuse_to_start_over_on(output_dir: PathLike) -> None:
    """``--no-auto_resume`` into a folder holding a run's checkpoints would write over them one by one and leave
    the rest; a later auto-resume could then continue the old run from its newest file. Refused, naming them."""
    d = Path(output_dir)
    names = sorted(p.name for p in d.iterdir()
                   if re.fullmatch(r"checkpoint-(\d+(-step\d+)?|latest|best)(\.pth)?|latest", p.name)) \
        if d.is_dir() else []
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise CheckpointError(f"--output_dir {output_dir} holds a run's checkpoints ({shown}); --no-auto_resume "
                              f"would start over on top of them, and a later auto-resume could continue the old "
                              f"run from its newest one. Use a new --output_dir, or remove them to start over here")


def _find_auto_resume_candidates(output_dir: Path) -> tuple[Path | None, list[tuple[int, Path]]]:
    latest = output_dir / "checkpoint-latest.pth"
    numbered = []
    for p in output_dir.glob("checkpoint-*.pth"):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    numbered.sort(key=lambda t: t[0], reverse=True)
    return (latest if latest.is_file() else None), numbered


def _load_run_weights(module: nn.Module, state: Mapping[str, Any], ckpt: Mapping[str, Any], path: str) -> None:
    """Strict load of a resumed run's weights; weights that do not fit are a CheckpointError saying what the file
    holds (torch's message lists every key)."""
    module = unwrap_model(module)
    state = strip_state_dict_prefixes(state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        target = module.state_dict()
        missing = [k for k in target if k not in state]
        unexpected = [k for k in state if k not in target]
        shapes = [k for k in state if k in target and tuple(getattr(state[k], "shape", ())) != tuple(target[k].shape)]
        what = " ".join(str(ckpt[k]) for k in ("kind", "model_name") if isinstance(ckpt.get(k), str))
        parts = [f"{len(v)} {name} (e.g. {v[0]})" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(f"{path}{f' ({what} checkpoint)' if what else ''} does not fit this run's model: "
                              f"{'; '.join(parts)} weights. --resume continues the run that wrote it, with its "
                              f"flags; to start from its weights, use --finetune") from None


def _restore(ckpt: Mapping[str, Any], path: str, args: argparse.Namespace, model_without_ddp: nn.Module,
             optimizer: torch.optim.Optimizer | None, loss_scaler: LossScaler | None, model_ema: Any
             ) -> ResumeInfo:
    _load_run_weights(model_without_ddp, ckpt["model"], ckpt, path)
    info = ResumeInfo(path=path, start_epoch=args.start_epoch)
    if model_ema is not None and ckpt.get("model_ema") is not None:
        _load_run_weights(model_ema, ckpt["model_ema"], ckpt, path)
    if "epoch" in ckpt and ckpt.get("optimizer") is not None:
        if optimizer is not None:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:  # torch: "... parameter group that doesn't match the size of optimizer's group"
                hint = ("--no_sampler_pos_weight_decay, which runs saved before it existed had on"
                        if "no_sampler_pos_weight_decay" in vars(args) else "--layer_decay, --weight_decay, the model")
                raise CheckpointError(f"{path}: its optimizer state does not fit this run's parameter groups ({e}); "
                                      f"the groups differ (e.g. {hint})") from None
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
                    model_ema: Any = None, kind: str | None = None) -> ResumeInfo:
    """Resume model/optimizer/scaler/EMA/RNG and set ``args.start_epoch``; the info has ``global_step``.

    ``args.resume`` (path, URL, or 'auto') wins and must load; otherwise with ``args.auto_resume`` (default
    True) the newest readable checkpoint in ``args.output_dir`` is used: ``checkpoint-latest.pth`` or
    ``checkpoint-N.pth`` by stored epoch, falling back past truncated files with a message naming each one.
    ``kind`` (the program's: pretrain, finetune, probe): a folder holding another program's run is refused as such.
    """
    resume = args.resume
    if resume and resume != "auto":
        ckpt = load_checkpoint_file(resume)
        return _restore(ckpt, resume, args, model_without_ddp, optimizer, loss_scaler, model_ema)
    if not (resume == "auto" or args.auto_resume):
        refuse_to_start_over_on(args.output_dir)
        return ResumeInfo(start_epoch=int(args.start_epoch))
    output_dir = args.output_dir
    if not Path(output_dir).is_dir():
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
        if kind and ck.get("kind") in RUN_KINDS and ck["kind"] != kind:
            raise CheckpointError(f"--output_dir {output_dir} holds a {ck['kind']} run ({path.name}); this "
                                  f"{kind} run cannot continue it: use another --output_dir")
        check_run_config(ck.get("args"), args, str(path))
        return _restore(ck, str(path), args, model_without_ddp, optimizer, loss_scaler, model_ema)
    if candidates or latest is not None:
        _builtin_print(f"[auto_resume] WARNING: no readable checkpoint in {output_dir}; starting fresh")
    return ResumeInfo(start_epoch=int(args.start_epoch))


class Checkpointer:
    """The run's checkpoints behind one interface (``finetune_deepspeed.DeepSpeedCheckpointer`` is the other):
    ``resume`` restores everything and sets ``args.start_epoch``; ``save`` writes an epoch's checkpoint, a tagged
    one (``best``) or a mid-epoch one. ``extra`` entries (kind, model name, best accuracy so far) go into each
    checkpoint's top level; with ``enabled`` False only mid-epoch checkpoints are written (a stopped run can always
    resume)."""

    def __init__(self, args: argparse.Namespace, model_without_ddp: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_scaler: LossScaler, model_ema: Any = None, enabled: bool = True, **extra: Any) -> None:
        self.args, self.model, self.optimizer, self.loss_scaler = args, model_without_ddp, optimizer, loss_scaler
        self.model_ema, self.enabled, self.extra = model_ema, enabled, extra

    def resume(self) -> ResumeInfo:
        return auto_load_model(self.args, self.model, self.optimizer, self.loss_scaler, model_ema=self.model_ema,
                               kind=self.extra.get("kind"))

    def save(self, epoch: int, global_step: int, tag: str | None = None, step_in_epoch: int | None = None,
             rank_state: Mapping[str, Any] | None = None) -> list[str]:
        """Collective; returns the paths written (empty on ranks other than 0)."""
        if not self.enabled and step_in_epoch is None:
            return []
        return save_checkpoint(self.args, epoch, self.model, self.optimizer, self.loss_scaler, global_step,
                               extra=self.extra, model_ema=self.model_ema, tag=tag, step_in_epoch=step_in_epoch,
                               rank_state=rank_state)
