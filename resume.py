"""What it takes to continue a run exactly where it stopped.

- ``check_run_config``: auto-resume refuses a checkpoint whose run was defined by other flags (a changed mask ratio
  would otherwise silently continue under the new value; a changed model would fail deep inside ``load_state_dict``).
- ``ResumableSampler``: the data order of an epoch is a function of (seed, epoch); a run resumed mid-epoch skips the
  clips the interrupted run already trained on.
- ``trim_log``: records past the resume point (written by the interrupted run) are dropped so log.txt has each
  epoch once.
- ``data_fingerprint``: what the training examples are (names and labels, in order), so that a list edited in place
  is refused and a moved copy of the same list is not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from torch.utils.data import DistributedSampler

from cli import UserError
from masking_generator import canonical_mask_type

# Flags that do not change what is computed: they may differ between the interrupted run and its resumption.
# Everything else defines the run. batch_size / accum_iter / world_size are compared as their product.
HARMLESS_FLAGS = frozenset({
    "print_freq", "num_workers", "worker_start_method", "prefetch_factor", "pin_mem", "output_dir", "log_dir", "resume",
    "softmax_temp", "auto_resume", "start_epoch", "save_ckpt_freq", "save_ckpt", "vis_freq", "vis_num_clips",
    "dist_url", "dist_timeout", "dist_on_itp", "local_rank", "rank", "gpu", "distributed", "dist_backend", "world_size",
    "batch_size", "accum_iter", "video_backend", "clip_dtype", "compile", "use_checkpoint", "max_retries",
    "max_broken_ratio", "device", "debug", "stall_minutes", "eval", "dist_eval", "disable_eval_during_finetuning",
    "skip_final_test", "model_ema_force_cpu", "val_list", "test_list", "test_num_segment", "test_num_crop",
    "short_side_size", "deepspeed_config",
    # derived at start-up from the flags above or compared through their base values
    "lr", "min_lr", "warmup_lr", "total_batch",
})
PATH_FLAGS = frozenset({"data_path", "train_list", "finetune", "data_root"})
# Run-defining flags added after runs were saved without them: the behaviour those runs had. A resume compares the
# current value with it, so an older run does not change recipe silently mid-way (or fail deep in torch). Both
# concern the adaptive sampler: runs with another mask (no sampler) are unaffected by them. Pre-training's --flip
# replaced --no_flip (pre-training used to flip): see _with_added_flags.
FLAGS_ADDED = {"no_sampler_pos_weight_decay": True, "sampling_log_prob": "log_softmax"}
FLAG_NAMES = {"base_lr": "lr", "base_min_lr": "min_lr", "base_warmup_lr": "warmup_lr"}  # saved value -> its flag
# Values the programs derive and save with the flags (args.json, checkpoints), named in messages by what they are.
DERIVED = {"train_data_sha256": "training examples (sha256 of the list's paths and labels, in order)",
           # the schedules' length: a run saved when 2 processes padded an odd list with a repeated clip has one more
           "num_training_steps_per_epoch": "optimizer steps per epoch (the list's length // the total batch)"}


def data_fingerprint(names: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 of the training examples: each listed name and label, in list order. The sampler's order and a
    mid-epoch resume's skip are positions in this sequence, so it is what a resumed run must find unchanged."""
    h = hashlib.sha256()
    for name, label in zip(names, labels):
        h.update(f"{name}\t{int(label)}\n".encode())
    return h.hexdigest()


def _total_batch(args: Mapping[str, Any]) -> int | None:
    try:
        return int(args["batch_size"]) * int(args.get("accum_iter") or 1) * int(args.get("world_size") or 1)
    except (KeyError, TypeError, ValueError):
        return None


def _same_path(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    try:
        return os.path.samefile(str(a), str(b))
    except OSError:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))


def _norm(v: Any) -> Any:
    # Saved args went through JSON-like plain types; compare lists and tuples alike.
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, tuple, dict)) else v


def _with_added_flags(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with each flag added since it was saved set to the behaviour that run had (``FLAGS_ADDED``)."""
    added: dict[str, Any] = {}
    if canonical_mask_type(saved.get("mask_type") or "adaptive") == "adaptive":
        added.update({k: v for k, v in FLAGS_ADDED.items() if k in current})
    if "flip" in current and "flip" not in saved and "no_flip" in saved:  # pre-training flipped before --flip existed
        added["flip"] = not saved["no_flip"] and saved.get("data_set") != "SSV2"
    return {**added, **saved}


def run_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(flag, old, new)`` for every run-defining flag that differs; flags unknown to either side are skipped.

    When both sides have the training data's fingerprint, the training list is compared by it, not by its path:
    the same list moved elsewhere may resume, one edited in place may not.
    """
    changes = []
    saved = _with_added_flags(saved, current)
    by_content = all(m.get("train_data_sha256") for m in (saved, current))
    for key in sorted(set(saved) & set(current)):
        if key in HARMLESS_FLAGS or key.startswith("_"):
            continue
        if by_content and key in ("data_path", "train_list"):
            continue
        old, new = saved[key], current[key]
        if key in PATH_FLAGS:
            if not _same_path(old, new):
                changes.append((key, old, new))
        elif _norm(old) != _norm(new):
            changes.append((FLAG_NAMES.get(key, key), old, new))
    old_total, new_total = _total_batch(saved), _total_batch(current)
    if old_total is not None and new_total is not None and old_total != new_total:
        changes.append(("batch_size x accum_iter x processes", old_total, new_total))
    return changes


def check_run_config(saved_args: Mapping[str, Any] | None, args: argparse.Namespace, checkpoint: str) -> None:
    """Raise a UserError listing each changed run-defining flag and the two ways out."""
    if not saved_args:
        return
    changes = run_config_changes(saved_args, vars(args))
    if not changes:
        return
    lines = "\n".join(f"  {DERIVED[k] if k in DERIVED else '--' + k}: {old!r} -> {new!r}" for k, old, new in changes)
    raise UserError(
        f"{checkpoint} belongs to a run with different settings; auto-resume would continue it under the new "
        f"flags:\n{lines}\nEither start a new run (--no-auto_resume and a new --output_dir) or rerun with the old "
        f"flags (and the old list, for the training examples) to continue this one.")


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first ``n`` of this rank's samples for one epoch (the part a resumed
    run already trained on). Order and sharding are exactly DistributedSampler's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = int(skip)

    def full_length(self) -> int:
        return super().__len__()

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return super().__len__() - self.skip


def trim_log(output_dir: str | os.PathLike | None, start_epoch: int, filename: str = "log.txt") -> int:
    """Keep only the log.txt records of epochs before ``start_epoch`` (rank 0 only; atomic rewrite).

    Records without an epoch (the final test line) come after training, so they are dropped as well: the resumed
    run writes them again. Returns how many records were dropped.
    """
    from distributed import is_main_process
    from utils import atomic_write_text

    if not output_dir or not is_main_process():
        return 0
    path = Path(output_dir) / filename
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line torn by a kill
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] < start_epoch:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
        print(f"log.txt: dropped {dropped} record(s) from epoch {start_epoch} on, written before the interruption")
    return dropped


def start_epoch_data(epoch: int, info: Any, args: argparse.Namespace, sampler: ResumableSampler,
                     dataset: Any) -> tuple[int, Any]:
    """Position the data for ``epoch`` and return ``(first optimizer step, the epoch's meters)``: step 0 and fresh
    meters, or, for the epoch a mid-epoch checkpoint stopped in, that step and the interrupted run's meters."""
    from metric_logging import MetricLogger

    first = info.step_in_epoch if info.step_in_epoch and epoch == info.start_epoch else 0
    sampler.set_epoch(epoch, skip=first * max(1, args.accum_iter) * args.batch_size)
    dataset.set_epoch(epoch)
    meters = MetricLogger(delimiter="  ")
    if first:
        if info.rank_state and info.rank_state.get("meters"):
            meters.load_state_dict(info.rank_state["meters"])
        else:
            print("Note: the checkpoint was written by a different number of processes; the averages of epoch "
                  f"{epoch} in log.txt cover only its steps from {first} on")
    return first, meters
