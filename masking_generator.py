"""Token masks for video MAE pre-training: tube, random, frame, and AdaMAE's adaptive sampler.

Every mask is drawn with torch on the model's device (no numpy, no host round trip, no ``.item()``), so a
training step never waits on the host. Masks are bool ``[B, N]`` with True = masked; every sample in a batch
has the same number of visible tokens, which keeps all gathers dense and shapes static.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from modeling_finetune import Block

MASK_TYPES = ("tube", "random", "frame", "adaptive")
_ALIASES = {"learnable": "adaptive", "tubelet": "tube"}


def canonical_mask_type(mask_type: str) -> str:
    """Map accepted names (AdaMAE calls the adaptive mask ``learnable``) to one of ``MASK_TYPES``."""
    name = _ALIASES.get(mask_type, mask_type)
    if name not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose from {MASK_TYPES + tuple(_ALIASES)}")
    return name


def _floor(x: float) -> int:
    """floor() that ignores float noise: 10 * (1 - 0.9) is 0.9999999999999998, which must count as 1."""
    return math.floor(round(x, 6))


def num_visible_tokens(mask_type: str, grid: Sequence[int], mask_ratio: float) -> int:
    """Visible tokens per clip, following each mask's reference implementation.

    adaptive (AdaMAE): ``floor(N * (1 - ratio))`` visible, e.g. 78 of 1568 at 0.95.
    random (AdaMAE's generator): ``floor(N * ratio)`` masked.
    tube (VideoMAE): ``floor(H*W * ratio)`` masked per frame, e.g. 20 visible per time slice at 0.9 (160 total).
    frame: ``floor(T * ratio)`` whole time slices masked, e.g. 1 of 8 visible at 0.875.
    """
    t, h, w = (int(g) for g in grid)
    hw, n = h * w, t * h * w
    kind = canonical_mask_type(mask_type)
    if kind == "adaptive":
        n_vis = _floor(n * (1.0 - mask_ratio))
    elif kind == "random":
        n_vis = n - _floor(n * mask_ratio)
    elif kind == "tube":
        n_vis = t * (hw - _floor(hw * mask_ratio))
    else:
        n_vis = (t - _floor(t * mask_ratio)) * hw
    if not 0 < n_vis < n:
        raise ValueError(f"mask_ratio={mask_ratio} leaves {n_vis} of {n} tokens visible with {mask_type} masking "
                         f"on a {t}x{h}x{w} token grid; need at least one visible and one masked token")
    return n_vis


def mask_from_visible(visible_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bool mask ``[B, num_tokens]``, True everywhere except at ``visible_idx``."""
    mask = torch.ones(visible_idx.shape[0], num_tokens, dtype=torch.bool, device=visible_idx.device)
    return mask.scatter_(1, visible_idx, False)


def uniform_visible(batch: int, num_tokens: int, num_visible: int, device: torch.device,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of ``num_visible`` tokens per row drawn uniformly without replacement.

    ``noise`` (uniform ``[0, 1)``, at least ``num_tokens`` columns) replaces the internal draw, so a caller can
    make masks a function of the sample rather than of the process (see ``engine_for_pretraining.mask_noise``).
    """
    scores = torch.rand(batch, num_tokens, device=device) if noise is None else noise[:, :num_tokens]
    return scores.topk(num_visible, dim=1).indices


def gumbel_topk(log_probs: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw ``k`` distinct indices per row without replacement from ``softmax(log_probs)``.

    Adding Gumbel noise and keeping the top k is distributed exactly like k successive categorical draws
    without replacement (Kool et al., 2019), i.e. like ``torch.multinomial(p, k, replacement=False)``, but it is
    one ``topk`` and still returns k distinct tokens when fewer than k have non-zero probability, where
    ``torch.multinomial`` raises. ``noise`` optionally supplies the uniform draws.
    """
    if noise is None:
        gumbel = -torch.empty_like(log_probs, dtype=torch.float32).exponential_().log()
    else:  # -log(-log U) is Gumbel(0, 1); clamping keeps U = 0 finite
        gumbel = -(-noise.float().clamp_min(1e-20).log()).log()
    return (log_probs.float() + gumbel).topk(k, dim=-1).indices


class MaskGenerator:
    """Non-adaptive masks (tube / random / frame) for a ``(T', H', W')`` token grid."""

    def __init__(self, mask_type: str, grid: Sequence[int], mask_ratio: float):
        self.mask_type = canonical_mask_type(mask_type)
        if self.mask_type == "adaptive":
            raise ValueError("adaptive masks come from the model's token sampler, not a MaskGenerator")
        self.grid = tuple(int(g) for g in grid)
        self.mask_ratio = mask_ratio
        self.num_visible = num_visible_tokens(self.mask_type, self.grid, mask_ratio)

    def __repr__(self) -> str:
        return f"MaskGenerator({self.mask_type}, grid={self.grid}, ratio={self.mask_ratio}, visible={self.num_visible})"

    def __call__(self, batch: int, device: torch.device, noise: torch.Tensor | None = None) -> torch.Tensor:
        t, h, w = self.grid
        n = t * h * w
        if self.mask_type == "random":
            return mask_from_visible(uniform_visible(batch, n, self.num_visible, device, noise), n)
        if self.mask_type == "tube":  # one spatial mask repeated over every time slice
            spatial = mask_from_visible(uniform_visible(batch, h * w, self.num_visible // t, device, noise), h * w)
            return spatial[:, None, :].expand(batch, t, h * w).reshape(batch, n)
        frames = mask_from_visible(uniform_visible(batch, t, self.num_visible // (h * w), device, noise), t)
        return frames[:, :, None].expand(batch, t, h * w).reshape(batch, n)


class TokenMLP(nn.Module):
    """Per-token residual MLP: the "MLP" sampler of AdaMAE's ablation (no interaction between tokens)."""

    def __init__(self, dim: int, drop: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, drop=(0.0, drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TokenSamplerNet(nn.Sequential):
    """AdaMAE's token-scoring network: ``[proj?] -> body -> Linear(d, 1) -> Flatten``.

    With defaults (``mha``, depth 1, width = encoder width) it is exactly AdaMAE's ``get_token_probs``: one
    qkv-bias-free transformer block with 8 heads, dropout 0.1 and LayerNorm eps 1e-5, then one logit per token,
    so released checkpoints load key for key.
    """

    def __init__(self, embed_dim: int, sampler_type: str = "mha", depth: int = 1, dim: int | None = None,
                 num_heads: int = 8, drop: float = 0.1):
        if sampler_type not in ("mha", "mlp"):
            raise ValueError(f"sampler_type must be 'mha' or 'mlp', got {sampler_type!r}")
        dim = dim or embed_dim
        layers: list[nn.Module] = [nn.Linear(embed_dim, dim)] if dim != embed_dim else []
        for _ in range(depth):
            if sampler_type == "mha":
                layers.append(Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=drop,
                                    norm_layer=nn.LayerNorm))
            else:
                layers.append(TokenMLP(dim, drop))
        layers += [nn.Linear(dim, 1), nn.Flatten(1)]
        super().__init__(*layers)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token logits ``[B, N]``; the last projection runs in fp32 even under autocast."""
        x = tokens
        for layer in list(self)[:-2]:
            x = layer(x)
        head = self[-2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), head.weight.float(), head.bias.float()).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------
# Mask statistics: is the sampler learning, or collapsing?
# ------------------------------------------------------------------------------------------------------------

def motion_energy(videos01: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """Temporal-difference energy per tubelet ``[B, N]`` from ``[0, 1]`` clips ``[B, 3, T, H, W]``.

    Squared frame-to-frame differences (the first frame reuses the first difference), averaged over each
    tubelet's pixels and channels, in the model's ``(t, h, w)`` token order.
    """
    v = videos01.float()
    diff = (v[:, :, 1:] - v[:, :, :-1]).square().mean(1)  # [B, T-1, H, W]
    diff = torch.cat([diff[:, :1], diff], dim=1)
    pooled = F.avg_pool3d(diff[:, None], kernel_size=(tubelet_size, patch_size, patch_size))
    return pooled.flatten(1)


def motion_coverage(mask: torch.Tensor, energy: torch.Tensor, top_fraction: float = 0.2) -> torch.Tensor:
    """Share of visible tokens that lie in each clip's top ``top_fraction`` tubelets by motion energy.

    A uniform random mask scores about ``top_fraction``; a sampler that favours moving regions scores higher.
    Returns the batch mean as a 0-d tensor (no host sync).
    """
    n = energy.shape[1]
    k = max(1, round(top_fraction * n))
    top = torch.zeros_like(mask).scatter_(1, energy.topk(k, dim=1).indices, True)
    visible = ~mask
    return ((visible & top).sum(1).float() / visible.sum(1).clamp_min(1).float()).mean()


def sampler_health(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised entropy ``H(p) / log N`` (1 = uniform, near 0 = collapsed) and max probability, batch means."""
    n = probs.shape[1]
    p = probs.float()
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1) / math.log(n)
    return entropy.mean(), p.max(1).values.mean()
