"""Hypothesis fuzzing of the GPU quantizer (round-to-nearest and stochastic
rounding), and of the fused ops (fake quantization, RMSNorm and SiLU-and-mul
with quantization), against the golden
model: random shapes, dtypes, layouts, formats, padding, row strides,
unaligned bases, special values and global scales (host, device, per row,
invalid), with poisoned outputs. A fixed seed and budget in the normal suite;
NVFP4_FUZZ_EXAMPLES=N for a longer run on a GPU machine."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bytes_check import assert_bytes_equal, quantize_poisoned
from conftest import import_cupy
from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import NUMPY_DTYPES, FORMATS, LAYOUTS, round_up
from nvfp4_cupy.reference.stochastic import scaled_fp4_quant_sr

pytestmark = pytest.mark.gpu
cp = import_cupy()
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("NVFP4_FUZZ_EXAMPLES", "60"))
DTYPES = NUMPY_DTYPES
SPECIALS = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 2688.0, 1e30, -1e-8]


@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    block = FORMATS[fmt]
    m = draw(st.integers(1, 200))
    n = draw(st.integers(1, 600))
    padded_n = round_up(n, block) + block * draw(st.integers(0, 3))
    row_stride = n + draw(st.sampled_from([0, 0, 1, 8, 37]))  # extra elements: a column slice
    offset = draw(st.sampled_from([0, 0, 1, 3, 8]))  # elements past an aligned base
    specials = draw(st.lists(st.tuples(st.integers(0, m * n - 1), st.sampled_from(SPECIALS)), max_size=4))
    if fmt == "mxfp4":
        scale_kind = "none"
    else:
        scale_kind = draw(st.sampled_from(["host", "device", "row", "invalid"]))
    return {
        "fmt": fmt,
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "layout": draw(st.sampled_from(sorted(LAYOUTS))),
        "m": m,
        "n": n,
        "padded_n": padded_n,
        "row_stride": row_stride,
        "offset": offset,
        "specials": specials,
        "scale_kind": scale_kind,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "magnitude": draw(st.sampled_from([1e-6, 1.0, 100.0, 3e4])),
    }


def drawn_input(case):
    """(x on the GPU as drawn: row stride, base offset; x on the host; the
    case's generator)."""
    m, n, dtype = case["m"], case["n"], DTYPES[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    values = (rng.standard_normal((m, n)) * case["magnitude"]).astype(np.float32)
    for index, special in case["specials"]:
        values.flat[index] = special
    with np.errstate(over="ignore"):
        x_host = values.astype(dtype)
    # Lay the rows out in a bigger buffer: row stride and base offset as drawn.
    storage = np.zeros(case["offset"] + m * case["row_stride"], dtype)
    rows = storage[case["offset"]:].reshape(m, case["row_stride"])
    rows[:, :n] = x_host
    x = cp.asarray(storage)[case["offset"]:].reshape(m, case["row_stride"])[:, :n]
    return x, x_host, rng


def drawn_scale(case, x_host, rng):
    """(global scale for the GPU, the same for the golden model) of the
    drawn kind, from x_host's values."""
    kind = case["scale_kind"]
    if kind == "none":
        return None, None
    if kind == "host":
        gs = float(ref.compute_global_scale(x_host)[0]) if np.isfinite(x_host.astype(np.float32)).all() else 3.0
        gs = gs if np.isfinite(gs) and gs > 0 else 3.0
        return gs, gs
    if kind == "device":
        gs_host = ref.compute_global_scale(x_host)
    elif kind == "row":
        gs_host = ref.compute_global_scale(x_host, per_row=True)
    else:
        gs_host = np.array([rng.choice([np.nan, np.inf, 0.0, -2.0])], np.float32)
    return cp.asarray(gs_host), gs_host


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_gpu_matches_golden(case):
    x, x_host, rng = drawn_input(case)
    gs, gs_host = drawn_scale(case, x_host, rng)
    want = ref.scaled_fp4_quant(x_host, gs_host, padded_n=case["padded_n"], layout=case["layout"], fmt=case["fmt"])
    packed, scales = quantize_poisoned(x, gs, fmt=case["fmt"], padded_n=case["padded_n"], layout=case["layout"])
    assert_bytes_equal(packed, want[0], f"{case}: packed")
    assert_bytes_equal(scales, want[1], f"{case}: scales")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases(), seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**64 - 1))
def test_stochastic_rounding_matches_golden(case, seed, offset):
    hypothesis.assume(case["fmt"] == "nvfp4")
    x, x_host, rng = drawn_input(case)
    gs, gs_host = drawn_scale(case, x_host, rng)
    want = scaled_fp4_quant_sr(x_host, gs_host, padded_n=case["padded_n"], layout=case["layout"], seed=seed,
                               offset=offset)
    packed, scales = quantize_poisoned(x, gs, padded_n=case["padded_n"], layout=case["layout"],
                                       stochastic=(seed, offset))
    assert_bytes_equal(packed, want[0], f"{case} seed={seed} offset={offset}: packed")
    assert_bytes_equal(scales, want[1], f"{case} seed={seed} offset={offset}: scales")


FUSED_OPS = ("fake_quantize", "fake_quantize_variant", "fake_quantize_amax", "rms_norm_quant", "silu_and_mul_quant")
MX_RULES = ("floor", "rceil", "te_pow2")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), op=st.sampled_from(FUSED_OPS))
def test_fused_ops_match_golden(case, op):
    """The fused ops of issue 16 on the same drawn inputs, outputs poisoned:
    fake quantization reads x as drawn (row stride, base offset), with the
    default quantizer or a variant (numerics="te", stochastic rounding, an MX
    scale rule, or NVFP4 Four Over Six or the RHT under the global amax of x,
    per row for a per-row scale); RMSNorm
    (with a weight) and SiLU-and-mul read a contiguous copy, SiLU-and-mul
    its even part ([m, 2 * (n // 2)])."""
    from test_experts_gpu import run_poisoned

    import nvfp4_cupy as nv
    from nvfp4_cupy.reference import fused

    x, x_host, rng = drawn_input(case)
    gs, gs_host = drawn_scale(case, x_host, rng)
    fmt, layout, padded_n = case["fmt"], case["layout"], case["padded_n"]
    if op in ("fake_quantize", "fake_quantize_variant"):
        options = {"fmt": fmt}
        if op == "fake_quantize_variant":  # an MX rule; numerics="te" (row-scaled for a per-row scale) or SR
            options |= ({"mx_scale_rule": MX_RULES[case["seed"] % 3]} if fmt == "mxfp4" else
                        {"numerics": "te", "row_scaled": case["scale_kind"] == "row"} if case["seed"] % 2 else
                        {"rounding": "stochastic", "seed": case["seed"] * 2**31 + 7, "offset": case["seed"] ** 2})
        want = (fused.fake_quantize(x_host, gs_host, **options),)
        got = run_poisoned(lambda: (nv.fake_quantize(x, gs, **options),))
    elif op == "fake_quantize_amax":
        seed = case["seed"]
        options = {"numerics": "te", "row_scaled": case["scale_kind"] == "row"}
        if case["n"] % 16 == 0 and seed % 2:
            options |= {"rht": True, "transform_dtype": ("input", "float32")[seed // 2 % 2]}
        else:
            options |= {"four_over_six": True, "err_mode": ("MAE", "MSE")[seed // 2 % 2],
                        "e4m3_max": (448, 256)[seed // 4 % 2], "err_use_fast_math": seed % 3 == 0}
        want = (fused.fake_quantize(x_host, **options),)
        got = run_poisoned(lambda: (nv.fake_quantize(x, **options),))
    elif op == "rms_norm_quant":
        weight_host = rng.standard_normal(case["n"]).astype(x_host.dtype)
        want = fused.rms_norm_quant(x_host, weight_host, 1e-6, gs_host, padded_n=padded_n, layout=layout, fmt=fmt)
        x_c, weight = cp.ascontiguousarray(x), cp.asarray(weight_host)
        got = run_poisoned(lambda: nv.rms_norm_quant(x_c, weight, 1e-6, gs, padded_n=padded_n, layout=layout,
                                                     fmt=fmt))
    else:
        even = 2 * (case["n"] // 2)
        if even == 0:
            return  # no gate-and-up pair in one column
        x_host = np.ascontiguousarray(x_host[:, :even])
        want = fused.silu_and_mul_quant(x_host, gs_host, padded_n=padded_n, layout=layout, fmt=fmt)
        x_c = cp.ascontiguousarray(x[:, :even])
        got = run_poisoned(lambda: nv.silu_and_mul_quant(x_c, gs, padded_n=padded_n, layout=layout, fmt=fmt))
    assert len(got) == len(want), f"{op} {case}: {len(got)} outputs, want {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bytes_equal(a.view(np.uint8), np.asarray(b).view(np.uint8), f"{op} {case}: output {i}")
