"""More than 2**31 elements: every index that can pass 2**31 is 64-bit in the
kernels. The golden model cannot run on 2**31 values in a test, so sampled
rows (the first, those around element 2**31, the last and random ones) are
compared bit for bit; quantization is row-local, so a row's bytes do not
depend on the others."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from nvfp4_cupy import reference as ref

pytestmark = pytest.mark.gpu
cp = import_cupy()

M, N = 65536 + 160, 32768  # 2**31 + 160 * 32768 elements; fp16 input 4.0 GiB
NEEDED_BYTES = M * N * (2 + 2 + 1) + (2 << 30)  # input, dequantized, packed, headroom


@pytest.fixture(scope="module")
def big_input():
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    rng = cp.random.default_rng(2026)
    x = cp.empty((M, N), cp.float16)
    for start in range(0, M, 8192):  # in slices: float32 randoms for all of it would need 8.6 GiB more
        rows = x[start : start + 8192]
        rows[:] = rng.standard_normal(rows.shape, dtype=cp.float32) * (1 + start // 8192)
    yield x
    del x
    cp.get_default_memory_pool().free_all_blocks()


def sample_rows() -> np.ndarray:
    crossing = (2**31) // N  # element 2**31 starts this row
    rng = np.random.default_rng(5)
    rows = np.r_[0:4, crossing - 4 : crossing + 4, M - 4 : M, rng.integers(0, M, 48)]
    return np.unique(rows)


def test_quantize_and_dequantize_past_2_31_elements(big_input):
    import nvfp4_cupy as nv

    rows = sample_rows()
    host_rows = cp.asnumpy(big_input[cp.asarray(rows)])
    gs = nv.compute_global_scale(big_input)
    amax = float(cp.abs(big_input).max())
    want_gs = ref.compute_global_scale(np.array([amax], np.float16))
    assert_bytes_equal(cp.asnumpy(gs).view(np.uint8), want_gs.view(np.uint8), "global scale")

    packed = cp.empty((M, N // 2), cp.uint8)
    scales = cp.empty((M, N // 16), cp.uint8)
    packed.fill(POISONS[0])
    scales.fill(POISONS[0])
    nv.scaled_fp4_quant(big_input, gs, layout="linear", out=packed, out_scale=scales)
    want_packed, want_scales = ref.scaled_fp4_quant(host_rows, want_gs[0], layout="linear")
    index = cp.asarray(rows)
    assert_bytes_equal(cp.asnumpy(packed[index]), want_packed, "packed rows")
    assert_bytes_equal(cp.asnumpy(scales[index]), want_scales, "scale rows")
    # Nothing past the output: the last bytes are written, not poison.
    assert int(cp.count_nonzero(packed[-1] == POISONS[0])) < N // 2

    out = cp.empty((M, N), cp.float16)
    out.view(cp.uint16).fill(0xA5A5)
    nv.dequantize_fp4(packed, scales, gs, layout="linear", dtype=np.float16, out=out)
    want = ref.dequantize(want_packed, want_scales, want_gs[0], layout="linear", dtype=np.float16)
    assert_bytes_equal(cp.asnumpy(out[index]).view(np.uint16), want.view(np.uint16), "dequantized rows")
    del packed, scales, out


def test_swizzled_scales_past_2_31_elements(big_input):
    import nvfp4_cupy as nv

    rows = sample_rows()
    packed, scales = nv.scaled_fp4_quant(big_input, 1.0)
    host_rows = cp.asnumpy(big_input[cp.asarray(rows)])
    want_packed, want_linear = ref.scaled_fp4_quant(host_rows, np.float32(1.0), layout="linear")
    linear = ref.unswizzle_scales(cp.asnumpy(scales), M, N)
    assert_bytes_equal(cp.asnumpy(packed[cp.asarray(rows)]), want_packed, "packed rows")
    assert_bytes_equal(linear[rows], want_linear, "scale rows, un-swizzled")
