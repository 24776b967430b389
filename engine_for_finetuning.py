"""Fine-tuning epoch, single-view validation, and the multi-view test with its per-video merge.

Multi-view test: every rank classifies its own contiguous shard of the ``videos x segments x crops`` views (no
padding, no ``drop_last``: no view is lost or repeated) and writes one JSON line per view to
``{output_dir}/test_views_rank{r}.jsonl`` (``video_id, segment, crop, label, probs``). After a barrier, rank 0
merges the files by video id, keeping one view per ``(segment, crop)`` pair (a tuple, so segment 1 / crop 11 and
segment 11 / crop 1 never collide), averages the softmax probabilities, and writes ``test_results.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler

import utils
from utils import NonFiniteLossError

__all__ = ["train_one_epoch", "evaluate", "ShardSampler", "run_test_views", "merge_views", "merge_view_files",
           "final_test", "view_file", "NonFiniteLossError"]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    data_loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    loss_scaler: utils.LossScaler | None, args: Any, start_step: int,
                    lr_schedule: np.ndarray, wd_schedule: np.ndarray, model_ema: Any = None,
                    mixup_fn: Callable | None = None, log_writer: utils.TensorboardLogger | None = None,
                    deepspeed_engine: bool = False) -> dict[str, float]:
    """One epoch of supervised fine-tuning; returns the epoch's averaged meters.

    ``optimizer`` is the torch optimizer whose groups carry ``lr_scale`` (also under DeepSpeed, where it is the
    client optimizer the engine wraps), so the per-step lr / weight-decay schedules are applied the same way on both
    paths. With ``args.accum_iter`` > 1, gradients of that many batches make one step (DDP skips the all-reduce on
    the accumulation micro-steps). With ``deepspeed_engine`` the model is a DeepSpeed engine that does backward,
    accumulation, clipping and the step itself.
    """
    model.train()
    accum = max(1, int(getattr(args, "accum_iter", 1)))
    print_freq = int(getattr(args, "print_freq", 10))
    steps_per_epoch = len(data_loader) // accum  # type: ignore[arg-type]
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}]"
    watch = utils.NonFiniteLossWatch(epoch, steps_per_epoch, start_step, device)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    ds_dtype = _deepspeed_input_dtype(model) if deepspeed_engine else None
    ema_target = utils.unwrap_model(model.module if deepspeed_engine else model)

    if not deepspeed_engine:
        optimizer.zero_grad(set_to_none=True)
    for it, step, global_step, update, batch in utils.scheduled_iterations(
            data_loader, metric_logger, optimizer, lr_schedule, wd_schedule, start_step, accum, print_freq, header):
        samples = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        hard_targets = targets
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        if deepspeed_engine:
            output = model(samples.to(ds_dtype) if ds_dtype is not None else samples)
            loss = criterion(output.float(), targets)
            model.backward(loss)
            model.step()
            grad_norm = _deepspeed_grad_norm(model) if update else None
        else:
            sync = model.no_sync() if (is_ddp and not update) else contextlib.nullcontext()
            with sync:
                with utils.autocast(device, args.precision):
                    output = model(samples)
                loss = criterion(output.float(), targets)
                grad_norm = loss_scaler(loss / accum, optimizer, clip_grad=args.clip_grad,  # type: ignore[misc]
                                        update_grad=update)
            if update:
                optimizer.zero_grad(set_to_none=True)
        if update and model_ema is not None:
            model_ema.update(ema_target, step=global_step)

        watch.update(loss, step)
        stats: dict[str, Any] = dict(loss=loss.detach(), grad_norm=grad_norm)
        if mixup_fn is None:
            stats["class_acc"] = (output.detach().argmax(-1) == hard_targets).float().mean()
        lr_stats = utils.get_lr_stats(optimizer)
        metric_logger.update(**stats, lr=lr_stats["lr"], min_lr=lr_stats["min_lr"],
                             weight_decay=lr_stats["weight_decay"])
        if it % print_freq == 0:
            watch.check()
        if log_writer is not None and update:
            log_writer.update(head="loss", step=global_step, loss=stats["loss"], class_acc=stats.get("class_acc"))
            log_writer.update(head="opt", step=global_step, lr=lr_stats["lr"], min_lr=lr_stats["min_lr"],
                              weight_decay=lr_stats["weight_decay"], grad_norm=grad_norm)
    watch.check()
    metric_logger.synchronize_between_processes()
    averages = metric_logger.global_averages()
    print("Averaged stats:", "  ".join(f"{k}: {v:.4g}" for k, v in averages.items()))
    return averages


def _deepspeed_input_dtype(engine: Any) -> torch.dtype | None:
    """DeepSpeed casts the model for fp16/bf16 but not the inputs (it does not autocast)."""
    if getattr(engine, "fp16_enabled", lambda: False)():
        return torch.float16
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    return None


def _deepspeed_grad_norm(engine: Any) -> torch.Tensor | None:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))


# ----------------------------------------------------------------------------------------------------------------
# Validation (single view)
# ----------------------------------------------------------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """Contiguous, unpadded shard of ``range(n)`` for this rank: every index is used exactly once over all ranks.

    Unlike ``DistributedSampler`` nothing is repeated to even out the shards (the shards differ by at most one),
    so evaluation needs no de-duplication and no view is dropped. Contiguous (not strided) so that the crops of one
    segment stay together on one rank and reuse the decoded frames. Without a process group it is sequential.
    """

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.n = int(n)
        self.rank = utils.get_rank() if rank is None else int(rank)
        self.world_size = utils.get_world_size() if world_size is None else int(world_size)
        self.start = self.n * self.rank // self.world_size
        self.stop = self.n * (self.rank + 1) // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top[:, 0] == target).sum(), (top == target[:, None]).any(dim=1).sum()


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, precision: str = "fp32",
             reduce: bool = False, header: str = "Val:", print_freq: int = 20) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy over the loader's clips.

    ``reduce``: the loader covers only this rank's shard (``--dist_eval``); sums are all-reduced so every rank
    gets the accuracy over the whole set. Counts, not per-batch means, are reduced, so uneven shards are exact.
    Run it on the bare model (not DDP): no collective happens inside the loop, so uneven shards cannot hang.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, clips
    metric_logger = utils.MetricLogger(delimiter="  ")
    for batch in metric_logger.log_every(data_loader, print_freq, header):
        samples = batch[0].to(device, non_blocking=True)
        target = torch.as_tensor(batch[1]).to(device, non_blocking=True)
        with utils.autocast(device, precision):
            out = model(samples)
        out = out.float()
        loss = F.cross_entropy(out, target, reduction="sum")
        c1, c5 = _topk_correct(out, target)
        sums += torch.stack([loss.double(), c1.double(), c5.double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=out.device)]).cpu()
    if reduce and utils.is_dist_avail_and_initialized():
        sums = utils.all_reduce_mean(sums) * utils.get_world_size()
    n = max(float(sums[3]), 1.0)
    stats = {"loss": float(sums[0]) / n, "acc1": 100.0 * float(sums[1]) / n, "acc5": 100.0 * float(sums[2]) / n,
             "num_clips": int(round(float(sums[3])))}
    print(f"* {header} Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
          f"({stats['num_clips']} clips)")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Multi-view test
# ----------------------------------------------------------------------------------------------------------------
def view_file(output_dir: str | os.PathLike, rank: int, suffix: str = "") -> Path:
    return Path(output_dir) / f"test_views{suffix}_rank{rank}.jsonl"


def _format_probs(p: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:.6g}" for v in p) + "]"


@torch.no_grad()
def run_test_views(data_loader: Iterable, model: nn.Module, device: torch.device, out_path: str | os.PathLike,
                   precision: str = "fp32", print_freq: int = 20) -> dict[str, float]:
    """Classify every view in the loader (items ``clip, label, video_id, segment, crop``) and write one JSON line
    per view with its softmax probabilities to ``out_path``; returns this rank's single-view accuracy counts."""
    model.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    correct1 = correct5 = count = 0
    metric_logger = utils.MetricLogger(delimiter="  ")
    with open(out_path, "w", encoding="utf-8") as f:
        for samples, labels, video_ids, segments, crops in metric_logger.log_every(data_loader, print_freq,
                                                                                    "Test:"):
            samples = samples.to(device, non_blocking=True)
            with utils.autocast(device, precision):
                out = model(samples)
            probs = torch.softmax(out.float(), dim=-1)
            labels_t = torch.as_tensor(labels).to(probs.device)
            c1, c5 = _topk_correct(probs, labels_t)
            correct1, correct5, count = correct1 + int(c1), correct5 + int(c5), count + int(labels_t.numel())
            for p, lb, vid, seg, crop in zip(probs.cpu().tolist(), torch.as_tensor(labels).tolist(), video_ids,
                                             torch.as_tensor(segments).tolist(), torch.as_tensor(crops).tolist()):
                f.write(f'{{"video_id": {json.dumps(str(vid))}, "segment": {int(seg)}, "crop": {int(crop)}, '
                        f'"label": {int(lb)}, "probs": {_format_probs(p)}}}\n')
        f.flush()
        os.fsync(f.fileno())
    return {"correct1": correct1, "correct5": correct5, "count": count}


def merge_views(records: Iterable[Mapping[str, Any]], expected_views: int | None = None) -> dict[str, Any]:
    """Merge per-view records into per-video predictions: average softmax probabilities over distinct views.

    A record repeating a ``(segment, crop)`` pair already seen for its video (e.g. padding added by a
    DistributedSampler, or the same view written by two ranks) is counted in ``duplicates_removed`` and ignored.
    Videos with fewer than ``expected_views`` distinct views are listed in ``videos_missing_views`` with a warning.
    Accuracies are percentages.
    """
    videos: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for r in records:
        vid = str(r["video_id"])
        entry = videos.setdefault(vid, {"label": int(r["label"]), "views": {}})
        if int(r["label"]) != entry["label"]:
            raise ValueError(f"video {vid!r} has views with labels {entry['label']} and {int(r['label'])}")
        key = (int(r["segment"]), int(r["crop"]))
        if key in entry["views"]:
            duplicates += 1
            continue
        entry["views"][key] = np.asarray(r["probs"], dtype=np.float64)
    predictions: dict[str, dict[str, Any]] = {}
    correct1 = correct5 = 0
    missing: dict[str, int] = {}
    for vid in sorted(videos):
        entry = videos[vid]
        mean = np.mean(np.stack(list(entry["views"].values())), axis=0)
        order = np.argsort(-mean, kind="stable")
        top5 = [int(c) for c in order[:5]]
        label = entry["label"]
        correct1 += int(top5[0] == label)
        correct5 += int(label in top5)
        n_views = len(entry["views"])
        if expected_views is not None and n_views < expected_views:
            missing[vid] = n_views
        predictions[vid] = {"label": label, "pred": top5[0], "top5": top5, "score": float(mean[top5[0]]),
                            "num_views": n_views}
    n = len(predictions)
    result: dict[str, Any] = {
        "top1": 100.0 * correct1 / n if n else float("nan"),
        "top5": 100.0 * correct5 / n if n else float("nan"),
        "num_videos": n,
        "num_views": sum(p["num_views"] for p in predictions.values()),
        "expected_views_per_video": expected_views,
        "duplicates_removed": duplicates,
        "videos_missing_views": missing,
        "warning": None,
        "predictions": predictions,
    }
    if missing:
        result["warning"] = (f"{len(missing)} of {n} videos have fewer than {expected_views} views (e.g. "
                             f"{next(iter(missing))}: {next(iter(missing.values()))}); their score averages "
                             f"fewer views")
        print(f"WARNING: {result['warning']}")
    return result


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON view record ({e})") from e


def merge_view_files(paths: Sequence[str | os.PathLike], expected_views: int | None = None) -> dict[str, Any]:
    """``merge_views`` over the records of several ``test_views_rank*.jsonl`` files (one per rank)."""
    def records() -> Iterator[dict[str, Any]]:
        for p in paths:
            yield from _read_jsonl(Path(p))
    return merge_views(records(), expected_views)


def final_test(data_loader: Iterable, model: nn.Module, device: torch.device, output_dir: str,
               expected_views: int, precision: str = "fp32", distributed_shards: bool = True,
               suffix: str = "", protocol: str = "") -> dict[str, Any] | None:
    """Multi-view test: per-rank view files, barrier, merge on rank 0 into ``test_results{suffix}.json``.

    ``distributed_shards``: each rank's loader covers only its shard (``--dist_eval``); otherwise every rank ran the
    whole set and only rank 0's file is merged. Collective: call on every rank. Returns the results (without the
    per-video predictions) on rank 0, None elsewhere.
    """
    rank, world = utils.get_rank(), utils.get_world_size()
    local = run_test_views(data_loader, model, device, view_file(output_dir, rank, suffix), precision)
    counts = torch.tensor([local["correct1"], local["correct5"], local["count"]], dtype=torch.float64)
    if distributed_shards and utils.is_dist_avail_and_initialized():
        counts = utils.all_reduce_mean(counts) * world
    utils.barrier()
    if not utils.is_main_process():
        utils.barrier()
        return None
    ranks = range(world) if distributed_shards else range(1)
    result = merge_view_files([view_file(output_dir, r, suffix) for r in ranks], expected_views)
    n_views = max(float(counts[2]), 1.0)
    result["single_view_top1"] = 100.0 * float(counts[0]) / n_views
    result["single_view_top5"] = 100.0 * float(counts[1]) / n_views
    result["protocol"] = protocol
    out = Path(output_dir) / f"test_results{suffix}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, out)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(f"* Final multi-view test{suffix} ({protocol}): top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"over {result['num_videos']} videos / {result['num_views']} views (single-view top-1 "
          f"{result['single_view_top1']:.2f}); per-video predictions in {out}")
    utils.barrier()
    return summary
