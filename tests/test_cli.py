"""The main job through its real entry point, as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy import reference

from conftest import gpu_unavailable_reason, nvrtc_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_cupy", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


# `warm` compiles every kernel program, one after another: minutes, more on a
# machine whose cores other test workers share (it ran past 300 s on the
# H200 runner under `pytest -n 16`). A hang guard, not a speed check.
WARM_TIMEOUT = 1800


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
    done = run_cli("warm", "--arch", "80", env=env, timeout=WARM_TIMEOUT)
    assert done.returncode == 0, done.stderr
    first = re.fullmatch(r"sm_80: compiled (\d+), loaded 0 from the cache in (.*)\n", done.stdout)
    assert first and first[2] == str(tmp_path / "kernels"), done.stdout
    programs = int(first[1])
    assert programs > 100  # every variant of every kernel
    again = run_cli("warm", "--arch", "80", env=env, timeout=WARM_TIMEOUT)
    assert f"sm_80: compiled 0, loaded {programs} from the cache" in again.stdout, again.stdout + again.stderr
    info = run_cli("info", env=env)
    assert f"kernel cache: {tmp_path / 'kernels'} ({programs} compiled programs" in info.stdout


def quantize_and_back(tmp_path, x, *quantize_flags, dequantize_flags=()):
    """x -> x.npy -> quantize -> dequantize -> (packed, scales, meta, y),
    through the real entry point."""
    np.save(tmp_path / "x.npy", x)
    done = run_cli("quantize", str(tmp_path / "x.npy"), str(tmp_path / "q"), *quantize_flags)
    assert done.returncode == 0, done.stderr
    back = run_cli("dequantize", str(tmp_path / "q"), str(tmp_path / "y.npy"), *dequantize_flags)
    assert back.returncode == 0, back.stderr
    meta = json.loads((tmp_path / "q.json").read_text())
    return np.load(tmp_path / "q.packed.npy"), np.load(tmp_path / "q.scales.npy"), meta, np.load(tmp_path / "y.npy")


def test_quantize_dequantize_round_trip_of_a_npy_file(tmp_path):
    x = np.random.default_rng(3).standard_normal((33, 100)).astype(np.float32)
    packed, scales, meta, y = quantize_and_back(tmp_path, x, "--padded-n", "128", "--layout", "8x4",
                                                dequantize_flags=("--dtype", "float16"))
    gs = reference.compute_global_scale(x)
    want = reference.scaled_fp4_quant(x, gs, padded_n=128, layout="8x4")
    assert np.array_equal(packed, want[0]) and np.array_equal(scales, want[1])
    assert meta["shape"] == [33, 100] and meta["layout"] == "8x4" and meta["padded_n"] == 128
    assert y.shape == x.shape and y.dtype == np.float16
    assert y.tobytes() == reference.dequantize(packed, scales, gs, n=100, layout="8x4", dtype=np.float16).tobytes()


def test_mxfp4_file_round_trip(tmp_path):
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float16)
    packed, scales, meta, y = quantize_and_back(tmp_path, x, "--fmt", "mxfp4", "--cpu")
    want = reference.scaled_fp4_quant(x, None, fmt="mxfp4")
    assert np.array_equal(packed, want[0]) and np.array_equal(scales, want[1])
    assert meta["global_scale"] is None and y.dtype == np.float16
    assert y.tobytes() == reference.dequantize(*want, None, n=64, dtype=np.float16, fmt="mxfp4").tobytes()


def test_bfloat16_npy_round_trip(tmp_path):
    """np.save of a bfloat16 array stores 2-byte void; quantize reads that as
    bfloat16 and dequantize writes bfloat16 the same way, for
    np.load(f).view(ml_dtypes.bfloat16)."""
    x = np.random.default_rng(5).standard_normal((4, 3, 40)).astype(ml_dtypes.bfloat16)
    packed, scales, meta, y = quantize_and_back(tmp_path, x, "--per-row")
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [4, 3, 40] and len(meta["global_scale"]) == 12
    rows = x.reshape(12, 40)
    gs = reference.compute_global_scale(rows, per_row=True)
    want = reference.scaled_fp4_quant(rows, gs)
    assert np.array_equal(packed, want[0]) and np.array_equal(scales, want[1])
    assert y.dtype == np.dtype("V2") and y.shape == x.shape
    expected = reference.dequantize(*want, gs, n=40, dtype=ml_dtypes.bfloat16).reshape(x.shape)
    assert y.view(ml_dtypes.bfloat16).tobytes() == expected.tobytes()


def test_dequantize_to_bfloat16_from_float32(tmp_path):
    x = np.random.default_rng(6).standard_normal((5, 32)).astype(np.float32)
    packed, scales, meta, y = quantize_and_back(tmp_path, x, "--global-scale", "0.3", "--cpu",
                                                dequantize_flags=("--dtype", "bfloat16"))
    assert meta["global_scale"] == [float(np.float32(0.3))]
    want = reference.dequantize(packed, scales, np.float32(0.3), n=32, dtype=ml_dtypes.bfloat16)
    assert y.view(ml_dtypes.bfloat16).tobytes() == want.tobytes()


def test_user_mistakes_are_one_line_errors(tmp_path):
    """Through the real entry point (a fresh process: what Python prints on
    its own, a warning, a traceback, shows here). tests/test_cli_errors.py
    holds every case in-process."""
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    cases = [
        (("quantize", tmp_path / "x.npy", tmp_path / "q", "--global-scale", "1e40"), "--global-scale"),
        (("quantize", tmp_path / "x.npy", "/nonexistent/dir/q"), "/nonexistent/dir"),
        (("quantize", tmp_path / "x.npy", tmp_path / "q", "--padded-n", "24"), "--padded-n"),
        (("dequantize", tmp_path / "nothing", tmp_path / "y.npy"), "nothing.json"),
        (("warm", "--arch", "75"), "--arch 75"),
    ]
    for args, name in cases:
        done = run_cli(*map(str, args))
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith(f"nvfp4-cupy {args[0]}: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert name in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
