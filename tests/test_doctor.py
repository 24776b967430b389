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
    assert re.search(r"^Ready \(\d+ warning\(s\)\)$", res.stdout, re.M)


def test_one_backend_missing_is_a_warning_and_no_backend_a_failure(tmp_path):
    res = run_doctor(tmp_path / "one", broken=("decord",))
    assert res.returncode == 0, res.stdout + res.stderr
    assert status(res.stdout, "decord") == "WARN" and "decord is broken here" in res.stdout
    assert status(res.stdout, "decode VP9 (pyav)") == "OK" and "(decord)" not in res.stdout
    assert "pip install 'decord>=" in res.stdout  # the fix, with requirements.txt's minimum

    res = run_doctor(tmp_path / "none", broken=("decord", "av"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert status(res.stdout, "video backend") == "FAIL" and "FAILED: video backend" in res.stdout
    assert status(res.stdout, "training step (cpu, fp32)") == "OK"  # the rest is still checked
