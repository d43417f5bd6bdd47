"""The main job through its real entry point, as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvfp4_cupy import reference

from conftest import gpu_unavailable_reason, nvrtc_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_cupy", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=None if env is None else {**os.environ, **env},
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
    bad = run_cli("demo", "--layout", "diagonal")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    unknown = run_cli("transmogrify")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_help_lists_every_command():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("demo", "bench", "info", "warm", "quantize", "dequantize"):
        assert command in done.stdout


def test_info_reports_versions_and_gpu_state():
    done = run_cli("info")
    assert done.returncode == 0, done.stderr
    assert "nvfp4_cupy" in done.stdout and "ml_dtypes" in done.stdout
    if gpu_unavailable_reason():
        assert "GPU: none" in done.stdout
    else:
        assert "GPU 0:" in done.stdout and "conversion" in done.stdout


def test_warm_fills_the_cache_that_info_reports(tmp_path):
    if nvrtc_unavailable_reason():
        pytest.skip(nvrtc_unavailable_reason())
    env = {"NVFP4_CUPY_CACHE_DIR": str(tmp_path / "kernels")}
    done = run_cli("warm", "--arch", "80", env=env)
    assert done.returncode == 0, done.stderr
    from nvfp4_cupy._compile import all_variants

    assert f"sm_80: compiled {len(all_variants())}," in done.stdout
    assert len(list((tmp_path / "kernels").glob("*.bin"))) == len(all_variants())
    again = run_cli("warm", "--arch", "80", env=env)
    assert "sm_80: compiled 0," in again.stdout, again.stdout + again.stderr
    info = run_cli("info", env=env)
    assert f"kernel cache: {tmp_path / 'kernels'} ({len(all_variants())} compiled programs" in info.stdout
    old = run_cli("warm", "--arch", "75", env=env)
    assert old.returncode == 1 and "sm_80 or newer" in old.stderr and "Traceback" not in old.stderr


def test_quantize_dequantize_round_trip_of_a_npy_file(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = run_cli("quantize", str(tmp_path / "x.npy"), str(tmp_path / "q"), "--padded-n", "128", "--layout", "8x4")
    assert done.returncode == 0, done.stderr
    packed = np.load(tmp_path / "q.packed.npy")
    scales = np.load(tmp_path / "q.scales.npy")
    meta = json.loads((tmp_path / "q.json").read_text())
    gs = reference.compute_global_scale(x)
    want = reference.scaled_fp4_quant(x, gs, padded_n=128, layout="8x4")
    assert np.array_equal(packed, want[0]) and np.array_equal(scales, want[1])
    assert meta["shape"] == [33, 100] and meta["layout"] == "8x4" and meta["padded_n"] == 128
    back = run_cli("dequantize", str(tmp_path / "q"), str(tmp_path / "y.npy"), "--dtype", "float16")
    assert back.returncode == 0, back.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == x.shape and y.dtype == np.float16
    assert np.array_equal(y, reference.dequantize(packed, scales, gs, n=100, layout="8x4", dtype=np.float16))


def test_mxfp4_file_round_trip(tmp_path):
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    assert run_cli("quantize", str(tmp_path / "x.npy"), str(tmp_path / "q"), "--fmt", "mxfp4", "--cpu").returncode == 0
    assert run_cli("dequantize", str(tmp_path / "q"), str(tmp_path / "y.npy")).returncode == 0
    want = reference.scaled_fp4_quant(x, None, fmt="mxfp4")
    assert np.array_equal(np.load(tmp_path / "q.packed.npy"), want[0])


def test_user_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "bad.npy").write_text("not an array")
    cases = [
        ("quantize", str(tmp_path / "missing.npy"), str(tmp_path / "q")),
        ("quantize", str(tmp_path / "bad.npy"), str(tmp_path / "q")),
        ("dequantize", str(tmp_path / "nothing"), str(tmp_path / "y.npy")),
    ]
    np.save(tmp_path / "ints.npy", np.ones((2, 16), np.int32))
    cases.append(("quantize", str(tmp_path / "ints.npy"), str(tmp_path / "q")))
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    cases.append(("quantize", str(tmp_path / "x.npy"), str(tmp_path / "q"), "--padded-n", "24"))
    for args in cases:
        done = run_cli(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "error:" in done.stderr
