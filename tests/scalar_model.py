"""A second, deliberately naive implementation of docs/format.md, one value at a
time in Python floats, sharing nothing with nvfp4_cupy.reference (no
ml_dtypes, no NumPy vector code). The fuzz tests hold the golden model to it.

float32 arithmetic is emulated by computing in float64 and rounding to
float32: for one multiply or divide of float32 operands that double rounding
is exact (53 >= 2 * 24 + 2 bits)."""

from __future__ import annotations

import math
import struct

FLT_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
# E2M1 magnitudes by code, and E4M3 finite non-negative values by code (0x00..0x7E).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E4M3 = [
    (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    for e, m in ((code >> 3, code & 7) for code in range(0x7F))
]


def f32(value: float) -> float:
    """Round a Python float to float32 (nearest even; overflow -> inf)."""
    if math.isnan(value) or math.isinf(value):
        return value
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # beyond float32 even before rounding
        return math.copysign(math.inf, value)


def nearest_even(value: float, grid: list[float]) -> int:
    """Index of the grid value nearest to value >= 0; ties to the even index;
    beyond the last value, the last (saturation)."""
    if value >= grid[-1]:
        return len(grid) - 1
    for i in range(len(grid) - 1):
        low, high = grid[i], grid[i + 1]
        if value <= high:
            if value - low < high - value:
                return i
            if value - low > high - value:
                return i + 1
            return i if i % 2 == 0 else i + 1
    raise AssertionError("unreachable")


def quantize_row(values: list[float], gs: float) -> tuple[list[int], list[int]]:
    """One row of float32 values (len a multiple of 16) -> (codes, scale bytes)."""
    codes, scales = [], []
    for start in range(0, len(values), 16):
        block = values[start : start + 16]
        if not (math.isfinite(gs) and gs > 0) or any(math.isnan(v) for v in block):
            codes += [0] * 16
            scales.append(0x7F)
            continue
        amax = max(abs(v) for v in block)
        s = f32(gs * f32(amax / 6.0))
        sf_code = nearest_even(s, E4M3)
        sf = E4M3[sf_code]
        r = 0.0 if sf == 0 else min(f32(1.0 / f32(sf / gs)), FLT_MAX)
        for v in block:
            y = f32(v * r)
            if math.isnan(y):  # inf * 0 (sf / gs overflowed): +6, as a satfinite conversion gives
                codes.append(7)
                continue
            magnitude = nearest_even(abs(y), E2M1)
            codes.append(magnitude | (8 if math.copysign(1.0, y) < 0 else 0))
        scales.append(sf_code)
    return codes, scales
