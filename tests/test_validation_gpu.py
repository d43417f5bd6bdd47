"""Bad input to the GPU function: a TypeError/ValueError naming the argument,
raised before any launch, with caller buffers left as they were."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS
from conftest import import_cupy

pytestmark = pytest.mark.gpu
cp = import_cupy()


@pytest.fixture
def x():
    return cp.ones((4, 64), dtype=cp.float16)


@pytest.mark.parametrize(
    "make_x, error, match",
    [
        (lambda: np.ones((4, 64), np.float16), TypeError, "x is a NumPy \\(host\\) array"),
        (lambda: [1.0] * 16, TypeError, "x must be a CuPy array or a CUDA tensor, got list"),
        (lambda: cp.ones((4, 64), cp.int8), TypeError, "got dtype int8"),
        (lambda: cp.ones((4, 64), cp.float64), TypeError, "got dtype float64"),
        (lambda: cp.array(1.0, cp.float32), ValueError, "at least one dimension"),
        (lambda: cp.ones((4, 128), cp.float16)[:, ::2], ValueError, "last dimension must be contiguous"),
        (lambda: cp.ones((4, 6, 32), cp.float16)[:, ::2, :].transpose(1, 0, 2), ValueError,
         "do not flatten into evenly strided rows"),
    ],
)
def test_bad_x(nv, make_x, error, match):
    with pytest.raises(error, match=match):
        nv.scaled_fp4_quant(make_x(), 1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"padded_n": 48}, ValueError, "padded_n must be >= n, got padded_n=48 < n=64"),
        ({"padded_n": 72}, ValueError, "multiple of 16, got padded_n=72"),
        ({"layout": "swizzle"}, ValueError, "layout must be one of"),
        ({"stream": 0}, TypeError, "stream must be a cupy.cuda.Stream, a torch.cuda.Stream or None, got int"),
    ],
)
def test_bad_options(nv, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        nv.scaled_fp4_quant(x, 1.0, **kwargs)


@pytest.mark.parametrize(
    "make_gs, error, match",
    [
        (lambda: 0.0, ValueError, "global_scale must be finite and > 0"),
        (lambda: float("nan"), ValueError, "global_scale must be finite and > 0"),
        (lambda: 1e40, ValueError, r"got 1e\+40 \(inf in float32\)"),
        (lambda: True, TypeError, "global_scale must be a float"),
        (lambda: np.array([1.0], np.float32), TypeError, "global_scale is a NumPy \\(host\\) array"),
        (lambda: cp.ones(1, cp.float64), TypeError, "must be float32, got float64"),
        (lambda: cp.ones(2, cp.float32), ValueError, r"must hold one element, one per expert .* got shape \(2,\)"),
    ],
)
def test_bad_global_scale(nv, x, make_gs, error, match):
    with pytest.raises(error, match=match):
        nv.scaled_fp4_quant(x, make_gs())


def poisoned(shape):
    buffer = cp.empty(shape, cp.uint8)
    buffer.fill(POISONS[0])
    return buffer


@pytest.mark.parametrize(
    "make_out, make_scale, error, match",
    [
        (lambda: poisoned((4, 31)), lambda: poisoned((128, 4)), ValueError, r"out must have shape \(4, 32\), got \(4, 31\)"),
        (lambda: poisoned((4, 32)).view(cp.int8), lambda: poisoned((128, 4)), TypeError, "out must have dtype uint8"),
        (lambda: poisoned((4, 64))[:, ::2], lambda: poisoned((128, 4)), ValueError, "out must be C-contiguous"),
        (lambda: poisoned((4, 32)), lambda: poisoned((4, 4)), ValueError, r"out_scale must have shape \(128, 4\)"),
        (lambda: np.zeros((4, 32), np.uint8), lambda: poisoned((128, 4)), TypeError, "out is a NumPy"),
    ],
)
def test_bad_outputs_leave_buffers_untouched(nv, x, make_out, make_scale, error, match):
    out, out_scale = make_out(), make_scale()
    with pytest.raises(error, match=match):
        nv.scaled_fp4_quant(x, 1.0, out=out, out_scale=out_scale)
    for buffer in (out, out_scale):
        if isinstance(buffer, cp.ndarray):
            assert (buffer.view(cp.uint8) == POISONS[0]).all()


def test_outputs_overlapping_input_or_each_other(nv):
    storage = cp.zeros(4096, cp.uint8)
    x = storage[:512].view(cp.float16).reshape(4, 64)
    with pytest.raises(ValueError, match="out overlaps x"):
        nv.scaled_fp4_quant(x, 1.0, out=storage[256:384].reshape(4, 32))
    out = storage[1024:1152].reshape(4, 32)
    with pytest.raises(ValueError, match="out_scale overlaps out"):
        nv.scaled_fp4_quant(x, 1.0, out=out, out_scale=storage[1100:1612].reshape(128, 4))
    assert not storage.any()


def test_create_fp4_output_tensors_checks(nv):
    packed, scales = nv.create_fp4_output_tensors(150, 7152, padded_n=7168)
    assert packed.shape == (150, 3584) and scales.shape == (256, 448)
    packed, scales = nv.create_fp4_output_tensors(9, 80, layout="8x4")
    assert packed.shape == (9, 40) and scales.shape == (16, 8)
    with pytest.raises(ValueError, match="m must be >= 0, got m=-1"):
        nv.create_fp4_output_tensors(-1, 64)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        nv.create_fp4_output_tensors(4, 64.0)
    with pytest.raises(ValueError, match="the last dimension n must be positive, got n=0"):
        nv.create_fp4_output_tensors(4, 0)
    with pytest.raises(ValueError, match="m=2147483648, .* too large for one launch"):
        nv.create_fp4_output_tensors(2**31, 16)  # checked, not a 32 GiB allocation attempt
    with pytest.raises(ValueError, match="num_experts=100000 is too large"):
        nv.create_fp4_output_tensors(4, 16, num_experts=100_000)


def test_per_expert_scale_shapes(nv):
    x3 = cp.ones((3, 4, 32), cp.float16)
    with pytest.raises(ValueError, match=r"one per expert for x of shape \[E, m, n\], or one per row, got shape \(2,\)"):
        nv.scaled_fp4_quant(x3, cp.ones(2, cp.float32))
    with pytest.raises(ValueError, match=r"got shape \(3,\) for x of shape \(4, 32\)"):
        nv.scaled_fp4_quant(cp.ones((4, 32), cp.float16), cp.ones(3, cp.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4, 16\)"):
        nv.scaled_fp4_quant(x3, cp.ones(3, cp.float32), out=cp.empty((12, 16), cp.uint8))


# --- dequantize_fp4, compute_global_scale and quantize -----------------------


@pytest.fixture
def quantized(nv):
    """(packed [4, 32], scales [128, 4]) of a [4, 64] input, swizzled."""
    return nv.scaled_fp4_quant(cp.ones((4, 64), cp.float16), 1.0)


@pytest.mark.parametrize(
    "make_change, error, match",
    [
        (lambda: {"packed": np.zeros((4, 32), np.uint8)}, TypeError, "packed is a NumPy \\(host\\) array"),
        (lambda: {"packed": cp.zeros((4, 32), cp.int8)}, TypeError, "packed must be uint8, got dtype int8"),
        (lambda: {"packed": cp.zeros(32, cp.uint8)}, ValueError, r"packed must be \[m, padded_n // 2\] or \[E, m"),
        (lambda: {"packed": cp.zeros((4, 64), cp.uint8)[:, ::2]}, ValueError, "packed must be C-contiguous"),
        (lambda: {"packed": cp.zeros((4, 12), cp.uint8)}, ValueError, "24 values a row, not a positive multiple of 16"),
        (lambda: {"scales": cp.zeros((4, 4), cp.uint8)}, ValueError, r"scales must have shape \(128, 4\), got \(4, 4\)"),
        (lambda: {"scales": cp.zeros((128, 4), cp.int8)}, TypeError, "scales must be uint8, got dtype int8"),
        (lambda: {"scales": [0] * 4}, TypeError, "scales must be a CuPy array or a CUDA tensor, got list"),
        (lambda: {"global_scale": 0.0}, ValueError, "global_scale must be finite and > 0"),
        (lambda: {"global_scale": cp.ones(3, cp.float32)}, ValueError, r"one per row, got shape \(3,\)"),
        (lambda: {"n": 65}, ValueError, r"n must be in \[1, 64\]"),
        (lambda: {"n": 0}, ValueError, r"n must be in \[1, 64\]"),
        (lambda: {"n": 16.0}, TypeError, "n must be an int, got float"),
        (lambda: {"n": True}, TypeError, "n must be an int, got bool"),
        (lambda: {"layout": "8x8"}, ValueError, "layout must be one of"),
        (lambda: {"dtype": np.int16}, TypeError, "dtype"),
        (lambda: {"fmt": "fp8"}, ValueError, "fmt"),
        (lambda: {"like": "jax"}, ValueError, "like must be None, 'cupy' or 'torch'"),
        (lambda: {"stream": 1}, TypeError, "stream must be a cupy.cuda.Stream"),
    ],
)
def test_bad_dequantize_arguments(nv, quantized, make_change, error, match):
    arguments = {"packed": quantized[0], "scales": quantized[1], "global_scale": 1.0, **make_change()}
    before = [cp.asnumpy(a).copy() for a in quantized]
    with pytest.raises(error, match=match):
        nv.dequantize_fp4(arguments.pop("packed"), arguments.pop("scales"), arguments.pop("global_scale"), **arguments)
    for original, now in zip(before, quantized):
        assert np.array_equal(original, cp.asnumpy(now))


def poisoned_as(shape, dtype):
    buffer = cp.empty(shape, dtype)
    buffer.view(cp.uint8).fill(POISONS[1])
    return buffer


@pytest.mark.parametrize(
    "make_out, error, match",
    [
        (lambda: poisoned_as((4, 63), cp.float16), ValueError, r"out must have shape \(4, 64\), got \(4, 63\)"),
        (lambda: poisoned_as((4, 64), cp.float32), TypeError, "out must have dtype float16, got float32"),
        (lambda: poisoned_as((4, 128), cp.float16)[:, ::2], ValueError, "out must be C-contiguous"),  # a view
        (lambda: np.zeros((4, 64), np.float16), TypeError, "out is a NumPy"),
    ],
)
def test_bad_dequantize_out_is_left_untouched(nv, quantized, make_out, error, match):
    out = make_out()
    with pytest.raises(error, match=match):
        nv.dequantize_fp4(*quantized, 1.0, out=out, dtype=cp.float16)
    if isinstance(out, cp.ndarray):
        assert (cp.asnumpy(out).view(np.uint8) == POISONS[1]).all()


def test_dequantize_out_overlapping_its_inputs(nv):
    storage = cp.zeros(8192, cp.uint8)
    packed, scales = storage[:128].reshape(4, 32), storage[512:1024].reshape(128, 4)
    with pytest.raises(ValueError, match="out overlaps packed"):
        nv.dequantize_fp4(packed, scales, 1.0, out=storage[:512].view(cp.float16).reshape(4, 64), dtype=cp.float16)
    with pytest.raises(ValueError, match="out overlaps scales"):
        nv.dequantize_fp4(packed, scales, 1.0, out=storage[768:1280].view(cp.float16).reshape(4, 64), dtype=cp.float16)
    gs = storage[4096:4100].view(cp.float32)
    with pytest.raises(ValueError, match="out overlaps global_scale"):
        nv.dequantize_fp4(packed, scales, gs, out=storage[4096:4608].view(cp.float16).reshape(4, 64), dtype=cp.float16)
    assert not storage.any()


def test_quantize_output_overlapping_a_device_global_scale(nv):
    storage = cp.zeros(1024, cp.uint8)
    gs = storage[:4].view(cp.float32)
    with pytest.raises(ValueError, match="out overlaps global_scale"):
        nv.scaled_fp4_quant(cp.ones((4, 64), cp.float16), gs, out=storage[:128].reshape(4, 32))
    assert not storage.any()


@pytest.mark.parametrize(
    "make_x, kwargs, error, match",
    [
        (lambda: np.ones((4, 64), np.float32), {}, TypeError, "x is a NumPy \\(host\\) array"),
        (lambda: cp.ones((4, 64), cp.int32), {}, TypeError, "got dtype int32"),
        (lambda: cp.array(2.0, cp.float32), {}, ValueError, "at least one dimension"),
        (lambda: cp.ones((4, 128), cp.float16)[:, ::2], {}, ValueError, "last dimension must be contiguous"),
        (lambda: cp.ones((4, 64), cp.float16), {"per_row": 1}, TypeError, "per_row must be a bool, got int"),
        (lambda: cp.ones((4, 64), cp.float16), {"per_row": "yes"}, TypeError, "per_row must be a bool"),
        (lambda: cp.ones((4, 64), cp.float16), {"stream": "default"}, TypeError, "stream must be"),
        (lambda: cp.ones((4, 64), cp.float16), {"like": "numpy"}, ValueError, "like must be"),
    ],
)
def test_bad_compute_global_scale_arguments(nv, make_x, kwargs, error, match):
    with pytest.raises(error, match=match):
        nv.compute_global_scale(make_x(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"padded_n": 32}, ValueError, "padded_n must be >= n"),
        ({"per_row": None}, TypeError, "per_row must be a bool"),
        ({"out": "make", "out_scale_shape": (4, 4)}, ValueError, r"out_scale must have shape \(128, 4\)"),
        ({"out": "overlap"}, ValueError, "out overlaps x"),
    ],
)
def test_bad_quantize_arguments_launch_nothing(nv, kwargs, error, match):
    """quantize() checks both of its steps before running either, and
    leaves every caller byte as it was."""
    storage = cp.zeros(4096, cp.uint8)
    x = storage[:512].view(cp.float16).reshape(4, 64)
    x[:] = 3.0
    arguments = dict(kwargs)
    shape = arguments.pop("out_scale_shape", (128, 4))
    if arguments.get("out") == "make":
        arguments["out"], arguments["out_scale"] = storage[1024:1152].reshape(4, 32), storage[2048:2048 + 16].reshape(shape)
    elif arguments.get("out") == "overlap":
        arguments["out"] = storage[256:384].reshape(4, 32)
    before = cp.asnumpy(storage)
    cp.cuda.Device().synchronize()
    with pytest.raises(error, match=match):
        nv.quantize(x, **arguments)
    cp.cuda.Device().synchronize()
    assert np.array_equal(cp.asnumpy(storage), before)
