"""The video masked autoencoder (VideoMAE layout) with AdaMAE's adaptive token sampler.

``model(videos)`` embeds all tubelets, picks the visible ones (adaptive sampler or a tube / random / frame
mask, drawn on device), encodes only those, and decodes the masked ones. With ``mask_type="adaptive"`` the
state_dict is key for key AdaMAE's released layout; with the other masks it is exactly VideoMAE's.
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from cli import construct_with_model_kwargs, check_model_kwargs
from masking_generator import MaskGenerator, TokenSamplerNet, canonical_mask_type, gumbel_topk, \
    mask_from_visible, num_visible_tokens
from modeling_finetune import TIMM_FACTORY_KWARGS, VIT_SIZES, PatchEmbed, get_sinusoid_encoding_table, \
    init_linear_and_norm, make_blocks, register_factory, run_blocks
from token_ops import gather_tokens, masked_indices


class PretrainOutput(tuple):
    """``(pred, probs, mask)`` as in AdaMAE, unpackable as a 3-tuple.

    ``pred`` ``[B, N_masked, 3*t*p*p]`` in ascending masked-token order; ``probs`` ``[B, N]`` the sampler's
    distribution (None without a sampler); ``mask`` bool ``[B, N]``, True = masked. Two attributes ride along:
    ``log_probs`` (fp32 ``log_softmax``) for a numerically stable sampling loss, and ``masked_idx``
    ``[B, N_masked]``, the masked tokens' indices in ``pred``'s order, which the forward needs anyway and the
    losses and the visualisation reuse instead of sorting the mask again.
    """

    def __new__(cls, pred: torch.Tensor, probs: torch.Tensor | None, mask: torch.Tensor,
                log_probs: torch.Tensor | None, masked_idx: torch.Tensor) -> PretrainOutput:
        out = super().__new__(cls, (pred, probs, mask))
        out.log_probs = log_probs
        out.masked_idx = masked_idx
        return out

    @property
    def pred(self) -> torch.Tensor:
        return self[0]

    @property
    def probs(self) -> torch.Tensor | None:
        return self[1]

    @property
    def mask(self) -> torch.Tensor:
        return self[2]


class PretrainVisionTransformerEncoder(nn.Module):
    """ViT over the visible tokens only; owns AdaMAE's sampler (``pos_embed_probs``, ``get_token_probs``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 init_values: float = 0.0, tubelet_size: int = 2, num_frames: int = 16,
                 use_checkpoint: bool = False, adaptive: bool = False, sampler_type: str = "mha",
                 sampler_depth: int = 1, sampler_dim: int | None = None, sampler_heads: int = 8,
                 sampler_drop: float = 0.1, sampler_temperature: float = 1.0, sampler_detach_input: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        if adaptive:  # registered first so the state_dict order matches AdaMAE's
            num_patches = PatchEmbed(img_size, patch_size, in_chans, 1, num_frames, tubelet_size).num_patches
            self.pos_embed_probs = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        self.register_buffer("pos_embed", get_sinusoid_encoding_table(self.patch_embed.num_patches, embed_dim),
                             persistent=False)
        self.blocks = make_blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                                  attn_drop_rate, drop_path_rate, init_values, norm_layer)
        self.norm = norm_layer(embed_dim)
        self.sampler_temperature = sampler_temperature
        self.sampler_detach_input = sampler_detach_input
        if adaptive:
            self.get_token_probs = TokenSamplerNet(embed_dim, sampler_type, sampler_depth, sampler_dim,
                                                   sampler_heads, sampler_drop)
        else:
            self.get_token_probs = None
        self.apply(init_linear_and_norm)  # Xavier; the Conv3d keeps PyTorch's default init, as released

    def token_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sampler's fp32 ``log_softmax`` over all N tokens, from the raw patch embeddings.

        As in AdaMAE the sampler sees the patch embeddings before the sinusoid is added, so its loss also trains
        the shared patch embedding; ``sampler_detach_input`` stops that.
        """
        if self.sampler_detach_input:
            tokens = tokens.detach()
        logits = self.get_token_probs.logits(tokens + self.pos_embed_probs)
        return torch.log_softmax(logits / self.sampler_temperature, dim=-1)

    def forward(self, tokens: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        x = tokens + self.pos_embed.to(tokens.dtype)
        x = gather_tokens(x, visible_idx)
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        return self.norm(x)


class PretrainVisionTransformerDecoder(nn.Module):
    """Light transformer that predicts the pixels of the last ``num_masked`` tokens of its input."""

    def __init__(self, patch_size: int = 16, num_classes: int = 1536, embed_dim: int = 384, depth: int = 4,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, init_values: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = make_blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                                  attn_drop_rate, drop_path_rate, init_values, norm_layer)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_linear_and_norm)

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        return self.head(self.norm(x[:, -num_masked:]))


class PretrainVisionTransformer(nn.Module):
    """Encoder over visible tokens -> ``encoder_to_decoder`` -> decoder over visible + mask tokens."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, encoder_embed_dim: int = 768,
                 encoder_depth: int = 12, encoder_num_heads: int = 12, decoder_embed_dim: int = 384,
                 decoder_depth: int = 4, decoder_num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 init_values: float = 0.0, tubelet_size: int = 2, num_frames: int = 16, use_checkpoint: bool = False,
                 mask_type: str = "adaptive", mask_ratio: float = 0.95, sampler_type: str = "mha",
                 sampler_depth: int = 1, sampler_dim: int | None = None, sampler_heads: int = 8,
                 sampler_drop: float = 0.1, sampler_temperature: float = 1.0, sampler_detach_input: bool = False):
        super().__init__()
        self.mask_type = canonical_mask_type(mask_type)
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        adaptive = self.mask_type == "adaptive"
        self.encoder = PretrainVisionTransformerEncoder(
            img_size, patch_size, in_chans, encoder_embed_dim, encoder_depth, encoder_num_heads, mlp_ratio,
            qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, init_values, tubelet_size,
            num_frames, use_checkpoint, adaptive, sampler_type, sampler_depth, sampler_dim, sampler_heads,
            sampler_drop, sampler_temperature, sampler_detach_input)
        self.grid_size = self.encoder.patch_embed.grid_size
        self.num_patches = self.encoder.patch_embed.num_patches
        self.num_visible = num_visible_tokens(self.mask_type, self.grid_size, mask_ratio)
        self.mask_generator = None if adaptive else MaskGenerator(self.mask_type, self.grid_size, mask_ratio)
        self.decoder = PretrainVisionTransformerDecoder(
            patch_size, in_chans * tubelet_size * patch_size ** 2, decoder_embed_dim, decoder_depth,
            decoder_num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate,
            norm_layer, init_values, use_checkpoint)
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", get_sinusoid_encoding_table(self.num_patches, decoder_embed_dim),
                             persistent=False)
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The position table and the mask token are not decayed. The sampler's ``encoder.pos_embed_probs`` is, as
        in AdaMAE (its skip list names only ``pos_embed``, ``cls_token``, ``mask_token``);
        ``--no_sampler_pos_weight_decay`` exempts it."""
        return {"pos_embed", "mask_token"}

    @property
    def has_sampler(self) -> bool:
        return self.encoder.get_token_probs is not None

    def sampler_parameters(self) -> list[nn.Parameter]:
        """The token sampler's parameters (none without one). Training logs their gradient norm on its own: the
        total norm is the encoder's and decoder's, and would not show a sampler that stopped learning."""
        if not self.has_sampler:
            return []
        return [self.encoder.pos_embed_probs, *self.encoder.get_token_probs.parameters()]

    def forward(self, videos: torch.Tensor, mask: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> PretrainOutput:
        """``videos`` ``[B, 3, T, H, W]`` ImageNet-normalised; ``mask`` (optional) bool ``[B, N]`` used as is;
        ``noise`` (optional) uniform ``[B, N]`` draws that the mask sampling uses instead of the global RNG."""
        tokens = self.encoder.patch_embed(videos)
        b, n, _ = tokens.shape
        log_probs = self.encoder.token_log_probs(tokens) if self.has_sampler else None
        if mask is None:
            num_visible = self.num_visible
            if log_probs is not None:
                mask = mask_from_visible(gumbel_topk(log_probs.detach(), num_visible, noise), n)
            else:
                mask = self.mask_generator(b, videos.device, noise)
        else:
            mask = mask.to(device=videos.device, dtype=torch.bool).reshape(b, n)
            num_visible = int((~mask[0]).sum())  # a host sync, only for caller-supplied masks
            if bool(((~mask).sum(1) != num_visible).any()):
                raise ValueError("every sample's mask must have the same number of visible tokens")
            if not 0 < num_visible < n:  # the encoder needs a token, the decoder a token to predict
                raise ValueError(f"a mask must leave between 1 and {n - 1} of the {n} tokens visible, not "
                                 f"{num_visible}")
        order = masked_indices(~mask, n)  # visible tokens first, then masked ones, each ascending
        visible_idx, masked_idx = order[:, :num_visible], order[:, num_visible:]

        x = self.encoder_to_decoder(self.encoder(tokens, visible_idx))
        pos = self.pos_embed.to(x.dtype).expand(b, -1, -1)
        x = torch.cat([x + gather_tokens(pos, visible_idx),
                       self.mask_token.to(x.dtype) + gather_tokens(pos, masked_idx)], dim=1)
        pred = self.decoder(x, n - num_visible)
        probs = log_probs.exp() if log_probs is not None else None
        return PretrainOutput(pred, probs, mask, log_probs, masked_idx)


PRETRAIN_DECODER_SIZES: dict[str, dict[str, int]] = {
    "small": dict(decoder_embed_dim=192, decoder_num_heads=3),
    "base": dict(decoder_embed_dim=384, decoder_num_heads=6),
    "large": dict(decoder_embed_dim=512, decoder_num_heads=8),
    "huge": dict(decoder_embed_dim=640, decoder_num_heads=8),
}


def _create_pretrain(size: str, **kwargs: Any) -> PretrainVisionTransformer:
    for k in TIMM_FACTORY_KWARGS + ("num_classes", "global_pool"):
        kwargs.pop(k, None)
    enc = VIT_SIZES[size]
    cfg: dict[str, Any] = dict(encoder_embed_dim=enc["embed_dim"], encoder_depth=enc["depth"],
                               encoder_num_heads=enc["num_heads"], decoder_depth=4, mlp_ratio=4, qkv_bias=True,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(PRETRAIN_DECODER_SIZES[size])
    if "all_frames" in kwargs:
        kwargs["num_frames"] = kwargs.pop("all_frames")
    cfg.update(kwargs)
    return PretrainVisionTransformer(**cfg)


for _size in PRETRAIN_DECODER_SIZES:
    register_factory(f"pretrain_videomae_{_size}_patch16_224", partial(_create_pretrain, _size), __name__)
PRETRAIN_MODELS = tuple(f"pretrain_videomae_{size}_patch16_224" for size in PRETRAIN_DECODER_SIZES)


_FLAG_OF = {"img_size": "input_size", "drop_path_rate": "drop_path"}  # constructor arguments named unlike their flag


def create_pretrain_model(args: argparse.Namespace, **overrides: Any) -> PretrainVisionTransformer:
    """The model ``run_mae_pretraining.py`` trains, built from its parsed flags (``model``, ``mask_type``,
    ``mask_ratio``, ``decoder_depth``, ``num_frames``, ``input_size``, ``tubelet_size``, ``drop_path``,
    ``use_checkpoint``, ``sampler_*``, ``model_kwargs``): the one place flags become constructor arguments, so
    the visualiser and the benchmarks build what training builds. ``overrides`` replace single constructor
    arguments (e.g. ``mask_type``); ``model_kwargs`` may not repeat any of them."""
    kwargs: dict[str, Any] = dict(
        mask_type=args.mask_type, mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth,
        num_frames=args.num_frames, img_size=args.input_size, tubelet_size=args.tubelet_size,
        drop_path_rate=args.drop_path, use_checkpoint=args.use_checkpoint, sampler_type=args.sampler_type,
        sampler_depth=args.sampler_depth, sampler_dim=args.sampler_dim, sampler_heads=args.sampler_heads,
        sampler_temperature=args.sampler_temperature, sampler_detach_input=args.sampler_detach_input)
    kwargs.update(overrides)
    check_model_kwargs(args.model_kwargs, {**{k: "--" + _FLAG_OF.get(k, k) for k in kwargs},
                                           "all_frames": "--num_frames"})  # VideoMAE's name for num_frames
    return construct_with_model_kwargs(timm.create_model, args.model, args.model_kwargs, **kwargs)
