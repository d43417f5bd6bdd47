"""The golden models of stochastic rounding (reference/philox.py,
reference/stochastic.py) and of the MXFP4 scale rules (reference/mx_rules.py)
against their oracles, on the CPU: Random123's known answers and PyTorch's
Philox engine, the PTX ISA's cvt.rs rule worked out in exact rationals, the
statistics of SR, torchao 0.18's MX quantizer (FLOOR, RCEIL) and
TransformerEngine 2.20.2's reference (pow_2_scales). Spec:
docs/stochastic_rounding_and_mx_rules.md."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from bytes_check import assert_bytes_equal
from nvfp4_cupy.reference import mx_rules, nvfp4, philox, stochastic

E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # docs/format.md, section 1: code -> value


# ---------------------------------------------------------------------------
# Philox4x32-10
# ---------------------------------------------------------------------------
# Random123 (github.com/DEShawResearch/random123), tests/kat_vectors, the
# philox4x32 lines: rounds, counter (4 words), key (2 words), expected output.
RANDOM123_KAT = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""


def _kat_rows():
    for line in RANDOM123_KAT.strip().splitlines():
        _, rounds, *words = line.split()
        words = [int(w, 16) for w in words]
        yield int(rounds), words[:4], words[4:6], words[6:]


@pytest.mark.parametrize("rounds, counter, key, expected", list(_kat_rows()))
def test_philox_random123_known_answers(rounds, counter, key, expected):
    got = philox.philox4x32(counter, key, rounds).tolist()
    assert got == expected, f"philox4x32-{rounds}({counter}, {key}): got {[hex(v) for v in got]}"


def test_philox_vectorised_equals_one_at_a_time():
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, (3, 5, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, (5, 2), dtype=np.uint64)  # broadcast against the leading 3
    together = philox.philox4x32_10(counters, keys)
    for i in range(3):
        for j in range(5):
            assert together[i, j].tolist() == philox.philox4x32_10(counters[i, j], keys[j]).tolist()
    with pytest.raises(ValueError):
        philox.philox4x32_10([2**32, 0, 0, 0], [0, 0])


_TORCH_PHILOX_SOURCE = r"""
#include <ATen/core/PhiloxRNGEngine.h>
#include <cstdio>
#include <cstdlib>
int main(int argc, char **argv) {
  for (int i = 1; i + 2 < argc; i += 3) {
    unsigned long long seed = strtoull(argv[i], 0, 0), group = strtoull(argv[i + 1], 0, 0),
                       offset = strtoull(argv[i + 2], 0, 0);
    at::Philox4_32 engine(seed, group, offset);  // key = seed; counter = (offset, subsequence)
    for (int k = 0; k < 4; ++k) printf("%u ", engine());
    printf("\n");
  }
}
"""


def test_philox_matches_pytorch_engine(tmp_path):
    """PyTorch's at::Philox4_32(seed, subsequence, offset) (the engine of
    torch's CUDA generator; curand_init(seed, subsequence, 4 * offset) has
    the same layout) puts the seed in the key and (offset, subsequence) in
    the counter, which is our (seed, offset, group): its first four outputs
    must be our group's four words. numpy.random.Philox is Philox4x64-10 and
    cannot serve. Needs a C++ compiler and torch's headers (header-only)."""
    torch = pytest.importorskip("torch")
    compiler = shutil.which("g++") or shutil.which("c++")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    if compiler is None or not os.path.exists(os.path.join(include, "ATen/core/PhiloxRNGEngine.h")):
        pytest.skip("needs g++ and torch's ATen/core/PhiloxRNGEngine.h")
    source, binary = tmp_path / "philox.cpp", tmp_path / "philox"
    source.write_text(_TORCH_PHILOX_SOURCE)
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{include}", str(source), "-o", str(binary)], check=True,
                   capture_output=True, timeout=120)
    cases = [(0, 0, 0), (1, 2, 3), (0x0123456789ABCDEF, 5, 7), (2**64 - 1, 2**64 - 1, 2**64 - 1),
             (2**32, 2**32 + 1, 2**32 - 1), (12345, 987654321, 2**40 + 3)]
    output = subprocess.run([str(binary)] + [str(v) for case in cases for v in case], check=True,
                            capture_output=True, text=True, timeout=60).stdout.split("\n")
    for (seed, group, offset), line in zip(cases, output):
        ours = philox.sr_words(seed, offset, group).tolist()
        assert ours == [int(v) for v in line.split()], f"seed={seed} group={group} offset={offset}: {ours} vs {line}"


# ---------------------------------------------------------------------------
# Stochastic rounding: the per-value rule and the bit consumption
# ---------------------------------------------------------------------------
def _sr_oracle(y: np.float32, r: int) -> int:
    """cvt.rs.satfinite's rounding of one value in exact rationals: the
    fraction of |y| below E2M1's last place, truncated to 8 bits, plus the
    random byte; a carry out rounds away from zero; saturate at 6; NaN -> +6."""
    if math.isnan(y):
        return 7
    sign = 8 if math.copysign(1.0, float(y)) < 0 else 0
    a = min(Fraction(abs(float(y))) if math.isfinite(y) else Fraction(6), Fraction(6))
    ulp = Fraction(1, 2) if a < 2 else Fraction(1) if a < 4 else Fraction(2)
    whole = math.floor(a / ulp)
    fraction8 = math.floor((a / ulp - whole) * 256)
    magnitude = min((whole + (fraction8 + r >= 256)) * ulp, Fraction(6))
    return sign | E2M1_MAGNITUDES.index(float(magnitude))


def _probe_values() -> np.ndarray:
    rng = np.random.default_rng(11)
    exact = [0.0, -0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -6, -0.5]
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5]
    edges = [1e-45, -1e-45, 1e-38, 0.001, 0.2490234375, 1.9999999, 2.0000002, 3.9999998, 4.0000005, 5.9999995,
             6.0000005, 7.9, 8.0, 1e30, np.inf, -np.inf, np.nan, -np.nan]
    randoms = rng.uniform(-7, 7, 120)
    grid = np.arange(-6, 6.01, 1 / 64)[::7]  # 8-bit fractions that are exact
    return np.array(exact + ties + edges + list(randoms) + list(grid), dtype=np.float32)


def test_sr_rule_equals_exact_rationals_for_every_random_byte():
    values = _probe_values()
    rand = np.arange(256, dtype=np.uint8)
    got = stochastic.sr_e2m1(values[:, None], rand[None, :])
    want = np.array([[_sr_oracle(v, int(r)) for r in rand] for v in values], dtype=np.uint8)
    assert_bytes_equal(got, want, "sr_e2m1 vs exact rationals [value, random byte]")


def test_sr_rule_properties():
    values = _probe_values()
    finite = np.isfinite(values)
    rand = np.arange(256, dtype=np.uint8)
    codes = stochastic.sr_e2m1(values[:, None], rand[None, :])
    magnitude = np.array(E2M1_MAGNITUDES)[codes & 7]
    # Byte 0 truncates toward zero; the result only ever grows with the byte.
    assert (np.diff(magnitude, axis=1) >= 0).all()
    a = np.minimum(np.abs(values[finite]), 6).astype(np.float64)
    assert (magnitude[finite, 0] <= a).all() and (magnitude[finite, -1] >= a - 2 * 6 / 256).all()
    # Representable values never move, whatever the byte.
    exact = np.isin(np.abs(values), E2M1_MAGNITUDES)
    assert (magnitude[exact] == np.abs(values[exact])[:, None]).all()
    # Sign bit kept (-0.0 included), NaN -> +6.
    assert (codes[np.signbit(values) & ~np.isnan(values)] >= 8).all()
    assert (codes[np.isnan(values)] == 7).all()


# One value q = 0.75 (fraction 0.5 of an ulp, 8-bit fraction 128) in operand
# slot `slot`, zeros elsewhere; random byte 0x80 at bit `shift`: the slot
# rounds up (to 1.0, code 2) iff the byte is its own. These are also the
# probes that check the hardware instruction's byte mapping (doc, section 2.4).
@pytest.mark.parametrize("slot, shift", [("a", 24), ("b", 8), ("e", 16), ("f", 0)])
def test_cvt_rs_e2m1x4_byte_mapping(slot, shift):
    nibble = {"a": 12, "b": 8, "e": 4, "f": 0}[slot]
    for probe_shift in (0, 8, 16, 24):
        operands = {name: np.float32(0.75 if name == slot else 0.0) for name in "abef"}
        d = int(stochastic.cvt_rs_satfinite_e2m1x4(operands["a"], operands["b"], operands["e"], operands["f"],
                                                   np.uint32(0x80 << probe_shift)))
        want = (2 if probe_shift == shift else 1) << nibble
        assert d == want, f"slot {slot}, rbits 0x{0x80 << probe_shift:08x}: d=0x{d:04x}, want 0x{want:04x}"


def test_bit_consumption_layout():
    """Element c of row `row` (block k = c // 16, j = (c % 16) // 4,
    i = c % 4) takes byte (x_j >> RBITS_SHIFT[i]) & 0xFF of Philox4x32-10
    (key = seed, counter = (offset, g = row * padded_n / 16 + k))."""
    seed, offset, rows, padded_n = 0xDEADBEEFCAFEF00D, 2**33 + 5, 3, 48
    rand = stochastic.group_random_bytes(seed, offset, rows, padded_n)
    key = [seed & 0xFFFFFFFF, seed >> 32]
    for row in range(rows):
        for c in range(padded_n):
            g = row * (padded_n // 16) + c // 16
            words = philox.philox4x32_10([offset & 0xFFFFFFFF, offset >> 32, g & 0xFFFFFFFF, g >> 32], key)
            word = int(words[(c % 16) // 4])
            assert rand[row, c] == (word >> stochastic.RBITS_SHIFT[c % 4]) & 0xFF, (row, c)
    # Rows further down start where the first rows end (rows 1.. of this = rows of an offset call).
    np.testing.assert_array_equal(stochastic.group_random_bytes(seed, offset, 2, padded_n, first_row=1), rand[1:])


def _sr_inputs():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 72)) * rng.uniform(0.01, 50, (6, 1))).astype(np.float32)
    x[0, :16] = 0.0
    x[0, 5] = -0.0  # zero block with a -0.0
    x[2, 3] = np.nan  # NaN block
    x[3, 40] = np.inf  # inf block
    x[3, 41] = -np.inf
    x[4, 64:] = 1e-30  # tiny block (scale byte 0x00)
    return x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["swizzled", "linear", "8x4"])
def test_sr_scales_and_special_blocks_equal_round_to_nearest(dtype, layout):
    x = _sr_inputs().astype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16 if dtype == "bfloat16"
                            else np.float32)
    gs = np.float32(448 * 6 / 50)
    packed, scales = stochastic.scaled_fp4_quant_sr(x, gs, padded_n=96, layout=layout, seed=5, offset=9)
    rn_packed, rn_scales = nvfp4.scaled_fp4_quant(x, gs, padded_n=96, layout=layout)
    assert_bytes_equal(scales, rn_scales, f"SR scale bytes vs RN ({dtype}, {layout})")
    codes, rn_codes = nvfp4.unpack_codes(packed), nvfp4.unpack_codes(rn_packed)
    # Where RN is deterministic in SR too: zero, NaN, and exact blocks, K padding, infinities.
    for rows, cols, what in ((0, slice(0, 16), "zero block (-0.0 -> 0x8)"), (2, slice(0, 16), "NaN block"),
                             (slice(None), slice(72, 96), "K padding"), (3, slice(40, 42), "+-inf")):
        assert_bytes_equal(codes[rows, cols], rn_codes[rows, cols], f"SR codes, {what}")
    # Elsewhere each SR code is one of the two E2M1 neighbours of y, on y's side.
    values = nvfp4._padded_rows(x.reshape(6, -1), 96)
    scale_bytes = nvfp4.unswizzle_scales(scales, 6, 96, layout)
    sf = nvfp4.e4m3_values(scale_bytes)
    with np.errstate(all="ignore"):
        y = values.reshape(6, -1, 16) * np.where(sf == 0, np.float32(0), np.float32(1) / (sf / gs))[..., None]
    y = np.clip(y.reshape(6, 96), -6, 6)
    got = nvfp4.e2m1_values(codes)
    ok = np.isfinite(y) & np.repeat(scale_bytes != nvfp4.E4M3_NAN_BYTE, 16, axis=1)
    lower = np.array(E2M1_MAGNITUDES)[np.searchsorted(E2M1_MAGNITUDES, np.abs(y[ok]), side="right") - 1]
    upper = np.array(E2M1_MAGNITUDES)[np.minimum(np.searchsorted(E2M1_MAGNITUDES, np.abs(y[ok]), side="left"), 7)]
    assert ((np.abs(got[ok]) == lower) | (np.abs(got[ok]) == upper)).all()


def test_sr_exact_values_never_move():
    exact = np.array([-6, -4, -3, -2, -1.5, -1, -0.5, -0.0, 0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    x = np.stack([exact, exact[::-1] / 4]).astype(np.float32)  # scales 1 and 0.25 (gs = 1): y exact
    rn = nvfp4.scaled_fp4_quant(x, 1.0, layout="linear")
    for seed in range(20):
        sr = stochastic.scaled_fp4_quant_sr(x, 1.0, layout="linear", seed=seed, offset=seed)
        assert_bytes_equal(sr[0], rn[0], f"exact values, seed {seed}")
        assert_bytes_equal(sr[1], rn[1], f"exact values' scales, seed {seed}")


def test_sr_kinds_of_global_scale_and_invalid_scale():
    x = _sr_inputs()
    per_row = np.linspace(1, 300, 6).astype(np.float32)
    per_row[2] = np.nan  # an invalid row scale NaN-scales its row only
    packed, scales = stochastic.scaled_fp4_quant_sr(x, per_row, layout="linear", seed=1)
    rn_packed, rn_scales = nvfp4.scaled_fp4_quant(x, per_row, layout="linear")
    assert_bytes_equal(scales, rn_scales, "per-row scales")
    assert (packed[2] == 0).all() and (scales[2] == 0x7F).all()
    # Per expert: expert e numbers its groups after the rows of experts < e,
    # so expert e equals rows e*m.. of the flattened tensor under one scale.
    experts = x.reshape(3, 2, 72)
    gs = np.array([40.0, 40.0, 40.0], np.float32)
    p_e, s_e = stochastic.scaled_fp4_quant_sr(experts, gs, layout="linear", seed=8, offset=2)
    p_one, s_one = stochastic.scaled_fp4_quant_sr(x, np.float32(40.0), layout="linear", seed=8, offset=2)
    assert_bytes_equal(p_e.reshape(6, -1), p_one, "per-expert packed vs flattened")
    assert_bytes_equal(s_e.reshape(6, -1), s_one, "per-expert scales vs flattened")


def test_sr_reproducible_and_seed_offset_sensitive():
    x = np.random.default_rng(4).standard_normal((32, 256)).astype(np.float32)
    gs = nvfp4.compute_global_scale(x)
    first = stochastic.scaled_fp4_quant_sr(x, gs, seed=42, offset=3)
    again = stochastic.scaled_fp4_quant_sr(x, gs, seed=42, offset=3)
    assert_bytes_equal(again[0], first[0], "same seed and offset: packed")
    assert_bytes_equal(again[1], first[1], "same seed and offset: scales")
    codes = nvfp4.unpack_codes(first[0])
    for other in ({"seed": 42, "offset": 4}, {"seed": 43, "offset": 3}, {"seed": 42 + 2**32, "offset": 3},
                  {"seed": 42, "offset": 3 + 2**32}):
        changed = np.mean(nvfp4.unpack_codes(stochastic.scaled_fp4_quant_sr(x, gs, **other)[0]) != codes)
        assert 0.2 < changed < 0.6, f"{other}: {changed:.3f} of the codes changed"
    # The first rows do not depend on how many rows follow (groups number from row 0).
    head = stochastic.scaled_fp4_quant_sr(x[:5], gs, layout="linear", seed=42, offset=3)[0]
    assert_bytes_equal(head, first[0][:5], "a prefix of rows")


def test_sr_unbiased_within_a_variance_bound():
    """The mean of SR over N seeds converges to x, within a bound from the
    variance.

    Blocks with a power-of-two scale P (amax = 6P, gs = 1) make every step
    exact: y = x / P and the decoded value is P * Q. For one value, SR picks
    Q = lo + u with probability p = q / 256 (q = the 8-bit fraction of y in
    ulps u) and lo otherwise, so E[Q] = lo + p u = y - d with the truncation
    bias d = u * (frac - q / 256) in [0, u / 256), Var[Q] = p (1 - p) u^2,
    and |Q - E[Q]| <= u. Over N independent seeds (distinct Philox keys) the
    mean obeys Bernstein's inequality:
        P(|mean - E[Q]| >= t) <= 2 exp(-N t^2 / (2 Var[Q] + 2 u t / 3)).
    Setting the right side to alpha / K (K values, alpha = 1e-9) gives
        t = (u L / 3 + sqrt((u L / 3)^2 + 2 N Var[Q] L)) / N, L = ln(2K / alpha),
    and every value must meet |mean - E[Q]| <= t. On a grid of y with exact
    8-bit fractions d = 0, so the mean converges to x itself; on random y,
    to x - d with 0 <= d < u / 256 (the 8 random bits of cvt.rs). The bound
    (about 0.13 u for N = 1024) would catch a bias of u / 4 (round to nearest
    at quarter points)."""
    rng = np.random.default_rng(5)
    seeds, alpha = 1024, 1e-9
    powers = np.float32([2.0**-3, 1.0, 2.0**5]).repeat(4)  # 12 blocks of 16: 3 rows of 64
    grid_y = rng.integers(-6 * 128, 6 * 128 + 1, (12, 16)) / 128.0  # multiples of 1/128: exact 8-bit fractions
    random_y = rng.uniform(-6, 6, (12, 16))
    for name, y in (("grid", grid_y), ("random", random_y)):
        y = y.astype(np.float32)
        y[:, 0] = 6.0  # amax = 6P: s = P exactly
        x = (y * powers[:, None]).reshape(3, 64).astype(np.float32)
        total = np.zeros((3, 64))
        for seed in range(seeds):
            packed, scales = stochastic.scaled_fp4_quant_sr(x, 1.0, layout="linear", seed=seed, offset=11)
            total += nvfp4.dequantize(packed, scales, 1.0, layout="linear")
        mean = (total / seeds).reshape(12, 16) / powers[:, None]  # back in y units
        a = np.abs(y.astype(np.float64))
        ulp = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))
        fixed = np.floor(a * 256 / ulp)
        p = (fixed % 256) / 256
        expected = np.sign(y) * (np.floor(fixed / 256) * ulp + p * ulp)
        bias = np.abs(y) - np.abs(expected)
        L = math.log(2 * y.size / alpha)
        t = (ulp * L / 3 + np.sqrt((ulp * L / 3) ** 2 + 2 * seeds * p * (1 - p) * ulp**2 * L)) / seeds
        excess = np.abs(mean - expected) - t
        assert (excess <= 0).all(), (
            f"{name}: {int((excess > 0).sum())} of {y.size} means outside the Bernstein bound; first at "
            f"{np.argwhere(excess > 0)[:5].tolist()}: mean {mean[excess > 0][:3]}, E[Q] {expected[excess > 0][:3]}")
        assert (bias >= 0).all() and (bias < ulp / 256).all(), f"{name}: truncation bias outside [0, u/256)"
        if name == "grid":
            assert (bias == 0).all()
        assert (t < ulp / 4).all(), "the bound must be tight enough to see a rounding bias"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sr_mean_of_50_beats_round_to_nearest_like_te(dtype):
    """TransformerEngine's tests/pytorch/nvfp4/test_nvfp4_sr_quantize.py
    (check_quantization_nvfp4_versus_reference): x = randn(M, N) * 2 - 1;
    quantize once with RN and 50 times with SR (the generator advancing
    between calls), dequantize each as e2m1 * e4m3(sf) * amax / (6 * 448),
    and require RMSE(mean of the 50 SR results - x) < RMSE(RN result - x),
    both for x (rowwise) and x^T (columnwise). TE runs 8192 x 8192 (and
    2D, RHT variants); here 128 x 256, no RHT, with seeds 0..49 rowwise and
    one seed with offsets 0..49 columnwise."""
    rng = np.random.default_rng(12345)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    x = (rng.standard_normal((128, 256)) * 2 - 1).astype(np_dtype)
    for direction, data, draws in (("rowwise", x, [{"seed": s, "offset": 0} for s in range(50)]),
                                   ("columnwise", np.ascontiguousarray(x.T), [{"seed": 77, "offset": o}
                                                                              for o in range(50)])):
        values = data.astype(np.float32)
        amax = np.float32(np.abs(values).max())
        gs = nvfp4.compute_global_scale(data)

        def te_dequantize(packed, scales):
            sf = np.repeat(nvfp4.e4m3_values(scales), 16, axis=1)
            return nvfp4.e2m1_values(nvfp4.unpack_codes(packed)) * sf * (amax / np.float32(6 * 448))

        rmse_rn = np.sqrt(np.mean((te_dequantize(*nvfp4.scaled_fp4_quant(data, gs, layout="linear")) - values) ** 2))
        total = np.zeros_like(values, dtype=np.float32)
        for draw in draws:
            total += te_dequantize(*stochastic.scaled_fp4_quant_sr(data, gs, layout="linear", **draw))
        rmse_sr = np.sqrt(np.mean((total / len(draws) - values) ** 2))
        assert rmse_sr < rmse_rn, f"{direction} {dtype}: RMSE SR {rmse_sr:.4e} >= RMSE RN {rmse_rn:.4e}"


def test_sr_without_a_seed_is_a_clear_error():
    x = np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match="stochastic rounding needs a seed"):
        stochastic.scaled_fp4_quant_sr(x, 1.0)
    with pytest.raises(ValueError, match="needs a seed"):
        stochastic.scaled_fp4_quant_sr(x, 1.0, seed=None, offset=3)
    for bad in (True, 1.5, "1"):
        with pytest.raises(TypeError, match="seed"):
            stochastic.scaled_fp4_quant_sr(x, 1.0, seed=bad)
    with pytest.raises(TypeError, match="offset"):
        stochastic.scaled_fp4_quant_sr(x, 1.0, seed=1, offset=2.0)
    for kwargs in ({"seed": -1}, {"seed": 2**64}, {"seed": 0, "offset": -1}, {"seed": 0, "offset": 2**64}):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
            stochastic.scaled_fp4_quant_sr(x, 1.0, **kwargs)
    stochastic.scaled_fp4_quant_sr(x, 1.0, seed=np.uint64(2**64 - 1), offset=np.int64(5))  # NumPy ints are ints


# ---------------------------------------------------------------------------
# MXFP4 scale rules
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchao_to_mx():
    torch = pytest.importorskip("torch")
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    config = pytest.importorskip("torchao.prototype.mx_formats.config")

    def run(x, mode):
        tensor = torch.from_numpy(np.asarray(x, np.float32))
        if x.dtype == ml_dtypes.bfloat16:
            tensor = tensor.to(torch.bfloat16)
        scales, data = mx_tensor.to_mx(tensor, torch.float4_e2m1fn_x2, 32,
                                       getattr(config.ScaleCalculationMode, mode.upper()))
        return data.view(torch.uint8).numpy(), scales.view(torch.uint8).numpy()

    return run


@pytest.fixture(scope="module")
def te_pow2():
    torch = pytest.importorskip("torch")
    from te_oracle import load_reference_nvfp4

    reference = load_reference_nvfp4()

    def run(x):
        tensor = torch.from_numpy(np.asarray(x, np.float32))
        if x.dtype == ml_dtypes.bfloat16:
            tensor = tensor.to(torch.bfloat16)
        # NVFP4QuantizerRef(pow_2_scales=True, quant_tile_shape=(1, 32)) quantizes through this
        # classmethod (its _quantize path leaves global amaxes undefined for pow_2_scales).
        packed, decode = reference.NVFP4QuantizerRef._quantize_blockwise_reference(
            tensor, None, 32, 1, pow_2_scales=True, eps=0.0)
        decode = decode.numpy().astype(np.float64)
        fraction, exponent = np.frexp(decode)
        assert (fraction[~np.isnan(decode)] == 0.5).all(), "TE's decode scales are powers of two"
        scale_bytes = np.where(np.isnan(decode), 0xFF, exponent - 1 + 127).astype(np.uint8)
        return packed.numpy(), scale_bytes

    return run


def _random_mx_input(dtype, rows=64, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.uniform(-30, 30, (rows, 1)))
    return (rng.standard_normal((rows, cols)) * scale).astype(dtype)


def _edge_amaxes(dtype) -> np.ndarray:
    """Block maxima at every edge of the rules: zero, subnormals, the E8M0
    clamp, powers of two times 1, 1.5, 3, 4, 6 and the floats next to them
    (and, for float32, a few ulps above), the largest finite value."""
    f32 = np.float32
    values = [0.0, 1e-45, 1e-40, 6 * 2.0**-127, 3 * 2.0**-127, 2.0**-126, 3.4028235e38]
    with np.errstate(over="ignore"):
        for k in range(-140, 128):
            for base in (1.0, 1.5, 3.0, 4.0, 6.0):
                v = f32(base * 2.0**k)
                if not np.isfinite(v) or v == 0:
                    continue
                values += [v, np.nextafter(v, f32(np.inf)), np.nextafter(v, f32(0))]
                if dtype == np.float32:
                    values += [v * f32(1 + 2**-21), np.nextafter(np.nextafter(v, f32(np.inf)), f32(np.inf))]
        amax = np.array(values, np.float32).astype(dtype).astype(np.float32)
    return np.unique(amax[np.isfinite(amax)])


def _mx_edge_input(dtype) -> np.ndarray:
    """[rows, 64]: one block per edge maximum (with -amax, -0.0 and random
    values below it), then blocks holding NaN, -NaN, +-inf, all -0.0, all
    +0.0; an odd count is padded with a zero block."""
    amax = _edge_amaxes(dtype)
    rng = np.random.default_rng(1)
    blocks = rng.uniform(-1, 1, (len(amax), 32)).astype(np.float32) * amax[:, None]
    blocks[:, 0], blocks[:, 1], blocks[:, 2] = amax, -amax, -0.0
    special = np.ones((6, 32), np.float32)
    special[0, 3], special[1, 4] = np.nan, -np.nan
    special[2, 5], special[3, 6], special[2, 7] = np.inf, -np.inf, -0.0
    special[4], special[5] = -0.0, 0.0
    special[3, 8:12] = [-1e-30, 3.0, -5.0, 1e-45]
    blocks = np.concatenate([blocks, special])
    if len(blocks) % 2:
        blocks = np.concatenate([blocks, np.zeros((1, 32), np.float32)])
    return blocks.reshape(-1, 64).astype(dtype)


def _float32_log2_misses(x) -> np.ndarray:
    """[blocks] bool: where torch.ceil(torch.log2(d)) in float32 (torchao's
    CPU fallback and TE's reference) differs from the exact ceil(log2(d)),
    d = RN(amax / 6): d a few ulps above a power of two 2^k, |k| >= 4."""
    import torch

    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    with np.errstate(invalid="ignore"):
        descale = (np.max(np.abs(blocks), axis=1) / np.float32(6)).astype(np.float32)
    finite = np.isfinite(descale) & (descale > 0)
    torch_e = torch.ceil(torch.log2(torch.from_numpy(np.where(finite, descale, 1)))).numpy()
    exact = mx_rules.ceil_log2(np.where(finite, descale, 1))
    return finite & (np.clip(torch_e, -127, 127) != np.clip(exact, -127, 127))


def _assert_mx_equal(packed, scales, want_packed, want_scales, what, allowed_blocks=None):
    """Bytes equal, except (when given) in the blocks of `allowed_blocks`
    ([rows * cols / 32] bool), where our scale must be the oracle's + 1."""
    if allowed_blocks is not None:
        allowed = allowed_blocks.reshape(scales.shape)
        assert (scales[allowed].astype(int) == want_scales[allowed].astype(int) + 1).all(), what
        keep = np.repeat(~allowed, 16, axis=1)
        packed, want_packed = np.where(keep, packed, 0), np.where(keep, want_packed, 0)
        scales, want_scales = np.where(allowed, 0, scales), np.where(allowed, 0, want_scales)
    assert_bytes_equal(scales, want_scales, f"{what}: scale bytes")
    assert_bytes_equal(packed, want_packed, f"{what}: packed codes")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_rceil_equals_torchao_on_random_data(torchao_to_mx, dtype):
    x = _random_mx_input(dtype)
    packed, scales = mx_rules.scaled_mxfp4_quant(x, "rceil", layout="linear")
    _assert_mx_equal(packed, scales, *torchao_to_mx(x, "rceil"), f"rceil vs torchao RCEIL, random {dtype}")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_rceil_equals_torchao_on_edge_values(torchao_to_mx, dtype):
    """bfloat16: every byte equal. float32: every byte equal except blocks
    whose d = amax / 6 lies a few ulps above a power of two, where torchao's
    CPU fallback (float32 torch.log2, then ceil) loses the fraction and
    picks the scale one below the exact rule (which its sm_100 path,
    cvt.rp.satfinite.ue8m0x2.f32, and cuBLAS use)."""
    x = _mx_edge_input(dtype)
    packed, scales = mx_rules.scaled_mxfp4_quant(x, "rceil", layout="linear")
    misses = _float32_log2_misses(x)
    if dtype == ml_dtypes.bfloat16:
        assert not misses.any()
    else:
        assert misses.any(), "the float32 edge set must reach torch.log2's misses"
    _assert_mx_equal(packed, scales, *torchao_to_mx(x, "rceil"), f"rceil vs torchao RCEIL, edges {dtype}", misses)
    # The special blocks, as torchao defines them (last rows of the edge input).
    first_special = len(_edge_amaxes(dtype))
    assert scales.reshape(-1)[first_special : first_special + 6].tolist() == [0xFF, 0xFF, 0xFE, 0xFE, 0, 0]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_te_pow2_equals_te_reference(te_pow2, dtype):
    for what, x in (("random", _random_mx_input(dtype, seed=2)), ("edges", _mx_edge_input(dtype))):
        packed, scales = mx_rules.scaled_mxfp4_quant(x, "te_pow2", layout="linear")
        misses = _float32_log2_misses(x) if what == "edges" and dtype == np.float32 else None
        _assert_mx_equal(packed, scales, *te_pow2(x), f"te_pow2 vs TE reference, {what} {dtype}", misses)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_floor_rule_is_the_golden_floor_and_torchao_floor(torchao_to_mx, dtype):
    """"floor" calls reference.nvfp4's OCP rule (every layout), which equals
    torchao's FLOOR on finite data except in blocks with scale byte 0
    (amax < 2^-124), where torchao divides by 2^-126 (its
    F32_MIN_NORMAL clamp) instead of the scale 2^-127."""
    x = _mx_edge_input(dtype)
    for layout in ("swizzled", "linear", "8x4"):
        got = mx_rules.scaled_mxfp4_quant(x, "floor", layout=layout, padded_n=96)
        want = nvfp4.scaled_fp4_quant(x, None, layout=layout, padded_n=96, fmt="mxfp4")
        assert_bytes_equal(got[0], want[0], f"floor packed ({layout})")
        assert_bytes_equal(got[1], want[1], f"floor scales ({layout})")
    blocks = x.astype(np.float32).reshape(-1, 32)
    finite = np.isfinite(blocks).all(axis=1)
    packed, scales = mx_rules.scaled_mxfp4_quant(x, "floor", layout="linear")
    want_packed, want_scales = torchao_to_mx(x, "floor")
    compare = (finite & (scales.reshape(-1) != 0)).reshape(scales.shape)
    assert_bytes_equal(np.where(compare, scales, 0), np.where(compare, want_scales, 0), "floor vs torchao scales")
    keep = np.repeat(compare, 16, axis=1)
    assert_bytes_equal(np.where(keep, packed, 0), np.where(keep, want_packed, 0), "floor vs torchao codes")


def _one_block(values, rule):
    packed, scales = mx_rules.scaled_mxfp4_quant(np.asarray(values, np.float32).reshape(1, -1), rule, layout="linear")
    return int(scales[0, 0]), nvfp4.unpack_codes(packed)[0]


def test_mx_rules_hand_computed():
    block = [6.0] + [0.0] * 31
    assert [_one_block(block, r)[0] for r in mx_rules.MX_SCALE_RULES] == [127, 127, 127]  # d = 1: X = 1 for all
    block = [7.0, -0.0, 0.4] + [0.0] * 29  # d = 7/6: rceil X = 2 (7 -> 3.5 -> 4), floor X = 1 (7 clips to 6)
    (fs, fc), (rs, rc), (ts, tc) = (_one_block(block, r) for r in mx_rules.MX_SCALE_RULES)
    assert (fs, rs, ts) == (127, 128, 128)
    assert fc[:3].tolist() == [7, 8, 1] and rc[:3].tolist() == [6, 8, 0] and tc[:3].tolist() == [6, 0, 0]
    assert [_one_block([6.0000005] + [0.0] * 31, r)[0] for r in ("rceil", "te_pow2")] == [128, 128]
    assert [_one_block([0.0] * 32, r)[0] for r in mx_rules.MX_SCALE_RULES] == [0, 0, 0]
    inf_block = [np.inf, -1.0] + [0.0] * 30
    assert [_one_block(inf_block, r)[0] for r in mx_rules.MX_SCALE_RULES] == [0xFF, 0xFE, 0xFE]
    assert _one_block(inf_block, "rceil")[1][:2].tolist() == [7, 8]
    nan_block = [np.nan, 1.0] + [0.0] * 30
    assert [_one_block(nan_block, r) [0] for r in mx_rules.MX_SCALE_RULES] == [0xFF, 0xFF, 0xFF]
    assert (_one_block(nan_block, "rceil")[1] == 3).all() and (_one_block(nan_block, "te_pow2")[1] == 0).all()
    # Tiny block (d <= 2^-127): byte 0; rceil multiplies by 1 (codes 0), te_pow2 by 2^127.
    tiny = [6 * 2.0**-128, 3 * 2.0**-128] + [0.0] * 30
    assert _one_block(tiny, "rceil")[0] == 0 and _one_block(tiny, "rceil")[1][:2].tolist() == [0, 0]
    assert _one_block(tiny, "te_pow2")[0] == 0 and _one_block(tiny, "te_pow2")[1][:2].tolist() == [5, 3]


def test_rceil_and_te_pow2_differ_only_in_their_special_cases():
    """Same exponent, same codes, except: byte-0 blocks (rceil scales by 1,
    te_pow2 by 2^127), -0.0 (0x8 vs 0x0) and NaN blocks (0x3 vs 0x0)."""
    x = _random_mx_input(np.float32, seed=4)  # no zeros, no tiny blocks, no NaN
    rceil, te = (mx_rules.scaled_mxfp4_quant(x, rule, layout="linear") for rule in ("rceil", "te_pow2"))
    assert_bytes_equal(rceil[0], te[0], "rceil vs te_pow2 packed")
    assert_bytes_equal(rceil[1], te[1], "rceil vs te_pow2 scales")


def test_rceil_never_clips():
    """amax / X <= 6 under rceil (and te_pow2): the largest value never
    saturates, unlike "floor", where amax / X lies in [4, 8)."""
    x = _random_mx_input(np.float32, rows=32, cols=512, seed=9)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    for rule in ("rceil", "te_pow2"):
        _, scales = mx_rules.scaled_mxfp4_quant(x, rule, layout="linear")
        ratio = amax / np.exp2(scales.reshape(-1).astype(np.float64) - 127)
        assert (ratio <= 6).all() and (ratio > 3).all(), rule


def test_ceil_log2_exact():
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    assert (mx_rules.ceil_log2(powers) == np.arange(-149, 128)).all()
    above = np.nextafter(powers, np.float32(np.inf))
    assert (mx_rules.ceil_log2(above[:-1]) == np.arange(-148, 128)).all()
    below = np.nextafter(powers[2:], np.float32(0))  # (2^-148 has only 2^-149 below it)
    assert (mx_rules.ceil_log2(below) == np.arange(-147, 128)).all()
    special = mx_rules.ceil_log2(np.float32([0.0, np.inf, np.nan]))
    assert special[0] == -np.inf and special[1] == np.inf and np.isnan(special[2])


def test_mx_rule_argument_errors():
    x = np.ones((2, 32), np.float32)
    for bad in ("ceil", "RCEIL", None, 1):
        with pytest.raises(ValueError, match="mx_scale_rule"):
            mx_rules.scaled_mxfp4_quant(x, bad)
    with pytest.raises(TypeError):
        mx_rules.scaled_mxfp4_quant(x.astype(np.float64), "rceil")
    with pytest.raises(ValueError, match="multiple of 32"):
        mx_rules.scaled_mxfp4_quant(x, "rceil", padded_n=48)
    packed, scales = mx_rules.scaled_mxfp4_quant(np.ones((3, 40), np.float16), "te_pow2")  # swizzled, K padded
    assert packed.shape == (3, 32) and scales.shape == (128, 4)
