"""What an exported Hugging Face folder says about itself: its model card (README.md), its
``preprocessor_config.json`` and the class names for ``id2label``. ``tools/export_hf.py`` writes the weights and
calls these; they only describe, so they live apart from the key mapping and the parity check."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_interop  # noqa: E402
from video_transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

if TYPE_CHECKING:
    from tools.export_hf import ExportResult

PIL_BILINEAR = 2  # our eval resize is bilinear


class ClassNamesError(ValueError):
    """A class-names file that cannot give one distinct name per class id."""


def read_class_names(path: str) -> list[str]:
    """One class per line: ``name`` or ``id name`` (our synthetic set's ``classes.txt``), in id order. Names must
    be distinct: ``label2id`` maps each name to one id, so a repeated name would silently lose a class."""
    entries: list[tuple[int, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise ClassNamesError(f"class names file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(lines):
        first, _, rest = line.partition(" ")
        entries.append((int(first), rest.strip()) if first.isdigit() and rest.strip() else (i, line))
    ids = sorted(i for i, _ in entries)
    if ids != list(range(len(entries))):
        raise ClassNamesError(f"{path}: class ids are not 0..{len(entries) - 1}")
    names = [name for _, name in sorted(entries)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClassNamesError(f"class names file {path} repeats {', '.join(map(repr, repeated))} (ids "
                          f"{'; '.join(', '.join(str(i) for i, n in enumerate(names) if n == r) for r in repeated)})"
                          f": label2id needs one id per name")
    return names


# What preprocessor_config.json does and does not reproduce; the model card says it too.
PREPROCESSOR_NOTE = (
    "`preprocessor_config.json` is this project's evaluation transform (bilinear short-side resize with the long "
    "side truncated to int(size * long / short), centre crop, /255, ImageNet mean/std) except in two details. "
    "The resize: transformers resizes with PIL, which antialiases when shrinking; ours, like VideoMAE's OpenCV "
    "`INTER_LINEAR`, does not, so frames larger than `shortest_edge` reach the model a little smoother through "
    "transformers (frames already at that size are not resized by either). The crop: on each side transformers' "
    "centre crop starts at floor((side - crop) / 2), while ours, like VideoMAE's validation `CenterCrop`, rounds "
    "(side - crop) / 2 half to even, so along a side where side - crop is 3 mod 4 (e.g. 3, 7) HF's crop sits "
    "1 px earlier.")


def preprocessor_config(model_frames: int, crop: int, short_side: int) -> dict[str, Any]:
    """VideoMAEImageProcessor settings for our evaluation transform: the same resize sizes (PIL antialiases when
    shrinking) and normalisation, and the same centre crop up to one pixel (``PREPROCESSOR_NOTE``).
    ``num_frames`` is informative (the processor does not sample frames)."""
    return {
        "image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": short_side},
        "resample": PIL_BILINEAR, "do_center_crop": True, "crop_size": {"height": crop, "width": crop},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "num_frames": model_frames,
    }


def _fmt(args: argparse.Namespace, key: str) -> str:
    value = getattr(args, key, None)
    return "—" if value in (None, "") else str(value)


def model_card(result: ExportResult, kind: str, args: argparse.Namespace, ckpt: Mapping[str, Any],
               weights: str, n_params: int, command: str, sampler_saved: bool) -> str:
    """The folder's README.md: what the model is, how it was trained (saved args), notes, the command."""
    cfg, arch = result.config, result.architecture
    what = {"VideoMAEForVideoClassification": f"A video classifier ({len(cfg.get('id2label', {}))} classes)",
            "VideoMAEForPreTraining": "A masked video autoencoder (encoder + pixel decoder)",
            "VideoMAEModel": "A video encoder (no head)"}[arch]
    rows = [("model", _fmt(args, "model")), ("checkpoint kind", kind), ("epoch", str(ckpt.get("epoch", "—"))),
            ("epochs", _fmt(args, "epochs")), ("frames x sampling rate", f"{_fmt(args, 'num_frames')} x "
                                                                         f"{_fmt(args, 'sampling_rate')}"),
            ("input size", _fmt(args, "input_size")), ("tubelet", _fmt(args, "tubelet_size"))]
    if kind == "pretrain":
        mask_type = ckpt.get("mask_type") or _fmt(args, "mask_type")
        rows += [("data", _fmt(args, "data_path")), ("mask", f"{mask_type}, ratio {_fmt(args, 'mask_ratio')}"),
                 ("normalised pixel targets", _fmt(args, "normalize_target"))]
    else:
        rows += [("data", f"{_fmt(args, 'data_set')}: {_fmt(args, 'data_path')}"),
                 ("initialised from", _fmt(args, "finetune")), ("classes", _fmt(args, "nb_classes"))]
    accum = f" x {args.accum_iter} accumulation steps" if args.accum_iter != 1 else ""  # --update_freq's dest
    rows += [("batch size per process", _fmt(args, "batch_size") + accum), ("lr", _fmt(args, "lr")),
             ("weights", weights)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    load = {"VideoMAEForVideoClassification": "logits = model(pixel_values=clip).logits",
            "VideoMAEForPreTraining": "out = model(pixel_values=clip, bool_masked_pos=mask)  # mask: bool [B, N]",
            "VideoMAEModel": "tokens = model(pixel_values=clip).last_hidden_state"}[arch]
    notes = "\n".join(f"- {n}" for n in result.notes)
    return f"""---
library_name: transformers
tags: [video, videomae, adamae]
---

# {Path(result.out_dir).name}

{what} in the Hugging Face `transformers` VideoMAE layout (`{arch}`), exported from an AdaMAE / VideoMAE
checkpoint of this project. ViT: width {cfg['hidden_size']}, depth {cfg['num_hidden_layers']}, \
{cfg['num_attention_heads']} heads, patch {cfg['patch_size']}, tubelet {cfg['tubelet_size']}, \
{cfg['num_frames']} frames of {cfg['image_size']} px; {n_params / 1e6:.2f}M parameters exported.

```python
from transformers import {arch}
model = {arch}.from_pretrained("{result.out_dir}").eval()
# clip: float [B, T={cfg['num_frames']}, 3, H, W], ImageNet-normalised (preprocessor_config.json does this)
{load}
```

## How it was trained (from the checkpoint's saved args)

| setting | value |
|---|---|
{table}

## Notes

{notes}

## Made by

```
{command}
```

Files: {', '.join(result.files)}.{' The AdaMAE sampler weights are in `' + hf_interop.SAMPLER_FILE + '`.'
                                    if sampler_saved else ''}
"""
