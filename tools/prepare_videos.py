"""Re-encode a list's videos into a copy that the data loader reads fast, and write the matching list.

    python tools/prepare_videos.py data/k400/train.csv /data/k400_prepared --data_root /data/k400 -j 16

Every video becomes H.264 (libx264 through PyAV) with a keyframe at least every ``--gop`` frames (a random clip
then needs at most that many frames decoded before its first one), x264's ``tune=fastdecode`` (no CABAC, no
deblocking: cheaper to decode), the short side scaled down to ``--short_side`` (320, VideoMAE's Kinetics
convention; never enlarged; 0 keeps the size; dimensions kept even for yuv420p), every decoded frame kept and
re-timed at the source's average frame rate (constant frame rate, same frame indices), no audio, in .mp4 (SSv2's
VP9 .webm included).

Outputs mirror the list's layout under OUT_DIR with the extension changed to .mp4: a relative path ``a/b.webm``
becomes ``OUT_DIR/a/b.mp4`` and stays relative in the new list (train with ``--data_root OUT_DIR``). Absolute
paths (and relative ones leading outside ``--data_root`` with ``..``) are placed relative to the deepest folder
that holds all of them, e.g. ``/data/k400/train/abseiling/x.mp4`` and ``/data/k400/train/zumba/y.mp4`` become
``OUT_DIR/abseiling/x.mp4`` and ``OUT_DIR/zumba/y.mp4``, and are written to the new list as absolute paths.

``--format frames`` writes each video as a folder of JPEG images instead (``OUT_DIR/a/b/img_00001.jpg``, ...,
numbered from 1 like VideoMAE V2's raw frames; short side and quality as flagged), which the training reader opens
like a video (``frame_folders``): a clip then costs the decoding of its own 16 frames only, wherever it lies in the
video, at many times the bytes of a video (DATASET.md has the numbers).

The new list, ``OUT_DIR/<IN_LIST's file name>``, keeps the input's lines (labels, order, separators, header and
comments) with only the paths replaced. A video that cannot be converted (missing, undecodable, truncated, or its
output failed the check) is reported as ``list:line: path: reason`` without stopping, left out of the new list,
and listed in ``OUT_DIR/failed.txt``; the exit status is still 0. A usage error exits with status 2.

Resumable: each output is written to a temporary file (or folder) next to it, checked (it opens with the project's
reader and has the source's number of decoded frames, within 1), fsynced and renamed into place, so an existing
output is a finished one and a rerun skips it (after any kill, SIGKILL included); temporary outputs of dead runs
are removed. The settings are recorded in ``OUT_DIR/.prepare_videos.json`` and a rerun with other settings is
refused.

Finally it prints the bytes before/after and decoded clips/s of a few videos before/after, measured on the
training reader's path (``video_io.open_video`` and pre-training's frame sampling, one process), unless
``--no-bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, NoReturn, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import UserError, make_output_dir  # noqa: E402
from frame_sampling import pretrain_indices  # noqa: E402
from tools.video_reencode import convert, remove_output  # noqa: E402
from video_io import BACKENDS, open_video  # noqa: E402

if TYPE_CHECKING:
    from datasets import VideoRecord

SETTINGS_FILE = ".prepare_videos.json"
FAILED_FILE = "failed.txt"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
TMP_RE = re.compile(r"\.(\d+)\.tmp$")  # temporary outputs: <output>.<pid>.tmp


class UsageError(Exception):
    """A bad flag or file: reported as one line, exit status 2."""


@dataclass
class Job:
    """One distinct source video and where its prepared copy goes."""

    src: str  # path to read
    rel: str  # output path relative to OUT_DIR
    list_path: str  # what the new list says
    lines: List[VideoRecord]  # every list line naming this video


# ----------------------------------------------------------------------------------------------------------------
# Planning: list lines -> distinct videos -> output paths
# ----------------------------------------------------------------------------------------------------------------
def plan_jobs(records: List[VideoRecord], out_dir: str,
              extension: str = ".mp4") -> Tuple[List[Job], List[Tuple[VideoRecord, str]]]:
    """Group lines by source video and map each source to its output (the source's path with ``extension``,
    ``""`` for a folder of frames); returns ``(jobs, collisions)``."""
    inside, outside = {}, {}
    for r in records:
        rel = os.path.normpath(r.path)
        if os.path.isabs(r.path) or rel.startswith(".."):
            outside.setdefault(os.path.abspath(r.full_path), []).append(r)
        else:
            inside.setdefault(os.path.abspath(r.full_path), (rel, []))[1].append(r)
    base = os.path.commonpath([os.path.dirname(p) for p in outside]) if outside else ""
    jobs: List[Job] = []
    for src, (rel, lines) in inside.items():
        out_rel = os.path.splitext(rel)[0] + extension
        jobs.append(Job(src, out_rel, out_rel, lines))
    for src, lines in outside.items():
        out_rel = os.path.splitext(os.path.relpath(src, base))[0] + extension
        jobs.append(Job(src, out_rel, os.path.abspath(os.path.join(out_dir, out_rel)), lines))
    jobs.sort(key=lambda j: j.lines[0].line_no)
    taken: Dict[str, Job] = {}
    kept, collisions = [], []
    for j in jobs:
        first = taken.setdefault(j.rel, j)
        if first is j:
            kept.append(j)
        else:
            collisions += [(r, f"its output {j.rel} is also the output of line {first.lines[0].line_no} "
                               f"({first.lines[0].path})") for r in j.lines]
    if not extension:  # frame folders: a/b.mp4 -> a/b/ would hold a/b/c.mp4 -> a/b/c/ (and look finished)
        inside: Dict[str, Job] = {}  # every folder that holds some output -> one job whose output it holds
        for k in kept:
            d = os.path.dirname(k.rel)
            while d and d not in inside:
                inside[d] = k
                d = os.path.dirname(d)
        nested = [j for j in kept if j.rel in inside]
        kept = [j for j in kept if j.rel not in inside]
        for j in nested:
            inner = inside[j.rel]
            collisions += [(r, f"its output folder {j.rel} would hold the output of line {inner.lines[0].line_no} "
                               f"({inner.lines[0].path})") for r in j.lines]
    return kept, collisions


# ----------------------------------------------------------------------------------------------------------------
# Worker processes and their temporary files (one video: tools/video_reencode.py)
# ----------------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Worker initialiser: on Linux, get SIGKILLed when the main process dies, so that a killed run leaves no
    encoder behind that would still write next to the rerun's files."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie does not (containers may not reap a killed run's workers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def remove_stale_tmp(out_dir: str) -> int:
    """Remove temporary outputs (files, or folders of frames) left by processes that no longer exist; returns how
    many."""
    removed = 0
    for root, dirs, files in os.walk(out_dir):
        for name in files + dirs:
            m = TMP_RE.search(name)
            if m and not _alive(int(m.group(1))):
                remove_output(os.path.join(root, name))
                removed += 1
        dirs[:] = [d for d in dirs if not TMP_RE.search(d)]
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Lists, settings, benchmark
# ----------------------------------------------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rewrite_list(in_list: str, new_paths: Dict[int, str], dropped: set) -> str:
    """The input list with the path of each line in ``new_paths`` (by line number) replaced and the lines in
    ``dropped`` left out; blank, comment and header lines are kept as they are."""
    from datasets import list_lines

    out = []
    for line_no, raw in list_lines(in_list):
        line = raw.strip()
        if line_no in new_paths:
            # the path is the first field: up to the first comma in comma lists, the first token otherwise
            path, comma = new_paths[line_no], "," in line
            end = line.index(",") if comma else re.match(r"\S+", line).end()
            if not comma and re.search(r"\s", path):  # an OUT_DIR with a space: the line becomes path,label
                out.append(",".join([path] + line[end:].split()))
            else:
                out.append(path + line[end:])
        elif line_no not in dropped:
            out.append(line)
    return "".join(x + "\n" for x in out)


def check_settings(out_dir: str, settings: dict) -> None:
    """Refuse to mix outputs made with other settings in one OUT_DIR (a rerun skips finished outputs)."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        old, new = {"format": "mp4", **old}, {"format": "mp4", **settings}  # a video folder's file names no format
        if old != new:
            keys = ["format"] if old["format"] != new["format"] else [k for k in new if old.get(k) != new[k]]
            diff = ", ".join(f"--{k} {old.get(k)}" for k in keys)
            raise UsageError(f"{out_dir} was prepared with {diff}; use the same flags or another OUT_DIR")
    else:
        _write_atomic(path, json.dumps(settings, sort_keys=True) + "\n")


def bench(pairs: List[Tuple[str, str]], backend: str, num_frames: int, sampling_rate: int,
          clips: int) -> Dict[str, float]:
    """Decoded clips/s of the sources and of their outputs, as a pre-training worker reads them (open, sample a
    clip, decode it), interleaved so that both see the same machine load; the same frames from both."""
    rng = random.Random(0)
    spent = {"raw": 0.0, "prepared": 0.0}

    def clip(path: str, idx: List[int]) -> float:
        t = time.perf_counter()
        with open_video(path, backend) as r:
            r.get_batch([min(i, len(r) - 1) for i in idx])
        return time.perf_counter() - t

    for src, dst in pairs:
        with open_video(src, backend) as r:
            n = len(r)
        clip(src, [0])
        clip(dst, [0])  # warm-up: page cache, converters
        for _ in range(clips):
            idx = pretrain_indices(n, num_frames, sampling_rate, rng)
            spent["raw"] += clip(src, idx)
            spent["prepared"] += clip(dst, idx)
    total = len(pairs) * clips
    return {k: total / v for k, v in spent.items()}


def _size(path: str) -> int:
    """Bytes of a file, or of the files in a folder of frames."""
    if os.path.isdir(path):
        with os.scandir(path) as it:
            return sum(e.stat().st_size for e in it if e.is_file())
    return os.path.getsize(path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: List[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_list", metavar="IN_LIST", help="list file (path [label] per line, as for training)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the prepared videos and the new list go")
    p.add_argument("--data_root", default="", help="folder that relative paths in IN_LIST are relative to")
    p.add_argument("-j", "--jobs", type=int, default=min(8, _cpus()),
                   help="parallel processes (each encodes one video on one thread; default: min(8, CPUs))")
    p.add_argument("--format", default="mp4", choices=("mp4", "frames"),
                   help="mp4: H.264 videos; frames: a folder of JPEG images per video (decoded per frame: a clip "
                        "costs its own frames only, at many times the bytes)")
    p.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of --format frames (mmaction2's 95)")
    p.add_argument("--short_side", type=int, default=320, help="scale the short side down to this (even; 0: keep)")
    p.add_argument("--gop", type=int, default=32, help="largest keyframe interval, in frames")
    p.add_argument("--crf", type=int, default=23, help="x264 quality (lower: better and larger)")
    p.add_argument("--preset", default="veryfast", choices=X264_PRESETS,
                   help="x264 preset (slower: smaller files, same decode speed)")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the before/after benchmark")
    p.add_argument("--bench_videos", type=int, default=4, help="videos in the benchmark sample")
    p.add_argument("--bench_clips", type=int, default=10, help="clips per video and side in the benchmark")
    p.add_argument("--video_backend", default="pyav", choices=list(BACKENDS), help="reader for the benchmark")
    p.add_argument("--num_frames", type=int, default=16, help="frames per benchmark clip")
    p.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a benchmark clip")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for flag, value, lo in (("-j", a.jobs, 1), ("--gop", a.gop, 1), ("--short_side", a.short_side, 0),
                            ("--bench_videos", a.bench_videos, 0), ("--bench_clips", a.bench_clips, 1),
                            ("--num_frames", a.num_frames, 1), ("--sampling_rate", a.sampling_rate, 1)):
        if value < lo:
            raise UsageError(f"argument {flag}: must be >= {lo}, got {value}")
    if a.short_side % 2:
        raise UsageError(f"argument --short_side: must be even (yuv420p), got {a.short_side}")
    if not 1 <= a.jpeg_quality <= 100:
        raise UsageError(f"argument --jpeg_quality: must be in [1, 100], got {a.jpeg_quality}")
    if not 0 <= a.crf <= 51:
        raise UsageError(f"argument --crf: must be in [0, 51], got {a.crf}")
    if not os.path.isfile(a.in_list):
        raise UsageError(f"IN_LIST not found: {a.in_list}")
    if a.data_root and not os.path.isdir(a.data_root):
        raise UsageError(f"argument --data_root: not a folder: {a.data_root}")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        raise UsageError(f"OUT_DIR is not a folder: {a.out_dir}")
    a.out_list = os.path.join(a.out_dir, os.path.basename(a.in_list))
    if os.path.exists(a.out_list) and os.path.samefile(a.out_list, a.in_list):
        raise UsageError(f"OUT_DIR {a.out_dir} holds IN_LIST; the new list would overwrite it")
    return a


def run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from datasets import read_list_file  # imports torch (seconds): not before a usage error

    errors: List[Tuple[int, str]] = []
    try:
        records = read_list_file(a.in_list, a.data_root, require_label=False, errors=errors)
    except (OSError, ValueError) as e:  # ValueError: cli.UserError, naming the list's line
        raise UsageError(f"IN_LIST cannot be read: {e}") from None
    if not records:
        raise UsageError(f"IN_LIST lists no videos: {a.in_list}" + (f" ({errors[0][1]})" if errors else ""))
    frames = a.format == "frames"
    jobs, collisions = plan_jobs(records, a.out_dir, "" if frames else ".mp4")
    in_place = next((j for j in jobs if os.path.abspath(os.path.join(a.out_dir, j.rel)) == j.src), None)
    if in_place is not None:  # the source would count as its finished output: nothing converted, silently
        raise UsageError(f"OUT_DIR {a.out_dir} is where the videos are: {a.in_list}:{in_place.lines[0].line_no}'s "
                         f"output would be its source {in_place.src}; choose another OUT_DIR")
    if any("," in j.list_path for j in jobs):  # no list format holds it (a space is fine: the line gets a comma)
        raise UsageError(f"OUT_DIR {a.out_dir} holds a comma, which no list line can hold with the absolute paths "
                         f"this list needs; choose another OUT_DIR")
    try:
        make_output_dir(a.out_dir, "OUT_DIR")
    except UserError as e:
        raise UsageError(str(e)) from None
    settings = {"short_side": a.short_side}
    settings.update({"format": "frames", "jpeg_quality": a.jpeg_quality} if frames else
                    {"gop": a.gop, "crf": a.crf, "preset": a.preset})
    check_settings(a.out_dir, settings)
    stale = remove_stale_tmp(a.out_dir)

    failures: List[Tuple[int, str]] = [(line, msg) for line, msg in errors]  # malformed lines
    for r, reason in collisions:
        failures.append((r.line_no, f"{a.in_list}:{r.line_no}: {r.path}: {reason}"))
    done = [j for j in jobs if os.path.exists(os.path.join(a.out_dir, j.rel))]
    todo = [j for j in jobs if j not in done]
    ok: List[Job] = list(done)
    t0 = time.time()
    bar = tqdm(total=len(todo), unit="video", disable=a.no_progress, dynamic_ncols=True, smoothing=0.1)
    with ProcessPoolExecutor(min(a.jobs, max(1, len(todo))), initializer=_die_with_parent) as ex:
        pending = {ex.submit(convert, j.src, os.path.join(a.out_dir, j.rel), a.short_side, a.gop, a.crf,
                             a.preset, a.jpeg_quality if frames else None): j for j in todo}
        for fut in as_completed(pending):
            j = pending[fut]
            reason, _ = fut.result()
            if reason is None:
                ok.append(j)
            else:
                for r in j.lines:
                    msg = f"{a.in_list}:{r.line_no}: {r.path}: {reason}"
                    failures.append((r.line_no, msg))
                    tqdm.write(msg, file=sys.stderr)
            bar.update(1)
    bar.close()
    elapsed = time.time() - t0

    new_paths = {r.line_no: j.list_path for j in ok for r in j.lines}
    dropped = {r.line_no for r in records if r.line_no not in new_paths} | {line for line, _ in errors}
    _write_atomic(a.out_list, rewrite_list(a.in_list, new_paths, dropped))
    failures.sort()
    failed_path = os.path.join(a.out_dir, FAILED_FILE)
    _write_atomic(failed_path, "".join(m + "\n" for _, m in failures))

    n_lines = len(records) + len(errors)
    print(f"{len(jobs)} videos on {n_lines} lines: {len(ok) - len(done)} converted in "
          f"{elapsed:.1f} s, {len(done)} already done" + (f" ({stale} stale temporary files removed)" if stale else ""))
    if failures:
        print(f"{len(failures)} lines failed and are left out of the new list (listed in {failed_path}):")
        for _, m in failures[:20]:
            print("  " + m)
        if len(failures) > 20:
            print(f"  ... {len(failures) - 20} more")
    print(f"new list: {a.out_list} ({len(new_paths)} of {n_lines} lines); use --data_root {a.out_dir}"
          if any(not os.path.isabs(j.list_path) for j in ok) else f"new list: {a.out_list}")
    ok.sort(key=lambda j: j.lines[0].line_no)
    pairs = [(j.src, os.path.join(a.out_dir, j.rel)) for j in ok]
    if pairs:
        before = sum(os.path.getsize(s) for s, _ in pairs)
        after = sum(_size(d) for _, d in pairs)
        print(f"bytes: {_mb(before)} -> {_mb(after)} ({after / before:.2f}x) for the {len(pairs)} prepared videos")
    if a.bench and pairs and a.bench_videos:
        sample = pairs[:a.bench_videos]
        cps = bench(sample, a.video_backend, a.num_frames, a.sampling_rate, a.bench_clips)
        before = sum(os.path.getsize(s) for s, _ in sample)
        after = sum(_size(d) for _, d in sample)
        print(f"benchmark on {len(sample)} videos, {a.bench_clips} clips each of {a.num_frames} frames every "
              f"{a.sampling_rate}, decoded with {a.video_backend} in one process:")
        print(f"  raw:      {_mb(before):>10}, {cps['raw']:.1f} clips/s")
        print(f"  prepared: {_mb(after):>10}, {cps['prepared']:.1f} clips/s "
              f"({cps['prepared'] / cps['raw']:.2f}x clips/s, {after / before:.2f}x bytes)")
    return 0


def main(argv: List[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"prepare_videos.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_videos.py: interrupted; run the same command again to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
