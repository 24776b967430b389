"""Video ViT building blocks and the fine-tuning classifier.

The blocks here are shared by the masked autoencoder (``modeling_pretrain.py``) and the classifier, and their
parameter names and shapes are exactly VideoMAE's, so released VideoMAE / AdaMAE checkpoints load with
``strict=True``. Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so that fused
(flash / memory-efficient) kernels are used where the device has them.
"""
from __future__ import annotations

import argparse
import warnings
from functools import partial
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model

from cli import construct_with_model_kwargs, check_model_kwargs
from torch.utils.checkpoint import checkpoint

IntOrPair = Union[int, Sequence[int]]


def _pair(x: IntOrPair) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """Fixed 1-D transformer sin/cos table ``[1, n_position, d_hid]`` over the flattened ``t*H*W + h*W + w`` index.

    Computed in float64 and cast, to match the numpy tables the released checkpoints were trained with.
    """
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d_hid, dtype=torch.float64)[None, :]
    angles = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / d_hid)
    table = torch.empty(n_position, d_hid, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d whose kernel and stride are ``(tubelet_size, patch, patch)``."""

    def __init__(self, img_size: IntOrPair = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_frames: int = 16, tubelet_size: int = 2):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.num_frames = int(num_frames)
        self.tubelet_size = int(tubelet_size)
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames={num_frames} is not divisible by tubelet_size={tubelet_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.grid_size = (self.num_frames // self.tubelet_size,
                          self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(self.tubelet_size, *self.patch_size),
                              stride=(self.tubelet_size, *self.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        if (t, h, w) != (self.num_frames, *self.img_size):
            raise ValueError(f"input clip is {t}x{h}x{w} (frames x height x width) but the model was built for "
                             f"{self.num_frames}x{self.img_size[0]}x{self.img_size[1]}; set num_frames/img_size")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's bias layout: one bias-free ``qkv`` weight plus separate
    ``q_bias`` / ``v_bias`` (the key gets no bias, which is softmax-invariant anyway)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


class Block(nn.Module):
    """Pre-norm transformer block; ``init_values > 0`` adds layer-scale (``gamma_1``/``gamma_2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, init_values: float = 0.0, act_layer: Callable[..., nn.Module] = nn.GELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, attn_head_dim: int | None = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, attn_head_dim=attn_head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        # VideoMAE's MLP has no dropout after the activation, only after fc2.
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=(0.0, drop))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply blocks in order, recomputing activations in backward when ``use_checkpoint`` (saves memory)."""
    for blk in blocks:
        if use_checkpoint and x.requires_grad:
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def make_blocks(depth: int, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                drop: float, attn_drop: float, drop_path_rate: float, init_values: float,
                norm_layer: Callable[..., nn.Module]) -> nn.ModuleList:
    """A stack of ``depth`` blocks with linearly increasing stochastic depth (VideoMAE's schedule)."""
    dpr = drop_path_rates(drop_path_rate, depth)
    return nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, dpr[i], init_values,
                                norm_layer=norm_layer) for i in range(depth)])


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth rises linearly with depth, as in VideoMAE."""
    if depth <= 1:
        return [0.0] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


def init_linear_and_norm(m: nn.Module, linear_init: str = "xavier") -> None:
    """VideoMAE's init: Xavier (pre-training) or trunc-normal .02 (fine-tuning) Linear, zero bias; LN 1/0."""
    if isinstance(m, nn.Linear):
        if linear_init == "xavier":
            nn.init.xavier_uniform_(m.weight)
        else:
            trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """Video ViT classifier (VideoMAE's fine-tuning model): mean pooling + ``fc_norm`` by default, or
    ``use_mean_pooling=False`` for LayerNorm-then-first-token (VideoMAE's ``--use_cls``; there is no CLS token)."""

    def __init__(self, img_size: IntOrPair = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, fc_drop_rate: float = 0.0,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6), init_values: float = 0.0,
                 use_learnable_pos_emb: bool = False, init_scale: float = 0.0, all_frames: int = 16,
                 tubelet_size: int = 2, use_checkpoint: bool = False, use_mean_pooling: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, all_frames, tubelet_size)
        num_patches = self.patch_embed.num_patches
        if use_learnable_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            # A buffer follows .to(device) but is not saved: released checkpoints do not contain it.
            self.register_buffer("pos_embed", get_sinusoid_encoding_table(num_patches, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.blocks = make_blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                                  attn_drop_rate, drop_path_rate, init_values, norm_layer)
        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.fc_dropout = nn.Dropout(p=fc_drop_rate) if fc_drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        self.apply(partial(init_linear_and_norm, linear_init="trunc_normal"))
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's layer-wise lr decay: stem 0, block i -> i+1, norms and head last."""
        return dict(stem=r"^patch_embed|^pos_embed", blocks=r"^blocks\.(\d+)")

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed.to(x.dtype))
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        if self.fc_norm is not None:
            return self.fc_norm(x.mean(1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_dropout(self.forward_features(x)))


# Encoder widths shared with the pre-training models (modeling_pretrain.py).
VIT_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

# Keyword arguments timm's create_model passes that our constructors have no use for.
TIMM_FACTORY_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create_vit(size: str, **kwargs: Any) -> VisionTransformer:
    for k in TIMM_FACTORY_KWARGS:
        kwargs.pop(k, None)
    if "num_frames" in kwargs:  # our name; VideoMAE calls it all_frames
        kwargs["all_frames"] = kwargs.pop("num_frames")
    cfg = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(VIT_SIZES[size])
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def register_factory(name: str, create: Callable[..., nn.Module], module: str) -> None:
    """Register ``create`` with timm under ``name``, replacing timm's image model of the same name (VideoMAE's
    names collide with timm's image ViTs) without the overwrite warning."""
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no hub weights are bundled; load a checkpoint with --finetune/--resume")
        return create(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overwriting.*")
        register_model(entrypoint)


for _size in VIT_SIZES:
    register_factory(f"vit_{_size}_patch16_224", partial(_create_vit, _size), __name__)
CLASSIFIER_MODELS = tuple(f"vit_{size}_patch16_224" for size in VIT_SIZES)


def create_classifier(args: argparse.Namespace) -> VisionTransformer:
    """The classifier ``run_class_finetuning.py`` trains, built from its parsed flags (``model``, ``nb_classes``,
    clip shape, dropouts, pooling, ``model_kwargs``): the one place those flags become constructor arguments (the
    HF export and the tests build through it too). With TSN-style ``--num_segments`` the segments' frames are
    concatenated in time."""
    check_model_kwargs(args.model_kwargs, CLASSIFIER_FLAGS)
    return construct_with_model_kwargs(
        timm.create_model, args.model, args.model_kwargs, num_classes=args.nb_classes,
        num_frames=args.num_frames * max(1, args.num_segments), img_size=args.input_size,
        tubelet_size=args.tubelet_size, drop_rate=args.drop, attn_drop_rate=args.attn_drop_rate,
        drop_path_rate=args.drop_path, fc_drop_rate=args.fc_drop_rate, use_mean_pooling=args.use_mean_pooling,
        use_checkpoint=args.use_checkpoint, init_scale=args.init_scale,
        use_learnable_pos_emb=args.use_learnable_pos_emb)


# Constructor arguments create_classifier sets, and the flag each comes from (all_frames: VideoMAE's num_frames).
CLASSIFIER_FLAGS = {
    "num_classes": "--nb_classes", "num_frames": "--num_frames", "all_frames": "--num_frames",
    "img_size": "--input_size", "tubelet_size": "--tubelet_size", "drop_rate": "--drop",
    "attn_drop_rate": "--attn_drop_rate", "drop_path_rate": "--drop_path", "fc_drop_rate": "--fc_drop_rate",
    "use_mean_pooling": "--use_cls", "use_checkpoint": "--use_checkpoint", "init_scale": "--init_scale",
    "use_learnable_pos_emb": "--use_learnable_pos_emb"}
