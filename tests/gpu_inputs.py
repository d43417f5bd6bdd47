"""Inputs for the GPU tests, as data: shapes at the boundaries and value
distributions that stress the special cases. Host NumPy only."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from nvfp4_cupy._format import NUMPY_DTYPES, round_up

HOST_DTYPES = NUMPY_DTYPES  # dtype name -> NumPy dtype: the package's one map

M_VALUES = (1, 2, 31, 127, 128, 129, 150, 1000)
N_VALUES = (16, 48, 80, 128, 7152, 8192)
PAD_MULTIPLES = (1, 32, 64, 128)  # padded_n = round_up(n, multiple)
DATA_KINDS = ("normal", "outliers", "zero_rows", "specials")
# vLLM's padded test cases: (m, n) with padded_n = round_up(n, 32).
VLLM_PADDED = ((128, 48), (128, 80), (150, 48), (150, 80), (64, 7152))


def boundary_cases():
    """Every m with every n once, each n seeing every padding multiple and
    data kind across the m values (not the full Cartesian grid)."""
    cases = []
    for mi, m in enumerate(M_VALUES):
        for ni, n in enumerate(N_VALUES):
            padded_n = round_up(n, PAD_MULTIPLES[(mi + ni) % 4])
            cases.append((m, n, padded_n, DATA_KINDS[(mi + 2 * ni) % 4]))
    cases += [(m, n, round_up(n, 32), "outliers") for m, n in VLLM_PADDED]
    return cases


def make_input(kind: str, m: int, n: int, seed: int) -> np.ndarray:
    """float32 [m, n] of the given kind."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n)).astype(np.float32)
    if kind == "outliers":
        # Heavy tails: a few outlier channels at 100x, as in LLM activations.
        channels = rng.choice(n, size=max(1, n // 64), replace=False)
        x[:, channels] *= 100
    elif kind == "zero_rows":
        x[::3] = 0.0
    elif kind == "specials":
        flat = x.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        specials = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -3e-39, 2688.0, -2687.9, 1e-8, 65504.0, -1e-30]
        flat[picks] = np.array(specials[: picks.size], np.float32)
        x[-1, :16] = -0.0  # a whole block of negative zeros
    return x


def global_scale_for(x: np.ndarray) -> float:
    """448 * 6 / amax over the finite values, as calibration would pick."""
    finite = np.abs(x[np.isfinite(x)])
    amax = float(finite.max()) if finite.size else 0.0
    return 448 * 6 / amax if amax > 0 else 1.0


def numerics_probe() -> np.ndarray:
    """float32 [rows, 16]: blocks whose s lands on every E4M3 tie and its
    neighbours, and blocks with power-of-two scales whose values land exactly
    on every E2M1 tie (and one ulp either side), both signs. gs = 1."""
    e4m3 = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    rows = []
    for low, high in zip(e4m3[:-1], e4m3[1:]):
        tie_amax = np.float32(6) * np.float32((low + high) / 2)  # exact: few significant bits
        for amax in (np.nextafter(tie_amax, np.float32(0)), tie_amax, np.nextafter(tie_amax, np.float32(1e9))):
            row = np.linspace(-amax, amax, 16, dtype=np.float32)
            row[0] = amax
            rows.append(row)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    for k in range(-9, 9):
        unit = np.float32(2.0**k)
        for values in (ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(10))):
            for sign in (1, -1):
                row = np.zeros(16, np.float32)
                row[0] = 6 * unit  # pins s = 2^k, so r = 2^-k exactly
                row[1:8] = sign * values * unit
                row[8:15] = -sign * values * unit
                row[15] = sign * 1e-3 * unit
                rows.append(row)
    return np.stack(rows)
