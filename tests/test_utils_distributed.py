"""A real two-process ``torchrun`` run (CPU, gloo) of utils' distributed helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "dist_utils_check.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_")) and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                  "MASTER_ADDR", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(SCRIPT), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RANK0 OK" in out and "RANK1 OK" in out, out[-4000:]
    assert out.count("this line is silenced on rank 1") == 1, out[-4000:]
    assert "distributed init (torchrun): rank 1/2" in out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["checkpoint-0.pth", "checkpoint-latest.pth"]
