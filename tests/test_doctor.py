"""tools/doctor.py on this machine, and with a video backend that cannot be imported (a real failing import)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_doctor(tmp_path: Path, broken: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the doctor; each module in ``broken`` raises ImportError when imported (shadowed on PYTHONPATH)."""
    shim = tmp_path / "shim"
    for name in broken:
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is broken here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "tools/doctor.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def status(out: str, check: str) -> str:
    m = re.search(rf"^(\w+)\s+{re.escape(check)}\s", out, re.M)
    assert m, f"no line for {check!r}:\n{out}"
    return m.group(1)


def test_doctor_passes_here_with_real_clips_and_a_real_step(tmp_path):
    res = run_doctor(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("torch", "av", "decord", "decode H.264 (pyav)", "decode VP9 (decord)", "backends agree (H.264)",
                  "backends agree (VP9)", "training step (cpu, fp32)", "open files"):
        assert status(res.stdout, check) == "OK", check
    assert "every parameter got a gradient (sampler included)" in res.stdout
    assert status(res.stdout, "lock") in ("OK", "INFO")  # INFO once newer releases than the lock's are installed
    assert re.search(r"^Ready \(\d+ warning\(s\)\)$", res.stdout, re.M)


def test_one_backend_missing_is_a_warning_and_no_backend_a_failure(tmp_path):
    res = run_doctor(tmp_path / "no_av", broken=("av",))  # decord alone: decoding untested, and it says so
    assert res.returncode == 0 and status(res.stdout, "decoding") == "WARN", res.stdout
    assert "not tested: writing the test clips needs PyAV" in res.stdout

    res = run_doctor(tmp_path / "one", broken=("decord",))
    assert res.returncode == 0, res.stdout + res.stderr
    assert status(res.stdout, "decord") == "WARN" and "decord is broken here" in res.stdout
    assert status(res.stdout, "decode VP9 (pyav)") == "OK" and "(decord)" not in res.stdout
    assert "pip install 'decord>=" in res.stdout  # the fix, with requirements.txt's minimum

    res = run_doctor(tmp_path / "none", broken=("decord", "av"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert status(res.stdout, "video backend") == "FAIL" and "FAILED: video backend" in res.stdout
    assert status(res.stdout, "training step (cpu, fp32)") == "OK"  # the rest is still checked


def test_the_lock_pins_a_version_every_requirement_file_admits():
    from packaging.requirements import Requirement

    sys.path.insert(0, str(ROOT / "tools"))
    from doctor import lock_pins

    pins = lock_pins()
    assert len(pins) > 20  # the whole environment, not only the direct requirements
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-deepspeed.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line or line.startswith("-r"):
                continue
            req = Requirement(line)
            key = req.name.replace("_", "-").lower()
            assert key in pins, f"{name}: {req.name} is not in requirements-lock.txt"
            assert req.specifier.contains(pins[key], prereleases=True), f"{name}: {line} vs lock {pins[key]}"


def test_doctor_names_the_packages_that_differ_from_the_lock(tmp_path):
    import importlib.metadata

    sys.path.insert(0, str(ROOT / "tools"))
    from doctor import LOCK, check_lock

    here = importlib.metadata.version("numpy")
    lock = tmp_path / "requirements-lock.txt"
    lock.write_text(LOCK.read_text().replace(f"numpy=={here}", "numpy==1.24.0") + "einops==0.1\n")
    r = check_lock(lock)
    assert r.status == "info"  # the ranges allow newer releases: information, not a failure
    assert f"numpy {here} (lock 1.24.0)" in r.detail and "einops" in r.detail and "LOCKED=1" in r.detail
    assert "tqdm" not in r.detail
    assert check_lock(tmp_path / "missing.txt").detail == "missing.txt not found"
