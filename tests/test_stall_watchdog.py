"""The stall watchdog on real processes: a pre-training run whose DataLoader worker is frozen with SIGSTOP reports
where it waits (its own stacks and the worker's), then finishes normally once the worker continues."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stall_watchdog  # noqa: E402
from tools.make_synthetic_dataset import make_synthetic_dataset  # noqa: E402

TINY_MAE = json.dumps(dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=32,
                           decoder_num_heads=4))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_frozen_worker_is_reported_with_stacks_and_the_run_finishes(tmp_path):
    make_synthetic_dataset(str(tmp_path / "data"), num_videos=12, num_classes=2, fmt="mp4", seed=3, size=48,
                           frames=12, split=(1.0, 0.0, 0.0))
    out = tmp_path / "out"
    cmd = [sys.executable, "run_mae_pretraining.py", "--data_path", str(tmp_path / "data" / "train.csv"),
           "--output_dir", str(out), "--model", "pretrain_videomae_small_patch16_224", "--model_kwargs", TINY_MAE,
           "--decoder_depth", "1", "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32",
           "--batch_size", "1", "--epochs", "2", "--warmup_epochs", "1", "--mask_ratio", "0.75", "--num_workers", "1",
           "--device", "cpu",
           "--print_freq", "1", "--vis_freq", "0", "--stall_minutes", "0.05"]  # 3 s without a finished batch
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, worker, header_at, reported_at = [], None, None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if worker is None and re.search(r"Epoch: \[0\]\s+\[\s*1/\d+\]", line):
                (worker,) = _children(proc.pid)  # the one persistent DataLoader worker
                os.kill(worker, signal.SIGSTOP)  # a worker that never returns, as in a decoder deadlock
            elif worker is not None and reported_at is None:
                if "stall watchdog: no progress" in line:
                    header_at = len(lines) - 1
                elif header_at is not None and "dataloader.py" in line:
                    # The report shows the main process waiting for a batch (on a loaded machine an earlier one may
                    # show a step that was merely slow); the stopped worker cannot print meanwhile.
                    reported_at = header_at
                    os.kill(worker, signal.SIGCONT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines[reported_at or 0:])
    assert rc == 0 and worker is not None and reported_at is not None, text[-4000:]
    header = re.search(r"\[rank 0\] stall watchdog: no progress for [\d.]+ s, since Epoch: \[0\] step (\d+)\. .*"
                       r"of its 1 DataLoader worker\(s\) \[(\d+)\]", text)
    assert header and header.start() == 0 and int(header.group(2)) == worker, text[-4000:]
    report = text
    main_stack = report[:report.index("worker.py")]  # this process's threads come first
    assert "Most recent call first" in main_stack or "most recent call first" in main_stack
    assert "dataloader.py" in main_stack and "run_mae_pretraining.py" in main_stack  # waiting for a batch
    assert re.search(r'worker\.py", line \d+ in _worker_loop', report)  # the worker's own stack, once continued
    records = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]  # the run went on and finished both epochs


def _wait_forever(register: bool, ready) -> None:
    if register:
        stall_watchdog.enable_in_worker()
    ready.set()
    time.sleep(60)


def test_only_children_that_handle_the_signal_are_asked():
    """A child process without the handler would be killed by SIGUSR2: it must not be in the list."""
    ctx = multiprocessing.get_context("fork")
    procs = []
    for register in (True, False):
        ready = ctx.Event()
        p = ctx.Process(target=_wait_forever, args=(register, ready), daemon=True)
        p.start()
        assert ready.wait(30)
        procs.append(p)
    try:
        asked = stall_watchdog._workers_that_dump()
        assert procs[0].pid in asked and procs[1].pid not in asked
    finally:
        for p in procs:
            p.kill()
            p.join()
