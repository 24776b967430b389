"""Check that this machine can run adamae, before a long job finds out: packages and their versions, the video
backends decoding real H.264 and VP9 clips to identical frames, one pre-training step of a tiny AdaMAE on CPU
(and on the GPU in bf16 when there is one), and the limits DataLoader workers hit (shared memory, cores, open
files). Each problem comes with its fix.

    python tools/doctor.py          # or: make doctor

Exit status: 0 when nothing failed (warnings allowed), 1 when something the programs need is broken.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import resource
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIONAL = {"av": "PyAV video backend (the default, `auto`)", "decord": "decord video backend",
            "deepspeed": "fine-tuning with --enable_deepspeed"}
MIN_SHM_GIB = 2.0  # batches of uint8 clips from several workers; Docker's default is 64 MB
MIN_OPEN_FILES = 4096  # workers pass each batch's tensors as file descriptors


class Result(NamedTuple):
    status: str  # "ok", "warn", "fail" or "info"
    check: str
    detail: str
    fix: str = ""


def requirements() -> dict[str, str]:
    """``{package: minimum version}`` from requirements.txt (the one place the minimums live)."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([\w.]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


LOCK = ROOT / "requirements-lock.txt"


def _dist_name(name: str) -> str:
    """A distribution's name as pip compares them (case, ``-``, ``_`` and ``.`` alike)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """``{package: version}`` pinned in a lock file (``name==version`` lines; names normalised as pip does)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[_dist_name(m.group(1))] = m.group(2)
    return pins


def check_lock(path: Path = LOCK) -> Result:
    """Installed versions of the direct requirements against the lock's (the versions the test suite passed with).

    Newer releases are allowed by the requirement ranges, so a difference is information, not a warning: it is where
    to look first when something that passed CI fails here.
    """
    if not path.exists():
        return Result("info", "lock", f"{path.name} not found")
    pins = lock_pins(path)
    differ = []
    for name in dict.fromkeys([*requirements(), *OPTIONAL]):  # av and decord are in both
        key = _dist_name(name)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if key in pins and pins[key] != version:
            differ.append(f"{name} {version} (lock {pins[key]})")
    if not differ:
        return Result("ok", "lock", f"installed versions are {path.name}'s, which the test suite passed with")
    return Result("info", "lock", f"differs from {path.name}: " + ", ".join(differ)
                  + "; if something that passed CI fails here, `make test LOCKED=1` installs the lock's versions")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def check_packages() -> list[Result]:
    results = [Result("ok" if sys.version_info >= (3, 10) else "fail", "python",
                      f"{platform.python_version()} ({sys.executable})",
                      "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer (pyproject.toml)")]
    # decord last: imported before av, it keeps PyAV's VP9 encoder from opening (make_synthetic_dataset.write_video)
    for name, minimum in sorted(requirements().items(), key=lambda kv: kv[0] == "decord"):
        optional = name in OPTIONAL
        try:
            importlib.import_module(name)
            version = importlib.metadata.version(name)
        except Exception as e:  # ImportError, or a broken install that raises something else on import
            results.append(Result("warn" if optional else "fail", name,
                                  f"cannot import ({type(e).__name__}: {e})" + (f"; needed for {OPTIONAL[name]}"
                                                                                 if optional else ""),
                                  f"pip install '{name}>={minimum}'"))
            continue
        old = _version_tuple(version) < _version_tuple(minimum)
        results.append(Result("fail" if old and not optional else "warn" if old else "ok", name, version,
                              f"pip install -U '{name}>={minimum}'" if old else ""))
    if importlib.util.find_spec("deepspeed") is not None:  # importing it takes seconds and logs; its own tests run it
        results.append(Result("ok", "deepspeed", importlib.metadata.version("deepspeed")))
    else:
        results.append(Result("info", "deepspeed", f"not installed; needed only for {OPTIONAL['deepspeed']}",
                              "pip install -r requirements-deepspeed.txt"))
    if not any(r.check in ("av", "decord") and r.status == "ok" for r in results):
        results.append(Result("fail", "video backend", "no video backend can be imported",
                              "pip install av (PyAV, the default backend)"))
    results.append(check_lock())
    return results


def check_torch() -> list[Result]:
    import torch
    import torch.distributed as dist

    out = [Result("info", "torch build", f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
                  f"{torch.get_num_threads()} CPU threads")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Result("ok", "GPU", f"{torch.cuda.device_count()} x {names}; bf16 {'yes' if bf16 else 'no'}"
                          + ("" if bf16 else " (runs use fp16 with a loss scaler)")))
        out.append(Result("ok" if dist.is_nccl_available() else "warn", "NCCL",
                          "available" if dist.is_nccl_available() else "not built into this torch",
                          "" if dist.is_nccl_available() else "install a CUDA build of torch for multi-GPU runs"))
    else:
        out.append(Result("info", "GPU", "no CUDA device: the programs run on CPU (--device cpu)"))
    out.append(Result("ok" if dist.is_gloo_available() else "warn", "gloo",
                      "available" if dist.is_gloo_available() else "missing: CPU multi-process runs cannot start"))
    return out


def check_decoding(backends: list[str]) -> list[Result]:
    """Write a 16-frame H.264 .mp4 and VP9 .webm, decode them with every importable backend, compare."""
    import numpy as np

    from tools.make_synthetic_dataset import write_video
    from video_io import read_frames

    out = []
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(16, 64, 96, 3), dtype=np.uint8)
    frames[:, :, :48] //= 2  # some structure: an encoder with nothing to predict is not a decoding test
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, codec in (("mp4", "H.264"), ("webm", "VP9")):
            path = os.path.join(tmp, f"clip.{fmt}")
            try:
                write_video(path, frames, fmt)
            except Exception as e:
                out.append(Result("warn", f"encode {codec}", f"PyAV cannot write .{fmt} ({type(e).__name__}: {e})",
                                  "tools/prepare_videos.py and the tests need PyAV with libx264 / libvpx-vp9"))
                continue
            decoded = {}
            for b in backends:
                try:
                    decoded[b] = read_frames(path, [0, 5, 15], b)
                    out.append(Result("ok", f"decode {codec} ({b})", f"3 of {len(frames)} frames, "
                                      f"{decoded[b].shape[2]}x{decoded[b].shape[1]}"))
                except Exception as e:
                    out.append(Result("fail", f"decode {codec} ({b})", f"{type(e).__name__}: {e}",
                                      "reinstall the backend, or pick another with --video_backend"))
            if len(decoded) == 2:
                a, b = decoded.values()
                same = a.shape == b.shape and np.array_equal(a, b)
                out.append(Result("ok" if same else "fail", f"backends agree ({codec})",
                                  "pyav and decord return identical frames" if same else
                                  "pyav and decord return different frames",
                                  "" if same else "report your PyAV / decord / FFmpeg versions in an issue"))
    return out


def check_training_step() -> list[Result]:
    """One forward/backward/step of a tiny adaptive-masking model, built the way run_mae_pretraining builds it."""
    import torch

    import run_mae_pretraining
    from losses import pretrain_losses
    from modeling_pretrain import create_pretrain_model
    from precision import autocast

    args = run_mae_pretraining.get_args_parser().parse_args([
        "--model", "pretrain_videomae_small_patch16_224", "--num_frames", "4", "--input_size", "32",
        "--decoder_depth", "1", "--mask_ratio", "0.75", "--model_kwargs",
        '{"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 4, "decoder_embed_dim": 32, '
        '"decoder_num_heads": 4}'])
    devices = [("cpu", "fp32")] + ([("cuda", "bf16")] if torch.cuda.is_available() else [])
    out = []
    for device, precision in devices:
        try:
            torch.manual_seed(0)
            model = create_pretrain_model(args).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            clips = torch.rand(2, 3, 4, 32, 32, device=device)
            with autocast(device, precision):
                losses = pretrain_losses(model, clips, 16, args.tubelet_size)
            losses.loss.backward()
            no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            opt.step()
            ok = torch.isfinite(losses.loss).item() and not no_grad
            detail = (f"loss {losses.loss.item():.4f}, every parameter got a gradient (sampler included)" if ok else
                      f"loss {losses.loss.item()}, parameters without a gradient: {no_grad[:5]}")
            out.append(Result("ok" if ok else "fail", f"training step ({device}, {precision})", detail,
                              "" if ok else "report torch / timm versions in an issue"))
        except Exception as e:
            out.append(Result("fail", f"training step ({device}, {precision})", f"{type(e).__name__}: {e}",
                              "see the traceback with ADAMAE_DEBUG=1; check the torch / timm versions above"))
            if os.environ.get("ADAMAE_DEBUG"):
                traceback.print_exc()
    return out


def check_limits(default_workers: int) -> list[Result]:
    out = []
    try:
        st = os.statvfs("/dev/shm")
        total, free = st.f_blocks * st.f_frsize / 2**30, st.f_bavail * st.f_frsize / 2**30
        small = total < MIN_SHM_GIB
        out.append(Result("warn" if small else "ok", "shared memory", f"/dev/shm {total:.1f} GiB, {free:.1f} free",
                          f"DataLoader workers hand batches over in /dev/shm; below {MIN_SHM_GIB:g} GiB runs die "
                          "with 'Bus error': docker run --shm-size=16g (or --ipc=host)" if small else ""))
    except OSError:
        out.append(Result("info", "shared memory", "no /dev/shm on this system"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    few = cores <= default_workers
    out.append(Result("warn" if few else "ok", "CPU cores", f"{cores} usable; --num_workers defaults to "
                      f"{default_workers} per GPU", f"pass --num_workers {max(cores - 1, 0)} (one core for the "
                      "training process); see PRETRAIN.md, 'Data loading at GPU speed'" if few else ""))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES
    out.append(Result("warn" if low else "ok", "open files", f"limit {soft}",
                      "workers pass tensors as file descriptors: 'ulimit -n 65536' before the run" if low else ""))
    return out


def run_checks() -> list[Result]:
    results = check_packages()
    imported = [r.check for r in results if r.check in ("av", "decord") and r.status == "ok"]
    backends = ["pyav" if b == "av" else b for b in imported]

    def default_workers() -> int:
        from datasets import add_data_args

        return add_data_args(argparse.ArgumentParser(), pretrain=True).parse_args([]).num_workers

    steps: list[tuple[str, Callable[[], list[Result]]]] = [("torch", check_torch)]
    if "pyav" in backends:  # writing the test clips needs PyAV
        steps.append(("decoding", lambda: check_decoding(backends)))
    elif backends:
        results.append(Result("warn", "decoding", f"not tested: writing the test clips needs PyAV "
                              f"({', '.join(backends)} is not checked)", "pip install av"))
    steps += [("training step", check_training_step), ("limits", lambda: check_limits(default_workers()))]
    for name, step in steps:
        try:
            results += step()
        except Exception as e:  # a check that cannot even start (e.g. torch itself is broken)
            results.append(Result("fail", name, f"{type(e).__name__}: {e}"))
    return results


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args(argv)
    results = run_checks()
    width = max(len(r.check) for r in results)
    for r in results:
        print(f"{r.status.upper():<5} {r.check:<{width}}  {r.detail}")
    fixes = [r for r in results if r.fix and r.status in ("fail", "warn")]
    if fixes:
        print("\nTo fix:")
        for r in fixes:
            print(f"  {r.check}: {r.fix}")
    failed = [r.check for r in results if r.status == "fail"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'Ready'} "
          f"({sum(r.status == 'warn' for r in results)} warning(s))")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
