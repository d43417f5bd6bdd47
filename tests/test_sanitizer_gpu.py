"""compute-sanitizer over every kernel family (tests/sanitizer_workload.py):
memcheck (out-of-bounds and misaligned accesses), racecheck (shared memory
hazards in the amax reduction), synccheck (barriers) and initcheck (reads of
memory never written: every output byte, padding included, is written before
it is copied back)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_cupy

pytestmark = pytest.mark.gpu
import_cupy()
WORKLOAD = Path(__file__).resolve().parent / "sanitizer_workload.py"


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        candidate = Path(root) / "bin" / "compute-sanitizer"
        if candidate.is_file():
            return str(candidate)
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_kernels_are_clean_under_compute_sanitizer(tool):
    sanitizer = find_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    command = [sanitizer, "--tool", tool, "--error-exitcode", "99"]
    if tool == "memcheck":
        command += ["--check-device-heap", "yes"]
    done = subprocess.run([*command, sys.executable, str(WORKLOAD)], capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert "all bit-exact" in done.stdout, report[-4000:]
    summary = "RACECHECK SUMMARY: 0 hazards" if tool == "racecheck" else "ERROR SUMMARY: 0 errors"
    assert summary in report, report[-4000:]
