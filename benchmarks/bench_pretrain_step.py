"""Time one pre-training step (forward + backward + AdamW step) per mask type and batch size, and report peak memory.

    python benchmarks/bench_pretrain_step.py --model pretrain_videomae_small_patch16_224 --batch_size 2 \
        --num_frames 16 --input_size 224 --device cpu
    # one GPU, bf16, two batch sizes, torch.compile:
    python benchmarks/bench_pretrain_step.py --model pretrain_videomae_base_patch16_224 --masks adaptive:0.95 tube:0.9 \
        --batch_size 16 64 --precision bf16 --compile

Each configuration (mask type x batch size) runs in its own process so that peak memory (CUDA: max allocated;
CPU: peak RSS of that process) belongs to that configuration alone; ``--in_process`` runs them one after the other
in one process instead (saves the start-up of each; on CUDA the peak is then counted from what was allocated
before the configuration started, so it is still that configuration's own; on CPU the RSS peak accumulates).
On CUDA the timed steps run under ``torch.cuda.set_sync_debug_mode`` (``--sync_check``, default "error"), so a
host synchronisation inside the step fails the run. Rows are printed as markdown as each configuration finishes;
a configuration that fails or runs past ``--timeout`` gets a "failed" row and the others still run (exit status
1 at the end).
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
MODEL_FLAGS = ("model", "model_kwargs", "num_frames", "input_size", "decoder_depth", "use_checkpoint")


def pretrain_args(args: argparse.Namespace) -> argparse.Namespace:
    """``run_mae_pretraining``'s flags (its defaults) with this benchmark's model flags, for
    ``create_pretrain_model``: the model is built exactly as pre-training builds it."""
    import run_mae_pretraining

    margs = run_mae_pretraining.get_args_parser().parse_args([])
    for key in MODEL_FLAGS:
        setattr(margs, key, getattr(args, key))
    return margs


def run_one(args: argparse.Namespace, batch_size: int) -> dict:
    import torch

    from losses import pretrain_losses
    from modeling_pretrain import create_pretrain_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # > 0 only for --in_process leftovers
    mask_type, ratio = args.mask.split(":")
    model = create_pretrain_model(pretrain_args(args), mask_type=mask_type, mask_ratio=float(ratio)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    # As run_mae_pretraining does: only the model is compiled, the loss and optimizer step stay eager.
    net = torch.compile(model, backend=args.compile_backend) if args.compile else model
    videos = torch.randn(batch_size, 3, args.num_frames, args.input_size, args.input_size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = pretrain_losses(net, videos, model.patch_size, model.tubelet_size)
        losses.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    checked = device.type == "cuda" and args.sync_check != "off"
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation with --compile
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if checked:
            torch.cuda.set_sync_debug_mode(args.sync_check)
        step()
        if checked:
            torch.cuda.set_sync_debug_mode(0)
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return dict(mask=args.mask, batch_size=batch_size, compile=args.compile_backend if args.compile else "no",
                visible=model.num_visible, tokens=model.num_patches, warmup_s=warmup_s,
                step_ms=1000 * statistics.mean(times), step_ms_median=1000 * statistics.median(times),
                clips_per_s=batch_size / statistics.mean(times), peak_gib=peak)


def _in_process(mask: str, batch_size: int, args: argparse.Namespace) -> dict:
    """Run one configuration here; an exception comes back as ``{"error": reason}``."""
    import gc
    import traceback

    import torch

    row = dict(mask=mask, batch_size=batch_size, compile=args.compile_backend if args.compile else "no")
    args.mask = mask
    try:
        return run_one(args, batch_size)
    except Exception as e:  # report it and go on with the next configuration
        traceback.print_exc()
        return {**row, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    finally:
        args.mask = None
        if args.compile:
            torch._dynamo.reset()  # forget the compiled graphs, which hold on to this configuration's model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(mask: str, batch_size: int, args: argparse.Namespace) -> dict:
    """Run one configuration in a fresh process; a failure or timeout comes back as ``{"error": reason}``."""
    cmd = [sys.executable, __file__] + sys.argv[1:] + ["--mask", mask, "--batch_size", str(batch_size),
                                                       "--device", args.device]
    row = dict(mask=mask, batch_size=batch_size, compile=args.compile_backend if args.compile else "no")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout:.0f} s"}
    if res.returncode:
        sys.stderr.write(f"--- {mask} batch {batch_size} failed:\n{res.stderr}")
        lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
        return {**row, "error": (lines[-1] if lines else f"exit status {res.returncode}")[:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def format_row(r: dict) -> str:
    head = f"| {r['mask']} | {r['batch_size']} | {r['compile']} |"
    if "error" in r:
        return head + f" failed: {r['error'].replace('|', '/')} | | | | | |"
    return head + (f" {r['visible']} / {r['tokens']} | {r['step_ms']:.1f} | {r['step_ms_median']:.1f} | "
                   f"{r['clips_per_s']:.1f} | {r['warmup_s']:.1f} | {r['peak_gib']:.2f} |")


def build_parser() -> argparse.ArgumentParser:
    import run_mae_pretraining

    pre = run_mae_pretraining.get_args_parser()  # the model flags' defaults are pre-training's
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrain_videomae_small_patch16_224")
    p.add_argument("--model_kwargs", default=pre.get_default("model_kwargs"), type=json.loads,
                   help="extra timm.create_model arguments as JSON, e.g. a smaller encoder")
    p.add_argument("--masks", nargs="+", default=DEFAULT_MASKS, help="mask_type:ratio entries")
    p.add_argument("--batch_size", type=int, nargs="+", default=[2], help="one or more batch sizes")
    p.add_argument("--num_frames", type=int, default=pre.get_default("num_frames"))
    p.add_argument("--input_size", type=int, default=pre.get_default("input_size"))
    p.add_argument("--decoder_depth", type=int, default=pre.get_default("decoder_depth"))
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--use_checkpoint", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as run_mae_pretraining does)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (e.g. aot_eager for a "
                   "quick check on CPU)")
    p.add_argument("--sync_check", choices=["error", "warn", "off"], default="error",
                   help="CUDA: torch.cuda.set_sync_debug_mode during the timed steps")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration before it is killed")
    p.add_argument("--in_process", action="store_true", help="run every configuration in this process")
    p.add_argument("--jsonl", default=None, help="also append each row as a JSON line to this file")
    p.add_argument("--mask", help=argparse.SUPPRESS)  # set in the per-configuration child process
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mask:
        print(json.dumps(run_one(args, args.batch_size[-1])))
        return 0

    peak_name = "peak GiB (CUDA allocated)" if args.device.startswith("cuda") else (
        "peak RSS GiB (cumulative)" if args.in_process else "peak RSS GiB")
    print(f"\n{args.model}, {args.num_frames}x{args.input_size}^2, decoder depth {args.decoder_depth}, "
          f"{args.precision}, {args.device}, {args.warmup} warm-up + {args.steps} timed steps\n")
    print(f"| mask | batch | compile | visible / tokens | step ms (mean) | step ms (median) | clips/s | "
          f"warm-up s | {peak_name} |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for batch_size in args.batch_size:
        for mask in args.masks:
            rows.append((_in_process if args.in_process else _child)(mask, batch_size, args))
            print(format_row(rows[-1]), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    ok = [r for r in rows if "error" not in r]
    for b in args.batch_size:
        by = {r["mask"].split(":")[0]: r for r in ok if r["batch_size"] == b}
        if "adaptive" in by and "tube" in by:
            print(f"\nbatch {b}: adaptive / tube step time {by['adaptive']['step_ms'] / by['tube']['step_ms']:.2f}x")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
