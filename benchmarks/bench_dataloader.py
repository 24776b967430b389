"""Data-loading throughput: decode only and a whole worker item, per backend, in-process (one core) and through a
DataLoader with 1 and N workers, with repeated sampling ``--num_sample`` 1 vs 4; and the batched crop + resize +
flip that then runs on the training device (``resize_crops``; here on this machine's CPU, one thread).

    python benchmarks/bench_dataloader.py --data_path data/synthetic/train.csv
    # a K400-like 320p H.264 video (written once, listed --copies times):
    python benchmarks/bench_dataloader.py --make_video /tmp/bench320/v.mp4 --height 320 --width 568
    # its frames as JPEG images (a list of folders; one backend is enough, folders are read the same way):
    python tools/prepare_videos.py /tmp/bench320/v.list /tmp/bench320f --format frames --short_side 0
    python benchmarks/bench_dataloader.py --data_path /tmp/bench320f/v.list --backends auto

In-process numbers use ``torch.set_num_threads(1)`` and one decoder thread: they are per-core costs. A worker item
is the planned frames' crop region, decoded (uint8), with its ``num_sample`` crops; "clips/s" counts clips
delivered (``num_sample`` per item). The device transform is not part of the worker's time: on a GPU it overlaps
with the workers; on a CPU-only run it is the main process's.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import add_data_args, build_pretraining_dataset, multiple_samples_collate  # noqa: E402
from frame_sampling import pretrain_indices  # noqa: E402
from video_datasets import PretrainVideoDataset  # noqa: E402
from video_io import open_video  # noqa: E402
from video_transforms import resize_crops  # noqa: E402


def make_video(path: str, height: int = 320, width: int = 568, seconds: float = 10, fps: int = 30,
               gop: int | None = None, seed: int = 0, tune: str | None = None) -> str:
    """A K400-like test video: panning textured background, two moving textured objects, sensor noise."""
    from tools.make_synthetic_dataset import _object_texture, _smooth_noise, write_video

    rng = np.random.default_rng(seed)
    n = int(seconds * fps)
    big = _smooth_noise(rng, height + 64, width + 64, 12)
    big += rng.normal(0, 10, size=big.shape)  # fine texture
    obj = _object_texture(rng, height // 4)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        dy, dx = int(32 + 30 * np.sin(i / 40)), int(32 + 30 * np.cos(i / 55))
        img = big[dy:dy + height, dx:dx + width] + rng.normal(0, 4, size=(height, width, 3))
        for k, speed in enumerate((3, -2)):
            x = int((k * width // 2 + speed * i) % (width - obj.shape[1]))
            y = int(height / 3 + k * height / 4 + 20 * np.sin(i / 10))
            img[y:y + obj.shape[0], x:x + obj.shape[1]] = obj
        frames[i] = np.clip(img, 0, 255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_video(path, frames, "mp4", fps=fps, gop=gop, tune=tune)
    return path


def training_data_args(**flags) -> argparse.Namespace:
    """The pre-training program's data flags, its defaults but for ``flags`` (and no ``--seed``)."""
    args = add_data_args(argparse.ArgumentParser(), pretrain=True).parse_args([])
    vars(args).update(flags, seed=None)
    return args


def _median_ms(fn, n: int) -> tuple[float, float]:
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000, n / sum(ts)


def bench_in_process(ds: PretrainVideoDataset, n: int, batch_size: int = 4) -> dict:
    """Per-core: decode only (whole frames), one worker item (__getitem__), median ms per item and items/s; and
    the device transform on this CPU, ms per clip over batches of ``batch_size`` items."""
    nv = len(ds.videos)

    def decode(i):
        with open_video(ds.videos.path(i % nv), ds.backend) as r:
            r.get_batch(pretrain_indices(len(r), ds.num_frames, ds.sampling_rate))

    decode(0)
    ds[0]
    dec_ms, dec_ips = _median_ms(decode, n)
    item_ms, item_ips = _median_ms(lambda i: ds[i % nv], n)
    batches = [multiple_samples_collate([ds[(b * batch_size + j) % nv] for j in range(batch_size)])
               for b in range(max(1, n // (4 * batch_size)))]
    resize_crops(batches[0], torch.device("cpu"))
    dev_ms, _ = _median_ms(lambda i: resize_crops(batches[i], torch.device("cpu")), len(batches))
    return {"decode_ms": dec_ms, "decode_clips_s": dec_ips, "item_ms": item_ms, "clips_s": item_ips * ds.num_sample,
            "device_ms_per_clip": dev_ms / (batch_size * ds.num_sample)}


def bench_loader(ds: PretrainVideoDataset, workers: int, n_items: int, batch_size: int = 4) -> float:
    """Clips/s through a DataLoader (after one warm-up batch per worker)."""
    sub = torch.utils.data.Subset(ds, [i % len(ds) for i in range(n_items + batch_size * workers)])
    loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=workers,
                                         collate_fn=multiple_samples_collate, prefetch_factor=2)
    it = iter(loader)
    for _ in range(workers):
        next(it)
    t = time.perf_counter()
    clips = sum(b.crops.shape[0] for b in it)
    return clips / (time.perf_counter() - t)


def main(argv=None) -> int:
    train = training_data_args()  # the clip flags default to the pre-training program's
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=None, help="list file (path [label] per line)")
    p.add_argument("--data_root", default=train.data_root)
    p.add_argument("--make_video", default=None, help="write a test video here and benchmark on it")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=568)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop", type=int, default=None, help="keyframe interval (default: x264's 250)")
    p.add_argument("--tune", default=None, help="x264 --tune for the made video, e.g. fastdecode")
    p.add_argument("--copies", type=int, default=16, help="list the made video this many times")
    p.add_argument("--backends", default="auto,decord", help="auto: the program's default (PyAV if installed)")
    p.add_argument("--num_frames", type=int, default=train.num_frames)
    p.add_argument("--sampling_rate", type=int, default=train.sampling_rate)
    p.add_argument("--input_size", type=int, default=train.input_size)
    p.add_argument("--num_samples", default="1,4")
    p.add_argument("--workers", default=f"1,{os.cpu_count()}")
    p.add_argument("--n", type=int, default=40, help="items per in-process measurement")
    p.add_argument("--loader_items", type=int, default=48, help="items per DataLoader measurement")
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    if a.make_video:
        if not os.path.exists(a.make_video):
            t = time.time()
            make_video(a.make_video, a.height, a.width, a.seconds, a.fps, a.gop, tune=a.tune)
            print(f"wrote {a.make_video} in {time.time() - t:.1f}s")
        a.data_path = os.path.splitext(a.make_video)[0] + ".list"
        with open(a.data_path, "w") as f:
            f.write("".join(f"{os.path.abspath(a.make_video)} 0\n" for _ in range(a.copies)))
    if not a.data_path:
        p.error("--data_path or --make_video is required")

    first = open(a.data_path).readline().split()[0]
    first = first if os.path.isabs(first) else os.path.join(a.data_root, first)
    with open_video(first, "pyav") as r:
        h, w = r.get_batch([0]).shape[1:3]
        folder = r.backend == "frames"  # a folder of frame images (frame_folders), whatever the backend flag
        info = f"{w}x{h}, {len(r)} frames, " + ("frame images" if folder else
                                                 f"{r.fps():.0f} fps, keyframes every "
                                                 f"~{len(r) / len(r._impl._keyframes):.0f}")
    print(f"# {a.data_path} (first video {info}); clip {a.num_frames}x{a.input_size}^2, "
          f"rate {a.sampling_rate}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    print("| backend | num_sample | decode ms/clip (median, 1 core) | decode clips/s (1 core) "
          "| worker item ms (median, 1 core) | worker clips/s (1 core) | "
          + " | ".join(f"DataLoader {w} worker(s) clips/s" for w in a.workers.split(","))
          + " | device transform on this CPU, ms/clip |")
    print("|---" * (7 + len(a.workers.split(","))) + "|")
    for backend in a.backends.split(","):
        for k in (int(x) for x in a.num_samples.split(",")):
            ds = build_pretraining_dataset(training_data_args(
                data_path=a.data_path, data_root=a.data_root, num_frames=a.num_frames, sampling_rate=a.sampling_rate,
                input_size=a.input_size, num_sample=k, video_backend=backend))
            r = bench_in_process(ds, a.n)
            loader = [bench_loader(ds, int(w), a.loader_items) for w in a.workers.split(",")]
            name = "frames" if folder else backend if backend == ds.backend else f"{backend} ({ds.backend})"
            print(f"| {name} | {k} | {r['decode_ms']:.1f} | {r['decode_clips_s']:.1f} | {r['item_ms']:.1f} | "
                  f"{r['clips_s']:.1f} | " + " | ".join(f"{x:.1f}" for x in loader)
                  + f" | {r['device_ms_per_clip']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
