"""Validate a video list offline before training.

Checks every line: malformed line, duplicate path, label out of ``[0, nb_classes)``, missing file,
undecodable / truncated video (opens it and decodes the first, middle and last frame, or every frame with
``--full``), and too short (fewer than ``--min_frames`` frames). Prints a summary, writes a report of the bad
lines (``LINE<TAB>PATH<TAB>PROBLEM``) and exits with status 1 if any line is bad.

    python tools/check_dataset.py data/k400/train.csv --data_root /data/k400 --nb_classes 400
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import read_list_file  # noqa: E402
from video_io import BACKENDS, VideoDecodeError, open_video  # noqa: E402


def check_video(path: str, backend: str = "decord", min_frames: int = 1, full: bool = False) -> tuple:
    """Return ``(num_frames, problem)``; ``problem`` is None when the video is fine."""
    try:
        with open_video(path, backend) as r:
            n = len(r)
            idx = list(range(n)) if full else sorted({0, n // 2, n - 1})
            r.get_batch(idx)
    except VideoDecodeError as e:
        kind = "missing" if e.reason == "file not found" else "undecodable"
        return 0, f"{kind}: {e.reason}"
    except Exception as e:  # anything else the decoder throws
        return 0, f"undecodable: {type(e).__name__}: {e}"
    if n < min_frames:
        return n, f"too short: {n} frames < --min_frames {min_frames}"
    return n, None


def _check_args(a):
    return check_video(*a)


def check_list(list_path: str, data_root: str = "", backend: str = "decord", nb_classes: int | None = None,
               min_frames: int = 1, full: bool = False, workers: int = 1, require_label: bool = False,
               progress: bool = True) -> dict:
    """Check a list; returns ``{'total': n_lines, 'bad': [(line, path, problem)], 'counts': Counter}``."""
    errors: list = []
    records = read_list_file(list_path, data_root, require_label, errors=errors)
    bad = [(line, "", "malformed: " + msg.split(": ", 1)[-1]) for line, msg in errors]
    first_line: dict = {}
    to_decode = []
    for r in records:
        if r.path in first_line:
            bad.append((r.line_no, r.path, f"duplicate: same path as line {first_line[r.path]}"))
            continue
        first_line[r.path] = r.line_no
        if r.label is not None and (r.label < 0 or (nb_classes is not None and r.label >= nb_classes)):
            hi = nb_classes if nb_classes is not None else "inf"
            bad.append((r.line_no, r.path, f"label out of range: {r.label} not in [0, {hi})"))
        to_decode.append(r)
    jobs = [(r.full_path, backend, min_frames, full) for r in to_decode]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            it = ex.map(_check_args, jobs, chunksize=8)
            results = list(tqdm(it, total=len(jobs), disable=not progress) if tqdm else it)
    else:
        it = map(_check_args, jobs)
        results = list(tqdm(it, total=len(jobs), disable=not progress) if tqdm else it)
    frames = []
    for r, (n, problem) in zip(to_decode, results):
        if problem:
            bad.append((r.line_no, r.path, problem))
        else:
            frames.append(n)
    bad.sort()
    counts = collections.Counter(p.split(":")[0] for _, _, p in bad)
    return {"total": len(records) + len(errors), "bad": bad, "counts": counts, "frames": frames}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("list", help="list file (path label per line)")
    p.add_argument("--data_root", default="")
    p.add_argument("--video_backend", default="decord", choices=list(BACKENDS))
    p.add_argument("--nb_classes", type=int, default=None, help="labels must be in [0, nb_classes)")
    p.add_argument("--min_frames", type=int, default=1, help="flag videos with fewer frames")
    p.add_argument("--full", action="store_true", help="decode every frame (slow, finds truncation anywhere)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report", default=None, help="report path (default: LIST.bad.txt)")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    res = check_list(a.list, a.data_root, a.video_backend, a.nb_classes, a.min_frames, a.full, a.workers,
                     progress=not a.no_progress)
    bad = res["bad"]
    print(f"{a.list}: {res['total']} lines, {res['total'] - len({b[0] for b in bad})} ok, "
          f"{len({b[0] for b in bad})} bad")
    for kind, n in sorted(res["counts"].items()):
        print(f"  {kind}: {n}")
    if res["frames"]:
        f = sorted(res["frames"])
        print(f"  frames per video: min {f[0]}, median {f[len(f) // 2]}, max {f[-1]}")
    report = a.report or a.list + ".bad.txt"
    if bad:
        with open(report, "w") as fh:
            for line, path, problem in bad:
                fh.write(f"{line}\t{path}\t{problem}\n")
        print(f"report of bad lines: {report}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
