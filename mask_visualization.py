"""Side-by-side pictures of what a video MAE sees and predicts: Video | Prediction | No leak | Error | CAT | Mask.

AdaMAE's project page shows five of these panels per clip, but the code that drew them was never released. They
are the quickest way to check that an adaptive sampler is learning (its categorical distribution "CAT" follows
the moving, hard-to-reconstruct regions) rather than collapsing onto a few tokens.

* :func:`reconstruct_clip` turns the decoder's output back into pixels (visible tubelets copied from the input):
  with normalised targets, VideoMAE's way (each masked tubelet's own statistics, which the model never saw: the
  picture looks better than the model is) or without that leak (statistics interpolated from the visible
  tubelets only).
* :func:`panel_images` runs a model once and returns, per clip, ``uint8 [T, H, W, 3]`` frames for each panel
  plus the sampler statistics (normalised entropy, max probability, motion coverage and the motion coverage a
  uniform random mask gets).
* :func:`contact_sheet` / :func:`animated_gif` draw one clip's panels (PNG grid, GIF with one frame per input
  frame); :func:`log_mask_images` logs a one-frame-per-clip grid to TensorBoard during pre-training.

Everything runs on CPU and draws with PIL (no matplotlib): the colour maps are small lookup tables built here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from losses import masked_token_error, pixel_targets, unnormalize
from masking_generator import mask_from_visible, motion_coverage, motion_energy, sampler_health, uniform_visible
from timm.utils import unwrap_model
from token_ops import denormalize_tubelets, gather_tokens, patchify, scatter_tokens, tubelet_stats, unpatchify

PANEL_KEYS = ("video", "prediction", "no_leak", "error", "cat", "mask")
PANEL_TITLES = ("Video", "Prediction", "No leak", "Error", "CAT", "Mask")
STAT_KEYS = ("entropy", "max_prob", "uniform_max_prob", "motion_coverage", "random_coverage", "error_max",
             "reconstruction_error", "pixel_error", "pixel_error_no_leak", "num_tokens", "num_visible", "mask_type")

# Layout (pixels). Cells are panels upscaled by an integer factor; see ``cell_box``.
PAD = 4
HEADER_H = 16
LABEL_W = 40
FOOTER_H = 44
BAR_H = 8
TOP_FRACTION = 0.2  # motion coverage: share of visible tokens inside the top-20% tubelets by motion energy
RANDOM_DRAWS = 64  # uniform random masks averaged for the comparison figure
DIM = 0.35  # brightness of the grey input shown under visible tokens in the Error panel
BACKGROUND = (255, 255, 255)
NA_FILL = (200, 200, 200)

# Colour maps: a handful of anchor colours (perceptually ordered, dark to bright) linearly interpolated to 256.
_VIRIDIS_ANCHORS = ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
                    (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37))
_INFERNO_ANCHORS = ((0, 0, 4), (27, 12, 65), (74, 12, 107), (120, 28, 109), (165, 44, 96), (207, 68, 70),
                    (237, 105, 37), (251, 155, 6), (247, 209, 61), (252, 255, 164))


def _make_lut(anchors: Sequence[Sequence[int]], size: int = 256) -> np.ndarray:
    a = np.asarray(anchors, dtype=np.float64)
    xp, x = np.linspace(0.0, 1.0, len(a)), np.linspace(0.0, 1.0, size)
    return np.stack([np.interp(x, xp, a[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


COLORMAPS: dict[str, np.ndarray] = {"viridis": _make_lut(_VIRIDIS_ANCHORS), "inferno": _make_lut(_INFERNO_ANCHORS)}
CAT_CMAP, ERROR_CMAP = "viridis", "inferno"


def apply_colormap(values01: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Map values in ``[0, 1]`` (any shape) to ``uint8 [..., 3]`` colours; out-of-range values are clipped."""
    lut = COLORMAPS[name]
    idx = np.clip(np.nan_to_num(np.asarray(values01, dtype=np.float64)), 0.0, 1.0)
    return lut[(idx * (len(lut) - 1)).round().astype(np.int64)]


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return (np.clip(x01, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout in the sampler) and restore each one's own flag afterwards,
    so a model that is mid-training, or has deliberately frozen parts, comes back exactly as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def tokens_to_pixels(values: torch.Tensor, grid: Sequence[int], patch_size: int, tubelet_size: int) -> torch.Tensor:
    """Paint per-token values ``[B, N]`` over their tubelets: ``[B, T, H, W]`` (each token covers ``tubelet``
    frames and ``patch x patch`` pixels, tokens in the model's ``(t, h, w)`` order)."""
    t, h, w = (int(g) for g in grid)
    v = values.reshape(values.shape[0], t, h, w)
    return v.repeat_interleave(tubelet_size, 1).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def reconstruct_clip(videos: torch.Tensor, pred: torch.Tensor, masked_idx: torch.Tensor, patch_size: int,
                     tubelet_size: int, normalize_target: bool = True, eps: float = 1e-6,
                     leak_free: bool = False) -> torch.Tensor:
    """Pixels ``[B, 3, T, H, W]`` in ``[0, 1]``: visible tubelets from the input, masked ones from the prediction.

    ``pred`` and ``masked_idx`` are the model output's (``PretrainOutput.pred`` / ``.masked_idx``). With
    ``normalize_target`` the decoder predicted each tubelet standardised per channel, so the prediction has to be
    mapped back with some mean and scale. VideoMAE's visualisation uses the *original* tubelet's, the ones its
    training target was standardised with (``token_ops.denormalize_tubelets``): the picture then borrows the
    answer's colours and contrast and looks better than the model is. ``leak_free`` uses only what the model
    saw: each masked tubelet's statistics interpolated from the visible tubelets' (inverse squared distance on the
    token grid, Shepard's method), so the picture shows what the model could produce on its own.
    """
    _, _, t, h, w = videos.shape
    grid = (t // tubelet_size, h // patch_size, w // patch_size)
    patches = patchify(unnormalize(videos), patch_size, tubelet_size)  # [B, N, t*p*p, 3]
    idx = masked_idx.to(patches.device)
    orig = gather_tokens(patches, idx)
    rec = pred.detach().float().to(patches.device).reshape(orig.shape)
    if normalize_target and leak_free:
        mean, scale = _visible_stats(patches, idx, grid, eps)
        rec = rec * scale + mean
    elif normalize_target:
        rec = denormalize_tubelets(rec, orig, eps)
    patches = scatter_tokens(patches, idx, rec)
    return unpatchify(patches.flatten(2), grid, patch_size, tubelet_size).clamp(0.0, 1.0)


def _visible_stats(patches: torch.Tensor, masked_idx: torch.Tensor, grid: tuple[int, int, int], eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per masked token ``[B, M, 1, C]`` mean and scale: the visible tubelets' (``tubelet_stats``) averaged with
    weights 1 / (squared token-grid distance)."""
    mean, scale = tubelet_stats(patches, eps)  # [B, N, 1, C]
    b, n = patches.shape[:2]
    coords = torch.stack(torch.meshgrid(*(torch.arange(g, device=patches.device) for g in grid), indexing="ij"),
                         -1).reshape(n, 3).float()
    d2 = torch.cdist(coords, coords).square()  # [N, N]
    visible = torch.ones(b, n, dtype=torch.bool, device=patches.device).scatter_(1, masked_idx, False)
    weights = torch.where(visible[:, None, :], 1.0 / d2.clamp_min(1.0)[None], torch.zeros((), device=d2.device))
    weights = gather_tokens(weights, masked_idx)  # [B, M, N]: rows of the masked tokens
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ mean.flatten(2)).unsqueeze(2), (weights @ scale.flatten(2)).unsqueeze(2)


def _random_coverage(energy: torch.Tensor, num_visible: int, seed: int) -> float:
    """Mean motion coverage of ``RANDOM_DRAWS`` uniform random masks with ``num_visible`` visible tokens."""
    n = energy.shape[1]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(RANDOM_DRAWS, n, generator=gen).to(energy.device)
    masks = mask_from_visible(uniform_visible(RANDOM_DRAWS, n, num_visible, energy.device, noise), n)
    return float(motion_coverage(masks, energy.expand(RANDOM_DRAWS, -1), TOP_FRACTION))


def panel_images(model: nn.Module, videos: torch.Tensor, mask: torch.Tensor | None = None,
                 normalize_target: bool = True, seed: int | None = 0, loss_type: str = "mse") -> list[dict[str, Any]]:
    """Run ``model`` once (eval mode, no grad, fp32; its train/eval flags are restored) on ImageNet-normalised
    ``videos`` ``[B, 3, T, H, W]`` and return one dict per clip.

    Panels, ``uint8 [T, H, W, 3]``: ``video``; ``prediction`` (:func:`reconstruct_clip`, VideoMAE's way);
    ``no_leak`` (the same without the masked tubelets' own statistics; equal to ``prediction`` for raw-pixel
    targets, which have nothing to leak); ``error`` (per-token
    reconstruction error of masked tokens, inferno, scaled 0..``error_max`` per clip; visible tokens show the
    input dimmed in grey); ``cat`` (the sampler's probability per token painted over its tubelet, viridis,
    scaled 0..``max_prob`` per clip; None without a sampler); ``mask`` (visible tubelets, masked ones black).
    Raw values: ``cat_values`` / ``error_values`` float32 ``[T, H, W]`` (token values painted over their pixels,
    so ``cat_values.sum() / (tubelet * patch**2) == 1``), ``visible`` bool ``[N]``, ``probs`` float32 ``[N]``.
    Stats (``STAT_KEYS``): ``entropy`` (H(p)/log N), ``max_prob`` (None without a sampler), ``uniform_max_prob``
    (1/N), ``motion_coverage`` / ``random_coverage`` (share of visible tokens in the top-20% tubelets by
    temporal-difference energy, for this mask and for uniform random masks of the same size), ``error_max``,
    ``reconstruction_error`` (mean over masked tokens: the loss), ``pixel_error`` / ``pixel_error_no_leak``
    (mean squared error of the two pictures against the input over the masked pixels, in [0, 1] units: how much
    better the leak makes the picture look), ``num_tokens``, ``num_visible``, ``mask_type``.

    ``seed`` fixes the mask draw through a private generator (the global RNG is untouched, so calling this
    during training does not change the run); None uses the global RNG. A given ``mask`` is used as is.
    """
    net = unwrap_model(model)
    patch, tubelet = int(net.patch_size), int(net.tubelet_size)
    device = next(net.parameters()).device
    videos = videos.detach().to(device=device, dtype=torch.float32)
    b, n = videos.shape[0], int(net.num_patches)
    noise = None
    if mask is None and seed is not None:
        noise = torch.rand(b, n, generator=torch.Generator().manual_seed(int(seed))).to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False), eval_mode(net):
        out = net(videos, mask=mask, noise=noise)
        probs, mask = out.probs, out.mask
        grid = tuple(int(g) for g in net.grid_size)
        target = pixel_targets(videos, patch, tubelet, normalize=normalize_target)
        err_masked = masked_token_error(out, target, loss_type)  # as training scores it
        err = scatter_tokens(torch.zeros(b, n, device=device), out.masked_idx, err_masked)
        video01 = unnormalize(videos)
        energy = motion_energy(video01, patch, tubelet)
        rec01 = reconstruct_clip(videos, out.pred, out.masked_idx, patch, tubelet, normalize_target)
        rec01_no_leak = reconstruct_clip(videos, out.pred, out.masked_idx, patch, tubelet, normalize_target,
                                         leak_free=True)
        masked_px = 1.0 - tokens_to_pixels((~mask).float(), grid, patch, tubelet)  # [B, T, H, W]
        pixel_err = [((r - video01.clamp(0, 1)).square().mean(1) * masked_px).flatten(1).sum(1)
                     / masked_px.flatten(1).sum(1).clamp_min(1) for r in (rec01, rec01_no_leak)]
        visible_px = tokens_to_pixels((~mask).float(), grid, patch, tubelet)
        err_px = tokens_to_pixels(err, grid, patch, tubelet)
        cat_px = tokens_to_pixels(probs.float(), grid, patch, tubelet) if probs is not None else None

    def hwc(x: torch.Tensor) -> np.ndarray:  # [3, T, H, W] -> [T, H, W, 3]
        return x.permute(1, 2, 3, 0).cpu().numpy()

    clips = []
    for i in range(b):
        v01 = np.clip(hwc(video01[i]), 0.0, 1.0)
        vis = visible_px[i].cpu().numpy().astype(bool)
        e = err_px[i].cpu().numpy().astype(np.float32)
        e_max = float(err_masked[i].max())
        grey = np.repeat(v01.mean(-1, keepdims=True) * DIM, 3, axis=-1)
        error = np.where(vis[..., None], _to_uint8(grey), apply_colormap(e / max(e_max, 1e-12), ERROR_CMAP))
        d: dict[str, Any] = {
            "video": _to_uint8(v01),
            "prediction": _to_uint8(hwc(rec01[i])),
            "no_leak": _to_uint8(hwc(rec01_no_leak[i])),
            "error": error,
            "cat": None,
            "mask": _to_uint8(v01 * vis[..., None]),
            "error_values": e,
            "cat_values": None,
            "visible": (~mask[i]).cpu().numpy(),
            "probs": None,
            "entropy": None,
            "max_prob": None,
            "uniform_max_prob": 1.0 / n,
            "motion_coverage": float(motion_coverage(mask[i:i + 1], energy[i:i + 1], TOP_FRACTION)),
            "random_coverage": _random_coverage(energy[i:i + 1], int((~mask[i]).sum()), (seed or 0) + 1),
            "error_max": e_max,
            "reconstruction_error": float(err_masked[i].mean()),
            "pixel_error": float(pixel_err[0][i]),
            "pixel_error_no_leak": float(pixel_err[1][i]),
            "num_tokens": n,
            "num_visible": int((~mask[i]).sum()),
            "mask_type": str(net.mask_type),
            "patch_size": patch,
            "tubelet_size": tubelet,
        }
        if probs is not None:
            entropy, max_prob = sampler_health(probs[i:i + 1])
            c = cat_px[i].cpu().numpy().astype(np.float32)
            d.update(entropy=float(entropy), max_prob=float(max_prob), cat_values=c,
                     probs=probs[i].float().cpu().numpy(),
                     cat=apply_colormap(c / max(float(max_prob), 1e-12), CAT_CMAP))
        clips.append(d)
    return clips


def clip_stats(panels: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly statistics of one clip (``STAT_KEYS``)."""
    return {k: panels.get(k) for k in STAT_KEYS}


def format_stats(panels: dict[str, Any], compact: bool = False) -> str:
    """One line: sampler health (or "no sampler") and motion coverage against a uniform random mask."""
    if compact:
        s = (f"H={panels['entropy']:.3f} max p={panels['max_prob']:.3g}" if panels.get("max_prob") is not None
             else f"{panels['mask_type']} mask")
        return (f"{s} motion cov={100 * panels['motion_coverage']:.0f}% "
                f"(random {100 * panels['random_coverage']:.0f}%)")
    if panels.get("max_prob") is not None:
        s = (f"entropy {panels['entropy']:.3f}  max p {panels['max_prob']:.4f} "
             f"(uniform {panels['uniform_max_prob']:.4f})")
    else:
        s = f"no sampler ({panels['mask_type']} mask)"
    return (f"{s}  motion coverage {100 * panels['motion_coverage']:.1f}% "
            f"(uniform random mask {100 * panels['random_coverage']:.1f}%)  visible {panels['num_visible']}"
            f"/{panels['num_tokens']}")


# ------------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------------

_FONT: Union[ImageFont.ImageFont, ImageFont.FreeTypeFont] | None = None


def _font() -> Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def panel_scale(height: int, width: int, min_size: int = 128) -> int:
    """Integer nearest-neighbour upscale factor that makes a panel's short side at least ``min_size`` px."""
    return max(1, math.ceil(min_size / max(1, min(height, width))))


def cell_box(row: int, col: int, cell_h: int, cell_w: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of panel ``col`` in row ``row`` of a sheet (cells already upscaled)."""
    x0 = LABEL_W + PAD + col * (cell_w + PAD)
    y0 = HEADER_H + PAD + row * (cell_h + PAD)
    return x0, y0, x0 + cell_w, y0 + cell_h


def sheet_size(rows: int, cell_h: int, cell_w: int, footer_h: int = FOOTER_H) -> tuple[int, int]:
    """``(width, height)`` of a sheet with ``rows`` rows of the panels (``PANEL_KEYS``)."""
    return LABEL_W + len(PANEL_KEYS) * (cell_w + PAD) + PAD, HEADER_H + rows * (cell_h + PAD) + PAD + footer_h


def _upscale(img: np.ndarray, s: int) -> np.ndarray:
    return img if s == 1 else np.repeat(np.repeat(img, s, axis=0), s, axis=1)


def _draw_grid(rows: list[list[np.ndarray | None]], labels: Sequence[str], scale: int, footer_h: int,
               na_text: str = "n/a") -> tuple[Image.Image, ImageDraw.ImageDraw, int, int]:
    """Titles, row labels and cells (None cells grey with ``na_text``); returns the image, its drawer and the
    cell size so the caller can fill the footer."""
    h, w = next(c for c in rows[0] if c is not None).shape[:2]
    ch, cw = h * scale, w * scale
    img = Image.new("RGB", sheet_size(len(rows), ch, cw, footer_h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()
    for col, title in enumerate(PANEL_TITLES):
        x0, _, _, _ = cell_box(0, col, ch, cw)
        draw.text((x0 + 2, 2), title, fill=(0, 0, 0), font=font)
    for r, (cells, label) in enumerate(zip(rows, labels)):
        _, y0, _, _ = cell_box(r, 0, ch, cw)
        draw.text((2, y0 + 2), label, fill=(0, 0, 0), font=font)
        for col, cell in enumerate(cells):
            box = cell_box(r, col, ch, cw)
            if cell is None:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=NA_FILL)
                draw.text((box[0] + cw // 2 - 8, box[1] + ch // 2 - 6), na_text, fill=(60, 60, 60), font=font)
            else:
                img.paste(Image.fromarray(_upscale(cell, scale)), box[:2])
    return img, draw, ch, cw


def _colour_bar(img: Image.Image, draw: ImageDraw.ImageDraw, x0: int, y0: int, width: int, cmap: str,
                caption: str) -> None:
    bar = apply_colormap(np.linspace(0.0, 1.0, max(width, 2))[None, :].repeat(BAR_H, 0), cmap)
    img.paste(Image.fromarray(bar), (x0, y0))
    draw.rectangle((x0, y0, x0 + width - 1, y0 + BAR_H - 1), outline=(0, 0, 0))
    draw.text((x0, y0 + BAR_H + 1), caption, fill=(0, 0, 0), font=_font())


def _sheet_frames(panels: dict[str, Any], frames: Union[str, Sequence[int], None]) -> list[int]:
    t = panels["video"].shape[0]
    if frames is None or frames == "tubelet":
        return list(range(0, t, int(panels.get("tubelet_size", 1))))
    if frames == "all":
        return list(range(t))
    out = [int(f) for f in frames]
    if not out or any(f < 0 or f >= t for f in out):
        raise ValueError(f"frames must be indices in [0, {t}), got {out}")
    return out


def contact_sheet(panels: dict[str, Any], frames: Union[str, Sequence[int], None] = None,
                  min_size: int = 128) -> Image.Image:
    """One clip's panels as a PNG-ready grid: a row per frame in ``frames`` (default ``"tubelet"``: the first
    frame of every tubelet; ``"all"``: every frame; or a list of indices), the columns titled
    Video | Prediction | No leak | Error | CAT | Mask, and a footer with the Error and CAT colour scales and the
    stats.
    Panels are upscaled by :func:`panel_scale` (nearest neighbour) so a 32 px clip stays legible."""
    idx = _sheet_frames(panels, frames)
    h, w = panels["video"].shape[1:3]
    scale = panel_scale(h, w, min_size)
    rows = [[None if panels[k] is None else panels[k][f] for k in PANEL_KEYS] for f in idx]
    img, draw, ch, cw = _draw_grid(rows, [f"t={f}" for f in idx], scale, FOOTER_H)
    y0 = img.height - FOOTER_H + 2
    ex, _, _, _ = cell_box(0, PANEL_KEYS.index("error"), ch, cw)
    _colour_bar(img, draw, ex, y0, cw, ERROR_CMAP, f"0..max err={panels['error_max']:.3g}")
    cx, _, _, _ = cell_box(0, PANEL_KEYS.index("cat"), ch, cw)
    if panels.get("cat") is not None:
        _colour_bar(img, draw, cx, y0, cw, CAT_CMAP, f"0..max p={panels['max_prob']:.3g}")
    else:
        draw.text((cx, y0), f"n/a: {panels['mask_type']} mask", fill=(0, 0, 0), font=_font())
    if panels.get("max_prob") is not None:
        line = (f"H/logN={panels['entropy']:.3f}  max p={panels['max_prob']:.4f} (1/N={panels['uniform_max_prob']:.4f})"
                f"  motion cov={100 * panels['motion_coverage']:.1f}% (random {100 * panels['random_coverage']:.1f}%)")
    else:
        line = (f"{panels['mask_type']} mask  motion cov={100 * panels['motion_coverage']:.1f}% "
                f"(random {100 * panels['random_coverage']:.1f}%)")
    draw.text((PAD, y0 + BAR_H + 15), line, fill=(0, 0, 0), font=_font())
    return img


def animated_gif(panels: dict[str, Any], path: str, fps: float = 8.0, min_size: int = 128) -> int:
    """Write ``path`` as an endlessly looping GIF with one frame per input frame (a one-row
    :func:`contact_sheet`, labelled ``t=i`` so no two frames are identical and none get merged); returns the
    number of frames written."""
    t = panels["video"].shape[0]
    frames = [contact_sheet(panels, [i], min_size) for i in range(t)]
    duration = max(20, int(round(1000.0 / max(fps, 1e-3))))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0, optimize=False,
                   disposal=1)
    return t


def mask_grid(clips: Sequence[dict[str, Any]], frame: int | None = None, min_size: int = 96) -> np.ndarray:
    """``uint8 [H, W, 3]``: one row per clip (the panels at ``frame``, default the first frame of the
    middle tubelet) with a stats line per clip underneath."""
    t = clips[0]["video"].shape[0]
    tub = int(clips[0].get("tubelet_size", 1))
    f = (t // tub // 2) * tub if frame is None else int(frame)
    if not 0 <= f < t:
        raise ValueError(f"frame must be in [0, {t}), got {f}")
    h, w = clips[0]["video"].shape[1:3]
    rows = [[None if c[k] is None else c[k][f] for k in PANEL_KEYS] for c in clips]
    line_h = 12
    img, draw, _, _ = _draw_grid(rows, [f"#{i}" for i in range(len(clips))], panel_scale(h, w, min_size),
                                 line_h * len(clips) + PAD)
    y = img.height - line_h * len(clips) - PAD // 2
    for i, c in enumerate(clips):
        draw.text((PAD, y + i * line_h), f"#{i} t={f}: {format_stats(c, compact=True)}", fill=(0, 0, 0), font=_font())
    return np.asarray(img)


def log_mask_images(log_writer: Any, model: nn.Module, videos: torch.Tensor, step: int, tag: str = "vis/masks",
                    normalize_target: bool = True, seed: int = 0, max_clips: int = 4, frame: int | None = None,
                    min_size: int = 96, loss_type: str = "mse") -> np.ndarray | None:
    """Log the Video | Prediction | No leak | Error | CAT | Mask grid of the first ``max_clips`` of ``videos`` (a fixed
    ImageNet-normalised batch ``[B, 3, T, H, W]``) as one image at ``step``, so TensorBoard's step slider shows the
    sampler's mask evolving over pre-training.

    ``log_writer`` is a ``metric_logging.TensorboardLogger`` (a no-op off rank 0: nothing is computed there) or a
    ``SummaryWriter``. ``model`` may be DDP / compiled: the bare module is run (no collectives, so calling this
    on rank 0 only is safe), in eval mode and without gradients, and every submodule's train/eval flag is
    restored. The mask is drawn from ``seed`` with a private generator, so the training RNG stream is unchanged
    and the same clips get comparable masks at every call. Returns the ``[H, W, 3]`` uint8 image (None when
    nothing was logged). ``loss_type`` scores the Error panel as training does.
    """
    if log_writer is None or getattr(log_writer, "writer", True) is None:
        return None
    clips = panel_images(model, videos[:max_clips], normalize_target=normalize_target, seed=seed, loss_type=loss_type)
    img = mask_grid(clips, frame, min_size)
    log_writer.add_images(tag, img[None], step, dataformats="NHWC")
    return img
