"""The dequantize kernel's shortcuts and launch plan, on the CPU.

- Its division by the global scale (cuda_src/dequantize.cu, `quotient`):
  q0 = RN(a * y) with y = RN(1 / b), then q = RN(q0 + RN(a - b * q0) * y),
  checked against the IEEE quotient RN(a / b) for every dividend the kernel
  divides (every E4M3 value and 3 times one) and every float32 divisor
  significand. Inside the kernel's range for b every intermediate is normal,
  so scaling a or b by a power of two scales every step exactly: the
  significands are the whole domain.
- The plan: blocks a thread, the thread-block shape the kernel's segments
  need, the arguments it binds.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from nvfp4_cupy import reference as ref


def dividend_significands() -> np.ndarray:
    """The significands in [1, 2) of every positive E4M3 value and its triple."""
    values = ref.e4m3_values(np.arange(1, 0x7F, dtype=np.uint8)).astype(np.float64)
    dividends = np.concatenate([values, 3 * values])
    return np.unique(np.ldexp(*np.frexp(dividends)[:1], 1))


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray, exact_product: bool) -> np.ndarray:
    """RN_f32(a * b + c) for float32 arrays. a * b is exact in float64. With
    exact_product the sum is exact too (the remainder a - b * q0: a and b * q0
    agree to within a few float32 ulps); otherwise float64 may round it, and
    the float32 rounding of that differs from the exact one only where the
    float64 sum lands on a float32 midpoint: those are redone exactly."""
    total = a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)
    rounded = total.astype(np.float32)
    if exact_product:
        return rounded
    midpoint = (total.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
    for i in np.flatnonzero(midpoint):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        below = np.float32(float(exact))
        candidates = (np.nextafter(below, np.float32(-np.inf)), below, np.nextafter(below, np.float32(np.inf)))
        rounded[i] = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))
    return rounded


def test_quotient_is_the_ieee_quotient_for_every_divisor_significand():
    divisors = (np.float32(1) + np.arange(1 << 23, dtype=np.float32) * np.float32(2.0**-23)).astype(np.float32)
    reciprocals = np.float32(1) / divisors
    significands = dividend_significands()
    assert len(significands) == 13
    for a in significands.astype(np.float32):
        dividend = np.full_like(divisors, a)
        q0 = dividend * reciprocals
        remainder = fma_f32(-q0, divisors, dividend, exact_product=True)
        q = fma_f32(remainder, reciprocals, q0, exact_product=False)
        want = dividend / divisors
        differ = np.flatnonzero(q.view(np.uint32) != want.view(np.uint32))
        assert differ.size == 0, f"a = {a}: {differ.size} divisors differ, first {divisors[differ[0]]!r}"


def test_plan_takes_fewer_blocks_a_thread_for_small_tensors():
    from nvfp4_cupy.ops.dequantize import THREADS_WANTED, blocks_per_thread

    assert blocks_per_thread(16384, 1024, 8) == 8
    assert blocks_per_thread(1, 1, 8) == 1
    for rows, blocks in ((4096, 448), (2048, 128), (7, 3), (100000, 1)):
        steps = blocks_per_thread(rows, blocks, 8)
        assert steps in (1, 2, 4, 8)
        assert steps == 1 or rows * -(-blocks // steps) >= THREADS_WANTED
        assert steps == 8 or rows * -(-blocks // (2 * steps)) < THREADS_WANTED


@pytest.mark.nvrtc
@pytest.mark.parametrize("n, experts", [(16, None), (1000, None), (7152, 3), (16384, None)])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_plan_geometry_and_arguments(n, experts, fmt):
    from nvfp4_cupy._format import dequantize_shape, round_up
    from nvfp4_cupy.ops import dequantize

    padded_n = round_up(n, 32)
    packed_shape = ((experts,) if experts else ()) + (37, padded_n // 2)
    shape = dequantize_shape(packed_shape, "uint8", n, "swizzled", fmt)
    plan = dequantize._plan_for(shape, "swizzled", "float32", fmt, "row")
    kernel = plan.kernels[0]
    threads_x, threads_y, _ = kernel.block
    assert threads_x * threads_y == 256 and threads_x >= dequantize.MIN_THREADS_X
    blocks = padded_n // 16
    steps = dequantize.blocks_per_thread(37 * (experts or 1), blocks, kernel.variant.max_blocks_per_thread)
    # The grid covers every row and every block of a row, each thread x taking `steps` blocks.
    assert kernel.grid[0] * threads_y >= 37 and kernel.grid[2] == (experts or 1)
    assert kernel.grid[1] * threads_x * steps >= blocks
    assert (plan.kernels[1] is None) == (n % 8 != 0)
