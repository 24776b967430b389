"""One embedding per video of a list, from a frozen encoder, for probes and for use elsewhere.

    python tools/extract_features.py --checkpoint out_pt/checkpoint-latest.pth --list data/train.csv --out feats/train
    python tools/extract_features.py --checkpoint hf/my-videomae --list val.csv --out feats/val --views 5x3

The checkpoint is ours (pre-training or fine-tuning; a DeepSpeed folder) or a Hugging Face VideoMAE folder; the
model, frames, stride and crop size come from its saved args (flags override). The embedding is the mean of the
encoder's output tokens (see ``engine_for_probing``: after the final LayerNorm of a pre-training encoder; for a
fine-tuned classifier, followed by its ``fc_norm``), averaged over the ``--views SEGMENTSxCROPS`` of the multi-view
test (default 1x1: the centre clip, centre crop).

Output in ``--out``: ``features-00000.safetensors`` ... (``features`` float32 [n, D], ``labels``, ``lines``; one
shard per ``--shard_size`` list entries, each written atomically), ``index.csv`` (``path,line,label,video_id,
shard,row``: the embedded videos in list order), ``skipped.csv`` (``path,line,label,video_id,reason``: videos that
could not be decoded, in any view; never replaced by another video) and ``features.json`` (settings, counts).
Interrupted runs resume: finished shards are kept and only the others are computed; a rerun with other settings
(``Plan``: clip, views, precision, decoder, the list's entries, and the checkpoint's files' size and mtime, so a
rewritten ``checkpoint-latest.pth`` counts) is refused, naming what changed. Unlabelled lists work (label -1).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from precision import autocast, resolve_precision
from cli import HelpFormatter, UserError, add_debug_arg, make_output_dir, run_program  # noqa: E402
from datasets import VideoList  # noqa: E402
from checkpoint_loading import checkpoint_files  # noqa: E402
from engine_for_probing import FeatureStore, FrozenEncoder, load_frozen_encoder  # noqa: E402
from video_datasets import VideoClsDataset  # noqa: E402
from video_io import BACKENDS, resolve_backend  # noqa: E402

MANIFEST, INDEX, SKIPPED = "features.json", "index.csv", "skipped.csv"
INDEX_FIELDS = ("path", "line", "label", "video_id", "shard", "row")
SKIPPED_FIELDS = ("path", "line", "label", "video_id", "reason")


def shard_name(k: int) -> str:
    return f"features-{k:05d}.safetensors"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Extract per-video features", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pth, DeepSpeed folder) or an HF folder")
    p.add_argument("--list", required=True, help="video list (the training lists' format; labels optional)")
    p.add_argument("--out", required=True, help="output folder (created; an interrupted run here resumes)")
    p.add_argument("--data_root", default="", help="prefix for relative paths in the list")
    p.add_argument("--views", default="1x1", help="SEGMENTSxCROPS of the multi-view test to average, e.g. 5x3")
    p.add_argument("--batch_size", default=32, type=int, help="views per forward pass")
    p.add_argument("--num_workers", default=8, type=int, help="DataLoader decoding processes")
    p.add_argument("--shard_size", default=2048, type=int, help="list entries per shard (the resume unit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="autocast; default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--model_key", default="model|module", help="where the weights are in the checkpoint")
    p.add_argument("--random_init", action="store_true",
                   help="baseline: the checkpoint's architecture with random initial weights (seed 0), not its own")
    g = p.add_argument_group("clip (default: the checkpoint's saved args)")
    g.add_argument("--num_frames", default=None, type=int, help="frames per clip")
    g.add_argument("--sampling_rate", default=None, type=int, help="frame stride (dense sampling)")
    g.add_argument("--input_size", default=None, type=int, help="crop size")
    g.add_argument("--short_side_size", default=None, type=int, help="resize the short side to this before cropping")
    g.add_argument("--sparse_sample", default=None, action=argparse.BooleanOptionalAction,
                   help="segment (TSN/SSv2) sampling; default: as the checkpoint was trained")
    g.add_argument("--video_backend", default="auto", choices=list(BACKENDS), help="video decoder")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_debug_arg(p)
    return p


def parse_views(text: str) -> tuple[int, int]:
    try:
        s, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--views {text!r}: expected SEGMENTSxCROPS, e.g. 1x1 or 5x3") from None
    if s < 1 or c < 1:
        raise UserError(f"--views {text!r}: both numbers must be >= 1")
    return s, c


@dataclass
class Plan:
    """Everything that defines the features; stored in every shard, so a resume never mixes settings."""

    settings: dict[str, Any]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]


# Plan settings that differ between the splits of one data set; every other one must match for the train / val /
# test features to come from the same encoder and clips (run_linear_probe.py compares them).
PER_SPLIT_SETTINGS = frozenset({"list", "list_entries", "data_root", "num_videos", "views", "shard_size"})


def changed_settings(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """The settings (keys of either) whose values differ, sorted; a key only one side has counts as changed."""
    return sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))


def weights_fingerprint(checkpoint: str) -> dict[str, list[int]]:
    """Size and mtime (ns) of every file the checkpoint's weights are read from. The path alone misses a rewrite
    (``checkpoint-latest.pth`` after more training); hashing gigabytes on every resume would be slow."""
    out: dict[str, list[int]] = {}
    for path in checkpoint_files(checkpoint):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {path} does not exist") from None
        out[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns]
    return out


def clip_settings(args: argparse.Namespace, encoder: FrozenEncoder) -> dict[str, Any]:
    """Clip sampling from the flags, else the checkpoint's saved args (what the encoder was trained on)."""
    saved = encoder.args

    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name)
        return v if v is not None else getattr(saved, name, default)
    # an explicit --[no-]sparse_sample wins; else as the run sampled (SSV2 fine-tuning is always segment-based)
    segment = bool(args.sparse_sample) if args.sparse_sample is not None else \
        bool(getattr(saved, "sparse_sample", False)) or getattr(saved, "data_set", "") == "SSV2"
    num_segments = int(getattr(saved, "num_segments", 1) or 1) if segment else 1
    out = {"num_frames": int(pick("num_frames", 16)), "sampling_rate": int(pick("sampling_rate", 4)),
           "input_size": int(pick("input_size", encoder.input_size)), "sampling": "segment" if segment else "dense",
           "num_segments": num_segments}
    # pre-training has no eval resize: crop from the short side at the crop size, as export_hf's processor does
    out["short_side_size"] = int(args.short_side_size or (getattr(saved, "short_side_size", None)
                                                          if encoder.kind == "finetune" else None)
                                 or out["input_size"])
    frames = out["num_frames"] * num_segments
    if frames != encoder.num_frames or out["input_size"] != encoder.input_size:
        raise UserError(f"clips of {frames} frames at {out['input_size']} px do not fit the encoder "
                        f"({encoder.num_frames} frames at {encoder.input_size} px, fixed position table)")
    return out


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    utils.atomic_write_bytes(path, data)


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: say which
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to recompute it") from e
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def write_shard(path: Path, plan: Plan, rows: Sequence[dict[str, Any]], feats: list[torch.Tensor],
                dim: int) -> None:
    """One shard: the embedded videos' features [n, D] and, in its metadata, every entry's path / line / label /
    video id (and the reason for those that were skipped) plus the plan key."""
    ok = [r for r in rows if r["reason"] == ""]
    tensors = {"features": torch.stack(feats) if feats else torch.zeros(0, dim),
               "labels": torch.tensor([r["label"] for r in ok], dtype=torch.int64),
               "lines": torch.tensor([r["line"] for r in ok], dtype=torch.int64)}
    _write_safetensors(path, tensors, {"plan": json.dumps(plan.key), "rows": json.dumps(list(rows))})


def _csv_text(fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """Run the extraction described by ``args`` (the parser's namespace); returns the manifest."""
    segments, crops = parse_views(args.views)
    if args.batch_size < 1 or args.shard_size < 1:
        raise UserError("--batch_size and --shard_size must be >= 1")
    device = torch.device(args.device)
    precision = resolve_precision(args.precision or ("bf16" if device.type == "cuda" else "fp32"), device)
    weights = weights_fingerprint(args.checkpoint)  # before reading: a rewrite during the load is not missed
    encoder = load_frozen_encoder(args.checkpoint, args.model_key, random_init=args.random_init).to(device)
    clip = clip_settings(args, encoder)
    videos = VideoList(args.list, args.data_root, require_label=False)
    if not len(videos):
        raise UserError(f"{args.list} lists no videos")
    ds = VideoClsDataset(videos, mode="test", sampling=clip["sampling"], num_frames=clip["num_frames"],
                         sampling_rate=clip["sampling_rate"], num_segments=clip["num_segments"],
                         input_size=clip["input_size"], short_side_size=clip["short_side_size"],
                         test_num_segment=segments, test_num_crop=crops, video_backend=args.video_backend)
    n, per_video = len(videos), segments * crops
    plan = Plan({"checkpoint": os.path.abspath(args.checkpoint), "weights": weights,
                 "list": os.path.abspath(args.list), "list_entries": videos.fingerprint(), "data_root": args.data_root,
                 "num_videos": n, "views": f"{segments}x{crops}", **clip, "shard_size": args.shard_size,
                 "pooling": encoder.pooling, "dim": encoder.dim, "model_key": args.model_key,
                 "random_init": args.random_init, "precision": precision,
                 "video_backend": resolve_backend(args.video_backend)})
    out = Path(make_output_dir(args.out, "--out"))
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("plan_key") != plan.key:
            changed = changed_settings(old.get("settings", {}), plan.settings)
            why = ", ".join("weights (the checkpoint was rewritten since)" if k == "weights" else k for k in changed)
            raise UserError(f"{out} holds features made with other settings (changed: {why or 'unknown'}); "
                            f"use another --out or delete it")
    manifest: dict[str, Any] = {"plan_key": plan.key, "settings": plan.settings, "complete": False}
    utils.atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")

    n_shards = (n + args.shard_size - 1) // args.shard_size
    bounds = [(k * args.shard_size, min(n, (k + 1) * args.shard_size)) for k in range(n_shards)]
    done = set()
    for k in range(n_shards):
        path = out / shard_name(k)
        if path.is_file():
            if _read_shard(path)[1].get("plan") != plan.key:
                raise UserError(f"{path} was made with other settings; delete it or use another --out")
            done.add(k)
    pending = [k for k in range(n_shards) if k not in done]
    print(f"{n} videos x {per_video} views -> {n_shards} shards in {out} ({len(done)} already done); encoder "
          f"{encoder.dim}-wide from {args.checkpoint}; embedding: {encoder.pooling}; {precision} on {device}")

    if pending:
        _run(ds, encoder, pending, bounds, per_video, plan, out, device, precision, args)

    rows: list[dict[str, Any]] = []
    for k in range(n_shards):
        rows += [dict(r, shard=shard_name(k)) for r in _read_shard(out / shard_name(k))[1]["rows"]]
    index, skipped = [r for r in rows if not r["reason"]], [r for r in rows if r["reason"]]
    counter: dict[str, int] = {}
    for r in index:
        r["row"] = counter[r["shard"]] = counter.get(r["shard"], -1) + 1
    utils.atomic_write_text(out / INDEX, _csv_text(INDEX_FIELDS, index))
    utils.atomic_write_text(out / SKIPPED, _csv_text(SKIPPED_FIELDS, skipped))
    manifest.update(complete=True, num_embedded=len(index), num_skipped=len(skipped), dim=encoder.dim,
                    shards=[shard_name(k) for k in range(n_shards)])
    utils.atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    print(f"{len(index)} videos embedded ({encoder.dim} dims) -> {out / INDEX}")
    for r in skipped[:5]:
        print(f"  skipped {args.list}:{r['line']} {r['path']}: {r['reason']}")
    if skipped:
        print(f"{len(skipped)} video(s) could not be decoded and have no embedding: {out / SKIPPED}")
    return manifest


@torch.no_grad()
def _run(ds: VideoClsDataset, encoder: FrozenEncoder, pending: list[int], bounds: list[tuple[int, int]],
         per_video: int, plan: Plan, out: Path, device: torch.device, precision: str,
         args: argparse.Namespace) -> None:
    """Embed the pending shards' views in list order, writing each shard as soon as its last view is done."""
    from tqdm import tqdm
    order = [v * per_video + j for k in pending for v in range(*bounds[k]) for j in range(per_video)]
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=order, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=utils.seed_worker)
    sums: dict[int, torch.Tensor] = {}
    reasons: dict[int, str] = {}
    seen: dict[int, int] = {}
    shard_iter = iter(pending)
    k: int | None = next(shard_iter)
    pos = 0
    bar = tqdm(total=len(order), unit="view", desc="features", disable=args.no_progress, dynamic_ncols=True)
    for batch in loader:
        clips, info = batch[0], batch[-1]
        valid = torch.as_tensor(info["valid"], dtype=torch.bool)
        feats = torch.zeros(len(valid), encoder.dim)
        if valid.any():
            with autocast(device, precision):
                feats[valid] = encoder(clips[valid].to(device, non_blocking=True)).float().cpu()
        vids = [i // per_video for i in order[pos:pos + len(valid)]]
        pos += len(valid)
        for j, v in enumerate(vids):
            seen[v] = seen.get(v, 0) + 1
            if valid[j]:
                sums[v] = sums.get(v, 0) + feats[j].double()
            else:
                reasons.setdefault(v, str(info["reason"][j]) or "could not be decoded")
        bar.update(len(valid))
        while k is not None and all(seen.get(v, 0) == per_video for v in range(*bounds[k])):
            _flush(ds.videos, k, bounds[k], sums, reasons, per_video, plan, out, encoder.dim)
            for v in range(*bounds[k]):
                sums.pop(v, None)
                seen.pop(v, None)
            k = next(shard_iter, None)
    bar.close()


def _flush(videos: VideoList, k: int, bound: tuple[int, int], sums: dict[int, torch.Tensor],
           reasons: dict[int, str], per_video: int, plan: Plan, out: Path, dim: int) -> None:
    rows, feats = [], []
    for v in range(*bound):
        reason = reasons.get(v, "")
        rows.append({"path": videos.listed_path(v), "line": videos.line(v), "label": videos.label(v),
                     "video_id": videos.video_id(v), "reason": reason})
        if not reason:  # a video counts only if every view decoded (as the multi-view test scores it)
            feats.append((sums[v] / per_video).float())
    write_shard(out / shard_name(k), plan, rows, feats, dim)


def load_features(folder: str | os.PathLike) -> FeatureStore:
    """Read a finished ``--out`` folder back (list order); refuses an unfinished one."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}: not a features folder of tools/extract_features.py")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise UserError(f"{folder}: feature extraction did not finish; rerun the same command to complete it")
    feats, labels, paths, lines, ids, skipped = [], [], [], [], [], []
    for name in manifest["shards"]:
        tensors, meta = _read_shard(folder / name)
        feats.append(tensors["features"])
        for r in meta["rows"]:
            if r["reason"]:
                skipped.append(r)
            else:
                labels.append(r["label"])
                paths.append(r["path"])
                lines.append(r["line"])
                ids.append(r["video_id"])
    features = torch.cat(feats) if feats else torch.zeros(0, int(manifest["dim"]))
    return FeatureStore(features, torch.tensor(labels, dtype=torch.int64), paths, lines, ids, skipped, manifest)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return extract(args)


if __name__ == "__main__":
    run_program(main, get_args_parser())
