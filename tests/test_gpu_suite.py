"""benchmarks/gpu_suite.sh: its CPU smoke run works and prints well-formed markdown tables.

The whole smoke run (every section) takes 2-3 minutes on the 2-core dev machine, too long for the test suite; it runs
only with GPU_SUITE_FULL_SMOKE=1. By default the smoke run of the model section (the quickest) runs, with PyAV and
decord hidden and a wheel carried in WHEELS (as on the GPU host), and the GPU run's commands are generated with a
stand-in Python and checked against the real argument parsers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_suite_tools import first_table, merge  # noqa: E402


def _suite(tmp_path: Path, *args: str, env: Dict[str, str] | None = None, timeout: float = 300) \
        -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work"),
         **(env or {})}
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", *args], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=timeout)


def _tables(text: str) -> List[List[List[str]]]:
    """Every markdown table in ``text`` as rows of cells (separator rows included)."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            cur.append([c.strip() for c in line[1:-1].split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def _check_tables(text: str) -> List[List[List[str]]]:
    tables = _tables(text)
    for t in tables:
        assert len(t) >= 3, t  # header, separator, at least one row
        assert all(c == "---" for c in t[1]), t[1]
        assert all(len(r) == len(t[0]) for r in t), t
    return tables


def test_merge_puts_a_label_column_first_and_keeps_the_last_epoch(tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text("log line\n| x | epoch |\n|---|---|\n| 1 | 0 |\n| 2 | 1 |\ntrailing\n")
    b.write_text("no table here\n")
    assert first_table(str(a)) == [["x", "epoch"], ["1", "0"], ["2", "1"]]
    out = merge("setting", [f"first={a}", f"second={b}", f"gone={tmp_path / 'missing.md'}"], last_of="epoch")
    rows = _check_tables(out)[0]
    assert rows[0] == ["setting", "x", "epoch"]
    assert rows[2] == ["first", "2", "1"]
    assert rows[3][0] == "second" and "no result" in rows[3][1]
    assert rows[4][0] == "gone"


def _fake_wheel(folder: Path, name: str, version: str) -> None:
    """A minimal pure-Python wheel, enough for pip to install it."""
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", f'__version__ = "{version}"\n')
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


def test_model_section_smoke_without_video_packages(tmp_path):
    """As on the GPU host: no PyAV, no decord (a wheel for decord carried in WHEELS). The model section runs, the
    video sections are skipped and say why, and the markdown is well formed and kept under $OUT."""
    hidden = tmp_path / "hidden"  # shadows the installed packages, as on a host without them
    for pkg in ("av", "decord"):
        (hidden / pkg).mkdir(parents=True)
        (hidden / pkg / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "decord", "99.0")  # installed ahead of the hidden one
    res = _suite(tmp_path, "--sections", "model,loader,e2e", env={"PYTHONPATH": str(hidden), "WHEELS": str(wheels)})
    out = res.stdout
    assert res.returncode == 0, out + res.stderr  # skipped for a missing package is not a failure
    assert "WHEELS: installed decord" in out and "WHEELS: no av wheel" in out
    assert "PyAV missing, decord 99.0" in out
    assert "PyAV is not installed" in out and "decord is not installed" not in out
    assert "loader and whole-iteration tables skipped" in out

    tables = _check_tables(out)
    model = next(t for t in tables if t[0][0] == "mask")
    assert model[0][:3] == ["mask", "batch", "compile"]
    assert [(r[0], r[1]) for r in model[2:]] == [("adaptive:0.95", "1"), ("tube:0.9", "1"),
                                                ("adaptive:0.95", "2"), ("tube:0.9", "2")]
    for r in model[2:]:
        assert float(r[4]) > 0 and float(r[6]) > 0, r  # step ms, clips/s
    timings = next(t for t in tables if t[0][0] == "section")
    assert [r[0] for r in timings[2:]] == ["probe", "model_eager", "doctor"]
    env = out[out.index("## Environment (tools/doctor.py)"):]  # the doctor's report, as the GPU host sees it
    assert re.search(r"^OK +training step \(cpu, fp32\)", env, re.M) and re.search(r"^WARN +av ", env, re.M)
    assert all(r[3] == "ok" for r in timings[2:])
    # the report is kept under $OUT, with every command's output
    assert (tmp_path / "out" / "gpu_suite.md").read_text() == out
    assert (tmp_path / "out" / "gpu_suite_logs" / "model_eager.md").exists()


def test_bad_arguments_are_usage_errors():
    for args in (["--nope"], ["--sections", "model,typo"]):
        res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *args], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "gpu_suite.sh:" in res.stderr, res.stderr


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for Python on a 16-core CUDA host: logs each command, fakes the probe, runs only the table merger.
printf '%s\0' "$@" >> "$FAKE_LOG"; printf '\n\0' >> "$FAKE_LOG"
if [[ $1 == benchmarks/gpu_suite_tools.py && $2 == probe ]]; then
    printf '%s\n' PY_VERSION=3.12.3 CORES=16 TORCH=2.9.0 TIMM=1.0 AV=19.0.2 DECORD=0.6.0 TQDM=4.67 CUDA=1 \
        "GPU='NVIDIA H200'" DEFAULT_BACKEND=auto DEFAULT_BATCH=64 BACKENDS=auto,decord,pyav > "$4"
elif [[ $1 == benchmarks/gpu_suite_tools.py && $2 == merge ]]; then
    exec "$REAL_PYTHON" "$@"
fi
"""


def _fake_gpu_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Dict[str, List[List[str]]]]:
    """The suite as on a 16-core CUDA host, with Python replaced by FAKE_PYTHON: its output and the command lines
    it ran, by script."""
    fake, log = tmp_path / "python", tmp_path / "commands"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "REAL_PYTHON": sys.executable,
           "WORK_DIR": str(tmp_path / "work")}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    cmds = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c]
    by_script: Dict[str, List[List[str]]] = {}
    for c in cmds:
        by_script.setdefault(c[0], []).append(c[1:])
    return res, by_script


def test_gpu_run_commands_parse(tmp_path):
    """The GPU run's commands (not taken by the smoke run), checked against the real argument parsers."""
    res, by_script = _fake_gpu_run(tmp_path)
    assert len(by_script["benchmarks/bench_pretrain_step.py"]) == 2  # eager, compiled
    assert len(by_script["benchmarks/bench_dataloader.py"]) == 2  # raw, prepared
    assert len(by_script["benchmarks/bench_pretrain.py"]) == 3  # defaults, raw tuned, recommended
    assert "Frame folders" not in res.stdout  # opt-in

    from bench_pretrain_step import build_parser
    eager, compiled = (build_parser().parse_args(a) for a in by_script["benchmarks/bench_pretrain_step.py"])
    assert eager.model == compiled.model == "pretrain_videomae_base_patch16_224"
    assert eager.batch_size == [16, 64] and compiled.batch_size == [64, 16] and compiled.compile
    assert eager.masks == ["adaptive:0.95", "tube:0.9"] and eager.precision == "bf16"

    sys.path.insert(0, str(REPO))
    import run_mae_pretraining

    parsed = []
    for a in by_script["benchmarks/bench_pretrain.py"]:
        assert a[:2] == ["--bench_epochs", "2"]
        parsed.append(run_mae_pretraining.get_args_parser().parse_args(a[2:] + ["--output_dir", str(tmp_path)]))
    defaults, raw, rec = parsed
    assert (defaults.batch_size, defaults.num_sample) == (64, 1)
    assert (raw.num_workers, raw.precision, raw.batch_size) == (15, "bf16", 64)
    assert (rec.num_workers, rec.batch_size, rec.num_sample) == (15, 16, 4) and "prepared" in rec.data_path
    assert all(a.data_path.endswith("raw_e2e.list") for a in parsed)  # each list 3 times: 30 batches of 64
    assert "| recommended: prepared videos, auto, bf16, batch 16 x num_sample 4 |" in res.stdout


def test_gpu_run_frames_section_commands_parse(tmp_path):
    """The opt-in frames section: the raw videos become JPEG frame folders, then the loader alone and whole
    iterations run on their list, with the recommended settings."""
    res, by_script = _fake_gpu_run(tmp_path, "--sections", "frames")
    sys.path.insert(0, str(REPO))
    from tools.prepare_videos import parse_args

    (tmp_path / "work" / "videos").mkdir(parents=True, exist_ok=True)
    (tmp_path / "work" / "videos" / "raw.list").write_text("")  # the list the stand-in did not write
    (prep,) = [parse_args(a) for a in by_script["tools/prepare_videos.py"]]
    assert prep.format == "frames" and prep.jobs == 16 and prep.in_list.endswith("videos/raw.list")
    frames_list = os.path.join(prep.out_dir, "raw.list")
    (loader,) = by_script["benchmarks/bench_dataloader.py"]
    assert loader[loader.index("--data_path") + 1] == frames_list and loader[loader.index("--workers") + 1] == "15"
    (e2e,) = by_script["benchmarks/bench_pretrain.py"]
    import run_mae_pretraining

    a = run_mae_pretraining.get_args_parser().parse_args(e2e[2:] + ["--output_dir", str(tmp_path)])
    frames_e2e = frames_list.replace("raw.list", "raw_e2e.list")  # the list 3 times: many batches per worker
    assert (a.data_path, a.num_workers, a.batch_size, a.num_sample, a.precision) == (frames_e2e, 15, 16, 4, "bf16")
    assert "## Frame folders" in res.stdout and "bench_pretrain_step.py" not in by_script
    assert "| frame folders, bf16, batch 16 x num_sample 4 |" in res.stdout


@pytest.mark.skipif(os.environ.get("GPU_SUITE_FULL_SMOKE") != "1",
                    reason="2-3 minutes on 2 cores; set GPU_SUITE_FULL_SMOKE=1")
def test_full_smoke(tmp_path):
    res = _suite(tmp_path, "--sections", "model,loader,e2e,compile,frames", timeout=500)
    assert res.returncode == 0, res.stdout + res.stderr
    tables = _check_tables(res.stdout)
    heads = [t[0][0] for t in tables]
    assert heads.count("mask") == 2  # eager and compiled
    loader = next(t for t in tables if t[0][0] == "videos")
    assert {r[0] for r in loader[2:]} == {"raw", "prepared"} and len(loader) == 2 + 8
    e2e = next(t for t in tables if t[0][0] == "setting")
    assert len(e2e) == 2 + 3 and all(r[6] not in ("", "no result") for r in e2e[2:])
    frames = [t for t in tables if t[0][0] == "videos"][1]
    assert {r[0] for r in frames[2:]} == {"frames"} and len(frames) == 2 + 2  # one backend (auto), ns 1 and 4
    frames_e2e = [t for t in tables if t[0][0] == "setting"][1]
    assert len(frames_e2e) == 3 and frames_e2e[2][6] not in ("", "no result")


def test_bench_pretrain_help_lists_its_own_flags_and_the_programs():
    res = subprocess.run([sys.executable, "benchmarks/bench_pretrain.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--bench_epochs", "--num_workers_list", "--num_sample_list", "--mask_ratio", "--data_path"):
        assert flag in res.stdout, flag
