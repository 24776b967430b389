"""Visualise a pre-trained AdaMAE / VideoMAE model: Video | Prediction | No leak | Error | CAT | Mask for each clip.

    python run_mae_vis.py --checkpoint out/checkpoint-latest.pth --video clip.mp4 --output_dir vis
    python run_mae_vis.py --checkpoint adamae_ssv2.pth --video val.csv --data_root /data/ssv2 --output_dir vis

For each video writes ``{stem}.gif`` (one frame per input frame) and ``{stem}.png`` (a contact sheet), prints
the sampler's normalised entropy, max probability and motion coverage (and that of a uniform random mask), and
writes everything to ``stats.json``. Model settings come from the checkpoint's saved ``args`` when present
(our checkpoints), else from the flags / ``run_mae_pretraining.py``'s defaults (the released AdaMAE setting: ViT-B,
adaptive, 0.95, 16 frames, 224 px); flags always win. The model is built as pre-training builds it
(``modeling_pretrain.create_pretrain_model``). See docs/VISUALIZATION.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

import run_mae_pretraining
from datasets import read_list_file
from mask_visualization import animated_gif, clip_stats, contact_sheet, format_stats, panel_images
from masking_generator import MASK_TYPES, canonical_mask_type
from modeling_pretrain import create_pretrain_model
from checkpoint_loading import read_model_checkpoint
from checkpointing import CheckpointError
from cli import make_output_dir
from frame_sampling import pretrain_indices
from utils import strip_state_dict_prefixes
from video_io import BACKENDS, DEFAULT_BACKEND, VideoDecodeError, open_video
from video_transforms import EvalTransform

# Pre-training's own flag defaults (the released AdaMAE setting), so each default lives in one place.
DEFAULTS: dict[str, Any] = vars(run_mae_pretraining.get_args_parser().parse_args([]))
CONFIG_KEYS = ("model", "mask_type", "mask_ratio", "num_frames", "sampling_rate", "input_size", "tubelet_size",
               "decoder_depth", "model_kwargs", "normalize_target", "sampler_type", "sampler_depth", "sampler_dim",
               "sampler_heads", "sampler_temperature", "loss_type")
LIST_EXTENSIONS = (".csv", ".txt", ".list", ".lst")
SAMPLER_PREFIXES = ("encoder.pos_embed_probs", "encoder.get_token_probs.")


class VisError(RuntimeError):
    """A fatal, user-facing problem (bad checkpoint, mismatched settings); printed without a traceback."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("AdaMAE visualisation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="pre-training checkpoint (ours or AdaMAE's released one), or a Hugging Face "
                        "VideoMAEForPreTraining folder")
    p.add_argument("--video", required=True, nargs="+",
                   help=f"video file(s), or list file(s) ({'/'.join(LIST_EXTENSIONS)}) of 'path [label]' lines")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--data_root", default="", help="prefix for relative paths in list files")
    g = p.add_argument_group("model (default: the checkpoint's saved args, else the released AdaMAE setting)")
    g.add_argument("--model", default=None, help=f"[{DEFAULTS['model']}]")
    g.add_argument("--mask_type", default=None, choices=list(MASK_TYPES) + ["learnable"],
                   help="[checkpoint's; adaptive if it has a sampler, else tube]")
    g.add_argument("--mask_ratio", default=None, type=float, help=f"[{DEFAULTS['mask_ratio']}]")
    g.add_argument("--num_frames", default=None, type=int, help=f"[{DEFAULTS['num_frames']}]")
    g.add_argument("--sampling_rate", default=None, type=int, help=f"[{DEFAULTS['sampling_rate']}]")
    g.add_argument("--input_size", default=None, type=int, help=f"[{DEFAULTS['input_size']}]")
    g.add_argument("--tubelet_size", default=None, type=int, help="[from the checkpoint's patch embedding]")
    g.add_argument("--decoder_depth", default=None, type=int, help="[from the checkpoint's decoder]")
    g.add_argument("--model_kwargs", default=None, type=json.loads,
                   help="extra JSON constructor kwargs, e.g. '{\"encoder_depth\": 4}' [checkpoint's or {}]")
    g.add_argument("--normalize_target", default=None, action=argparse.BooleanOptionalAction,
                   help="whether the model was trained on per-tubelet normalised targets [checkpoint's or yes]")
    g = p.add_argument_group("run")
    g.add_argument("--video_backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="decoder (default: training's; decord fails on some tiny widths (< 64 px), pyav reads them)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int, help="seed of the mask draw (the same for every clip)")
    g.add_argument("--fps", default=8.0, type=float, help="GIF frame rate")
    g.add_argument("--sheet_frames", default="tubelet", choices=["tubelet", "all"],
                   help="contact-sheet rows: the first frame of each tubelet, or every frame")
    g.add_argument("--min_panel_size", default=128, type=int, help="upscale panels (nearest) to at least this")
    return p


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------

def _saved_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The run's flags from our checkpoints (a dict) or AdaMAE's (an argparse Namespace); {} when absent."""
    saved = ckpt.get("args")
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    out = dict(saved) if isinstance(saved, Mapping) else {}
    if isinstance(out.get("model_kwargs"), str):
        try:
            out["model_kwargs"] = json.loads(out["model_kwargs"])
        except ValueError:
            out.pop("model_kwargs")
    if "normlize_target" in out and "normalize_target" not in out:  # VideoMAE / AdaMAE's spelling
        out["normalize_target"] = out["normlize_target"]
    return out


def _inferred(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Settings readable off the weights, used when neither flags nor saved args give them."""
    out: dict[str, Any] = {"mask_type": "adaptive" if "encoder.pos_embed_probs" in state_dict else "tube"}
    w = state_dict.get("encoder.patch_embed.proj.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 5:
        out["tubelet_size"] = int(w.shape[2])
    depths = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))}
    if depths:
        out["decoder_depth"] = max(depths) + 1
    return out


def resolve_config(args: argparse.Namespace, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Each setting from, in order: the command line, the checkpoint's saved args (and top-level
    ``model_name`` / ``mask_type``), what the weights show, pre-training's defaults (``DEFAULTS``)."""
    saved = _saved_args(ckpt)
    if "model_name" in ckpt:
        saved.setdefault("model", ckpt["model_name"])
    if "mask_type" in ckpt:
        saved.setdefault("mask_type", ckpt["mask_type"])
    inferred = _inferred(strip_state_dict_prefixes(ckpt["model"]))
    cfg = {}
    for key in CONFIG_KEYS:
        cli = getattr(args, key, None)  # the sampler_* and loss_type settings have no flag here
        if cli is not None:
            cfg[key] = cli
        elif saved.get(key) is not None:
            cfg[key] = saved[key]
        elif key in inferred:
            cfg[key] = inferred[key]
        else:
            cfg[key] = DEFAULTS[key]
    cfg["mask_type"] = canonical_mask_type(cfg["mask_type"])
    cfg["model_kwargs"] = dict(cfg["model_kwargs"] or {})
    return cfg


def build_model(cfg: Mapping[str, Any], state_dict: Mapping[str, Any]) -> torch.nn.Module:
    """Create the model and load ``state_dict`` strictly (wrapper prefixes stripped). A checkpoint with a sampler
    can be shown with a tube / random / frame mask: its sampler weights are then left out."""
    sd = strip_state_dict_prefixes(state_dict)
    if "decoder.head.weight" not in sd:
        raise VisError("the checkpoint has no decoder weights (a fine-tuning or encoder-only checkpoint?); "
                       "visualisation needs a full pre-training checkpoint")
    has_sampler = any(k.startswith(SAMPLER_PREFIXES) for k in sd)
    if cfg["mask_type"] == "adaptive" and not has_sampler:
        raise VisError("--mask_type adaptive needs a checkpoint with the AdaMAE sampler "
                       "(encoder.pos_embed_probs, encoder.get_token_probs.*); this one has none: use "
                       "--mask_type tube, random or frame")
    if cfg["mask_type"] != "adaptive" and has_sampler:
        print(f"note: showing a {cfg['mask_type']} mask; the checkpoint's sampler weights are not used")
        sd = {k: v for k, v in sd.items() if not k.startswith(SAMPLER_PREFIXES)}
    try:
        model = create_pretrain_model(argparse.Namespace(**{**DEFAULTS, **cfg}))
    except (RuntimeError, ValueError, TypeError) as e:
        raise VisError(f"cannot build {cfg['model']} with {json.dumps(cfg, default=str)}: {e}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = [line.strip()[:400] + ("..." if len(line.strip()) > 400 else "") for line in str(e).split("\n")]
        raise VisError("the checkpoint does not fit the model built from these settings "
                       f"({json.dumps(cfg, default=str)}); check --model, --model_kwargs, --num_frames, "
                       f"--input_size, --tubelet_size, --decoder_depth:\n  " + "\n  ".join(detail[:8])) from None
    return model


# ------------------------------------------------------------------------------------------------------------
# Videos
# ------------------------------------------------------------------------------------------------------------

class _CentreStart:
    """Stands in for ``random`` in ``frame_sampling.pretrain_indices``: the middle of the possible start frames, so
    the clip (VideoMAE's pre-training sampling: consecutive frames ``sampling_rate`` apart) is reproducible."""

    @staticmethod
    def randrange(n: int) -> int:
        return n // 2


def expand_videos(entries: list[str], data_root: str = "") -> list[str]:
    """Video paths from ``--video``: files as given, list files expanded (labels optional)."""
    paths: list[str] = []
    for entry in entries:
        if entry.lower().endswith(LIST_EXTENSIONS):
            paths += [r.full_path for r in read_list_file(entry, data_root, require_label=False)]
        else:
            paths.append(entry if os.path.isabs(entry) or not data_root else os.path.join(data_root, entry))
    return paths


def load_clip(path: str, cfg: Mapping[str, Any], backend: str = DEFAULT_BACKEND) -> tuple[torch.Tensor, list[int]]:
    """``[1, 3, T, S, S]`` ImageNet-normalised clip (centre start, short side resized to ``input_size``, centre
    crop) and the frame indices used; raises VideoDecodeError naming the file."""
    with open_video(path, backend) as reader:
        indices = pretrain_indices(len(reader), cfg["num_frames"], cfg["sampling_rate"], rng=_CentreStart())
        frames = reader.get_batch(indices)
    size = int(cfg["input_size"])
    return EvalTransform(short_side_size=size, crop_size=size)(frames)[None], indices


def _unique_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "video"
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict[str, Any]:
    """Render every video; returns what ``stats.json`` holds: ``config``, ``clips`` (stats per clip) and
    ``failed`` (``{"video", "error"}`` for videos that could not be decoded). Raises VisError / CheckpointError
    for problems that stop the whole run."""
    ckpt = read_model_checkpoint(args.checkpoint)  # ours, or a Hugging Face VideoMAEForPreTraining folder
    cfg = resolve_config(args, ckpt)
    device = torch.device(args.device)
    model = build_model(cfg, ckpt["model"]).to(device)
    del ckpt
    videos = expand_videos(args.video, args.data_root)
    out_dir = Path(make_output_dir(args.output_dir, "--output_dir"))
    print(f"{cfg['model']} ({model.mask_type} mask, ratio {cfg['mask_ratio']}, {model.num_visible} of "
          f"{model.num_patches} tokens visible), {cfg['num_frames']} frames every {cfg['sampling_rate']}, "
          f"{cfg['input_size']} px, {len(videos)} video(s)")

    clips: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    used: set[str] = set()
    for path in videos:
        try:
            clip, indices = load_clip(path, cfg, args.video_backend)
        except VideoDecodeError as e:
            print(f"error: cannot read video {path}: {e.reason}", file=sys.stderr)
            failed.append({"video": path, "error": e.reason})
            continue
        t0 = time.time()
        panels = panel_images(model, clip, normalize_target=cfg["normalize_target"], seed=args.seed,
                              loss_type=cfg["loss_type"])[0]
        stem = _unique_stem(path, used)
        gif, png = out_dir / f"{stem}.gif", out_dir / f"{stem}.png"
        animated_gif(panels, str(gif), fps=args.fps, min_size=args.min_panel_size)
        contact_sheet(panels, frames=args.sheet_frames, min_size=args.min_panel_size).save(png)
        print(f"{stem}: {format_stats(panels)}  [{time.time() - t0:.1f}s -> {gif.name}, {png.name}]")
        clips.append({"name": stem, "video": path, "frames": indices, "gif": str(gif), "png": str(png),
                      **clip_stats(panels)})

    result = {"config": {**cfg, "checkpoint": args.checkpoint, "seed": args.seed,
                         "video_backend": args.video_backend}, "clips": clips, "failed": failed}
    with open(out_dir / "stats.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = main(args)
    except (VisError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["failed"]:
        names = ", ".join(x["video"] for x in result["failed"])
        print(f"error: {len(result['failed'])} of {len(result['failed']) + len(result['clips'])} video(s) could "
              f"not be read: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
