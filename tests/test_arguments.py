"""The golden model and the GPU API agree on every argument: the same bad
call raises the same error type with the same message in
nvfp4_cupy.reference (CPU), the CuPy API and the torch API (GPU), and the
same defaults hold (docs/format.md, Arguments)."""

from __future__ import annotations

import numpy as np
import pytest

from nvfp4_cupy import reference as ref

GOLDEN = "golden"
ENTRIES = [GOLDEN, pytest.param("cupy", marks=pytest.mark.gpu), pytest.param("torch", marks=pytest.mark.gpu)]


def _on(entry, host):
    """A host array as the entry point takes it (numpy, CuPy or torch)."""
    if entry == GOLDEN or not isinstance(host, np.ndarray):
        return host
    if entry == "cupy":
        import cupy as cp

        return cp.asarray(host)
    torch = pytest.importorskip("torch", reason="torch is not installed")
    host = np.ascontiguousarray(host)
    if host.dtype.kind in "iu":
        return torch.from_numpy(host).cuda()
    bits = {2: np.int16, 4: np.int32, 8: np.int64}[host.dtype.itemsize]  # bfloat16 has no torch.from_numpy
    return torch.from_numpy(host.view(bits)).cuda().view(getattr(torch, host.dtype.name))


def _api(entry):
    if entry == GOLDEN:
        return ref.scaled_fp4_quant, ref.dequantize, ref.compute_global_scale
    if entry == "cupy":
        import nvfp4_cupy as nv

        return nv.scaled_fp4_quant, nv.dequantize_fp4, nv.compute_global_scale
    pytest.importorskip("torch", reason="torch is not installed")
    import nvfp4_cupy.torch as nvt

    return nvt.scaled_fp4_quant, nvt.dequantize_fp4, nvt.compute_global_scale


def _quantized():
    return ref.scaled_fp4_quant(np.ones((3, 64), np.float32), 1.0)


# (what is wrong, (packed, scales, global_scale) -> (args, kwargs), error, message)
DEQUANTIZE_CASES = [
    ("scales shape", lambda p, s: ((p, s[:5], 1.0), {}), ValueError, r"scales must have shape \(128, 4\)"),
    ("packed K", lambda p, s: ((p[:, :3], s, 1.0), {}), ValueError, "not a positive multiple of 16"),
    ("n too big", lambda p, s: ((p, s, 1.0), {"n": 99}), ValueError, r"n must be in \[1, 64\]"),
    ("n a bool", lambda p, s: ((p, s, 1.0), {"n": True}), TypeError, "n must be an int, got bool"),
    ("n a float", lambda p, s: ((p, s, 1.0), {"n": 8.0}), TypeError, "n must be an int, got float"),
    ("dtype", lambda p, s: ((p, s, 1.0), {"dtype": np.int8}), TypeError, "dtype must be float16, bfloat16 or float32"),
    ("packed dtype", lambda p, s: ((p.astype(np.int16), s, 1.0), {}), TypeError, "packed must be uint8"),
    ("scales dtype", lambda p, s: ((p, s.astype(np.int8), 1.0), {}), TypeError, "scales must be uint8"),
    ("scale type", lambda p, s: ((p, s, "x"), {}), TypeError, "global_scale must be a float"),
    ("scale value", lambda p, s: ((p, s, 0.0), {}), ValueError, "global_scale must be finite and > 0"),
    ("scale rows", lambda p, s: ((p, s, np.ones(2, np.float32)), {}), ValueError, "one per row"),
    ("scale dtype", lambda p, s: ((p, s, np.ones(1, np.float64)), {}), TypeError, "must be float32"),
    ("layout", lambda p, s: ((p, s, 1.0), {"layout": "bad"}), ValueError, "layout must be one of"),
    ("fmt", lambda p, s: ((p, s, 1.0), {"fmt": "fp4"}), ValueError, "fmt must be one of"),
    ("mx scale", lambda p, s: ((p, s, 1.0), {"fmt": "mxfp4"}), ValueError, "global_scale must be None"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case, change, error, match", DEQUANTIZE_CASES, ids=[c[0] for c in DEQUANTIZE_CASES])
def test_dequantize_refuses_the_same_arguments_everywhere(entry, case, change, error, match):
    _, dequantize, _ = _api(entry)
    args, kwargs = change(*_quantized())
    with pytest.raises(error, match=match):
        dequantize(*(_on(entry, a) for a in args), **kwargs)


QUANTIZE_CASES = [
    ("x dtype", np.ones((2, 16), np.int8), 1.0, {}, TypeError, "x must be float16, bfloat16 or float32, got dtype int8"),
    ("padded_n a bool", np.ones((2, 16), np.float32), 1.0, {"padded_n": True}, TypeError, "padded_n must be an int"),
    ("padded_n", np.ones((2, 16), np.float32), 1.0, {"padded_n": 24}, ValueError, "padded_n must be a multiple of 16"),
    ("padded_n < n", np.ones((2, 32), np.float32), 1.0, {"padded_n": 16}, ValueError, "padded_n must be >= n"),
    ("layout", np.ones((2, 16), np.float32), 1.0, {"layout": "4x8"}, ValueError, "layout must be one of"),
    ("swizzled flag", np.ones((2, 16), np.float32), 1.0, {"is_sf_swizzled_layout": 1}, TypeError,
     "is_sf_swizzled_layout must be a bool"),
    ("scale value", np.ones((2, 16), np.float32), 1e40, {}, ValueError,
     r"global_scale must be finite and > 0 in float32, got 1e\+40 \(inf in float32\)"),
    ("scale nan", np.ones((2, 16), np.float32), float("nan"), {}, ValueError, "got nan$"),
    ("scale rows", np.ones((2, 16), np.float32), np.ones(3, np.float32), {}, ValueError,
     r"one per row, got shape \(3,\)"),
    ("mx scale", np.ones((2, 32), np.float32), 2.0, {"fmt": "mxfp4"}, ValueError, "global_scale must be None"),
    ("empty row", np.ones((2, 0), np.float32), 1.0, {}, ValueError, "n must be positive"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case, x, gs, kwargs, error, match", QUANTIZE_CASES, ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_refuses_the_same_arguments_everywhere(entry, case, x, gs, kwargs, error, match):
    quantize, _, _ = _api(entry)
    with pytest.raises(error, match=match):
        quantize(_on(entry, x), _on(entry, gs), **kwargs)


@pytest.mark.parametrize("entry", ENTRIES)
def test_global_scale_per_row_must_be_a_bool(entry):
    _, _, compute_global_scale = _api(entry)
    with pytest.raises(TypeError, match="per_row must be a bool, got int"):
        compute_global_scale(_on(entry, np.ones((2, 16), np.float32)), per_row=1)


@pytest.mark.parametrize("entry", ENTRIES)
def test_dequantize_defaults_to_float32_everywhere(entry):
    _, dequantize, _ = _api(entry)
    packed, scales = _quantized()
    out = dequantize(_on(entry, packed), _on(entry, scales), 1.0)
    assert str(out.dtype).replace("torch.", "") == "float32"
    golden = ref.dequantize(packed, scales, 1.0)
    host = out if isinstance(out, np.ndarray) else (out.get() if hasattr(out, "get") else out.cpu().numpy())
    np.testing.assert_array_equal(host.view(np.uint32), golden.view(np.uint32))


@pytest.mark.parametrize("entry", ENTRIES)
def test_expert_batches_round_trip(entry):
    """[E, m, n] with E global scales quantizes per expert and dequantizes
    back, per-expert scales and all, on every entry point."""
    quantize, dequantize, _ = _api(entry)
    x = (np.random.default_rng(5).standard_normal((3, 10, 64)) * [[[1.0]], [[30.0]], [[0.01]]]).astype(np.float32)
    gs = np.array([400.0, 10.0, 9e4], np.float32)
    packed, scales = quantize(_on(entry, x), _on(entry, gs))
    assert tuple(packed.shape) == (3, 10, 32) and tuple(scales.shape) == (3, 128, 4)
    y = dequantize(packed, scales, _on(entry, gs), dtype="float32")
    host = y if isinstance(y, np.ndarray) else (y.get() if hasattr(y, "get") else y.cpu().numpy())
    want_packed, want_scales = ref.scaled_fp4_quant(x, gs)
    want = ref.dequantize(want_packed, want_scales, gs)
    np.testing.assert_array_equal(host.view(np.uint32), want.view(np.uint32))
    expert_one = ref.dequantize(want_packed[1], want_scales[1], np.float32(gs[1]))
    np.testing.assert_array_equal(want[1].view(np.uint32), expert_one.view(np.uint32))
