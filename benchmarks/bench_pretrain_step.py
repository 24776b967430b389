"""Time one pre-training step (forward + backward + AdamW step) per mask type and report peak memory.

    python benchmarks/bench_pretrain_step.py --model pretrain_videomae_small_patch16_224 --batch_size 2 \
        --num_frames 16 --input_size 224 --device cpu

Each mask type runs in its own process so that peak memory (CUDA: max allocated; CPU: peak RSS of that process)
belongs to that configuration alone. On CUDA the timed steps run under ``torch.cuda.set_sync_debug_mode("error")``
so any host synchronisation inside the step fails the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_MASKS = ["tube:0.9", "random:0.9", "frame:0.875", "adaptive:0.95"]


def run_one(args: argparse.Namespace) -> dict:
    import timm
    import torch

    import modeling_pretrain  # noqa: F401
    from engine_for_pretraining import pretrain_losses

    torch.manual_seed(0)
    device = torch.device(args.device)
    mask_type, ratio = args.mask.split(":")
    model = timm.create_model(args.model, mask_type=mask_type, mask_ratio=float(ratio), num_frames=args.num_frames,
                              img_size=args.input_size, decoder_depth=args.decoder_depth,
                              use_checkpoint=args.use_checkpoint).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    videos = torch.randn(args.batch_size, 3, args.num_frames, args.input_size, args.input_size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = pretrain_losses(model, videos, model.patch_size, model.tubelet_size)
        losses.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("error")
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            sync()
            torch.cuda.set_sync_debug_mode("error")
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return dict(mask=args.mask, visible=model.num_visible, tokens=model.num_patches,
                step_ms=1000 * statistics.mean(times), step_ms_median=1000 * statistics.median(times),
                clips_per_s=args.batch_size / statistics.mean(times), peak_gib=peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrain_videomae_small_patch16_224")
    p.add_argument("--masks", nargs="+", default=DEFAULT_MASKS, help="mask_type:ratio entries")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--decoder_depth", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--use_checkpoint", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mask", help=argparse.SUPPRESS)  # set in the per-configuration child process
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mask:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for mask in args.masks:
        cmd = [sys.executable, __file__, "--mask", mask] + [a for a in sys.argv[1:]]
        cmd += ["--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{mask} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    peak_name = "peak GiB (CUDA allocated)" if args.device.startswith("cuda") else "peak RSS GiB"
    print(f"\n{args.model}, batch {args.batch_size}, {args.num_frames}x{args.input_size}^2, "
          f"decoder depth {args.decoder_depth}, {args.precision}, {args.device}, {args.steps} timed steps\n")
    print(f"| mask | visible / tokens | step ms (mean) | step ms (median) | clips/s | {peak_name} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask']} | {r['visible']} / {r['tokens']} | {r['step_ms']:.0f} | {r['step_ms_median']:.0f} | "
              f"{r['clips_per_s']:.2f} | {r['peak_gib']:.2f} |")
    by = {r["mask"].split(":")[0]: r for r in rows}
    if "adaptive" in by and "tube" in by:
        print(f"\nadaptive / tube step time: {by['adaptive']['step_ms'] / by['tube']['step_ms']:.2f}x")


if __name__ == "__main__":
    main()
