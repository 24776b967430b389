"""Validate a video list offline before training, with the same rules as training.

Checks every line: malformed line, duplicate path, missing file, undecodable / truncated video (opens it and
decodes the first, middle and last frame; ``--full`` decodes every frame and also flags a video with fewer
decodable frames than its container declares, e.g. a .webm cut short whose header keeps the full duration), and
too short (fewer than ``--min_frames`` frames); a video with a display-matrix rotation (decoded unrotated) is a
warning, not a bad line. With ``--nb_classes`` and/or ``--data_set`` the labels are checked
as fine-tuning checks them (the same parser and class count as ``datasets.VideoList``): every line needs a label
in ``[0, nb_classes)``. Without either, labels are optional (pre-training lists) and only negative ones are bad.

Prints a summary and the first bad lines (``LIST:LINE: PATH: PROBLEM``), writes a report of all bad lines
(``LINE<TAB>PATH<TAB>PROBLEM``). Exit status: 0 all lines ok, 1 some lines bad, 2 usage error (unknown flag,
missing or empty list, ``--nb_classes`` that contradicts ``--data_set``).

    python tools/check_dataset.py data/k400/train.csv --data_root /data/k400 --data_set Kinetics-400
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import DATA_SETS, VideoList, class_count, read_list_file  # noqa: E402
from video_io import BACKENDS, DEFAULT_BACKEND, VideoDecodeError, open_video  # noqa: E402
from pyav_index import demux_index  # noqa: E402
from video_metadata import display_rotation  # noqa: E402

FULL_CHUNK = 32  # --full decodes this many frames per call: bounded memory for long videos
SHOWN_BAD = 20  # bad lines printed on the terminal (all of them go to the report)


def _decodable(reader, n: int) -> int:
    """How many of the ``n`` indexed frames decode, in chunks (a failing chunk is retried frame by frame)."""
    ok = 0
    for start in range(0, n, FULL_CHUNK):
        idx = list(range(start, min(start + FULL_CHUNK, n)))
        try:
            reader.get_batch(idx)
            ok += len(idx)
        except VideoDecodeError:
            for i in idx:
                try:
                    reader.get_batch([i])
                    ok += 1
                except VideoDecodeError:
                    pass
    return ok


def check_video(path: str, backend: str = DEFAULT_BACKEND, min_frames: int = 1, full: bool = False) -> tuple:
    """Return ``(num_frames, problem)``; ``problem`` is None when the video is fine."""
    try:
        with open_video(path, backend) as r:
            n = len(r)
            if full:
                got = _decodable(r, n)
                want = max(n, r.declared_frames())  # more than indexed: the file was cut short
                if got < want:
                    return got, f"truncated: decoded {got} of {want} frames"
            else:
                r.get_batch(sorted({0, n // 2, n - 1}))
    except VideoDecodeError as e:
        kind = "missing" if e.reason == "file not found" else "undecodable"
        return 0, f"{kind}: {e.reason}"
    except Exception as e:  # anything else the decoder throws
        return 0, f"undecodable: {type(e).__name__}: {e}"
    if n < min_frames:
        return n, f"too short: {n} frames < --min_frames {min_frames}"
    return n, None


def rotation_warning(path: str) -> str | None:
    """A warning for a video whose header asks players to rotate it: both backends return it unrotated."""
    rot = display_rotation(path)
    return (f"its display matrix rotates it by {rot} degrees; decoded unrotated, as stored (re-encode it rotated if "
            f"the orientation matters)") if rot else None


def missing_frames(path: str) -> str | None:
    """Why frames seem to be missing inside ``path`` (a jump of three or more frame steps in a stream whose
    timestamps otherwise step evenly: what a demuxer leaves after skipping corrupt bytes; every later index then
    names a later frame), or None. A warning: variable-frame-rate recordings are uneven throughout and not flagged;
    the demux pass is PyAV's whatever the backend (None without PyAV)."""
    try:
        import av

        with av.open(path) as c:
            st = c.streams.video[0]
            index = demux_index(c, st)
            tb = float(st.time_base)
    except Exception:  # no PyAV, or unreadable: decoding reports the file itself
        return None
    if index is None or len(index[0]) < 8:
        return None
    steps = np.diff(np.asarray(index[0]))
    values, counts = np.unique(steps, return_counts=True)
    d = int(values[counts.argmax()])
    jump = int(steps.argmax())
    if d <= 0 or counts.max() < 0.9 * len(steps) or steps[jump] < 3 * d:
        return None
    return (f"frames seem missing inside: the timestamps jump by {steps[jump] * tb:.3g} s ({steps[jump] // d - 1} "
            f"frames) after {index[0][jump] * tb:.3g} s in an otherwise constant-rate stream (corrupt data skipped "
            f"by the demuxer?); later frame indices name later frames")


def _check_args(a):
    n, problem = check_video(*a)
    return n, problem, None if problem else (rotation_warning(a[0]) or missing_frames(a[0]))


def check_list(list_path: str, data_root: str = "", backend: str = DEFAULT_BACKEND, nb_classes: int | None = None,
               min_frames: int = 1, full: bool = False, workers: int = 1, require_label: bool | None = None,
               progress: bool = True) -> dict:
    """Check a list; returns ``{'total': n_lines, 'bad': [(line, path, problem)], 'counts': Counter, 'warnings':
    [(line, path, warning)], ...}``.

    Labels are required when ``nb_classes`` is given (as in fine-tuning) unless ``require_label`` says otherwise.
    Raises FileNotFoundError / ValueError (the list's path in the message) for a missing or empty list.
    """
    if require_label is None:
        require_label = nb_classes is not None
    errors: list = []
    records = read_list_file(list_path, data_root, require_label, errors=errors)
    if not records and not errors:
        raise ValueError(f"{list_path}: no videos listed")
    bad = []
    for line, msg in errors:
        msg = msg.split(": ", 1)[-1]  # drop "LIST:LINE" (the report has its own columns)
        if msg.startswith("missing label"):
            msg = "missing label: labels are required with --nb_classes / --data_set"
        else:
            msg = "malformed: " + msg
        bad.append((line, "", msg))
    first_line: dict = {}
    to_decode = []
    for r in records:
        label_ok = r.label is None or (r.label >= 0 and (nb_classes is None or r.label < nb_classes))
        if not label_ok:  # on duplicate lines too: training rejects the whole list for it
            hi = nb_classes if nb_classes is not None else "inf"
            bad.append((r.line_no, r.path, f"label out of range: {r.label} not in [0, {hi})"))
        if r.path in first_line:
            bad.append((r.line_no, r.path, f"duplicate: same path as line {first_line[r.path]}"))
            continue
        first_line[r.path] = r.line_no
        to_decode.append(r)
    if nb_classes is not None and not any(p.startswith(("malformed", "missing label", "label")) for _, _, p in bad):
        try:  # what fine-tuning itself does with the list: a rule that drifted from the checks above shows here
            VideoList(list_path, data_root, require_label, nb_classes)
        except ValueError as e:
            m = re.search(r":(\d+): ", str(e))  # the list's line, when the message names it
            bad.append((int(m.group(1)) if m else 0, "", f"rejected by training: {e}"))
    jobs = [(r.full_path, backend, min_frames, full) for r in to_decode]
    from tqdm import tqdm

    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(tqdm(ex.map(_check_args, jobs, chunksize=8), total=len(jobs), disable=not progress))
    else:
        results = list(tqdm(map(_check_args, jobs), total=len(jobs), disable=not progress))
    frames, warnings = [], []
    for r, (n, problem, warning) in zip(to_decode, results):
        if problem:
            bad.append((r.line_no, r.path, problem))
        else:
            frames.append(n)
        if warning:
            warnings.append((r.line_no, r.path, warning))
    bad.sort()
    counts = collections.Counter(p.split(":")[0] for _, _, p in bad)
    labels = collections.Counter(r.label for r in records if r.label is not None)
    return {"total": len(records) + len(errors), "bad": bad, "counts": counts, "frames": frames, "labels": labels,
            "warnings": warnings}


def _class_count(nb_classes: int | None, data_set: str | None) -> int | None:
    """The class count fine-tuning would use for these flags (None: labels not checked); ValueError if they
    contradict each other. ``--nb_classes`` alone means a custom set."""
    if nb_classes is None and data_set is None:
        return None
    return class_count(data_set or "custom", nb_classes)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("list", help="list file (path label per line)")
    p.add_argument("--data_root", default="", help="prefix for relative paths in the list")
    p.add_argument("--video_backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="decoder to check with (use the one you train with; the default is training's)")
    p.add_argument("--nb_classes", type=int, default=None,
                   help="labels required and in [0, nb_classes) (alone: a custom set)")
    p.add_argument("--data_set", default=None, choices=list(DATA_SETS),
                   help="labels required and in [0, classes of the set) (custom needs --nb_classes)")
    p.add_argument("--min_frames", type=int, default=1, help="flag videos with fewer frames")
    p.add_argument("--full", action="store_true",
                   help="decode every frame and compare with the container's frame count (slow, finds truncation "
                        "anywhere)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--report", default=None, help="report path (default: LIST.bad.txt)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    a = get_args_parser().parse_args(argv)
    report_dir = os.path.dirname(os.path.abspath(a.report)) if a.report else None
    if report_dir and not (os.path.isdir(report_dir) and os.access(report_dir, os.W_OK)):  # before the long check
        print(f"check_dataset.py: error: --report {a.report}: its folder {report_dir} does not exist or is not "
              f"writable", file=sys.stderr)
        return 2
    try:
        nb = _class_count(a.nb_classes, a.data_set)
        res = check_list(a.list, a.data_root, a.video_backend, nb, a.min_frames, a.full, a.workers,
                         progress=not a.no_progress)
    except (OSError, ValueError) as e:
        print(f"check_dataset.py: error: {e}", file=sys.stderr)
        return 2
    bad = res["bad"]
    n_bad = len({b[0] for b in bad})
    print(f"{a.list}: {res['total']} lines, {res['total'] - n_bad} ok, {n_bad} bad")
    for kind, n in sorted(res["counts"].items()):
        print(f"  {kind}: {n}")
    if res["frames"]:
        f = sorted(res["frames"])
        print(f"  frames per video: min {f[0]}, median {f[len(f) // 2]}, max {f[-1]}")
    if nb is not None:
        empty = [c for c in range(nb) if not res["labels"][c]]
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            print(f"  note: {len(empty)} of {nb} classes have no video in this list ({shown})")
    for line, path, warning in res["warnings"]:  # not bad lines: the exit status ignores them
        print(f"{a.list}:{line}: {path}: warning: {warning}")
    for line, path, problem in bad[:SHOWN_BAD]:
        print(f"{a.list}:{line}: {path + ': ' if path else ''}{problem}")
    if len(bad) > SHOWN_BAD:
        print(f"... {len(bad) - SHOWN_BAD} more")
    report = a.report or a.list + ".bad.txt"
    if bad:
        try:
            with open(report, "w") as fh:
                for line, path, problem in bad:
                    fh.write(f"{line}\t{path}\t{problem}\n")
            print(f"report of bad lines: {report}")
        except OSError as e:  # the default sits beside the list, often in a read-only dataset folder
            print(f"check_dataset.py: cannot write the report of bad lines {report} ({e.strerror or e}); "
                  f"pass --report PATH", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
