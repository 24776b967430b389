"""Worker memory over a real multi-epoch run (the soak test users of video training code asked for): every epoch's
log.txt record holds the PSS of the main process and of its DataLoader workers, and the workers' does not grow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402

TINY_MAE = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                           decoder_num_heads=4))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="PSS is read from Linux /proc")
@pytest.mark.parametrize("fmt,backend", [("mp4", "pyav"), ("webm", "decord")])
def test_worker_memory_is_logged_and_stays_flat_over_epochs(tmp_path, fmt, backend):
    make_synthetic_dataset(str(tmp_path / "data"), num_videos=16, num_classes=2, fmt=fmt, seed=5, size=64,
                           frames=16, split=(1.0, 0.0, 0.0))
    out = tmp_path / "out"
    cmd = [sys.executable, "run_mae_pretraining.py", "--data_path", str(tmp_path / "data" / "train.csv"),
           "--output_dir", str(out), "--model", "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE,
           "--decoder_depth", "1", "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32",
           "--mask_ratio", "0.75", "--batch_size", "2", "--num_sample", "2", "--epochs", "10", "--warmup_epochs",
           "1", "--num_workers", "2", "--video_backend", backend, "--device", "cpu", "--print_freq", "100",
           "--vis_freq", "0", "--save_ckpt_freq", "100"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Memory (PSS): main process" in res.stdout
    records = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    workers = [r["memory_workers_mb"] for r in records]
    main = [r["memory_main_mb"] for r in records]
    print("workers MB per epoch:", workers, "main MB:", main)
    assert len(workers) == 10 and all(w > 5 for w in workers)  # two live workers, each with its own pages
    assert all(m > 50 for m in main)  # torch alone is more than that
    # After the first epochs (allocator and decoder warm-up), 8 epochs x 16 videos x 2 clips must not add memory.
    assert max(workers[2:]) - workers[2] < max(8.0, 0.1 * workers[2]), workers
