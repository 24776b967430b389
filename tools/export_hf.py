"""Export a checkpoint of ours as a Hugging Face ``transformers`` VideoMAE folder (``from_pretrained`` loads it).

    python tools/export_hf.py out_ft/checkpoint-best.pth hf/my-videomae-ft        # -> VideoMAEForVideoClassification
    python tools/export_hf.py out_pt/checkpoint-latest.pth hf/my-videomae-pt      # -> VideoMAEForPreTraining
    python tools/export_hf.py out_pt/checkpoint-latest.pth hf/enc --encoder_only  # -> VideoMAEModel

Model, sizes, frames and classes come from the checkpoint's saved ``args``; flags only override. The folder gets
``config.json``, ``model.safetensors``, ``preprocessor_config.json`` (VideoMAEImageProcessor), a model card
``README.md``, ``adamae_args.json`` (the run's args, so ``--finetune`` / ``run_mae_vis.py`` rebuild the same model
from the folder) and, for an AdaMAE pre-training checkpoint, ``adamae_sampler.safetensors`` (the adaptive token
sampler has no HF counterpart). When ``transformers`` is installed the folder is loaded back and compared with our
model on one random clip (``--no_verify`` skips that); a relative difference above ``PARITY_TOL`` fails the export.
Bad input: one line naming the file, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_interop  # noqa: E402
import utils  # noqa: E402
import checkpointing
from checkpoint_loading import CheckpointMismatchError, read_checkpoint, refuse_probe_checkpoint  # noqa: E402
from tools.hf_model_card import (PREPROCESSOR_NOTE, ClassNamesError, model_card,  # noqa: E402
                                 preprocessor_config, read_class_names)

# Largest max |ours - HF| / max |ours| the export accepts. HF's hard-coded LayerNorm eps 1e-5 (ours 1e-6) gives
# ~1e-6 (README's parity table); a wrong key mapping or config gives O(1).
PARITY_TOL = 1e-3


class ExportError(ValueError):
    """The checkpoint cannot be exported faithfully; the message says why."""


@dataclass
class ExportResult:
    """What ``export`` wrote; ``parity`` holds the verification numbers when it ran."""

    out_dir: str
    architecture: str
    files: list[str]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Export to Hugging Face VideoMAE", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="our pre-training or fine-tuning checkpoint (.pth, or a DeepSpeed folder)")
    p.add_argument("out_dir", help="folder to write (created; existing files of the same names are replaced)")
    p.add_argument("--use_ema", action="store_true", help="export the EMA weights (model_ema) instead of model")
    p.add_argument("--encoder_only", action="store_true", help="export the encoder alone as VideoMAEModel")
    p.add_argument("--class_names", default=None,
                   help="file of class names, one per line ('name' or 'id name'); default: classes.txt in the "
                        "run's --data_path when it exists, else LABEL_i")
    p.add_argument("--no_verify", action="store_true", help="do not load the folder back with transformers")
    return p


# ---- Rebuilding our model ----

def _kind(ckpt: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str:
    kind = ckpt.get("kind")
    if kind in ("pretrain", "finetune"):
        return kind
    if "decoder.head.weight" in state_dict:
        return "pretrain"
    if "head.weight" in state_dict:
        return "finetune"
    raise ExportError("neither a pre-training model (no decoder) nor a classifier (no head)")


def build_our_model(kind: str, saved_args: Mapping[str, Any]) -> tuple[nn.Module, argparse.Namespace]:
    """The model the training program built, from its own parser defaults overlaid with the saved args."""
    if kind == "pretrain":
        import run_mae_pretraining as program
        from modeling_pretrain import create_pretrain_model as build
    else:
        import run_class_finetuning as program
        from modeling_finetune import create_classifier as build
    defaults = vars(program.get_args_parser().parse_args([]))
    saved = dict(saved_args)
    if isinstance(saved.get("model_kwargs"), str):
        saved["model_kwargs"] = json.loads(saved["model_kwargs"])
    args = argparse.Namespace(**{**defaults, **saved})
    if kind == "finetune" and not args.nb_classes:
        raise ExportError("the saved args have no nb_classes")
    try:
        return build(args), args
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"cannot rebuild {args.model} from the saved args: {e}") from None


# ---- Our model -> HF config ----

def _blocks_spec(blocks: nn.ModuleList, where: str) -> dict[str, Any]:
    """Width, heads, MLP size, LayerNorm eps and q/v bias of a block stack; refuses what HF cannot express."""
    b0 = blocks[0]
    dim, heads = b0.norm1.normalized_shape[0], b0.attn.num_heads
    spec = dict(dim=dim, depth=len(blocks), heads=heads, mlp=b0.mlp.fc1.out_features, eps=b0.norm1.eps,
                qkv_bias=b0.attn.q_bias is not None)
    for i, blk in enumerate(blocks):
        name = f"{where} block {i}"
        if blk.gamma_1 is not None:
            raise ExportError(f"{name} has layer-scale (init_values > 0); Hugging Face VideoMAE has none")
        if blk.attn.qkv.out_features != 3 * dim or abs(blk.attn.scale - (dim // heads) ** -0.5) > 1e-12:
            raise ExportError(f"{name} uses attn_head_dim / qk_scale; Hugging Face VideoMAE derives both from the "
                              f"width and head count")
        act = blk.mlp.act
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise ExportError(f"{name}: activation {act} is not exact GELU")
        norms = (blk.norm1, blk.norm2)
        if any(not isinstance(n, nn.LayerNorm) or n.eps != spec["eps"] for n in norms) or \
                (blk.attn.q_bias is not None) != spec["qkv_bias"] or blk.mlp.fc1.out_features != spec["mlp"]:
            raise ExportError(f"{name} differs from block 0 (norm, eps, bias or MLP size); HF blocks are uniform")
    return spec


def hf_config(model: nn.Module, kind: str, args: argparse.Namespace, encoder_only: bool,
              class_names: Sequence[str] | None) -> dict[str, Any]:
    """``config.json`` for ``model`` (our classifier or pre-training model), read off the built modules."""
    enc = model.encoder if kind == "pretrain" else model
    if isinstance(getattr(enc, "pos_embed", None), nn.Parameter):
        raise ExportError("learnable position embeddings (--use_learnable_pos_emb): Hugging Face VideoMAE only "
                          "has the fixed sinusoid table, so the exported model would differ")
    pe = enc.patch_embed
    if pe.patch_size[0] != pe.patch_size[1]:
        raise ExportError(f"non-square patches {pe.patch_size}; Hugging Face VideoMAE's decoder assumes square")
    spec = _blocks_spec(enc.blocks, "encoder")
    mean_pooling = kind == "finetune" and enc.fc_norm is not None
    if not mean_pooling and enc.norm.eps != spec["eps"]:
        raise ExportError("the encoder's final LayerNorm eps differs from its blocks'; HF uses one layer_norm_eps")
    arch = "VideoMAEModel" if encoder_only else \
        ("VideoMAEForPreTraining" if kind == "pretrain" else "VideoMAEForVideoClassification")
    img = pe.img_size
    cfg: dict[str, Any] = {
        "architectures": [arch], "model_type": "videomae",
        "image_size": img[0] if img[0] == img[1] else list(img), "patch_size": pe.patch_size[0],
        "num_channels": pe.proj.in_channels, "num_frames": pe.num_frames, "tubelet_size": pe.tubelet_size,
        "hidden_size": spec["dim"], "num_hidden_layers": spec["depth"], "num_attention_heads": spec["heads"],
        "intermediate_size": spec["mlp"], "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": spec["eps"],
        # transformers 4.x reads qkv_bias, 5.x qv_bias (and maps qkv_bias onto it): write both
        "qkv_bias": spec["qkv_bias"], "qv_bias": spec["qkv_bias"],
        "use_mean_pooling": mean_pooling,
    }
    if kind == "pretrain":
        dec = _blocks_spec(model.decoder.blocks, "decoder")
        if dec["eps"] != spec["eps"] or dec["qkv_bias"] != spec["qkv_bias"]:
            raise ExportError("decoder and encoder blocks differ in LayerNorm eps or q/v bias; HF shares both")
        cfg.update(decoder_hidden_size=dec["dim"], decoder_num_hidden_layers=dec["depth"],
                   decoder_num_attention_heads=dec["heads"], decoder_intermediate_size=dec["mlp"],
                   norm_pix_loss=bool(args.normalize_target))
    if arch == "VideoMAEForVideoClassification":
        n = model.head.out_features
        names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(n)]
        if len(names) != n:
            raise ExportError(f"{len(names)} class names for a {n}-class head")
        cfg["id2label"] = {str(i): name for i, name in enumerate(names)}
        cfg["label2id"] = {name: i for i, name in enumerate(names)}
    return cfg


# ---- Export ----

def encoder_tokens(model: nn.Module, kind: str, clip: torch.Tensor) -> torch.Tensor:
    """Our encoder's output tokens for all positions, as HF's ``VideoMAEModel.last_hidden_state`` gives them
    (final LayerNorm only when the model has one before pooling)."""
    if kind == "pretrain":
        tokens = model.encoder.patch_embed(clip)
        return model.encoder(tokens, torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1))
    x = model.patch_embed(clip) + model.pos_embed
    for blk in model.blocks:
        x = blk(x)
    return x if model.fc_norm is not None else model.norm(x)


def _verify(out_dir: str, arch: str, model: nn.Module, kind: str) -> dict[str, float]:
    """Load the folder with transformers (no missing / unexpected keys allowed) and compare its output with
    ours on one random clip (a tube mask for pre-training)."""
    import transformers
    hf, info = getattr(transformers, arch).from_pretrained(out_dir, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if v}
    if bad:
        raise ExportError(f"transformers {transformers.__version__} loads {out_dir} with {bad}")
    hf.eval()
    model.eval()
    pe = (model.encoder if kind == "pretrain" else model).patch_embed
    gen = torch.Generator().manual_seed(0)
    clip = torch.randn(1, pe.proj.in_channels, pe.num_frames, *pe.img_size, generator=gen)
    hf_clip = clip.permute(0, 2, 1, 3, 4)  # HF takes [B, T, C, H, W]
    with torch.no_grad():
        if arch == "VideoMAEModel":
            ours, theirs = encoder_tokens(model, kind, clip), hf(pixel_values=hf_clip).last_hidden_state
        elif arch == "VideoMAEForPreTraining":
            from masking_generator import MaskGenerator
            mask = MaskGenerator("tube", pe.grid_size, 0.75)(1, clip.device)
            ours = model(clip, mask=mask).pred
            theirs = hf(pixel_values=hf_clip, bool_masked_pos=mask).logits
        else:
            ours, theirs = model(clip), hf(pixel_values=hf_clip).logits
    diff, scale = float((ours - theirs).abs().max()), float(ours.abs().max()) or 1.0
    return {"max_abs_diff": diff, "max_abs": scale, "relative": diff / scale}


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors writes owner-only files; give them the same permissions as the folder's JSON files."""
    from safetensors.torch import save_file
    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export(checkpoint: str, out_dir: str, use_ema: bool = False, encoder_only: bool = False,
           class_names: str | None = None, verify: bool = True, command: str | None = None) -> ExportResult:
    """Write the HF folder for ``checkpoint``; raises ExportError / ClassNamesError / CheckpointError /
    CheckpointMismatchError / FileNotFoundError / HFInteropError for input it cannot export faithfully."""
    if hf_interop.is_hf_folder(checkpoint):
        raise ExportError("is already a Hugging Face VideoMAE folder")
    ckpt = read_checkpoint(checkpoint)  # a .pth file or URL, or a DeepSpeed checkpoint folder (weights: module)
    refuse_probe_checkpoint(ckpt, checkpoint)
    key = "model_ema" if use_ema else ("model" if "model" in ckpt else "module")
    if not isinstance(ckpt.get(key), Mapping):
        raise ExportError(f"has no '{key}' weights" + (" (it was trained without --model_ema)" if use_ema else ""))
    state_dict = utils.strip_state_dict_prefixes(ckpt[key])
    saved = ckpt.get("args")
    if not isinstance(saved, Mapping):
        raise ExportError("has no saved run args (not a checkpoint of this project; released AdaMAE / VideoMAE "
                          "files: fine-tune or load them here first)")
    kind = _kind(ckpt, state_dict)
    model, args = build_our_model(kind, saved)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ExportError(f"weights do not fit {args.model} rebuilt from the saved args: "
                          f"{str(e).splitlines()[0][:300]}") from None

    names: list[str] | None = None
    if kind == "finetune" and not encoder_only:
        default_names = os.path.join(str(args.data_path or ""), "classes.txt")
        source = class_names or (default_names if args.data_path and os.path.isfile(default_names) else None)
        names = read_class_names(source) if source else None
    cfg = hf_config(model, kind, args, encoder_only, names)
    arch = cfg["architectures"][0]

    sd = hf_interop.flat_layout(model.state_dict())
    sampler = {k: v for k, v in sd.items() if k.startswith(hf_interop.SAMPLER_PREFIXES)}
    sd = {k: v for k, v in sd.items() if k not in sampler}
    notes: list[str] = []
    if encoder_only:
        keep = ("patch_embed.", "blocks.") + (() if cfg["use_mean_pooling"] else ("norm.",))
        left_out = sorted({k.split(".")[0] for k in sd if not k.startswith(keep)} |
                          ({"AdaMAE sampler"} if sampler else set()))
        sd = {k: v for k, v in sd.items() if k.startswith(keep)}
        sampler = {}
        notes.append(f"Encoder only; not included: {', '.join(left_out)} (export without --encoder_only for "
                     f"the full model).")
    hf_sd = hf_interop.to_hf_state_dict(sd, base="" if encoder_only else "videomae.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ["config.json", "model.safetensors", "preprocessor_config.json", hf_interop.ARGS_FILE, "README.md"]
    _save_safetensors(hf_sd, out / "model.safetensors")
    stale_sampler = out / hf_interop.SAMPLER_FILE  # from an earlier export here: import would pick it up
    if stale_sampler.exists() and not sampler:
        stale_sampler.unlink()
    if sampler:
        _save_safetensors({"encoder." + k: v.detach().clone().contiguous() for k, v in sampler.items()},
                          out / hf_interop.SAMPLER_FILE)
        files.insert(2, hf_interop.SAMPLER_FILE)
        notes.append(f"AdaMAE's adaptive token sampler (`encoder.pos_embed_probs`, `encoder.get_token_probs.*`, "
                     f"{sum(v.numel() for v in sampler.values()) / 1e6:.2f}M parameters) has no Hugging Face "
                     f"counterpart: its weights are saved beside, in `{hf_interop.SAMPLER_FILE}` (our key names). "
                     f"`VideoMAEForPreTraining` takes the mask as `bool_masked_pos`; this project's `--finetune` and "
                     f"`run_mae_vis.py` read the folder with the sampler.")
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    pe = (model.encoder if kind == "pretrain" else model).patch_embed
    short = int(args.short_side_size or pe.img_size[0]) if kind == "finetune" else pe.img_size[0]
    with open(out / "preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump(preprocessor_config(pe.num_frames, pe.img_size[0], short), f, indent=2)
    meta = {"args": vars(args), "kind": kind, "model_name": args.model,
            "mask_type": ckpt.get("mask_type") or (model.mask_type if kind == "pretrain" else None),
            "mask_ratio": args.mask_ratio if kind == "pretrain" else None,
            "epoch": ckpt.get("epoch"), "source": os.path.abspath(checkpoint), "weights": key,
            "architecture": arch}
    with open(out / hf_interop.ARGS_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)

    eps = cfg["layer_norm_eps"]
    if eps != 1e-5 and (kind == "pretrain" or cfg["use_mean_pooling"]) and not encoder_only:
        where = "the decoder's final norm" if kind == "pretrain" else "`fc_norm`"
        notes.append(f"transformers builds {where} with LayerNorm eps 1e-5 regardless of the config; this model "
                     f"was trained with {eps:g}, so its outputs differ slightly from ours.")
    if kind == "pretrain" and not encoder_only:
        notes.append("`use_mean_pooling` is false because the pre-training encoder ends in a LayerNorm "
                     "(`videomae.layernorm`). To fine-tune in transformers with VideoMAE's mean pooling, load "
                     "`VideoMAEForVideoClassification` with `use_mean_pooling=True` (otherwise it classifies "
                     "from token 0; there is no CLS token).")
    notes.append(PREPROCESSOR_NOTE)
    result = ExportResult(str(out), arch, files, cfg, notes)
    if verify:
        try:
            import transformers  # noqa: F401
        except ImportError:
            notes.append("Not verified with transformers (not installed at export time).")
        else:
            result.parity = _verify(str(out), arch, model, kind)
            if not result.parity["relative"] <= PARITY_TOL:  # NaN fails too
                for name in files:  # nothing loadable is left behind
                    (out / name).unlink(missing_ok=True)
                raise ExportError(
                    f"parity check failed: transformers {transformers.__version__} loads {out} but its output "
                    f"differs from ours by {result.parity['relative']:.2e} of the output's scale (max abs diff "
                    f"{result.parity['max_abs_diff']:.2e}, allowed {PARITY_TOL:g}); the folder is not a faithful "
                    f"export; its files were removed")
            notes.append(f"Parity at export (fp32, CPU, one random clip): max abs diff "
                         f"{result.parity['max_abs_diff']:.2e}, max abs output {result.parity['max_abs']:.2e} "
                         f"(transformers {transformers.__version__}).")
    n_params = sum(v.numel() for v in hf_sd.values())
    cmd = command or "python tools/export_hf.py " + shlex.join([checkpoint, out_dir])
    with open(out / "README.md", "w", encoding="utf-8") as f:
        f.write(model_card(result, kind, args, ckpt, "EMA (model_ema)" if use_ema else "model", n_params, cmd,
                           bool(sampler)))
    return result


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python tools/export_hf.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        result = export(args.checkpoint, args.out_dir, use_ema=args.use_ema, encoder_only=args.encoder_only,
                        class_names=args.class_names, verify=not args.no_verify, command=command)
    except (ExportError, ClassNamesError, hf_interop.HFInteropError, checkpointing.CheckpointError,
            CheckpointMismatchError, FileNotFoundError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {args.checkpoint}: {msg}" if args.checkpoint not in msg else f"error: {msg}",
              file=sys.stderr)
        return 2
    print(f"wrote {result.architecture} to {result.out_dir}: {', '.join(result.files)}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
