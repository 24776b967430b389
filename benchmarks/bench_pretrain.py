"""Whole pre-training iterations with the real data loader: clips/s and the share of time spent waiting for data.

    python benchmarks/bench_pretrain.py --data_path data/synthetic/train.csv [any run_mae_pretraining.py flags]

Runs ``run_mae_pretraining.main`` for ``--bench_epochs`` epochs (default 2) into a temporary output folder and
prints one row per epoch from its ``log.txt``. The first epoch includes worker start-up and warm-up; read the last.
Each configuration given with ``--num_workers_list`` / ``--num_sample_list`` is run in turn.

What a long epoch is made of: each epoch's first iteration is left out (the workers then fill the pipeline, each
building a whole batch: in a short benchmark epoch it would dominate), on a GPU each step ends with a
synchronisation (so "waiting for data" is time the GPU idles, not time the host waits while the GPU still works;
``args.sync_each_step``), and no checkpoint is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_mae_pretraining  # noqa: E402


def main() -> None:
    bench = argparse.ArgumentParser(prog="bench_pretrain.py", description=__doc__, add_help=False,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--bench_epochs", type=int, default=2, help="epochs per configuration (read the last)")
    bench.add_argument("--num_workers_list", type=int, nargs="+", default=None,
                       help="run once per --num_workers value")
    bench.add_argument("--num_sample_list", type=int, nargs="+", default=None,
                       help="run once per --num_sample value")
    if {"-h", "--help"} & set(sys.argv[1:]):  # its own flags, then every flag it passes on
        bench.print_help()
        print("\nEvery other flag goes to run_mae_pretraining.py:\n")
        run_mae_pretraining.get_args_parser().print_help()
        return
    bopts, rest = bench.parse_known_args()
    import checkpointing

    checkpointing.Checkpointer.save = lambda self, *a, **k: []  # 1 GiB per save for ViT-B: not what is measured
    rows = []
    for workers in bopts.num_workers_list or [None]:
        for num_sample in bopts.num_sample_list or [None]:
            argv = list(rest)
            if workers is not None:
                argv += ["--num_workers", str(workers)]
            if num_sample is not None:
                argv += ["--num_sample", str(num_sample)]
            with tempfile.TemporaryDirectory() as out:
                args = run_mae_pretraining.get_args_parser().parse_args(
                    argv + ["--output_dir", out, "--epochs", str(bopts.bench_epochs), "--vis_freq", "0",
                            "--no-auto_resume", "--save_ckpt_freq", "1000"])
                args.sync_each_step = True
                run_mae_pretraining.main(args)
                with open(os.path.join(out, "log.txt")) as f:
                    epochs = [json.loads(line) for line in f]
            clips_per_it = args.batch_size * max(1, args.num_sample) * args.world_size
            for e in epochs:  # steady state: the epoch without its first iteration (when it has more than one)
                step = e.get("train_steady_step_time", e["train_step_time"])
                data = e.get("train_steady_data_time", e["train_data_time"])
                rows.append((args.model, args.mask_type, args.num_workers, args.num_sample, e["epoch"],
                             clips_per_it / step, 1000 * step, 100 * data / step))
    print(f"\n{' '.join(rest)}\n")
    print("| model | mask | workers | num_sample | epoch | clips/s | ms / iteration | waiting for data |")
    print("|---|---|---|---|---|---|---|---|")
    for m, mask, w, k, ep, cps, ms, share in rows:
        print(f"| {m} | {mask} | {w} | {k} | {ep} | {cps:.1f} | {ms:.0f} | {share:.0f}% |")


if __name__ == "__main__":
    main()
