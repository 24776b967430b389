"""Evaluation: single-view validation, and the multi-view test with its per-video merge.

Multi-view test: every rank classifies its own contiguous shard of the ``videos x segments x crops`` views (no
padding, no ``drop_last``: no view is lost or repeated) and writes one JSON line per view to
``{output_dir}/test_views_rank{r}.jsonl`` (``video_id, segment, crop, label, probs``). After a barrier, rank 0
merges the files by video id, keeping one view per ``(segment, crop)`` pair (a tuple, so segment 1 / crop 11 and
segment 11 / crop 1 never collide), averages the softmax probabilities, and writes ``test_results.json``.

Honest numbers: a clip or view whose video could not be decoded (``info["valid"]`` False from ``VideoClsDataset``)
is never scored. Validation and test leave such videos out of every metric, report how many were evaluated, and
name the others (``unevaluated``: ``[{path, line, reason}]``, once per video, united over ranks).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import distributed
import stall_watchdog
from precision import autocast
from utils import atomic_write_text, worker_kwargs


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
        self.rank = distributed.get_rank() if rank is None else int(rank)
        self.world_size = distributed.get_world_size() if world_size is None else int(world_size)
        self.start = self.n * self.rank // self.world_size
        self.stop = self.n * (self.rank + 1) // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def eval_loader(dataset: Any, args: Any, batch_size: int) -> DataLoader:
    """In-order loader without drop_last; with ``--dist_eval`` this rank's contiguous part only."""
    shard = args.dist_eval and args.distributed
    sampler = ShardSampler(len(dataset)) if shard else ShardSampler(len(dataset), 0, 1)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size,
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=False,
                      persistent_workers=False, **worker_kwargs(args))


def progress(loader: Iterable, desc: str) -> Iterator:
    """``loader``'s batches with a tqdm bar on rank 0 (batches, rate, ETA; a log file gets a refresh every 30 s),
    each one a beat of the stall watchdog."""
    name = desc.rstrip(":")
    bar = tqdm(loader, desc=name, unit="batch", disable=not distributed.is_main_process(),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    beat_name = f"{name} batch"
    for i, batch in enumerate(bar):
        yield batch
        stall_watchdog.beat(beat_name, i)


def _topk_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers of top-1 and top-5 hits (counts, so that shards of any size reduce exactly; top-5 is clamped to the
    classes). A clip whose logits are not finite is a miss: ``topk`` would rank NaN first and could score it a hit
    (timm's ``accuracy`` does), as the multi-view merge counts such views wrong."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == target.view(-1, 1)
    ok = torch.isfinite(logits).all(dim=-1)
    return (hit[:, 0] & ok).sum(), (hit.any(dim=-1) & ok).sum()


# ----------------------------------------------------------------------------------------------------------------
# Videos that could not be decoded (items with info["valid"] False): excluded from every metric, and named
# ----------------------------------------------------------------------------------------------------------------
def _batch_validity(batch: Sequence[Any], n: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``(valid mask [n], entries of the invalid items)`` from a batch whose last field is the collated ``info``
    dict of ``VideoClsDataset``; a batch without it is all valid."""
    info = batch[-1] if isinstance(batch[-1], Mapping) else None
    if info is None:
        return torch.ones(n, dtype=torch.bool), []
    valid = torch.as_tensor(info["valid"], dtype=torch.bool).reshape(n)
    lines = torch.as_tensor(info["line"]).tolist()
    bad = [{"path": str(info["path"][j]), "line": int(lines[j]), "reason": str(info["reason"][j])}
           for j in (~valid).nonzero().flatten().tolist()]
    return valid, bad


def unique_unevaluated(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per video (the first reason seen), in list order."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for e in entries:
        out.setdefault((int(e["line"]), str(e["path"])), {"path": str(e["path"]), "line": int(e["line"]),
                                                          "reason": str(e["reason"])})
    return [out[k] for k in sorted(out)]


def _gather_unevaluated(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The union of every rank's entries (collective when a process group exists)."""
    return unique_unevaluated(e for rank_entries in distributed.all_gather_objects(entries) for e in rank_entries)


def describe_unevaluated(entries: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """'N videos not evaluated (could not be decoded): line L PATH (REASON); ...' naming the first ``limit``."""
    if not entries:
        return ""
    shown = "; ".join(f"line {e['line']} {e['path']} ({e['reason']})" for e in entries[:limit])
    more = f"; and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{len(entries)} video{'s' if len(entries) != 1 else ''} not evaluated (could not be decoded): {shown}{more}"


# ----------------------------------------------------------------------------------------------------------------
# Validation (single view)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, precision: str = "fp32",
             reduce: bool = False, header: str = "Val:") -> dict[str, Any]:
    """Top-1 / top-5 (%) and mean cross-entropy over the clips that could be decoded.

    A clip whose video could not be decoded is in no metric: it is counted in ``num_unevaluated`` and named in
    ``unevaluated`` (``[{path, line, reason}]``, list order); ``num_clips`` is the number of clips scored. With no
    clip scored the metrics are NaN (never a number a best checkpoint could be chosen from).
    ``reduce``: the loader covers only this rank's shard (``--dist_eval``); sums are all-reduced and the unevaluated
    lists gathered, so every rank gets the result over the whole set. Counts, not per-batch means, are reduced, so
    uneven shards are exact. Run it on the bare model (not DDP): no collective happens inside the loop, so uneven
    shards cannot hang.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, clips
    unevaluated: list[dict[str, Any]] = []
    for batch in progress(data_loader, header):
        samples, target = batch[0], torch.as_tensor(batch[1])
        valid, bad = _batch_validity(batch, len(target))
        unevaluated += bad
        if not valid.any():
            continue
        if bad:
            samples, target = samples[valid], target[valid]
        device = _model_device(model, device)
        samples = samples.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(samples)
        out = out.float()
        loss = F.cross_entropy(out, target, reduction="sum")
        c1, c5 = _topk_correct(out, target)
        sums += torch.stack([loss.double(), c1.double(), c5.double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=out.device)]).cpu()
    if reduce and distributed.is_dist_avail_and_initialized():
        sums = distributed.all_reduce_mean(sums) * distributed.get_world_size()
        unevaluated = _gather_unevaluated(unevaluated)
    else:
        unevaluated = unique_unevaluated(unevaluated)
    n = int(round(float(sums[3])))
    nan = float("nan")
    stats: dict[str, Any] = {
        "loss": float(sums[0]) / n if n else nan, "acc1": 100.0 * float(sums[1]) / n if n else nan,
        "acc5": 100.0 * float(sums[2]) / n if n else nan, "num_clips": n,
        "num_unevaluated": len(unevaluated), "unevaluated": unevaluated}
    if n:
        print(f"* {header} Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
              f"({n} clips)")
    else:
        print(f"* {header} no clip could be evaluated")
    if unevaluated:
        print(f"* {header} {describe_unevaluated(unevaluated)}")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Multi-view test
# ----------------------------------------------------------------------------------------------------------------
def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model``'s weights are (an EMA kept on the CPU with --model_ema_force_cpu), else ``default``."""
    p = next(model.parameters(), None)
    return p.device if p is not None else default


def view_file(output_dir: str | os.PathLike, rank: int, suffix: str = "") -> Path:
    return Path(output_dir) / f"test_views{suffix}_rank{rank}.jsonl"


def _format_probs(p: Sequence[float]) -> str:
    """6 significant digits; a non-finite value (a diverged model) as ``NaN`` / ``Infinity``, which ``json.loads``
    reads back (``f"{nan:.6g}"`` is ``nan``, which it does not)."""
    return "[" + ",".join(f"{v:.6g}" if math.isfinite(v) else json.dumps(v) for v in p) + "]"


@torch.no_grad()
def run_test_views(data_loader: Iterable, model: nn.Module, device: torch.device, out_path: str | os.PathLike,
                   precision: str = "fp32") -> dict[str, int]:
    """Classify every view in the loader (items ``clip, label, video_id, segment, crop[, info]``) and write one
    JSON line per view to ``out_path``: its softmax probabilities, or for a view that could not be decoded
    ``"valid": false`` with the video's list ``path``, ``line`` and ``reason`` (never a score). Returns this rank's
    numbers of scored and of undecodable views."""
    model.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scored = failed = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for batch in progress(data_loader, "Test:"):
            samples, labels, video_ids, segments, crops = batch[:5]
            labels, segments, crops = (torch.as_tensor(x).tolist() for x in (labels, segments, crops))
            valid, bad = _batch_validity(batch, len(labels))
            probs: list[list[float] | None] = [None] * len(labels)
            if valid.any():
                device = _model_device(model, device)
                with autocast(device, precision):
                    out = model(samples[valid].to(device, non_blocking=True))
                for j, p in zip(valid.nonzero().flatten().tolist(),
                                torch.softmax(out.float(), dim=-1).cpu().tolist()):
                    probs[j] = p
            bad_iter = iter(bad)
            for j, (lb, vid, seg, crop) in enumerate(zip(labels, video_ids, segments, crops)):
                head = f'{{"video_id": {json.dumps(str(vid))}, "segment": {int(seg)}, "crop": {int(crop)}, ' \
                       f'"label": {int(lb)}, '
                p = probs[j]
                if p is None:
                    e = next(bad_iter)
                    f.write(f'{head}"valid": false, "path": {json.dumps(e["path"])}, "line": {e["line"]}, '
                            f'"reason": {json.dumps(e["reason"])}}}\n')
                else:
                    f.write(f'{head}"probs": {_format_probs(p)}}}\n')
            scored, failed = scored + int(valid.sum()), failed + len(bad)
        f.flush()
        os.fsync(f.fileno())
    return {"views": scored, "failed_views": failed}


def merge_views(records: Iterable[Mapping[str, Any]], expected_views: int | None = None) -> dict[str, Any]:
    """Merge per-view records into per-video predictions: average softmax probabilities over distinct views.

    A video any of whose views could not be decoded (a record with ``"valid": false``) is not evaluated: it is in
    no metric and is listed once in ``unevaluated`` (``[{path, line, reason}]``). Scoring the views that did decode
    would evaluate a different protocol for that video, and a decoder that fails on one part of a file does not
    vouch for the rest. ``num_videos`` and every accuracy cover the evaluated videos only (NaN if none);
    ``single_view_top1/top5`` are over their views.
    A record repeating a ``(segment, crop)`` pair already seen for its video (e.g. padding added by a
    DistributedSampler, or the same view written by two ranks) is counted in ``duplicates_removed`` and ignored.
    Videos with fewer than ``expected_views`` distinct views are listed in ``videos_missing_views`` with a warning.
    Accuracies are percentages.
    """
    videos: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for r in records:
        vid = str(r["video_id"])
        entry = videos.setdefault(vid, {"label": int(r["label"]), "views": {}, "failed": None})
        if int(r["label"]) != entry["label"]:
            raise ValueError(f"video {vid!r} has views with labels {entry['label']} and {int(r['label'])}")
        if not r.get("valid", True):
            entry["failed"] = entry["failed"] or {"path": str(r["path"]), "line": int(r["line"]),
                                                  "reason": str(r["reason"])}
            continue
        key = (int(r["segment"]), int(r["crop"]))
        if key in entry["views"]:
            duplicates += 1
            continue
        entry["views"][key] = np.asarray(r["probs"], dtype=np.float64)
    predictions: dict[str, dict[str, Any]] = {}
    correct1 = correct5 = view_correct1 = view_correct5 = n_views = nonfinite = 0
    missing: dict[str, int] = {}
    unevaluated = unique_unevaluated(e["failed"] for e in videos.values() if e["failed"] is not None)
    for vid in sorted(videos):
        entry = videos[vid]
        if entry["failed"] is not None:
            continue
        label = entry["label"]
        views = np.stack(list(entry["views"].values()))
        finite = np.isfinite(views).all(axis=1)  # a view whose probabilities are NaN/inf predicts nothing
        view_top = np.argsort(-views, axis=1, kind="stable")[:, :5]
        view_correct1 += int(((view_top[:, 0] == label) & finite).sum())
        view_correct5 += int(((view_top == label).any(axis=1) & finite).sum())
        n_views += len(views)
        nonfinite += int((~finite).sum())
        if expected_views is not None and len(views) < expected_views:
            missing[vid] = len(views)
        if not finite.all():  # the video's average is not finite: wrong, not silently class 0
            predictions[vid] = {"label": label, "pred": None, "top5": [], "score": float("nan"),
                                "num_views": len(views)}
            continue
        mean = views.mean(axis=0)
        top5 = [int(c) for c in np.argsort(-mean, kind="stable")[:5]]
        correct1 += int(top5[0] == label)
        correct5 += int(label in top5)
        predictions[vid] = {"label": label, "pred": top5[0], "top5": top5, "score": float(mean[top5[0]]),
                            "num_views": len(views)}
    n = len(predictions)

    def pct(k: int, total: int) -> float:
        return 100.0 * k / total if total else float("nan")

    warnings = []
    if unevaluated:
        warnings.append(f"{len(unevaluated)} of {n + len(unevaluated)} videos are not in top-1/top-5: "
                        f"{describe_unevaluated(unevaluated)}")
    if nonfinite:
        warnings.append(f"{nonfinite} of {n_views} views have non-finite probabilities (a diverged model or an "
                        f"fp16 overflow): their videos count as wrong")
    if missing:
        warnings.append(f"{len(missing)} of {n} videos have fewer than {expected_views} views (e.g. "
                        f"{next(iter(missing))}: {next(iter(missing.values()))}); their score averages fewer views")
    result: dict[str, Any] = {
        "top1": pct(correct1, n),
        "top5": pct(correct5, n),
        "num_videos": n,
        "num_unevaluated": len(unevaluated),
        "unevaluated": unevaluated,
        "num_views": n_views,
        "single_view_top1": pct(view_correct1, n_views),
        "single_view_top5": pct(view_correct5, n_views),
        "expected_views_per_video": expected_views,
        "duplicates_removed": duplicates,
        "non_finite_views": nonfinite,
        "videos_missing_views": missing,
        "warning": "; ".join(warnings) or None,
        "predictions": predictions,
    }
    for w in warnings[1 if unevaluated else 0:]:  # the unevaluated videos are printed by the caller
        print(f"WARNING: {w}")
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
    whole set and only rank 0's file is merged. The merge of all ranks' files is where the videos that could not be
    decoded are united (once per video, however many views or ranks failed on it). Collective: call on every rank.
    Returns the results (without the per-video predictions) on rank 0, None elsewhere.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    run_test_views(data_loader, model, device, view_file(output_dir, rank, suffix), precision)
    distributed.barrier()
    if not distributed.is_main_process():
        distributed.barrier()
        return None
    ranks = range(world) if distributed_shards else range(1)
    result = merge_view_files([view_file(output_dir, r, suffix) for r in ranks], expected_views)
    result["protocol"] = protocol
    out = Path(output_dir) / f"test_results{suffix}.json"
    atomic_write_text(out, json.dumps(result, indent=1, default=float))
    summary = {k: v for k, v in result.items() if k != "predictions"}
    if result["num_videos"]:
        print(f"* Final multi-view test{suffix} ({protocol}): top-1 {result['top1']:.2f}  top-5 "
              f"{result['top5']:.2f}  over {result['num_videos']} videos / {result['num_views']} views "
              f"(single-view top-1 {result['single_view_top1']:.2f}); per-video predictions in {out}")
    else:
        print(f"* Final multi-view test{suffix} ({protocol}): no video could be evaluated; see {out}")
    if result["unevaluated"]:
        print(f"* Final multi-view test{suffix}: {describe_unevaluated(result['unevaluated'])}")
    distributed.barrier()
    return summary
