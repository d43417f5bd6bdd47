"""Dequantize, the on-device global scale, per-row scales and torch interop
on the GPU, each against the golden model byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, make_input
from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import LAYOUTS

pytestmark = pytest.mark.gpu
cp = import_cupy()

BITS = {2: np.uint16, 4: np.uint32}


def as_bits(array: np.ndarray) -> np.ndarray:
    return array.view(BITS[array.dtype.itemsize])


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("scale_kind", ["host", "device", "row"])
def test_dequantize_matches_golden(nv, out_dtype, layout, scale_kind):
    m, n, padded_n = 129, 7150, 7168
    x_host = make_input("specials", m, n, seed=21).astype(np.float16)
    if scale_kind == "row":
        gs_host = ref.compute_global_scale(x_host, per_row=True)
    else:
        gs_host = np.float32(448 * 6 / 2688.0)
    gs = float(gs_host) if scale_kind == "host" else cp.asarray(np.atleast_1d(gs_host))
    packed, scales = nv.scaled_fp4_quant(cp.asarray(x_host), gs, padded_n=padded_n, layout=layout)
    dtype = HOST_DTYPES[out_dtype]
    want = ref.dequantize(cp.asnumpy(packed), cp.asnumpy(scales), gs_host, n=n, layout=layout, dtype=dtype)
    for poison in POISONS:
        out = cp.empty((m, n), dtype=want.dtype)
        out.view(cp.uint8).fill(poison)
        got = nv.dequantize_fp4(packed, scales, gs, n=n, layout=layout, dtype=dtype, out=out)
        assert got is out
        assert_bytes_equal(as_bits(cp.asnumpy(got)), as_bits(want), f"dequantize {out_dtype} {layout} {scale_kind}")


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
def test_dequantize_every_code_and_scale_byte(nv, out_dtype):
    codes = np.tile(np.arange(16, dtype=np.uint8), 16)
    packed = np.repeat((codes[0::2] | (codes[1::2] << 4)).reshape(1, 128), 16, axis=0)
    scale_bytes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    dtype = HOST_DTYPES[out_dtype]
    # gs values whose quotients cross the kernel's exact-shortcut bounds
    # (2^-125 and 2^124) within the sweep of scale bytes, and the far ends.
    for gs in (1.0, 1e-30, 3.4e38, 2.0**-115, 2.0**-116, 2.0**116, 2.0**117):
        want = ref.dequantize(packed, scale_bytes, gs, layout="linear", dtype=dtype)
        got = nv.dequantize_fp4(cp.asarray(packed), cp.asarray(scale_bytes), gs, layout="linear", dtype=dtype)
        assert_bytes_equal(as_bits(cp.asnumpy(got)), as_bits(want), f"every code, {out_dtype}, gs={gs}")


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("per_row", [False, True])
def test_compute_global_scale_matches_golden(nv, dtype, per_row):
    cases = {
        "outliers": make_input("outliers", 300, 7152, seed=31),
        "zeros": np.zeros((3, 64), np.float32),
        "nan": make_input("normal", 5, 48, seed=32),
        "inf": make_input("normal", 5, 48, seed=33),
        "tiny": np.full((2, 16), 1e-40, np.float32),
        "odd n": make_input("normal", 7, 17, seed=34),
    }
    cases["nan"][2, 7] = np.nan
    cases["inf"][4, 0] = -np.inf
    for label, values in cases.items():
        x_host = values.astype(HOST_DTYPES[dtype])
        got = nv.compute_global_scale(cp.asarray(x_host), per_row=per_row)
        want = ref.compute_global_scale(x_host, per_row=per_row)
        assert got.dtype == cp.float32 and got.shape == want.shape
        assert_bytes_equal(cp.asnumpy(got).view(np.uint32), want.view(np.uint32), f"{label} {dtype} per_row={per_row}")
    empty = nv.compute_global_scale(cp.zeros((0, 64), cp.float16))
    assert cp.asnumpy(empty).tolist() == [1.0]


@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_in_one_call_and_sqnr(nv, per_row):
    x_host = np.random.default_rng(41).standard_normal((512, 4096)).astype(np.float32)
    packed, scales, gs = nv.quantize(cp.asarray(x_host), per_row=per_row)
    gs_host = ref.compute_global_scale(x_host, per_row=per_row)
    want = ref.scaled_fp4_quant(x_host, gs_host)
    assert_bytes_equal(cp.asnumpy(gs).view(np.uint32), gs_host.view(np.uint32), "global scale")
    assert_bytes_equal(cp.asnumpy(packed), want[0], "packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "scales")
    back = cp.asnumpy(nv.dequantize_fp4(packed, scales, gs, dtype=np.float32))
    sqnr = 10 * np.log10((x_host**2).sum() / ((x_host - back) ** 2).sum())
    print(f"NVFP4 quantize -> dequantize on Gaussian data, per_row={per_row}: SQNR {sqnr:.2f} dB")
    assert 18 < sqnr < 23, sqnr


def test_per_row_scales_in_scaled_fp4_quant(nv):
    x_host = make_input("outliers", 150, 7152, seed=42).astype(np.float16)
    gs_host = ref.compute_global_scale(x_host, per_row=True)
    gs_host[3] = np.inf  # an invalid row scale NaNs that row only
    want = ref.scaled_fp4_quant(x_host, gs_host, padded_n=7168)
    packed, scales = nv.scaled_fp4_quant(cp.asarray(x_host), cp.asarray(gs_host), padded_n=7168)
    assert_bytes_equal(cp.asnumpy(packed), want[0], "per-row packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "per-row scales")


def test_torch_in_torch_out_on_torchs_stream(nv, torch_cuda):
    """The work must run on torch's current stream: the input is written on a
    side stream right after a long sleep, and the result is read on that
    stream with no sync in between. Run anywhere else, the read would race the
    kernel (or the kernel the write) and see poison."""
    torch = torch_cuda
    host = make_input("outliers", 4096, 8192, seed=43)
    source = torch.from_numpy(host).to("cuda", torch.bfloat16)
    x = torch.empty_like(source)
    out = torch.full((4096, 4096), POISONS[0], dtype=torch.uint8, device="cuda")
    out_scale = torch.full((4096, 512), POISONS[0], dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time before the input exists
        x.copy_(source)
        packed, scales = nv.scaled_fp4_quant(x, 30.0, out=out, out_scale=out_scale, like="torch")
        packed_copy, scales_copy = packed.clone(), scales.clone()
    assert isinstance(packed, torch.Tensor) and packed.data_ptr() == out.data_ptr()
    side.synchronize()
    want = ref.scaled_fp4_quant(source.float().cpu().numpy().astype(HOST_DTYPES["bfloat16"]), 30.0)
    assert_bytes_equal(packed_copy.cpu().numpy(), want[0], "packed read on torch's stream")
    assert_bytes_equal(scales_copy.cpu().numpy(), want[1], "scales read on torch's stream")


def test_torch_round_trip_without_cupy_types(nv, torch_cuda):
    torch = torch_cuda
    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    packed, scales, gs = nv.quantize(x, like="torch")
    y = nv.dequantize_fp4(packed, scales, gs, dtype=np.float16, like="torch")
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in (packed, scales, gs, y))
    assert y.shape == x.shape and y.dtype == torch.float16
    want = ref.scaled_fp4_quant(x.cpu().numpy(), gs.cpu().numpy())
    assert_bytes_equal(packed.cpu().numpy(), want[0], "torch packed")
