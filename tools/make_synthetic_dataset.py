"""Write a small synthetic video classification dataset whose classes can only be told apart by motion.

Each video: a textured, low-contrast static background (smooth noise, plus slight per-frame noise), one textured object
that moves according to the class, and (``--distractor_prob``, off by default) a second, static textured
distractor. Off by default because in a minutes-long pre-training run the model cannot yet copy a static texture
from other time slices, so a distractor would draw the sampler's attention away from motion. A single frame says
nothing about the class (object texture, position and background are random), so a model has to use motion,
as on SSv2. Classes are invariant to horizontal flipping (so the default flip augmentation is safe):

    0 up, 1 down, 2 horizontal (left or right), 3 circle (either direction),
    4 vertical bounce, 5 grow (approach), 6 shrink (recede), 7 static

Videos are real H.264 .mp4 or VP9 .webm files written with PyAV (single-threaded encoder, fixed settings). The
frames are a function of the seed; the encoded bytes are not always: on the dev machine (PyAV 18.1, its libx264)
encoding the same frames again gave different bytes for a few of every dozen videos, so a freshly generated set
trains to slightly different numbers (the quickstart's epoch-20 motion coverage 0.281-0.283).
Lists ``train.csv`` / ``val.csv`` / ``test.csv`` use VideoMAE's ``path label``
format (absolute paths unless ``--relative``, then relative to ``--out``, to be used with ``--data_root``).

    python tools/make_synthetic_dataset.py --out data/synthetic --num_videos 240 --num_classes 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import UserError, at_least, make_output_dir  # noqa: E402

CLASS_NAMES = ["up", "down", "horizontal", "circle", "bounce", "grow", "shrink", "static"]
BACKGROUND_RANGE = (90.0, 165.0)  # grey levels of the background's colour grid (see render_video)


def write_video(path: str, frames: np.ndarray, fmt: str | None = None, fps: int = 25,
                gop: int | None = None, crf: int = 23, tune: str | None = None) -> None:
    """Encode ``uint8 [T, H, W, 3]`` RGB frames (H, W even) to H.264 .mp4 or VP9 .webm with PyAV."""
    import av

    fmt = fmt or os.path.splitext(path)[1].lstrip(".")
    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}[fmt]
    t, h, w, _ = frames.shape
    if codec == "libx264":
        options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        if tune:
            options["tune"] = tune
    else:
        options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1",
                   "row-mt": "0"}
    try:
        with av.open(path, "w", options={"fflags": "+bitexact"}) as c:  # no random UIDs / dates in the container
            s = c.add_stream(codec, rate=fps, options=options)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            if gop:
                s.codec_context.gop_size = gop
            for f in frames:
                for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    except av.error.FFmpegError as e:
        if codec == "libvpx-vp9" and "decord" in sys.modules:
            # Seen with decord 0.6.0 and PyAV 18.1: once decord (and its own FFmpeg) is imported first, PyAV's VP9
            # encoder fails to open with EINVAL; decoding, and H.264 encoding, are unaffected.
            raise RuntimeError(f"{path}: PyAV cannot open the VP9 encoder in a process that imported decord "
                               f"before av ({e}); import av first, or write the videos in another process") from e
        raise


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, lo: float = 40.0,
                  hi: float = 215.0) -> np.ndarray:
    """Smooth colour noise: a coarse random grid of values in ``[lo, hi]``, bilinearly upsampled (``[h, w, 3]``)."""
    g = rng.uniform(lo, hi, size=(cells + 1, cells + 1, 3))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a, b = g[y0][:, x0], g[y0][:, x0 + 1]
    c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx)


def _object_texture(rng: np.random.Generator, s: int) -> np.ndarray:
    """High-contrast blocky texture so the object stands out from the smooth background."""
    k = max(2, s // 4)
    blocks = rng.choice([20.0, 235.0], size=(k, k, 3))
    tex = np.repeat(np.repeat(blocks, -(-s // k), 0), -(-s // k), 1)[:s, :s]
    return np.clip(tex + rng.normal(0, 12, size=tex.shape), 0, 255)


def _trajectory(cls: int, rng: np.random.Generator, frames: int, size: int, obj: int):
    """Per-frame (y, x, side) of the moving object for class ``cls``."""
    t = np.arange(frames, dtype=np.float64)
    room = size - obj
    travel = rng.uniform(0.5, 0.75) * room
    v = travel / max(frames - 1, 1)
    sides = np.full(frames, obj, dtype=np.float64)
    cx = rng.uniform(0, room)
    cy = rng.uniform(0, room)
    if cls in (0, 1):  # up / down
        y0 = rng.uniform(travel, room) if cls == 0 else rng.uniform(0, room - travel)
        y = y0 - v * t if cls == 0 else y0 + v * t
        x = np.full(frames, cx)
    elif cls == 2:  # horizontal, random direction
        sign = rng.choice([-1.0, 1.0])
        x0 = rng.uniform(travel, room) if sign < 0 else rng.uniform(0, room - travel)
        x, y = x0 + sign * v * t, np.full(frames, cy)
    elif cls == 3:  # circle, random direction and phase
        r = rng.uniform(0.25, 0.4) * room
        c0 = room / 2
        ph, sign = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
        ang = ph + sign * 2 * np.pi * t / frames * rng.uniform(0.8, 1.2)
        y, x = c0 + r * np.sin(ang), c0 + r * np.cos(ang)
    elif cls == 4:  # vertical bounce: down and up again
        amp = rng.uniform(0.3, 0.45) * room
        y0 = rng.uniform(0, room - amp)
        y = y0 + amp * np.abs(np.sin(np.pi * t / frames * 2))
        x = np.full(frames, cx)
    elif cls in (5, 6):  # grow / shrink around a fixed centre
        lo, hi = obj * 0.4, obj * 1.5
        sides = np.linspace(lo, hi, frames) if cls == 5 else np.linspace(hi, lo, frames)
        ccy, ccx = size / 2 + rng.uniform(-0.15, 0.15) * size, size / 2 + rng.uniform(-0.15, 0.15) * size
        y, x = ccy - sides / 2, ccx - sides / 2
    else:  # static
        y, x = np.full(frames, cy), np.full(frames, cx)
    return y, x, sides


def _paste(img: np.ndarray, tex: np.ndarray, y: float, x: float, side: float) -> None:
    s = max(2, int(round(side)))
    idx = (np.arange(s) * tex.shape[0] / s).astype(int)
    patch = tex[idx][:, idx]
    h, w = img.shape[:2]
    y0, x0 = int(round(y)), int(round(x))
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + s, h), min(x0 + s, w)
    if ya < yb and xa < xb:
        img[ya:yb, xa:xb] = patch[ya - y0:yb - y0, xa - x0:xb - x0]


def render_video(cls: int, rng: np.random.Generator, size: int = 112, frames: int = 32,
                 distractor_prob: float = 0.0) -> np.ndarray:
    """``uint8 [frames, size, size, 3]`` for class ``cls``."""
    # Background detail at about the patch scale (8-12 px cells at 112 px), but of low contrast (grey levels
    # BACKGROUND_RANGE, against 20/235 for the object): where a small MAE has not yet learned to copy the static
    # background from other time slices, its reconstruction error is then mostly on the moving object, which is the
    # signal AdaMAE's sampler learns from (8-9x more error on moving tubelets; with a 40-215 background, 2.2x, and
    # the quickstart's sampler did not learn to prefer motion).
    cells = int(rng.integers(max(3, size // 14), max(4, size // 9) + 1))
    bg = _smooth_noise(rng, size, size, cells, *BACKGROUND_RANGE)
    obj = max(6, int(size * rng.uniform(0.18, 0.26)))
    tex = _object_texture(rng, obj * 2)
    y, x, sides = _trajectory(cls, rng, frames, size, obj)
    distractor = None
    if rng.random() < distractor_prob:
        ds = max(4, int(size * rng.uniform(0.12, 0.2)))
        distractor = (_object_texture(rng, ds), rng.uniform(0, size - ds), rng.uniform(0, size - ds), ds)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        img = bg + rng.normal(0, 2, size=bg.shape)
        if distractor is not None:
            _paste(img, *distractor)
        _paste(img, tex, y[i], x[i], sides[i])
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def settings_problem(out_dir: str, num_classes: int, fmt: str, size: int, relative: bool,
                     distractor_prob: float) -> str | None:
    """What is wrong with these settings (named as the command line's flags), or None."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        return f"--num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}"
    if fmt not in ("mp4", "webm"):
        return f"--format must be mp4 or webm, got {fmt!r}"
    if size % 2 or size < 8:
        return f"--size must be even (yuv420p) and >= 8, got {size}"
    if not 0.0 <= distractor_prob <= 1.0:
        return f"--distractor_prob must be in [0, 1], got {distractor_prob}"
    if not relative and "," in os.path.abspath(out_dir):
        return f"--out {out_dir!r} contains a comma, which no list format can hold: use another folder or --relative"
    return None


def make_synthetic_dataset(out_dir: str, num_videos: int = 240, num_classes: int = 4, fmt: str = "mp4",
                           seed: int = 0, size: int = 112, frames: int = 32, fps: int = 25,
                           split: tuple = (0.7, 0.15, 0.15), relative: bool = False,
                           distractor_prob: float = 0.0) -> Dict[str, str]:
    """Write videos and ``train.csv``/``val.csv``/``test.csv`` (classes balanced in every split).

    Returns ``{'train': path, 'val': path, 'test': path}``.
    """
    problem = settings_problem(out_dir, num_classes, fmt, size, relative, distractor_prob)
    if problem:
        raise ValueError(problem)
    out_dir = os.path.abspath(out_dir)
    vdir = os.path.join(out_dir, "videos")
    os.makedirs(vdir, exist_ok=True)
    root = np.random.default_rng(seed)
    seeds = root.integers(0, 2**63 - 1, size=num_videos)
    labels = np.arange(num_videos) % num_classes
    # balanced split: the first 70% of each class's videos go to train, etc.
    rows: Dict[str, list] = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n = len(members)
        # at least one video per class in val and test when there are 3 or more
        n_va = max(int(round(split[1] * n)), 1 if n >= 3 else 0)
        n_te = max(int(round(split[2] * n)), 1 if n >= 3 else 0)
        n_tr = n - n_va - n_te
        for k, i in enumerate(members):
            part = "train" if k < n_tr else ("val" if k < n_tr + n_va else "test")
            rows[part].append(i)
    for i in range(num_videos):
        name = f"{i:05d}_{CLASS_NAMES[labels[i]]}.{fmt}"
        frames_arr = render_video(int(labels[i]), np.random.default_rng(int(seeds[i])), size, frames,
                                  distractor_prob)
        write_video(os.path.join(vdir, name), frames_arr, fmt, fps)
    lists = {}
    for part, idx in rows.items():
        p = os.path.join(out_dir, f"{part}.csv")
        paths = [os.path.join("videos", f"{i:05d}_{CLASS_NAMES[labels[i]]}.{fmt}") for i in sorted(idx)]
        paths = paths if relative else [os.path.join(out_dir, x) for x in paths]
        # VideoMAE's `path label`, unless a path holds whitespace: then `path,label` (datasets.read_list_file)
        sep = "," if any(x != "".join(x.split()) for x in paths) else " "
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(f"{x}{sep}{labels[i]}\n" for x, i in zip(paths, sorted(idx)))
        lists[part] = p
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(f"{c} {CLASS_NAMES[c]}\n" for c in range(num_classes)))
    return lists


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num_videos", type=at_least(1), default=240)
    p.add_argument("--num_classes", type=int, default=4, help=f"2 to {len(CLASS_NAMES)}")
    p.add_argument("--format", choices=["mp4", "webm"], default="mp4")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--size", type=int, default=112, help="frame side in pixels (even, >= 8)")
    p.add_argument("--frames", type=at_least(1), default=32)
    p.add_argument("--fps", type=at_least(1), default=25)
    p.add_argument("--relative", action="store_true", help="write paths relative to --out (use --data_root)")
    p.add_argument("--distractor_prob", type=float, default=0.0,
                   help="probability of a static textured distractor object in a video")
    a = p.parse_args(argv)
    problem = settings_problem(a.out, a.num_classes, a.format, a.size, a.relative, a.distractor_prob)
    if problem:
        p.error(problem)  # exit 2, one line naming the flag
    try:
        make_output_dir(a.out, "--out")
    except UserError as e:
        p.error(str(e))
    t0 = time.time()
    lists = make_synthetic_dataset(a.out, a.num_videos, a.num_classes, a.format, a.seed, a.size, a.frames,
                                   a.fps, relative=a.relative, distractor_prob=a.distractor_prob)
    print(f"wrote {a.num_videos} videos ({a.num_classes} classes, {a.format}) to {a.out} in "
          f"{time.time() - t0:.1f}s: " + ", ".join(f"{k}={v}" for k, v in lists.items()))
    empty = [k for k, path in lists.items() if not any(line.strip() for line in open(path, encoding="utf-8"))]
    if empty:  # a class needs 3 videos to have one in val and one in test
        print(f"warning: {' and '.join(f'{k}.csv' for k in empty)} list no video: give each class at least 3 "
              f"(--num_videos >= {3 * a.num_classes}) for fine-tuning, which needs them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
