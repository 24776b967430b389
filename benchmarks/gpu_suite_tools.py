"""Helpers for ``benchmarks/gpu_suite.sh``: probe the machine, make the test videos, merge markdown tables.

    python benchmarks/gpu_suite_tools.py probe --out FILE      # KEY=value lines for the shell
    python benchmarks/gpu_suite_tools.py videos OUT_DIR --n 16  # K400-like videos + OUT_DIR/raw.list
    python benchmarks/gpu_suite_tools.py merge --label videos raw=a.md prepared=b.md

``merge`` takes the first markdown table of each file, puts LABEL in a new first column and prints one table
(header from the first file that has a table); a file without a table gives a row saying so.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from multiprocessing import get_context
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(module: str) -> str:
    """The module's version, or "" when it cannot be imported (the reason goes to stderr)."""
    try:
        m = importlib.import_module(module)
    except Exception as e:  # a broken install counts as missing
        print(f"probe: import {module} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return ""
    return str(getattr(m, "__version__", "?"))


def probe() -> Dict[str, str]:
    """What the suite needs to know before it plans the sections."""
    import platform

    info = {"PY_VERSION": platform.python_version(),
            "CORES": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())}
    for key, module in (("TORCH", "torch"), ("TIMM", "timm"), ("AV", "av"), ("DECORD", "decord"),
                        ("TQDM", "tqdm")):
        info[key] = _version(module)
    info["CUDA"], info["GPU"] = "0", ""
    if info["TORCH"]:
        import torch

        if torch.cuda.is_available():
            info["CUDA"], info["GPU"] = "1", torch.cuda.get_device_name(0)
    info["DEFAULT_BACKEND"], info["DEFAULT_BATCH"], info["BACKENDS"] = "", "", ""
    try:  # the program's own default and choices, so the suite follows them if they change
        sys.path.insert(0, REPO)
        import run_mae_pretraining

        parser = run_mae_pretraining.get_args_parser()
        info["DEFAULT_BACKEND"] = str(parser.get_default("video_backend"))
        info["DEFAULT_BATCH"] = str(parser.get_default("batch_size"))
        action = next(a for a in parser._actions if a.dest == "video_backend")  # noqa: SLF001
        info["BACKENDS"] = ",".join(action.choices or [])
    except Exception as e:
        print(f"probe: reading run_mae_pretraining's flags failed: {type(e).__name__}: {e}", file=sys.stderr)
    return info


def _make_one(job: Tuple[str, int, int, float, int, int]) -> float:
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    sys.path.insert(0, REPO)
    from bench_dataloader import make_video

    path, height, width, seconds, fps, seed = job
    t = time.time()
    if not os.path.exists(path):
        tmp = path[:-4] + ".tmp.mp4"  # a killed run leaves no half-written video behind
        make_video(tmp, height, width, seconds, fps, seed=seed)
        os.replace(tmp, path)
    return time.time() - t


def make_videos(out_dir: str, n: int, height: int, width: int, seconds: float, fps: int, copies: int,
                jobs: int) -> str:
    """``n`` K400-like videos (x264 default keyframe interval) in parallel; the list names each ``copies`` times."""
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)
    paths = [os.path.abspath(os.path.join(out_dir, "raw", f"v{i:02d}.mp4")) for i in range(n)]
    t = time.time()
    with get_context("fork").Pool(max(1, min(jobs, n))) as pool:
        pool.map(_make_one, [(p, height, width, seconds, fps, i) for i, p in enumerate(paths)])
    list_path = os.path.join(out_dir, "raw.list")
    with open(list_path, "w") as f:  # interleaved, so consecutive items are different videos
        f.write("".join(f"{p} 0\n" for _ in range(copies) for p in paths))
    size = sum(os.path.getsize(p) for p in paths)
    print(f"{n} videos {width}x{height}, {seconds:g} s at {fps} fps, x264 default keyframes, "
          f"{size / 2 ** 20:.1f} MiB, made in {time.time() - t:.1f} s; {list_path}: {n * copies} lines")
    return list_path


def first_table(path: str) -> List[List[str]]:
    """Cells of the first markdown table in ``path`` (header first, separator dropped)."""
    rows: List[List[str]] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return rows
    for line in lines:
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s[1:-1].split("|")]
            if all(set(c) <= set("-: ") and c for c in cells):
                continue
            rows.append(cells)
        elif rows:
            break
    return rows


def merge(label: str, items: List[str], last_of: str | None = None) -> str:
    """One markdown table from the first table of each ``LABEL=FILE`` item, LABEL in a new first column."""
    header: List[str] | None = None
    body: List[List[str]] = []
    for item in items:
        name, _, path = item.partition("=")
        table = first_table(path)
        if not table:
            body.append([name, "no result (skipped, failed or timed out; see the log)"])
            continue
        header = header or table[0]
        rows = table[1:]
        if last_of and last_of in table[0]:  # e.g. keep only the last epoch
            col = table[0].index(last_of)
            last = rows[-1][col] if rows else None
            rows = [r for r in rows if len(r) > col and r[col] == last]
        body += [[name] + r for r in rows] or [[name, "no rows (see the log)"]]
    if header is None:
        return "\n".join([f"| {label} | result |", "|---|---|"] + [f"| {r[0]} | {r[1]} |" for r in body])
    width = len(header) + 1
    out = ["| " + " | ".join([label] + header) + " |", "|---" * width + "|"]
    out += ["| " + " | ".join(r + [""] * (width - len(r))) + " |" for r in body]
    return "\n".join(out)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--out", default=None, help="write the KEY=value lines here (libraries may print to stdout)")
    v = sub.add_parser("videos")
    v.add_argument("out_dir")
    v.add_argument("--n", type=int, default=16)
    v.add_argument("--height", type=int, default=320)
    v.add_argument("--width", type=int, default=568)
    v.add_argument("--seconds", type=float, default=10)
    v.add_argument("--fps", type=int, default=30)
    v.add_argument("--copies", type=int, default=40)
    v.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    m = sub.add_parser("merge")
    m.add_argument("--label", required=True, help="name of the new first column")
    m.add_argument("--last_of", default=None, help="keep only the rows whose value in this column is the last one")
    m.add_argument("items", nargs="+", metavar="LABEL=FILE")
    a = p.parse_args(argv)
    if a.cmd == "probe":
        text = "".join(f"{k}={shlex.quote(val)}\n" for k, val in probe().items())
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        print(text, end="")
    elif a.cmd == "videos":
        make_videos(a.out_dir, a.n, a.height, a.width, a.seconds, a.fps, a.copies, a.jobs)
    else:
        print(merge(a.label, a.items, a.last_of))
    return 0


if __name__ == "__main__":
    sys.exit(main())
