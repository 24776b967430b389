"""Load a pre-trained (or fine-tuned) checkpoint into the video ViT classifier, with a report of what happened.

Accepted layouts: our pre-training / fine-tuning checkpoints (weights under ``model``), released AdaMAE / VideoMAE
files (``model`` or ``module``, the latter also DeepSpeed's ``mp_rank_00_model_states.pt``; a DeepSpeed checkpoint
folder works too), bare state dicts, and Hugging Face ``transformers`` VideoMAE folders (``config.json`` with
``model_type: videomae``; keys mapped back to ours by ``hf_interop``). Wrapper prefixes (``module.``, ``_orig_mod.``
from torch.compile, ``backbone.``, ``encoder.``) are stripped; the pre-training-only parts (decoder, AdaMAE sampler,
``mask_token``, ``encoder_to_decoder``) are dropped by name, not silently via a non-strict load. A classifier head
whose class count differs is dropped. Learnable position embeddings are interpolated in time (linear) and space
(bicubic) when the clip length or resolution changed; sinusoid tables are never stored and are built by the model
for its own grid.

Loading fails loudly (``CheckpointMismatchError``) when encoder weights are missing or have the wrong shape (e.g. a
different tubelet / patch size or model width), because a silently random backbone is the classic way to get chance
accuracy after "fine-tuning".
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_interop
import utils
from timm.utils import unwrap_model
from checkpointing import CheckpointError, load_checkpoint_file, torch_load

__all__ = ["CheckpointMismatchError", "LoadReport", "read_checkpoint", "read_model_checkpoint", "select_state_dict",
           "checkpoint_files", "convert_state_dict", "interpolate_pos_embed", "load_pretrained_encoder",
           "DROPPED_PREFIXES"]

# Keys of the pre-training model that the classifier has no use for (after the ``encoder.`` prefix is removed).
DROPPED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("decoder.", "pre-training decoder"),
    ("encoder_to_decoder.", "pre-training decoder projection"),
    ("mask_token", "pre-training mask token"),
    ("pos_embed_probs", "AdaMAE sampler"),
    ("get_token_probs.", "AdaMAE sampler"),
    ("mask_generator.", "mask generator"),
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
Grid = tuple[int, int, int]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model (missing encoder weights, wrong shapes); the message says which."""


@dataclass
class LoadReport:
    """What ``load_pretrained_encoder`` did; ``str(report)`` is the printed summary."""

    source: str = "<state dict>"
    model_key: str = "(top level)"
    kind: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys nothing matched
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def head_loaded(self) -> bool:
        return any(k.startswith("head.") for k in self.loaded)

    def __str__(self) -> str:
        lines = [f"Load report for {self.source} (weights under {self.model_key}"
                 + (f", kind {self.kind}" if self.kind else "") + ")",
                 f"  loaded:     {len(self.loaded)} tensors"]
        if self.reshaped:
            lines.append("  reshaped:   " + ", ".join(f"{k} {list(a)} -> {list(b)}" for k, (a, b) in
                                                      self.reshaped.items()))
        by_reason: dict[str, list[str]] = {}
        for k, r in self.dropped.items():
            by_reason.setdefault(r, []).append(k)
        for r, ks in by_reason.items():
            lines.append(f"  dropped ({r}): {_short(ks)}")
        lines.append(f"  missing (kept at init): {_short(self.missing) if self.missing else 'none'}")
        lines.append(f"  unexpected: {_short(self.unexpected) if self.unexpected else 'none'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


@contextlib.contextmanager
def _hf_folder_errors(path: str) -> Iterator[None]:
    """A damaged HF folder (truncated weights, bad JSON, a missing shard) -> CheckpointError naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:  # hf_interop's errors (a ValueError) name the damaged file
        raise CheckpointError(f"Hugging Face folder {path} is unreadable: {e}") from e


def _read_hf_folder(path: str) -> dict[str, Any]:
    with _hf_folder_errors(path):
        ckpt = hf_interop.read_hf_folder(path)
    ckpt["hf_note"] = (f"Hugging Face VideoMAE folder ({ckpt['hf_architecture']}), keys mapped to ours"
                       + (", AdaMAE sampler from " + hf_interop.SAMPLER_FILE
                          if any("get_token_probs." in k for k in ckpt["model"]) else ""))
    return ckpt


def _deepspeed_model_file(folder: str) -> str:
    """A DeepSpeed checkpoint folder (or its parent with ``latest``) -> its ``mp_rank_00_model_states.pt``."""
    tag_file = os.path.join(folder, "latest")
    if os.path.isfile(tag_file):
        with open(tag_file, encoding="utf-8") as f:
            folder = os.path.join(folder, f.read().strip())
    candidate = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"{folder} is a folder without mp_rank_00_model_states.pt (not a DeepSpeed "
                                f"checkpoint); pass a .pth file")
    return candidate


def _hf_folder_of_weights(path: str) -> str | None:
    """The Hugging Face folder whose weights file ``path`` is (``hf/model.safetensors``), else None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not (os.path.isfile(path) and hf_interop.is_hf_folder(folder)):
        return None
    try:
        weights = [os.path.abspath(f) for f in hf_interop.hf_weight_files(folder)]
    except hf_interop.HFInteropError:
        return None
    return folder if os.path.abspath(path) in weights else None


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The local files ``read_checkpoint(path)`` reads (none for a URL), so that a cache of what was computed
    from them can notice when they are rewritten (e.g. ``checkpoint-latest.pth`` after more training)."""
    path = str(path)
    if path.startswith(("https://", "http://")):
        return []
    path = _hf_folder_of_weights(path) or path
    if os.path.isdir(path) and hf_interop.is_hf_folder(path):
        with _hf_folder_errors(path):
            files = hf_interop.hf_folder_files(path)
        return files
    return [_deepspeed_model_file(path) if os.path.isdir(path) else path]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file or URL, or a Hugging Face VideoMAE folder (as our layout); a DeepSpeed checkpoint
    folder (or its parent with ``latest``) is resolved to its ``mp_rank_00_model_states.pt``. A missing file
    raises FileNotFoundError, a truncated / unreadable one ``checkpointing.CheckpointError`` naming it."""
    path = str(path)
    if os.path.isdir(path) and hf_interop.is_hf_folder(path):
        return _read_hf_folder(path)
    folder = _hf_folder_of_weights(path)
    if folder is not None:  # an HF folder's weights file: its config.json says what the weights are
        return _read_hf_folder(folder)
    path = _deepspeed_model_file(path) if os.path.isdir(path) else path
    ckpt = torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return dict(ckpt)


def read_model_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """One of our checkpoints (``checkpointing.load_checkpoint_file``: weights under ``model``) or a Hugging Face
    VideoMAE folder read as one (pre-training layout when it has a decoder); what ``run_mae_vis.py`` loads."""
    path = str(path)
    if os.path.isdir(path) and hf_interop.is_hf_folder(path):
        return _read_hf_folder(path)
    return load_checkpoint_file(path)


def refuse_probe_checkpoint(ckpt: Mapping[str, Any], path: str) -> None:
    """A probe checkpoint where an encoder's is needed (export, features, probes) is named as such: it holds only
    the probe trained on a frozen encoder."""
    if ckpt.get("kind") != "probe":
        return
    args = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    encoder = args.get("checkpoint") or args.get("features")
    raise CheckpointMismatchError(f"{path} is a probe checkpoint: it holds the probe trained on a frozen encoder, "
                                  f"not the encoder; give the encoder's checkpoint"
                                  + (f" (this probe's was {encoder})" if encoder else ""))


def select_state_dict(ckpt: Mapping[str, Any], model_key: str = "model|module") -> tuple[dict[str, Any], str]:
    """The weights: the first of ``model_key`` ('|'-separated) present in the file, else the file itself."""
    for key in model_key.split("|"):
        if key and isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key]), key
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"no state dict under {model_key!r} and no tensors at the top level "
                                      f"(keys: {sorted(ckpt)[:10]})")
    return tensors, "(top level)"


def convert_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Strip wrapper prefixes and drop pre-training-only keys; returns ``(weights, {dropped key: reason})``."""
    out: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for key, value in state_dict.items():
        k = utils.strip_key_prefixes(key, WRAPPER_PREFIXES)
        reason = next((r for p, r in DROPPED_PREFIXES if k.startswith(p)), None)
        if reason is not None:
            dropped[key] = reason
            continue
        if k in out:
            raise CheckpointMismatchError(f"checkpoint keys {key!r} and another one both map to {k!r}")
        out[k] = value
    return out, dropped


def interpolate_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]
                          ) -> torch.Tensor:
    """Resize a learnable ``[1, T*H*W, D]`` table from ``src_grid`` (T, H, W) to ``dst_grid``.

    Space is resized bicubically per time step, then time linearly per position (separately, so a change in only
    one of them leaves the other untouched). Computed in float32, returned in the input dtype.
    """
    t0, h0, w0 = (int(v) for v in src_grid)
    t1, h1, w1 = (int(v) for v in dst_grid)
    if pos_embed.dim() != 3 or pos_embed.shape[1] != t0 * h0 * w0:
        raise ValueError(f"pos_embed {list(pos_embed.shape)} does not match the source grid {src_grid}")
    d = pos_embed.shape[-1]
    x = pos_embed.float().reshape(t0, h0, w0, d)
    if (h0, w0) != (h1, w1):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h1, w1), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)  # [t0, h1, w1, d]
    if t0 != t1:
        y = x.permute(1, 2, 3, 0).reshape(1, h1 * w1 * d, t0)
        y = F.interpolate(y, size=t1, mode="linear", align_corners=False)
        x = y.reshape(h1, w1, d, t1).permute(3, 0, 1, 2)
    return x.reshape(1, t1 * h1 * w1, d).to(pos_embed.dtype)


def _model_grid(model: nn.Module) -> Grid:
    return tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[return-value]


def _grid_from_args(ckpt_args: Any, patch: int) -> Grid | None:
    """The checkpoint's token grid from its stored args (our checkpoints keep them)."""
    if not isinstance(ckpt_args, Mapping):
        return None
    try:
        frames = int(ckpt_args["num_frames"]) * int(ckpt_args.get("num_segments", 1) or 1)
        tubelet, size = int(ckpt_args.get("tubelet_size", 2)), int(ckpt_args["input_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return frames // tubelet, size // patch, size // patch


def _infer_src_grid(n_tokens: int, dst: Grid) -> Grid:
    """Guess the grid of a checkpoint without saved args from its token count: the model's frames with a square
    image; else the model's image size, or 224 px square frames (14 x 14 tokens: what VideoMAE and AdaMAE train
    at), with at most 16 token frames (32 frames at tubelet 2): 1568 tokens for a 112 px model are 8 x 14 x 14,
    not 32 x 7 x 7."""
    t1, h1, w1 = dst
    if n_tokens % t1 == 0:
        side = math.isqrt(n_tokens // t1)
        if side * side * t1 == n_tokens:
            return t1, side, side
    for h, w in ((h1, w1), (14, 14)):
        if n_tokens % (h * w) == 0 and n_tokens // (h * w) <= 16:
            return n_tokens // (h * w), h, w
    raise CheckpointMismatchError(
        f"cannot tell the token grid of a {n_tokens}-token pos_embed (the model has {t1}x{h1}x{w1}); pass "
        f"src_grid=(T, H, W)")


def load_pretrained_encoder(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any],
                            model_key: str = "model|module", src_grid: Sequence[int] | None = None,
                            require_head: bool = False, verbose: bool = True) -> LoadReport:
    """Load ``path_or_state`` into the classifier ``model`` (a ``modeling_finetune.VisionTransformer``).

    Returns a ``LoadReport`` (printed when ``verbose``). Raises ``CheckpointMismatchError`` when any
    ``patch_embed`` / ``blocks`` weight is missing or unexpected, when a shape differs other than the head (dropped
    if the class count differs) and a learnable ``pos_embed`` (interpolated; grid from ``src_grid``, the
    checkpoint's stored args, or inferred), or, with ``require_head``, when no classifier head was loaded (the
    file is a pre-training checkpoint: evaluating it would give chance accuracy).
    """
    model = unwrap_model(model)
    report = LoadReport()
    if isinstance(path_or_state, (str, os.PathLike)):
        ckpt = read_checkpoint(path_or_state)
        report.source = str(path_or_state)
    else:
        ckpt = dict(path_or_state)
    report.kind = ckpt.get("kind") if isinstance(ckpt.get("kind"), str) else None
    if "hf_note" in ckpt:
        report.notes.append(ckpt["hf_note"])
    raw, report.model_key = select_state_dict(ckpt, model_key)
    sd, report.dropped = convert_state_dict(raw)

    target = model.state_dict()
    pos_is_param = isinstance(getattr(model, "pos_embed", None), nn.Parameter)
    if "pos_embed" in sd and not pos_is_param:
        report.dropped["pos_embed"] = "model uses a fixed sinusoid table"
        sd.pop("pos_embed")
    if not pos_is_param:
        grid_text = "x".join(map(str, _model_grid(model)))
        report.notes.append(f"pos_embed: sinusoid table built for the model's grid {grid_text} (T x H x W tokens); "
                            f"never stored in checkpoints")
    if "norm.weight" in sd and "norm.weight" not in target:
        for k in ("norm.weight", "norm.bias"):
            if k in sd:
                sd.pop(k)
                report.dropped[k] = "encoder norm (the classifier mean-pools into a fresh fc_norm)"

    bad_shapes: list[str] = []
    head_classes = None  # the checkpoint's class count, when its head does not fit
    for k in list(sd):
        if k not in target or not isinstance(sd[k], torch.Tensor):
            continue
        src, dst = tuple(sd[k].shape), tuple(target[k].shape)
        if src == dst:
            continue
        if k.startswith("head."):
            sd.pop(k)
            report.dropped[k] = f"class count differs (checkpoint {src[0]}, model {dst[0]})"
            head_classes = src[0]
        elif k == "pos_embed":
            dst_grid = _model_grid(model)
            grid = tuple(src_grid) if src_grid is not None else \
                _grid_from_args(ckpt.get("args"), model.patch_embed.patch_size[0])
            if grid is None or int(grid[0]) * int(grid[1]) * int(grid[2]) != src[1]:
                grid = _infer_src_grid(src[1], dst_grid)
            sd[k] = interpolate_pos_embed(sd[k], grid, dst_grid)
            report.reshaped[k] = (src, dst)
            report.notes.append(f"pos_embed interpolated from grid {'x'.join(map(str, grid))} to "
                                f"{'x'.join(map(str, dst_grid))}")
        else:
            bad_shapes.append(f"{k}: checkpoint {list(src)} vs model {list(dst)}")
    if bad_shapes:
        raise CheckpointMismatchError(
            "checkpoint does not fit the model (different width / depth / patch or tubelet size?):\n  "
            + "\n  ".join(bad_shapes[:10]))

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    enc_missing = [k for k in missing if k.startswith(("patch_embed.", "blocks."))]
    enc_unexpected = [k for k in unexpected if k.startswith(("patch_embed.", "blocks."))]
    if enc_missing or enc_unexpected:
        raise CheckpointMismatchError(
            f"encoder weights do not match ({report.source}, weights under {report.model_key}): "
            f"{len(enc_missing)} missing ({_short(enc_missing)}), {len(enc_unexpected)} unexpected "
            f"({_short(enc_unexpected)}). Is this the right --model / --model_kwargs for the checkpoint?")
    result = model.load_state_dict(sd, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    report.loaded = [k for k in sd if k in target]
    if report.head_loaded:
        # A classifier's head reads what fc_norm / norm leave; a checkpoint trained with other pooling (--use_cls vs
        # mean pooling) loads every block yet gives meaningless outputs.
        around = [k for k in report.missing + report.unexpected + list(report.dropped)
                  if k.startswith(("norm.", "fc_norm."))]
        if around:
            raise CheckpointMismatchError(
                f"{report.source} is a classifier whose layers before the head do not match this model's "
                f"({_short(around)} missing, unexpected or dropped): was it fine-tuned with another --use_cls / "
                f"--use_mean_pooling setting?")
    if require_head and not report.head_loaded:
        n = getattr(model, "num_classes", "?")
        if head_classes is not None:  # a classifier, for another class count
            raise CheckpointMismatchError(
                f"{report.source}'s classifier head is for {head_classes} classes, this run's for {n} "
                f"(--nb_classes / --data_set): evaluating it would need a new head; give the matching class count")
        raise CheckpointMismatchError(
            f"{report.source} has no classifier head for {n} classes (it looks like a pre-training checkpoint): "
            f"evaluating it would give chance accuracy; fine-tune it first")
    if verbose:
        print(report)
    return report
