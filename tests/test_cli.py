"""The main job through its real entry point, as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import gpu_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_cupy", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_demo_reports_and_checks():
    done = run_cli()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "packed    : uint8 [256, 3584]; scales uint8 [256, 448] (swizzled)" in out
    assert "SQNR" in out
    if gpu_unavailable_reason():
        assert "ran the golden model alone" in out
    else:
        assert "every byte matched" in out


def test_demo_layout_option_and_bad_flag():
    done = run_cli("demo", "--layout", "8x4")
    assert done.returncode == 0, done.stderr
    assert "scales uint8 [256, 448] (8x4)" in done.stdout
    bad = run_cli("--layout", "diagonal")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
