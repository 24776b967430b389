"""Frozen-encoder evaluation: the encoder as a frozen feature extractor, the two probes, and cached features as a
dataset. Training is ``engine_for_finetuning``'s, validation and the multi-view test ``evaluation``'s, unchanged: a
probe is a small model whose input is either a clip (``ProbedEncoder``: frozen encoder + probe, computed on the
fly) or a cached feature vector (``FeatureDataset`` items mimic ``VideoClsDataset``'s, ``info`` dict included), so
the same honest evaluation (undecodable videos never scored, named in ``unevaluated``) applies.

What a video's embedding is (one definition, used by ``tools/extract_features.py`` and the probes): the encoder's
output tokens for every position, as Hugging Face's ``VideoMAEModel.last_hidden_state`` gives them (after the
encoder's final LayerNorm for a pre-training checkpoint, whose decoder reads exactly these), averaged over tokens;
for a fine-tuned classifier with mean pooling its trained ``fc_norm`` is applied after the mean, i.e. the vector
its head reads. No input tokens are masked.

Probes (defaults and their sources in FINETUNE.md, "Frozen-encoder evaluation"):
- ``LinearProbe``: BatchNorm1d without affine parameters, then Linear (MAE's linear probe, He et al. 2022, A.2):
  the normalisation makes one learning rate work for features of any scale.
- ``AttentiveProbe``: one learned query cross-attending over the frozen tokens, an MLP, then Linear (V-JEPA's
  attentive probe, Bardes et al. 2024): mean pooling discards where things happen, the query learns what to attend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_
from torch.utils.data import Dataset

import hf_interop
import utils
from cli import UserError
from resume import data_fingerprint
from checkpoint_loading import CheckpointMismatchError, read_checkpoint, refuse_probe_checkpoint, select_state_dict
from tools.export_hf import ExportError, encoder_tokens, build_our_model

__all__ = ["FrozenEncoder", "load_frozen_encoder", "LinearProbe", "AttentiveProbe", "PROBES", "build_probe",
           "ProbedEncoder", "FeatureDataset"]

_OPTIONAL_KEYS = ("head.",) + hf_interop.SAMPLER_PREFIXES  # not part of the representation


class FrozenEncoder(nn.Module):
    """A checkpoint's encoder, frozen and always in eval mode: ``tokens(clip)`` [B, N, D], ``pool(tokens)`` [B, D],
    ``forward(clip) = pool(tokens(clip))`` (see the module docstring for the definition)."""

    def __init__(self, model: nn.Module, kind: str, source: str = "", args: Any = None) -> None:
        super().__init__()
        self.model, self.kind, self.source, self.args = model, kind, source, args
        enc = model.encoder if kind == "pretrain" else model
        pe = enc.patch_embed
        self.dim = int(pe.proj.out_channels)
        self.num_heads = int(enc.blocks[0].attn.num_heads)
        self.num_frames, self.input_size = int(pe.num_frames), int(pe.img_size[0])
        self.fc_norm = getattr(model, "fc_norm", None) if kind == "finetune" else None
        self.pooling = "mean of the tokens, then the classifier's fc_norm" if self.fc_norm is not None else \
            "mean of the tokens" + (" (after the encoder's final LayerNorm)" if kind == "pretrain" else "")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen means no dropout / drop-path either, whatever the caller's mode

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        return encoder_tokens(self.model, self.kind, clip)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.mean(1)
        return self.fc_norm(x) if self.fc_norm is not None else x

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.pool(self.tokens(clip))


def load_frozen_encoder(checkpoint: str, model_key: str = "model|module", random_init: bool = False,
                        seed: int = 0) -> FrozenEncoder:
    """The encoder of ``checkpoint`` (ours: pre-training or fine-tuning, a DeepSpeed folder, or a Hugging Face
    VideoMAE folder), rebuilt from its saved args as ``tools/export_hf.py`` does. Every encoder weight must be in
    the file: a silently random encoder would make the probe numbers meaningless. A file that does not fit raises
    ``cli.UserError`` naming it (the programs exit 2). ``random_init``: the same architecture with its initial
    weights (seeded), the baseline a probe on pre-trained features must beat."""
    try:
        return _load_frozen_encoder(checkpoint, model_key, random_init, seed)
    except CheckpointMismatchError as e:
        raise UserError(str(e)) from e


def _load_frozen_encoder(checkpoint: str, model_key: str, random_init: bool, seed: int) -> FrozenEncoder:
    ckpt = read_checkpoint(checkpoint)
    refuse_probe_checkpoint(ckpt, checkpoint)
    saved = ckpt.get("args")
    if not isinstance(saved, Mapping):
        raise CheckpointMismatchError(f"{checkpoint} has no saved run args (not a checkpoint of this project); "
                                      f"fine-tune or export it here first")
    raw, _ = select_state_dict(ckpt, model_key)
    state = hf_interop.flat_layout(utils.strip_state_dict_prefixes(raw))
    pretrain = str(saved.get("model", "")).startswith("pretrain_") or "decoder.head.weight" in state
    kind = "pretrain" if pretrain else "finetune"
    # an encoder-only folder has no class count; the head is not part of the representation anyway
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random stream
            torch.manual_seed(seed)
            model, args = build_our_model(kind, {**saved, "nb_classes": saved.get("nb_classes") or 1})
    except ExportError as e:
        raise CheckpointMismatchError(f"{checkpoint}: {e}") from None
    enc = model.encoder if pretrain else model
    target = enc.state_dict()
    sd = {k: v for k, v in state.items() if k in target}
    if not pretrain and getattr(model, "fc_norm", None) is not None and "fc_norm.weight" not in sd:
        model.fc_norm = None  # an encoder-only folder (VideoMAEModel) has no fc_norm: the embedding is the plain mean
        target = enc.state_dict()
    missing = [k for k in target if k not in sd and not k.startswith(_OPTIONAL_KEYS)]
    shapes = [f"{k}: checkpoint {list(v.shape)} vs model {list(target[k].shape)}" for k, v in sd.items()
              if tuple(v.shape) != tuple(target[k].shape) and not k.startswith("head.")]
    if missing or shapes:
        raise CheckpointMismatchError(
            f"{checkpoint}: the encoder rebuilt from its saved args ({args.model}) does not fit its weights: "
            + (f"{len(missing)} missing ({', '.join(missing[:5])})" if missing else "")
            + ("; " if missing and shapes else "") + "; ".join(shapes[:5]))
    if random_init:
        return FrozenEncoder(model, kind, f"{checkpoint} (architecture only: random initial weights, seed {seed})",
                             args)
    enc.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False)
    return FrozenEncoder(model, kind, str(checkpoint), args)


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """MAE's linear probe on pooled features: BatchNorm1d(affine=False) then Linear (weights N(0, 0.01))."""

    takes = "pooled"

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x))


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive probe on tokens [B, N, D]: a learned query cross-attends (multi-head) over the normalised
    tokens, a residual MLP refines it, a Linear classifies it."""

    takes = "tokens"

    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"query"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm1(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1).to(kv.dtype)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


PROBES = ("linear", "attentive")


def build_probe(kind: str, dim: int, num_classes: int, num_heads: int) -> nn.Module:
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    if kind == "attentive":
        if dim % num_heads:
            raise ValueError(f"--probe_heads {num_heads} does not divide the encoder width {dim}")
        return AttentiveProbe(dim, num_classes, num_heads)
    raise ValueError(f"unknown probe {kind!r}, expected one of {PROBES}")


class ProbedEncoder(nn.Module):
    """Clip -> frozen encoder (no gradient) -> probe: the classifier that the fine-tuning engine trains and tests
    when features are computed on the fly. Only the probe has trainable parameters (DDP syncs only those)."""

    def __init__(self, encoder: FrozenEncoder, probe: nn.Module) -> None:
        super().__init__()
        self.encoder, self.probe = encoder, probe

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.encoder.tokens(clip)
            x = tokens if self.probe.takes == "tokens" else self.encoder.pool(tokens)
        return self.probe(x.float())


# ----------------------------------------------------------------------------------------------------------------
# Cached features as a dataset
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FeatureStore:
    """What ``tools/extract_features.py`` wrote, in list order: ``features[i]`` is video ``paths[i]`` (list line
    ``lines[i]``, label ``labels[i]``); ``skipped`` are the videos that could not be decoded, never embedded."""

    features: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    lines: list[int]
    video_ids: list[str]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class FeatureDataset(Dataset):
    """Cached features with ``VideoClsDataset``'s item layout for ``mode``: ``train`` ``(x, label)`` over the
    embedded videos only; ``validation`` ``(x, label, video_id, info)`` and ``test`` ``(x, label, video_id, 0, 0,
    info)`` over every listed video, the skipped ones as zero vectors with ``info["valid"]`` False (never scored,
    named in ``unevaluated``). Items are in list order."""

    def __init__(self, store: FeatureStore, mode: str) -> None:
        if mode not in ("train", "validation", "test"):
            raise ValueError(f"mode must be train/validation/test, got {mode!r}")
        self.store, self.mode = store, mode
        rows: list[tuple[int, int]] = [(line, i) for i, line in enumerate(store.lines)]
        if mode != "train":
            rows += [(int(s["line"]), -1 - j) for j, s in enumerate(store.skipped)]
        self.rows = [r for _, r in sorted(rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:  # resume.start_epoch_data calls it; features have no augmentation
        pass

    def fingerprint(self) -> str:
        """What the examples are, for auto-resume: the embedded videos' ids and labels in order."""
        s = self.store
        return data_fingerprint([s.video_ids[r] if r >= 0 else "" for r in self.rows],
                                [int(s.labels[r]) if r >= 0 else -1 for r in self.rows])

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        r = self.rows[index]
        s = self.store
        if r >= 0:
            x, label = s.features[r], int(s.labels[r])
            video_id = s.video_ids[r]
            info = {"valid": True, "path": s.paths[r], "line": s.lines[r], "reason": ""}
        else:
            e = s.skipped[-1 - r]
            x, label, video_id = torch.zeros(s.features.shape[1]), int(e["label"]), str(e["video_id"])
            info = {"valid": False, "path": str(e["path"]), "line": int(e["line"]), "reason": str(e["reason"])}
        if self.mode == "train":
            return x, label
        if self.mode == "validation":
            return x, label, video_id, info
        return x, label, video_id, 0, 0, info


def probe_summary(encoder: FrozenEncoder, probe: nn.Module) -> str:
    n = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    return (f"{type(probe).__name__} ({n:,} trainable parameters) on the frozen {encoder.dim}-wide encoder of "
            f"{encoder.source}; input: {encoder.pooling if probe.takes == 'pooled' else 'all output tokens'}")
