"""SiLU-and-mul on the GPU against the golden model, bit for bit: the float32
primitives exp32 and silu32 (cuda_src/fused_math.cuh) on every float16 and
bfloat16 value and on millions of float32 bit patterns; silu_and_mul (the
dtype output, NaN canonical); the dense silu_and_mul_quant in every dtype,
layout and format with every global-scale form and padded_n, against the
golden model and against our own GPU silu_and_mul then scaled_fp4_quant.
Outputs are allocated poisoned (test_experts_gpu.run_poisoned). The expert
forms are in test_experts_gpu.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bytes_check import assert_bytes_equal
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy._runtime import kernels
from nvfp4_cupy._runtime.compile import compile_options, kernel_source
from nvfp4_cupy._runtime.nvrtc import compile_program
from nvfp4_cupy.reference import fused as golden
from test_experts_gpu import assert_outputs_equal, run_poisoned

pytestmark = pytest.mark.gpu
cp = import_cupy()

import nvfp4_cupy as nv  # noqa: E402  (after the CuPy skip)

SOURCE = Path(__file__).with_name("cuda") / "fused_math_values.cu"
FLOAT32_STRIDE = 1021  # every 1021st float32 bit pattern: 4.2 million, both signs, every binade


# ---------------------------------------------------------------------------
# exp32 and silu32
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def math_module():
    from cupy.cuda import function

    target, arch = kernels._device_build(cp.cuda.Device().id)
    source = kernel_source("fused_math.cuh") + SOURCE.read_text()
    program = compile_program(source, SOURCE.name, ("exp32_bits", "silu32_bits"), compile_options(target, arch))
    module = function.Module()
    module.load(program.image)
    return module


def _f32_bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


def special_inputs() -> np.ndarray:
    """float32 bit patterns at every edge of sections 2.2 and 2.4: zeros,
    infinities, NaNs, subnormals, the clamp bounds, the overflow and
    underflow thresholds, the worst inputs, each with neighbours."""
    centres = _f32_bits([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.17549435e-38, -104.0, 104.0, 89.0, -89.0,
                         88.72283935546875, -88.72283935546875, 88.72283172607422, -88.72283172607422,
                         26.688921, -26.688921, -16.684786, 16.684786, 1.0, -1.0, 0.5, 3.4028235e38, -3.4028235e38,
                         0.34657359, -0.34657359])
    around = (centres[:, None].astype(np.int64) + np.arange(-64, 65)[None, :]).reshape(-1)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], np.int64)
    return np.unique(np.concatenate([around, nans]) & 0xFFFFFFFF).astype(np.uint32)


INPUT_SETS = {
    "float16": lambda: np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32),
    "bfloat16": lambda: (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32),
    "float32-strided": lambda: np.arange(0, 1 << 32, FLOAT32_STRIDE, dtype=np.uint64).astype(np.uint32).view(np.float32),
    "float32-specials": lambda: special_inputs().view(np.float32),
}


@pytest.mark.parametrize("function", ["exp32", "silu32"])
@pytest.mark.parametrize("inputs", sorted(INPUT_SETS))
def test_fused_math_matches_golden(math_module, function, inputs):
    values = INPUT_SETS[inputs]()
    device_in = cp.asarray(values.view(np.uint32))
    device_out = cp.full(values.size, 0xA5A5A5A5, cp.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    math_module.get_function(f"{function}_bits")((sms * 8,), (256,), (device_in, device_out, np.int64(values.size)))
    got = cp.asnumpy(device_out)
    want = getattr(golden, function)(values).view(np.uint32)
    both_nan = np.isnan(got.view(np.float32)) & np.isnan(want.view(np.float32))  # NaN payloads are not specified
    bad = np.flatnonzero((got != want) & ~both_nan)
    assert bad.size == 0, (
        f"{function} on {inputs}: {bad.size} of {values.size} differ; first: "
        + ", ".join(f"x={values[i]!r} ({values.view(np.uint32)[i]:#010x}) got {got[i]:#010x} want {want[i]:#010x}"
                    for i in bad[:5]))


# ---------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------
def gated_input(rows: tuple, n: int, dtype: str, seed: int) -> np.ndarray:
    """[*rows, 2n]: gates across silu's whole range (saturation at both
    ends), ups of several magnitudes, and specials in both halves."""
    rng = np.random.default_rng(seed)
    m = int(np.prod(rows))
    x = rng.standard_normal((m, 2 * n)).astype(np.float32)
    x[:, :n] *= rng.choice(np.array([1, 8, 40, 120], np.float32), size=(m, n))
    x[:, n:] *= np.float32(2.0) ** rng.integers(-10, 10, size=(m, 1)).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -3e-39, 90.0, -90.0, -88.7, 1e-8, 6e4],
                        np.float32)
    flat = x.reshape(-1)
    if flat.size:
        picks = rng.choice(flat.size, size=min(flat.size, 3 * specials.size), replace=False)
        flat[picks] = np.resize(specials, picks.size)
    return x.astype(HOST_DTYPES[dtype]).reshape(*rows, 2 * n)


SHAPES = [((1,), 16), ((37,), 40), ((5,), 13), ((3, 4), 24), ((0,), 16), ((130,), 7)]


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_silu_and_mul_matches_golden(dtype):
    for seed, (rows, n) in enumerate(SHAPES):
        x_host = gated_input(rows, n, dtype, seed)
        want = golden.silu_and_mul(x_host)
        x = cp.asarray(x_host)
        (got,) = run_poisoned(lambda: (nv.silu_and_mul(x),))
        assert got.dtype == want.dtype and got.shape == want.shape, f"{dtype} {rows} n={n}: {got.shape} {got.dtype}"
        assert_bytes_equal(got.view(np.uint8), want.view(np.uint8), f"{dtype} {rows} n={n} silu_and_mul")


def test_silu_and_mul_reads_strided_rows():
    """Rows of a wider buffer (a view, no copy), on both load paths."""
    for n, extra in ((32, 16), (20, 3)):
        wide = gated_input((50,), n + extra, "bfloat16", seed=n)
        x_host = np.ascontiguousarray(wide[:, : 2 * n])
        (got,) = run_poisoned(lambda: (nv.silu_and_mul(cp.asarray(wide)[:, : 2 * n]),))
        assert_bytes_equal(got.view(np.uint8), golden.silu_and_mul(x_host).view(np.uint8), f"strided n={n}")


# ---------------------------------------------------------------------------
# silu_and_mul_quant, dense
# ---------------------------------------------------------------------------
def _global_scales(form: str, values: np.ndarray):
    """(device or host argument, golden twin) of each global-scale form, for
    the float32 values [*rows, n] that will be quantized."""
    finite = np.abs(values[np.isfinite(values)])
    gs = np.float32(448 * 6 / finite.max()) if finite.size and finite.max() > 0 else np.float32(1.0)
    if form == "host":
        return float(gs), float(gs)
    if form == "device-one":
        host = np.array([gs], np.float32)
        return cp.asarray(host), host
    if form == "device-row":
        rows = values.reshape(-1, values.shape[-1])
        host = np.array([448 * 6 / max(float(np.max(np.abs(r[np.isfinite(r)]), initial=0)), 1e-30) for r in rows],
                        np.float32)
        if host.size > 2:
            host[1] = np.nan  # an invalid scale NaN-scales its row only
        return cp.asarray(host), host
    raise ValueError(form)


DENSE_CASES = [((64,), 32, None), ((130,), 40, 64), ((3, 5), 13, None), ((1,), 16, 128), ((0,), 16, None)]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_silu_and_mul_quant_matches_golden_and_unfused_gpu(dtype, layout, fmt):
    for seed, (rows, n, padded_n) in enumerate(DENSE_CASES):
        if fmt == "mxfp4" and padded_n is not None and padded_n % 32:
            continue
        x_host = gated_input(rows, n, dtype, seed)
        x = cp.asarray(x_host)
        product = golden.silu_and_mul(x_host).astype(np.float32)
        for form in ("host", "device-one", "device-row") if fmt == "nvfp4" else (None,):
            gs, gs_host = _global_scales(form, product) if form else (None, None)
            label = f"{dtype} {layout} {fmt} {rows} n={n} padded_n={padded_n} gs={form}"
            want = golden.silu_and_mul_quant(x_host, gs_host, padded_n=padded_n, layout=layout, fmt=fmt)
            got = run_poisoned(lambda: nv.silu_and_mul_quant(x, gs, padded_n=padded_n, layout=layout, fmt=fmt))
            assert_outputs_equal(got, want, label)
            unfused = nv.scaled_fp4_quant(nv.silu_and_mul(x), gs, padded_n=padded_n, layout=layout, fmt=fmt)
            assert_outputs_equal(got, tuple(cp.asnumpy(a) for a in unfused), f"{label} vs unfused GPU ops")


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_silu_and_mul_quant_per_expert_scale(dtype):
    """x [E, m, 2n] with a global scale per expert: a complete scale tensor
    per expert, as scaled_fp4_quant lays an expert batch out."""
    x_host = gated_input((4, 70), 48, dtype, seed=8)
    gs_host = np.array([1.0, 50.0, 0.0, 3000.0], np.float32)
    x, gs = cp.asarray(x_host), cp.asarray(gs_host)
    for layout in sorted(LAYOUTS):
        want = golden.silu_and_mul_quant(x_host, gs_host, layout=layout)
        got = run_poisoned(lambda: nv.silu_and_mul_quant(x, gs, layout=layout))
        assert got[0].shape == (4, 70, 24)
        assert_outputs_equal(got, want, f"{dtype} {layout} per-expert scale")
        unfused = nv.scaled_fp4_quant(nv.silu_and_mul(x), gs, layout=layout)
        assert_outputs_equal(got, tuple(cp.asnumpy(a) for a in unfused), f"{dtype} {layout} vs unfused GPU ops")


def test_silu_and_mul_refusals():
    with pytest.raises(ValueError, match="even"):
        nv.silu_and_mul(cp.ones((3, 7), cp.float32))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        nv.silu_and_mul(cp.ones((3, 8), cp.float64))
    with pytest.raises(TypeError, match="host"):
        nv.silu_and_mul(np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="even"):
        nv.silu_and_mul_quant(cp.ones((3, 7), cp.float32), 1.0)
    with pytest.raises(ValueError, match="one per"):
        nv.silu_and_mul_quant(cp.ones((3, 8), cp.float32), cp.ones(5, cp.float32))


def test_torch_silu_and_mul(torch_cuda):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = gated_input((33,), 40, "bfloat16", seed=1)
    x = torch.from_numpy(x_host.view(np.int16).copy()).cuda().view(torch.bfloat16)
    want = golden.silu_and_mul(x_host)
    for entry in ("eager", "torch.ops", "compiled"):
        if entry == "eager":
            got = nvt.silu_and_mul(x)
        elif entry == "torch.ops":
            got = torch.ops.nvfp4.silu_and_mul(x)
        else:
            torch._dynamo.reset()
            got = torch.compile(lambda t: nvt.silu_and_mul(t), fullgraph=True)(x)
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == (33, 40)
        assert_bytes_equal(got.view(torch.int16).cpu().numpy().view(np.uint8), want.view(np.uint8), entry)
