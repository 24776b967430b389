"""Hugging Face ``transformers`` VideoMAE <-> our video ViTs: the one key-mapping table, config translation, and
reading an HF folder back as one of our checkpoints.

Used by ``tools/export_hf.py`` (ours -> HF) and ``checkpoint_loading`` (HF -> ours, for ``--finetune`` and
``run_mae_vis.py``). ``transformers`` itself is never imported here: the folder is plain JSON + safetensors.

Names. "Flat" keys are the classifier's (``patch_embed.*``, ``blocks.i.*``, ``norm.*``, ``fc_norm.*``,
``head.*``) plus the pre-training-only ``decoder.*``, ``encoder_to_decoder.*``, ``mask_token``; the pre-training
model keeps its encoder under ``encoder.`` (``pretrain_layout`` / ``flat_layout`` convert). On the HF side the
encoder sits under ``videomae.`` except in a bare ``VideoMAEModel``. Attention: ours has one bias-free ``qkv``
weight plus ``q_bias`` / ``v_bias``; HF has ``query`` / ``key`` / ``value`` weights. We write the biases as
``attention.attention.q_bias`` / ``v_bias`` (the hub's layout, which transformers 4.x loads as is and 5.x renames
to ``query.bias`` / ``value.bias`` on load) and read either spelling. The key has no bias in either model.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import torch

__all__ = ["HFInteropError", "HF_ARCHITECTURES", "SAMPLER_FILE", "ARGS_FILE", "SAMPLER_PREFIXES", "to_hf_state_dict",
           "from_hf_state_dict", "flat_layout", "pretrain_layout", "is_hf_folder", "read_hf_folder",
           "hf_config_to_args", "hf_weight_files", "hf_folder_files"]

HF_ARCHITECTURES = ("VideoMAEForVideoClassification", "VideoMAEForPreTraining", "VideoMAEModel")
SAMPLER_FILE = "adamae_sampler.safetensors"  # AdaMAE's token sampler: no HF counterpart, kept beside
ARGS_FILE = "adamae_args.json"  # the training run's saved args, so an import rebuilds the same model
SAMPLER_PREFIXES = ("pos_embed_probs", "get_token_probs.")  # flat names
_ENCODER_PARTS = ("patch_embed.", "blocks.", "norm.", "pos_embed") + SAMPLER_PREFIXES

# (ours, HF) key prefixes. "{i}" is a layer index; "{base}" is "videomae." inside the task models, "" in a bare
# VideoMAEModel. Rows marked True continue with a block-internal name from _BLOCK.
_TOP: tuple[tuple[str, str, bool], ...] = (
    ("patch_embed.proj.", "{base}embeddings.patch_embeddings.projection.", False),
    ("blocks.{i}.", "{base}encoder.layer.{i}.", True),
    ("norm.", "{base}layernorm.", False),
    ("fc_norm.", "fc_norm.", False),
    ("head.", "classifier.", False),
    ("decoder.blocks.{i}.", "decoder.decoder_layers.{i}.", True),
    ("decoder.norm.", "decoder.norm.", False),
    ("decoder.head.", "decoder.head.", False),
    ("encoder_to_decoder.", "encoder_to_decoder.", False),
    ("mask_token", "mask_token", False),
)
_BLOCK: tuple[tuple[str, str], ...] = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.q_bias", "attention.attention.q_bias"),
    ("attn.v_bias", "attention.attention.v_bias"),
    ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_QKV_OURS = "attn.qkv.weight"
_QKV_HF = tuple(f"attention.attention.{p}.weight" for p in ("query", "key", "value"))
_HF_BIAS_ALIASES = {"attention.attention.query.bias": "attention.attention.q_bias",  # transformers >= 5 names
                    "attention.attention.value.bias": "attention.attention.v_bias"}


class HFInteropError(ValueError):
    """A state dict or folder that cannot be translated; the message names the key or file."""


def _prefix_regex(template: str, base: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template.replace("{base}", base)).replace(r"\{i\}", r"(\d+)"))


def _translate(key: str, rows: list[tuple[re.Pattern[str], str, bool]], block: tuple[tuple[str, str], ...]
               ) -> str | None:
    """``key`` rewritten by the first matching row (and the block table), or None when nothing matches."""
    for pattern, target, is_block in rows:
        m = pattern.match(key)
        if m is None:
            continue
        head = target.replace("{i}", m.group(1)) if m.groups() else target
        rest = key[m.end():]
        if not is_block:
            return head + rest
        for src, dst in block:
            if rest.startswith(src):
                return head + dst + rest[len(src):]
        return None
    return None


def flat_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Pre-training model keys -> flat keys (``encoder.`` removed); flat keys pass through."""
    return {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state_dict.items()}


def pretrain_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys -> the pre-training model's (encoder parts under ``encoder.``)."""
    return {"encoder." + k if k.startswith(_ENCODER_PARTS) else k: v for k, v in state_dict.items()}


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], base: str = "videomae.") -> dict[str, torch.Tensor]:
    """Our weights (flat or pre-training layout, sampler already removed) -> HF keys, ``qkv`` split in three.

    Tensors are cloned contiguous (safetensors refuses views that share storage). Raises HFInteropError for a
    key HF has no place for (e.g. learnable ``pos_embed``, layer-scale ``gamma_*``, the AdaMAE sampler).
    """
    rows = [(_prefix_regex(o, ""), h.replace("{base}", base), b) for o, h, b in _TOP]
    out: dict[str, torch.Tensor] = {}
    for key, value in flat_layout(state_dict).items():
        if key.endswith(_QKV_OURS):
            stem = key[:-len(_QKV_OURS)]
            hf_stem = _translate(stem + "norm1.", rows, _BLOCK)  # the block's HF prefix
            if hf_stem is None or value.shape[0] % 3:
                raise HFInteropError(f"no Hugging Face VideoMAE place for {key} {list(value.shape)}")
            hf_stem = hf_stem[:-len("layernorm_before.")]
            for name, part in zip(_QKV_HF, value.chunk(3, dim=0)):
                out[hf_stem + name] = part.clone().contiguous()
            continue
        hf_key = _translate(key, rows, _BLOCK)
        if hf_key is None:
            raise HFInteropError(f"no Hugging Face VideoMAE place for {key} {list(value.shape)}")
        out[hf_key] = value.detach().clone().contiguous()
    return out


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF VideoMAE weights (any of the three classes, either q/v-bias spelling) -> flat keys, ``qkv`` merged.

    Raises HFInteropError naming any key not understood, or a layer whose query/key/value are incomplete.
    """
    rows = [(_prefix_regex(h, ""), o, b) for o, h, b in _TOP]
    block = tuple((h, o) for o, h in _BLOCK)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        k = key[len("videomae."):] if key.startswith("videomae.") else key
        for new, old in _HF_BIAS_ALIASES.items():
            if k.endswith(new):
                k = k[:-len(new)] + old
        part = next((p for p in _QKV_HF if k.endswith(p)), None)
        if part is not None:
            qkv.setdefault(k[:-len(part)], {})[part] = value
            continue
        flat = _translate(k, rows, block)
        if flat is None:
            raise HFInteropError(f"unknown Hugging Face VideoMAE key {key} {list(value.shape)}")
        out[flat] = value
    for stem, parts in qkv.items():
        if len(parts) != 3:
            raise HFInteropError(f"{stem}: query/key/value weights incomplete (found {sorted(parts)})")
        flat_stem = _translate(stem + "layernorm_before.", rows, block)
        if flat_stem is None:
            raise HFInteropError(f"unknown Hugging Face VideoMAE attention {stem}")
        out[flat_stem[:-len("norm1.")] + _QKV_OURS] = torch.cat([parts[p] for p in _QKV_HF], dim=0)
    return out


# ------------------------------------------------------------------------------------------------------------
# Reading a folder
# ------------------------------------------------------------------------------------------------------------

def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``config.json`` whose ``model_type`` is ``videomae``."""
    cfg = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "videomae"
    except (OSError, ValueError, AttributeError):
        return False


def hf_weight_files(folder: str) -> list[str]:
    """The weight files ``_read_hf_weights`` reads: ``model.safetensors`` (or its index and shards), else
    ``pytorch_model.bin``."""
    single = os.path.join(folder, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [index] + [os.path.join(folder, s) for s in shards]
    legacy = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return [legacy]
    raise HFInteropError(f"{folder} has a VideoMAE config.json but no model.safetensors or pytorch_model.bin")


def hf_folder_files(path: str | os.PathLike) -> list[str]:
    """Every file ``read_hf_folder`` reads (config, weights, and the sampler / saved args when present), so that a
    cache can tell when the folder was rewritten."""
    folder = str(path)
    extra = [os.path.join(folder, n) for n in (SAMPLER_FILE, ARGS_FILE) if os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, "config.json")] + hf_weight_files(folder) + extra


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """One safetensors / ``.bin`` file; a truncated or corrupt one raises HFInteropError naming it (safetensors'
    own SafetensorError is neither OSError nor ValueError, and callers turn HFInteropError into a clean error)."""
    from safetensors.torch import load_file
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure means the same thing: this file is damaged
        raise HFInteropError(f"{path} is truncated or unreadable ({type(e).__name__}: {e})") from e


def _read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(folder):
        if not path.endswith(".json"):
            out.update(_load_weights_file(path))
    return out


VIDEOMAE_MASK_RATIO = 0.9  # VideoMAE's tube-mask pre-training ratio (what hub VideoMAEForPreTraining was trained with)


def hf_config_to_args(config: Mapping[str, Any], pretrain: bool = False, sampler: bool = False) -> dict[str, Any]:
    """Our run args (the subset that builds a model) for an HF VideoMAE config with no saved args beside it:
    the classifier's ``model_kwargs``, or with ``pretrain`` the pre-training model's (encoder + decoder). Such a
    pre-training folder is VideoMAE's (tube mask, the config's ``mask_ratio`` else 0.9), not pre-training's AdaMAE
    defaults, unless ``sampler``: AdaMAE sampler weights beside it make it adaptive (ratio: the config's, else
    pre-training's default)."""
    hidden, dec = int(config.get("hidden_size", 768)), int(config.get("decoder_hidden_size", 384))
    mlp_ratio = int(config.get("intermediate_size", 3072)) / hidden
    patch, size = config.get("patch_size", 16), config.get("image_size", 224)
    kwargs: dict[str, Any] = dict(patch_size=int(patch if isinstance(patch, int) else patch[0]),
                                  in_chans=int(config.get("num_channels", 3)), mlp_ratio=mlp_ratio,
                                  qkv_bias=bool(config.get("qv_bias", config.get("qkv_bias", True))))
    depth, heads = int(config.get("num_hidden_layers", 12)), int(config.get("num_attention_heads", 12))
    if pretrain:
        if int(config.get("decoder_intermediate_size", 1536)) != round(dec * mlp_ratio):
            raise HFInteropError("the decoder's MLP ratio differs from the encoder's; our model shares one")
        kwargs.update(encoder_embed_dim=hidden, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=dec,
                      decoder_num_heads=int(config.get("decoder_num_attention_heads", 6)))
    else:
        kwargs.update(embed_dim=hidden, depth=depth, num_heads=heads)
    masking: dict[str, Any] = {}
    if pretrain:
        masking["mask_type"] = "adaptive" if sampler else "tube"
        ratio = config.get("mask_ratio") or (None if sampler else VIDEOMAE_MASK_RATIO)
        if ratio is not None:
            masking["mask_ratio"] = float(ratio)
    return {
        **masking,
        "model": "pretrain_videomae_base_patch16_224" if pretrain else "vit_base_patch16_224",
        "model_kwargs": kwargs,  # sets every size, so the base name above is only a starting point
        "num_frames": int(config.get("num_frames", 16)), "tubelet_size": int(config.get("tubelet_size", 2)),
        "input_size": int(size if isinstance(size, int) else size[0]),
        "use_mean_pooling": bool(config.get("use_mean_pooling", True)),
        "normalize_target": bool(config.get("norm_pix_loss", True)),
        "decoder_depth": int(config.get("decoder_num_hidden_layers", 4)),
        "nb_classes": len(config.get("id2label") or {}) or None,
    }


def read_hf_folder(path: str | os.PathLike) -> dict[str, Any]:
    """An HF VideoMAE folder as one of our checkpoint dicts: ``model`` (pre-training layout when it has a
    decoder, else flat; the AdaMAE sampler added back from ``adamae_sampler.safetensors`` when present),
    ``args`` (the saved run args from ``adamae_args.json``, else derived from ``config.json``), ``kind``,
    ``model_name`` / ``mask_type`` when known, and ``hf_architecture``."""
    folder = str(path)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    flat = from_hf_state_dict(_read_hf_weights(folder))
    sampler_path = os.path.join(folder, SAMPLER_FILE)
    if os.path.isfile(sampler_path):
        flat.update(flat_layout(_load_weights_file(sampler_path)))
    arch = (config.get("architectures") or ["VideoMAEModel"])[0]
    has_decoder = any(k.startswith("decoder.") for k in flat)
    ckpt: dict[str, Any] = {"model": pretrain_layout(flat) if has_decoder else flat, "hf_architecture": arch,
                            "kind": "pretrain" if has_decoder else ("finetune" if "head.weight" in flat
                                                                    else "encoder")}
    args_path = os.path.join(folder, ARGS_FILE)
    if os.path.isfile(args_path):
        with open(args_path, encoding="utf-8") as f:
            saved = json.load(f)
        ckpt["args"] = saved.get("args", {})
        for key in ("model_name", "mask_type", "mask_ratio"):
            if saved.get(key) is not None:
                ckpt[key] = saved[key]
    else:
        ckpt["args"] = hf_config_to_args(config, pretrain=has_decoder,
                                         sampler=any(k.startswith(SAMPLER_PREFIXES) for k in flat))
        if has_decoder:
            ckpt["mask_type"] = ckpt["args"]["mask_type"]
    return ckpt
