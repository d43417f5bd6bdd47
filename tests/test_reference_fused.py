"""The fused golden models (nvfp4_cupy/reference/fused.py) on the CPU:
docs/fused_ops.md.

- The float32 primitives: fma32 against exact rational arithmetic; exp32's
  constants, its error against float64 (all float16 and bfloat16 inputs, a
  float32 sample) and its bits against a scalar transcription of section 2.2;
  silu32's error.
- The mean of squares: the order of section 3.2 produced by kernels of any
  thread count, and its error within the bound of section 3.3.
- Fused == unfused: rms_norm_quant, silu_and_mul_quant (dense, offsets,
  masked) and fake_quantize (every variant) against our unfused golden ops
  run one after another, bit for bit, on a grid.
- Grouped experts against a per-expert loop over reference.scaled_fp4_quant,
  and vLLM's shape and offset conventions, written down as data with the
  source lines they come from.
- Bad input, empty experts and empty inputs.
"""

from __future__ import annotations

import itertools
import math
from decimal import Decimal, getcontext
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from bytes_check import assert_bytes_equal
from nvfp4_cupy._format import round_up
from nvfp4_cupy import reference as ref
from nvfp4_cupy.reference import fused as F
from nvfp4_cupy.reference import mx_rules, stochastic, te, te_4over6, te_rht

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
LAYOUT_NAMES = ("swizzled", "linear", "8x4")
U = 2.0**-24  # unit roundoff of float32


# ---------------------------------------------------------------------------
# Exact float32 rounding of rationals (the oracle for fma32 and the constants)
# ---------------------------------------------------------------------------
def rn32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational q (ties to even), with subnormals
    and overflow to +-inf."""
    if q == 0:
        return np.float32(0.0)
    sign = -1 if q < 0 else 1
    q = abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    scaled = q / quantum
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2):
        whole += 1
    value = whole * quantum
    if value >= Fraction(2) ** 128:
        return np.float32(sign * np.inf)
    return np.float32(sign * float(value))  # exact: value is a float32


def frac(x) -> Fraction:
    return Fraction(float(x))


def bits32(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def f32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


def same_bits(a, b) -> bool:
    """float32 arrays equal bit for bit, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(both_nan | (bits32(a) == bits32(b))))


def ulp_error(got, exact) -> np.ndarray:
    """|got - exact| in float32 ulps of the exact value (float64), the ulp
    of a subnormal being 2^-149."""
    exact = np.asarray(exact, np.float64)
    magnitude = np.abs(exact)
    exponent = np.maximum(np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0))), -126)
    return np.abs(np.asarray(got, np.float64) - exact) / 2.0 ** (exponent - 23)


def all_values(dtype) -> np.ndarray:
    """Every finite value of a 16-bit dtype, as float32."""
    values = np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float32)
    return values[np.isfinite(values)]


# ---------------------------------------------------------------------------
# 2.1 fma32
# ---------------------------------------------------------------------------
def test_fma32_is_exactly_rounded():
    rng = np.random.default_rng(1)
    count = 1500
    a = rng.standard_normal(count).astype(np.float32) * np.exp2(rng.integers(-30, 30, count)).astype(np.float32)
    b = rng.standard_normal(count).astype(np.float32) * np.exp2(rng.integers(-30, 30, count)).astype(np.float32)
    # c near -a * b (cancellation), tiny (subnormal results), or unrelated
    near = (-(a.astype(np.float64) * b)).astype(np.float32)
    c = np.where(rng.random(count) < 0.5, near, rng.standard_normal(count).astype(np.float32))
    a[:100] = rng.standard_normal(100).astype(np.float32) * np.float32(2.0**-70)
    b[:100] = rng.standard_normal(100).astype(np.float32) * np.float32(2.0**-70)
    c[:100] = rng.standard_normal(100).astype(np.float32) * np.float32(2.0**-135)
    got = F.fma32(a, b, c)
    for i in range(count):
        want = rn32(frac(a[i]) * frac(b[i]) + frac(c[i]))
        assert bits32(got[i]) == bits32(want), (a[i], b[i], c[i], got[i], want)


def test_fma32_rounds_once_where_float64_would_round_twice():
    # a * b = 1 + 2^-11 + 2^-24 lies half an ulp above 1 + 2^-11; c = 2^-80 pushes it above the
    # tie. RN64(a * b + c) drops c, and RN32 of that tie would round to even (down); one rounding
    # rounds up.
    a = np.float32(1 + 2.0**-12)
    c = np.float32(2.0**-80)
    assert F.fma32(a, a, c) == np.float32(1 + 2.0**-11 + 2.0**-23)
    assert F.fma32(a, a, -c) == np.float32(1 + 2.0**-11)
    assert F.fma32(a, a, np.float32(0)) == np.float32(1 + 2.0**-11)  # the tie itself: to even
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    assert np.isnan(F.fma32(inf, np.float32(0), np.float32(1)))
    assert np.isnan(F.fma32(inf, np.float32(1), -inf))
    assert F.fma32(np.float32(3e38), np.float32(2), np.float32(-3e38)) == np.float32(3e38)  # no overflow inside
    assert np.isnan(F.fma32(nan, np.float32(1), np.float32(1)))
    assert np.signbit(F.fma32(np.float32(-0.0), np.float32(1), np.float32(-0.0)))
    assert not np.signbit(F.fma32(np.float32(1), np.float32(1), np.float32(-1)))
    # a subnormal result, rounded once
    assert F.fma32(np.float32(2.0**-75), np.float32(2.0**-75) * np.float32(1.5), np.float32(0)) == \
        rn32(Fraction(3, 2) * Fraction(2) ** -150)


# ---------------------------------------------------------------------------
# 2.2 - 2.4 exp32 and silu32
# ---------------------------------------------------------------------------
getcontext().prec = 60
LN2 = Fraction(Decimal("0.693147180559945309417232121458176568075500134360255254120680"))


def test_exp_constants_are_the_documented_roundings():
    k = {name: f32(bits) for name, bits in F.EXP_CONSTANTS.items()}
    for i in range(8):
        assert k[f"C{i}"] == rn32(Fraction(1, math.factorial(i))), i
    assert k["LN2_HI"] == np.float32(355 / 512)
    assert k["LN2_LO"] == rn32(LN2 - Fraction(355, 512))
    assert k["LOG2E"] == rn32(1 / LN2)
    assert k["SHIFTER"] == np.float32(1.5 * 2**23)
    assert (k["LOW"], k["HIGH"]) == (np.float32(-104), np.float32(89))
    # The clamp bounds do what section 2.2 says: exp(-104) < 2^-150, exp(89) > FLT_MAX.
    assert math.exp(-104) < 2.0**-150 and math.exp(89) > float(np.finfo(np.float32).max)


def exp32_scalar(t: np.float32) -> np.float32:
    """docs/fused_ops.md section 2.2, transcribed one step at a time with
    exact rational fma (independent of fma32's vectorized emulation)."""
    k = {name: frac(f32(bits)) for name, bits in F.EXP_CONSTANTS.items()}

    def fma(a, b, c):
        return frac(rn32(a * b + c))

    if math.isnan(t):
        return np.float32(np.nan)
    tc = frac(min(max(float(t), -104.0), 89.0))  # the clamp to [LOW, HIGH]
    j = fma(tc, k["LOG2E"], k["SHIFTER"])
    kf = j - k["SHIFTER"]
    assert kf.denominator == 1
    r = fma(kf, -k["LN2_HI"], tc)
    assert r == tc - kf * k["LN2_HI"]  # the first Cody-Waite step is exact
    r = fma(kf, -k["LN2_LO"], r)
    p = k["C7"]
    for i in range(6, -1, -1):
        p = fma(p, r, k[f"C{i}"])
    e1 = int(kf) // 2
    e2 = int(kf) - e1
    first = rn32(p * Fraction(2) ** e1)
    assert frac(first) == p * Fraction(2) ** e1  # the first scaling is exact
    return rn32(frac(first) * Fraction(2) ** e2)


def test_exp32_matches_its_scalar_definition():
    rng = np.random.default_rng(2)
    t = np.concatenate([
        rng.uniform(-104, 89, 150).astype(np.float32),
        np.float32([0.0, -0.0, 1.0, -1.0, 0.34657359, -0.34657359, 88.72283, 88.7229, 89.0, 120.0, -87.33655,
                    -88.0, -103.2789, -103.9, -104.0, -200.0, 1e-30, -1e-30, 2.0**-149, np.inf, -np.inf]),
    ])
    got = F.exp32(t)
    for value, result in zip(t, got):
        want = exp32_scalar(value)
        assert bits32(result) == bits32(want), (value, result, want)
    assert np.isnan(F.exp32(np.float32(np.nan)))


# docs/fused_ops.md, section 2.4, measured over every float32 of the domain: exp32 errs by at most
# 0.93861 ulp (at t = 26.688921), silu32 by at most 2.39386 ulp (at x = -16.684786). The tests
# include both worst inputs.
EXP_MAX_ULP = 0.9387
EXP_WORST = np.float32(26.688920974731445)
SILU_MAX_ULP = 2.3939
SILU_WORST = np.float32(-16.684785842895508)


def test_exp32_error_below_one_ulp():
    rng = np.random.default_rng(3)
    sample = rng.integers(0, 0x42D00000, 1 << 18, dtype=np.uint32).view(np.float32)
    t = np.concatenate([all_values(np.float16), all_values(ml_dtypes.bfloat16), sample, -sample, [EXP_WORST]])
    t = t[(t >= -104) & (t <= 88.72)]
    err = ulp_error(F.exp32(t), np.exp(t.astype(np.float64)))
    assert err.max() <= EXP_MAX_ULP, (err.max(), t[np.argmax(err)])
    assert err.max() > EXP_MAX_ULP - 1e-4  # the worst input is in
    assert np.mean(err > 0.5) < 0.01  # correctly rounded for more than 99% of inputs
    assert F.exp32(np.float32(0)) == 1 and F.exp32(np.float32(-np.inf)) == 0
    assert F.exp32(np.float32(np.inf)) == np.inf and F.exp32(np.float32(89)) == np.inf
    assert F.exp32(np.float32(-104)) == 0 and F.exp32(np.float32(-103)) > 0  # subnormal results are kept
    overflow = np.arange(0x42B17218, 0x42B20001, dtype=np.uint32).view(np.float32)  # 88.72283935546875 .. 89
    assert np.all(F.exp32(overflow) == np.inf) and np.isfinite(F.exp32(f32(0x42B17217)))


def silu64(x):
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        return x / (1.0 + np.exp(-x))


def test_silu32_error():
    rng = np.random.default_rng(4)
    sample = rng.integers(0, 0x42D00000, 1 << 18, dtype=np.uint32).view(np.float32)
    x = np.concatenate([all_values(np.float16), all_values(ml_dtypes.bfloat16), sample, -sample, [SILU_WORST]])
    finite = x > np.float32(-88.72283935546875)  # 0xC2B17218: from here down exp32(-x) is +inf
    err = ulp_error(F.silu32(x[finite]), silu64(x[finite]))
    assert err.max() <= SILU_MAX_ULP, (err.max(), x[finite][np.argmax(err)])
    assert err.max() > SILU_MAX_ULP - 1e-4
    assert np.mean(err > 1) < 0.02
    # Below -88.7228 exp(-x) overflows and silu is -0.0 (PyTorch's and vLLM's float32 formula too),
    # where the exact value is below 2.7e-37 in magnitude.
    tail = x[~finite]
    assert np.all(F.silu32(tail) == 0) and np.all(np.signbit(F.silu32(tail)))
    assert np.all(np.abs(silu64(tail)) < 2.7e-37)
    special = F.silu32(np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0]))
    assert special[0] == np.inf and np.isnan(special[1]) and np.isnan(special[2])
    assert special[3] == 0 and not np.signbit(special[3]) and np.signbit(special[4])


# ---------------------------------------------------------------------------
# 3.2 - 3.3 the mean of squares
# ---------------------------------------------------------------------------
def lane_sums_by_kernel(z: np.ndarray, threads: int) -> np.ndarray:
    """What a kernel of `threads` threads per row accumulates (section 3.2,
    implementation): thread t reads the 8-element chunks c = t, t + threads,
    ... (coalesced) and adds chunk c into its accumulator (c mod 256) //
    threads when threads < 256; with threads >= 256, thread t < 256 is lane
    t and the others add nothing. Returns float32 [256] lane sums."""
    n = z.shape[0]
    chunks = -(-n // 8)
    padded = np.zeros(chunks * 8, np.float32)
    padded[:n] = z
    if threads >= 256:
        acc = np.zeros(threads, np.float32)
        for c in range(chunks):
            for j in range(8):
                acc[c % 256] = F.fma32(padded[8 * c + j], padded[8 * c + j], acc[c % 256])
        return acc[:256]
    acc = np.zeros((threads, 256 // threads), np.float32)
    rounds = -(-chunks // threads)
    for step in range(rounds):  # all threads at once, one chunk each
        for t in range(threads):
            c = step * threads + t
            if c >= chunks:
                continue
            slot = (c % 256) // threads
            for j in range(8):
                acc[t, slot] = F.fma32(padded[8 * c + j], padded[8 * c + j], acc[t, slot])
    lanes = np.zeros(256, np.float32)
    for t in range(threads):
        for slot in range(256 // threads):
            lanes[slot * threads + t] = acc[t, slot]
    return lanes


def tree_by_warp_shuffles(lanes: np.ndarray) -> np.ndarray:
    """Section 3.2's tree as a 32-thread warp runs it with 8 accumulators
    (group g in accumulator g): shfl_xor 16, 8, 4, 2, 1 on each accumulator,
    then in-thread g ^ 4, g ^ 2, g ^ 1. Returns what each of the 32 threads
    holds at the end (all equal)."""
    acc = lanes.reshape(8, 32).T.copy()  # [thread l, group g]
    for offset in (16, 8, 4, 2, 1):
        acc = (acc + acc[np.arange(32) ^ offset]).astype(np.float32)
    for offset in (4, 2, 1):
        acc = (acc + acc[:, np.arange(8) ^ offset]).astype(np.float32)
    return acc[:, 0]


@pytest.mark.parametrize("threads", [32, 64, 128, 256, 1024])
def test_sum_order_is_the_same_for_every_thread_count(threads):
    rng = np.random.default_rng(5)
    for n in (5, 8, 300, 2049 + 256 * 8):
        z = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
        lanes = lane_sums_by_kernel(z, threads)
        warp = tree_by_warp_shuffles(lanes)
        assert np.all(bits32(warp) == bits32(warp[0]))  # every thread holds the same sum
        assert bits32(warp[0]) == bits32(F.sum_of_squares(z[None, :])[0]), (n, threads)


def sum_bound(n: int) -> float:
    """gamma_h of section 3.3: h = 8 * ceil(ceil(n / 8) / 256) + 8 roundings
    at most on any term's way to the sum."""
    h = 8 * -(-(-(-n // 8)) // 256) + 8
    return h * U / (1 - h * U)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_within_bound(dtype):
    rng = np.random.default_rng(6)
    worst = 0.0
    for n in (1, 7, 64, 1000, 4096, 7168, 16384):
        x = (rng.standard_normal((3, n)) * np.exp(rng.standard_normal((3, n)))).astype(DTYPES[dtype])
        z = x.astype(np.float32)
        got = F.sum_of_squares(z).astype(np.float64)
        for row in range(3):
            exact = math.fsum(float(v) ** 2 for v in z[row].astype(np.float64))  # squares exact in float64
            relative = abs(got[row] - exact) / exact
            assert relative <= sum_bound(n), (n, row, relative, sum_bound(n))
            worst = max(worst, relative / sum_bound(n))
        inv = F.rms_inverse(F.sum_of_squares(z), n, np.float32(1e-6)).astype(np.float64)
        exact_inv = 1 / np.sqrt(np.array([math.fsum(v**2 for v in r.astype(np.float64)) for r in z]) / n + 1e-6)
        # eps is float32(1e-6) in the kernel; its rounding is below 3e-14 relative here
        assert np.all(np.abs(inv / exact_inv - 1) <= sum_bound(n) / 2 + 3.1 * U)
    assert worst < 0.5  # the bound is not loose by orders of magnitude... nor reached


def rn_bf16(v: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 with one rounding to nearest even (ml_dtypes'
    cast from float64 goes through float32: two roundings)."""
    v = np.asarray(v, np.float64)
    with np.errstate(all="ignore"):
        _, e = np.frexp(v)  # |v| = f * 2^e, f in [0.5, 1)
        quantum = np.exp2(np.maximum(e - 8, -133).astype(np.float64))  # 8 bits, or the subnormal spacing
        rounded = np.rint(v / quantum) * quantum  # exact: v / quantum has at most 53 bits
        rounded = np.where(np.abs(rounded) >= 2.0**128, np.copysign(np.inf, v), rounded)
    return rounded.astype(np.float32).astype(ml_dtypes.bfloat16)  # exact now


def test_residual_sum_rounds_once():
    """Section 3.1, step 1: to_T(RN32(a + b)) is the correctly rounded sum in
    T for float16 and bfloat16 (the double rounding is innocuous)."""
    rng = np.random.default_rng(20)
    assert rn_bf16(np.array([1 + 2.0**-8 + 2.0**-40]))[0] == np.float32(1 + 2.0**-7)  # one rounding, not two
    for dtype in (np.float16, ml_dtypes.bfloat16):
        bits = rng.integers(0, 1 << 16, (2, 200_000), dtype=np.uint64).astype(np.uint16)
        a, b = bits.view(dtype)
        keep = np.isfinite(a.astype(np.float32)) & np.isfinite(b.astype(np.float32))
        a, b = a[keep], b[keep]
        with np.errstate(all="ignore"):
            got = (a.astype(np.float32) + b.astype(np.float32)).astype(dtype)
            exact = a.astype(np.float64) + b.astype(np.float64)
        if dtype is np.float16:  # float64 holds every float16 sum, and NumPy rounds float64 to float16 once
            exact_ok = np.ones(a.shape, bool)
            with np.errstate(over="ignore"):
                want = exact.astype(np.float16)
        else:  # float64 holds the sum when the exponents are at most 44 apart
            ea = np.frexp(a.astype(np.float64))[1]
            eb = np.frexp(b.astype(np.float64))[1]
            exact_ok = (np.abs(ea - eb) <= 44) | (a.astype(np.float32) == 0) | (b.astype(np.float32) == 0)
            want = rn_bf16(exact)
        assert np.array_equal(got.view(np.uint16)[exact_ok], want.view(np.uint16)[exact_ok]), dtype
        assert exact_ok.mean() > 0.3


def rms_norm_scalar(x_row, w, eps, r_row=None):
    """Section 3.1 for one row, one float32 operation at a time."""
    dtype = x_row.dtype
    if r_row is None:
        z = [np.float32(v) for v in x_row]
    else:
        z = [np.float32(dtype.type(np.float32(a) + np.float32(b))) for a, b in zip(x_row, r_row)]
    n = len(z)
    lanes = [np.float32(0)] * 256
    for i, v in enumerate(z):
        lane = (i // 8) % 256
        lanes[lane] = np.float32(rn32(frac(v) * frac(v) + frac(lanes[lane])))
    groups = []
    for g in range(8):
        part = lanes[32 * g : 32 * g + 32]
        while len(part) > 1:
            half = len(part) // 2
            part = [np.float32(part[i] + part[i + half]) for i in range(half)]
        groups.append(part[0])
    while len(groups) > 1:
        half = len(groups) // 2
        groups = [np.float32(groups[i] + groups[i + half]) for i in range(half)]
    ms = np.float32(groups[0] / np.float32(n))
    d = np.float32(ms + np.float32(eps))
    inv = np.float32(np.float32(1) / np.sqrt(d))
    out = []
    for i, v in enumerate(z):
        y = dtype.type(np.float32(v * inv))
        out.append(y if w is None else dtype.type(np.float32(np.float32(y) * np.float32(w[i]))))
    return np.array(out, dtype), np.array([dtype.type(v) for v in z], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_its_scalar_definition(dtype):
    rng = np.random.default_rng(7)
    t = DTYPES[dtype]
    for n, with_weight, with_residual in itertools.product((3, 40, 300), (True, False), (True, False)):
        x = (rng.standard_normal((2, n)) * 3).astype(t)
        w = rng.standard_normal(n).astype(t) if with_weight else None
        r = rng.standard_normal((2, n)).astype(t) if with_residual else None
        result = F.rms_norm(x, w, 1e-5, residual=r)
        out, z = result if with_residual else (result, None)
        for row in range(2):
            want, want_z = rms_norm_scalar(x[row], w, 1e-5, None if r is None else r[row])
            assert np.array_equal(out[row].view(np.uint8), want.view(np.uint8)), (n, row)
            if with_residual:
                assert np.array_equal(z[row].view(np.uint8), want_z.view(np.uint8))


def test_rms_norm_special_values():
    x = np.zeros((1, 16), np.float16)
    out = F.rms_norm(x, None, 0.0)  # 0 / sqrt(0) is 0 * inf: NaN (documented), as the canonical NaN
    assert np.all(out.view(np.uint16) == 0x7E00)
    packed, scales = F.rms_norm_quant(x, None, 0.0, 1.0, layout="linear")
    assert np.all(scales == 0x7F) and np.all(packed == 0)
    assert np.all(F.rms_norm(x, None, 1e-6) == 0)  # eps > 0: zeros stay zeros
    y = np.ones((1, 16), np.float32)
    y[0, 3] = np.inf
    out = F.rms_norm(y, None, 1e-6)  # mean inf, inv 0: finite values give 0, inf * 0 is NaN
    assert np.isnan(out[0, 3]) and np.all(out[0, np.arange(16) != 3] == 0)


# ---------------------------------------------------------------------------
# Fused == unfused, bit for bit
# ---------------------------------------------------------------------------
def data(shape, dtype, rng, kind="normal"):
    values = rng.standard_normal(shape)
    if kind == "heavy":
        values = values * np.exp(2 * rng.standard_normal(shape))
    return values.astype(np.float32).astype(DTYPES[dtype])


def global_scale_forms(x_shape, rng):
    m = math.prod(x_shape[:-1])
    forms = [("host", 37.5), ("one", np.array([0.75], np.float32)),
             ("row", (rng.uniform(0.5, 200, m)).astype(np.float32))]
    if len(x_shape) == 3:
        forms.append(("expert", rng.uniform(0.5, 200, x_shape[0]).astype(np.float32)))
    return forms


def assert_outputs_equal(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        assert_bytes_equal(a.view(np.uint8), b.view(np.uint8), f"{what} output {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_quant_equals_rms_norm_then_quantize(dtype):
    rng = np.random.default_rng(8)
    grid = itertools.product([(4, 33), (2, 3, 160), (1, 5), (130, 16)], (True, False), (True, False),
                             LAYOUT_NAMES, ("nvfp4", "mxfp4"))
    for shape, with_weight, with_residual, layout, fmt in grid:
        x = data(shape, dtype, rng, "heavy")
        w = data((shape[-1],), dtype, rng) if with_weight else None
        r = data(shape, dtype, rng) if with_residual else None
        forms = [("mx", None)] if fmt == "mxfp4" else global_scale_forms(shape, rng)
        block = 16 if fmt == "nvfp4" else 32
        for (name, gs), padded_n in itertools.product(forms, (None, round_up(shape[-1], block) + block)):
            got = F.rms_norm_quant(x, w, 1e-6, gs, padded_n=padded_n, layout=layout, fmt=fmt, residual=r)
            normed = F.rms_norm(x, w, 1e-6, residual=r)
            out = normed if r is None else normed[0]
            want = ref.scaled_fp4_quant(out, gs, padded_n=padded_n, layout=layout, fmt=fmt)
            if r is not None:
                want = (*want, normed[1])
            assert_outputs_equal(got, want, f"rms_norm_quant {dtype} {shape} {name} {layout} {fmt} {padded_n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_quant_equals_silu_and_mul_then_quantize(dtype):
    rng = np.random.default_rng(9)
    for shape, layout, fmt in itertools.product([(4, 66), (2, 3, 64), (1, 2), (129, 32)], LAYOUT_NAMES,
                                                ("nvfp4", "mxfp4")):
        x = data(shape, dtype, rng, "heavy") * DTYPES[dtype](4)
        out_shape = (*shape[:-1], shape[-1] // 2)
        forms = [("mx", None)] if fmt == "mxfp4" else global_scale_forms(out_shape, rng)
        for name, gs in forms:
            got = F.silu_and_mul_quant(x, gs, layout=layout, fmt=fmt)
            want = ref.scaled_fp4_quant(F.silu_and_mul(x), gs, layout=layout, fmt=fmt)
            assert_outputs_equal(got, want, f"silu_and_mul_quant {dtype} {shape} {name} {layout} {fmt}")


def test_silu_and_mul_definition():
    rng = np.random.default_rng(10)
    for dtype in DTYPES:
        x = data((8, 64), dtype, rng, "heavy") * DTYPES[dtype](8)
        gate, up = x[:, :32].astype(np.float32), x[:, 32:].astype(np.float32)
        want = (F.silu32(gate) * up).astype(np.float32).astype(DTYPES[dtype])
        assert np.array_equal(F.silu_and_mul(x).view(np.uint8), want.view(np.uint8))
    # float16 overflow of the product, and NaN as the canonical NaN
    x = np.array([[60000, np.nan, 60000, 1]], np.float16)
    out = F.silu_and_mul(x)
    assert out[0, 0] == np.inf and out.view(np.uint16)[0, 1] == 0x7E00


# ---------------------------------------------------------------------------
# Grouped experts: against a per-expert loop over reference.scaled_fp4_quant
# ---------------------------------------------------------------------------
def experts_by_loop(x, gs, offsets, padded_n, layout, fmt):
    """Each expert's rows through reference.scaled_fp4_quant, its complete
    scale tensor copied to scale row b[e] (its bytes are contiguous there:
    every layout's tile rows divide b[e])."""
    scale_layout = ref.LAYOUTS[layout]
    tokens, n = x.shape
    block = 16 if fmt == "nvfp4" else 32
    padded_n = padded_n or round_up(n, block)
    experts = len(offsets) - 1
    packed = np.zeros((tokens, padded_n // 2), np.uint8)
    rows = F.experts_scale_rows(tokens, experts, layout)
    cols = scale_layout.scale_shape(0, padded_n, block)[1]
    scales = np.zeros(rows * cols, np.uint8)
    start = 0
    starts = [0]
    for e in range(experts):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            expert_gs = None if fmt == "mxfp4" else gs[e : e + 1]
            p, s = ref.scaled_fp4_quant(x[lo:hi], expert_gs, padded_n=padded_n, layout=layout, fmt=fmt)
            packed[lo:hi] = p
            scales[start * cols : start * cols + s.size] = s.reshape(-1)
            start += s.shape[0]
        starts.append(start)
    return packed, scales.reshape(rows, cols), np.array(starts, np.int32)


EXPERT_CASES = [
    ("uneven", [0, 5, 5, 140, 150]),
    ("empty experts", [0, 0, 0, 7, 7]),
    ("all empty", [0, 0, 0]),
    ("no experts", [0]),
    ("trailing rows", [0, 3, 9]),  # offsets[E] < T: rows 9.. belong to no expert
    ("one expert", [0, 150]),
]


@pytest.mark.parametrize("name,offsets", EXPERT_CASES, ids=[c[0] for c in EXPERT_CASES])
def test_experts_quant_equals_per_expert_loop(name, offsets):
    rng = np.random.default_rng(11)
    offsets = np.array(offsets, np.int32)
    tokens = 150 if offsets[-1] == 150 or name == "trailing rows" else int(offsets[-1]) + 2
    experts = len(offsets) - 1
    for dtype, layout, fmt, extra in itertools.product(DTYPES, LAYOUT_NAMES, ("nvfp4", "mxfp4"), (0, 1)):
        block = 16 if fmt == "nvfp4" else 32
        x = data((tokens, 40), dtype, rng, "heavy")
        padded_n = None if not extra else round_up(40, block) + block
        gs = None if fmt == "mxfp4" else rng.uniform(0.5, 300, experts).astype(np.float32)
        if gs is not None and experts > 1:
            gs[1] = np.nan  # an invalid device scale NaN-scales its expert only
        got = F.scaled_fp4_experts_quant(x, gs, offsets, padded_n=padded_n, layout=layout, fmt=fmt)
        want = experts_by_loop(x, gs, offsets, padded_n, layout, fmt)
        assert_outputs_equal(got, want, f"experts {name} {dtype} {layout} {fmt} {padded_n}")
        # silu_and_mul's expert form is silu_and_mul, then this
        xs = data((tokens, 80), dtype, rng, "heavy")
        got = F.silu_and_mul_quant(xs, gs, padded_n=padded_n, layout=layout, fmt=fmt, expert_offsets=offsets)
        want = F.scaled_fp4_experts_quant(F.silu_and_mul(xs), gs, offsets, padded_n=padded_n, layout=layout, fmt=fmt)
        assert_outputs_equal(got, want, f"silu experts {name} {dtype} {layout} {fmt}")


def test_experts_one_global_scale_for_all():
    rng = np.random.default_rng(12)
    x = data((20, 32), "bfloat16", rng)
    offsets = np.array([0, 4, 20], np.int32)
    for gs in (2.5, np.array([2.5], np.float32)):
        got = F.scaled_fp4_experts_quant(x, gs, offsets)
        want = experts_by_loop(x, np.array([2.5, 2.5], np.float32), offsets, None, "swizzled", "nvfp4")
        assert_outputs_equal(got, want, "one scale for all experts")


def test_experts_unchecked_offsets_are_sanitized():
    """validate=False (section 5.4): offsets clamped to [0, T], then made
    non-decreasing; rows outside [o[0], o[E]) give 0x00."""
    rng = np.random.default_rng(13)
    x = data((30, 32), "float16", rng)
    for raw in ([0, 12, 5, 40], [-3, 10, 8, 20], [4, 9, 30, 25], [0, 100, 100]):
        offsets = np.array(raw, np.int32)
        gs = np.full(len(raw) - 1, 3.0, np.float32)
        with pytest.raises(ValueError):
            F.scaled_fp4_experts_quant(x, gs, offsets)
        got = F.scaled_fp4_experts_quant(x, gs, offsets, validate=False)
        clean = np.maximum.accumulate(np.clip(offsets.astype(np.int64), 0, 30))
        packed, scales, starts = experts_by_loop(x, gs, clean, None, "swizzled", "nvfp4")
        assert_outputs_equal(got, (packed, scales, starts), f"sanitized {raw}")


def test_masked_quant():
    rng = np.random.default_rng(14)
    for dtype, layout, fmt in itertools.product(DTYPES, LAYOUT_NAMES, ("nvfp4", "mxfp4")):
        x = data((4, 9, 48), dtype, rng, "heavy")
        counts = np.array([0, 9, 3, 1], np.int32)
        gs = None if fmt == "mxfp4" else np.array([1.0, np.nan, 40.0, 0.25], np.float32)
        packed, scales = F.scaled_fp4_masked_quant(x, gs, counts, layout=layout, fmt=fmt)
        block = 16 if fmt == "nvfp4" else 32
        for e in range(4):
            c = int(counts[e])
            want_p, want_s = ref.scaled_fp4_quant(x[e, :c], None if gs is None else gs[e : e + 1], layout=layout,
                                                  fmt=fmt, padded_n=round_up(48, block))
            assert_bytes_equal(packed[e, :c], want_p, f"masked {dtype} {layout} {fmt} expert {e} packed")
            assert np.all(packed[e, c:] == 0)
            # the expert's scale tensor for its count rows, then zeros (masked rows are layout padding)
            full = ref.unswizzle_scales(scales[e], 9, round_up(48, block), layout, fmt)
            assert_bytes_equal(full[:c], ref.unswizzle_scales(want_s, c, round_up(48, block), layout,
                                                              fmt), f"masked {e} scales")
            assert np.all(full[c:] == 0)
            rest = scales[e].copy().reshape(-1)
            rest[ref.scale_offsets(layout, *np.indices(full.shape), scales[e].shape[1]).reshape(-1)] = 0
            assert np.all(rest == 0)  # layout padding
        xs = data((4, 9, 96), dtype, rng, "heavy")
        got = F.silu_and_mul_quant(xs, gs, layout=layout, fmt=fmt, expert_counts=counts)
        want = F.scaled_fp4_masked_quant(F.silu_and_mul(xs), gs, counts, layout=layout, fmt=fmt)
        assert_outputs_equal(got, want, f"silu masked {dtype} {layout} {fmt}")


def test_masked_rows_are_not_read():
    rng = np.random.default_rng(15)
    x = data((2, 5, 32), "float16", rng)
    y = x.copy()
    y[0, 2:] = np.nan
    y[1, 4:] = np.inf
    counts = np.array([2, 4], np.int32)
    assert_outputs_equal(F.scaled_fp4_masked_quant(x, 1.0, counts), F.scaled_fp4_masked_quant(y, 1.0, counts),
                         "masked rows")
    got = F.scaled_fp4_masked_quant(x, 1.0, np.array([9, -1], np.int32), validate=False)  # clamped to [0, max_m]
    assert_outputs_equal(got, F.scaled_fp4_masked_quant(x, 1.0, np.array([5, 0], np.int32)), "clamped counts")


# ---------------------------------------------------------------------------
# vLLM's conventions, as data. Sources (vllm-project/vllm, read for this spec):
#   [A] csrc/quantization/w8a8/cutlass/moe/moe_data.cu @027b0d8a, compute_expert_blockscale_offsets:
#         expert_offsets[0] = 0; blockscale_offsets[0] = 0;
#         tot_offset += cur_offset; expert_offsets[i + 1] = tot_offset;
#         tot_offset_round += (cur_offset + (128 - 1)) / 128 * 128; blockscale_offsets[i + 1] = tot_offset_round;
#   [B] csrc/quantization/fp4/nvfp4_experts_quant.cu @0328802b, cvt_fp16_to_fp4:
#         expert of row: rowIdx >= input_offset_by_experts[i] && rowIdx < input_offset_by_experts[i + 1];
#         rowIdx_in_expert = rowIdx - offset; SFScaleVal = SFScale[expert_idx];
#         numCols_SFout = round_up(numCols, 64) / 16 / 4   (int32 words of one scale row)
#         SFout_in_expert = SFout + output_scale_offset_by_experts[expert_idx] * numCols_SFout;
#       and its entry point: input.dim() == 2; k % 16 == 0; offsets int32 of size n_experts + 1;
#         output [m_topk, k / 2] uint8; output_scale.size(1) * 4 == round_up(k / 16, 4).
#       Its later version, csrc/libtorch_stable/quantization/fp4/nvfp4_experts_quant.cu @4750b9f7,
#       templates the kernel on FUSE_SILU_MUL (silu_and_mul_scaled_fp4_experts_quant): the gate is
#         in[rowIdx * 2 * colsPerRow + colIdx], the up half colsPerRow vectors further (gate || up),
#         quant_input = compute_silu_mul(gate, up); SFout_in_expert = SFout +
#         output_scale_offset_by_experts[expert_idx] * numKTiles, numKTiles = (numCols + 63) / 64.
#   [C] csrc/quantization/fp4/nvfp4_utils.cuh @07c13c7b, cvt_quant_to_fp4_get_sf_out_offset:
#         SFOffset = (mTileIdx * numKTiles + kTileIdx) << 9 | (outerMIdx << 4) | (innerMIdx << 2) | innerKIdx
#         with mTileIdx = m / 128, outerMIdx = m % 32, innerMIdx = (m / 32) % 4, kTileIdx = k / 4,
#         innerKIdx = k % 4, numKTiles = (numCols + 63) / 64.
#   [D] vllm/_custom_ops.py @0002bde5, scaled_fp4_experts_quant / silu_and_mul_scaled_fp4_experts_quant:
#         input [m_numtopk, k] (silu: [m_topk, 2 * k], gate || up); output [m_numtopk, k // 2] uint8;
#         output_scales int32 [MAX_TOKENS_PER_EXPERT * topk, (k // 16 + 3) // 4]; global scale [n_experts].
#   FlashInfer (flashinfer-ai/flashinfer flashinfer/fp4_quantization.py @6930085e), the masked form:
#         scaled_fp4_grouped_quantize(a [B, M, K], mask [B], a_global_sf) -> [B, M, K / 2] packed.
# ---------------------------------------------------------------------------
VLLM_CASES = [
    # (counts per expert, k)
    ([3, 0, 130, 128, 1], 64),
    ([0, 0], 32),
    ([200], 48),
    ([1] * 9, 16),
]


def vllm_offsets(counts):
    """[A], transcribed."""
    expert_offsets, blockscale_offsets = [0], [0]
    tot, tot_round = 0, 0
    for cur in counts:
        tot += cur
        expert_offsets.append(tot)
        tot_round += (cur + (128 - 1)) // 128 * 128
        blockscale_offsets.append(tot_round)
    return expert_offsets, blockscale_offsets


def vllm_scale_byte(row, k_block, expert_offsets, blockscale_offsets, k):
    """The byte offset [B] and [C] write the scale of (row, k_block) to."""
    e = next(i for i in range(len(expert_offsets) - 1) if expert_offsets[i] <= row < expert_offsets[i + 1])
    m = row - expert_offsets[e]
    num_cols_sf_out = (k + 63) // 64 * 64 // 16 // 4
    base = blockscale_offsets[e] * num_cols_sf_out * 4  # uint32 words -> bytes
    num_k_tiles = (k + 63) // 64
    offset = ((m >> 7) * num_k_tiles + (k_block >> 2)) << 9 | ((m & 31) << 4) | (((m >> 5) & 3) << 2) | (k_block & 3)
    return base + offset


@pytest.mark.parametrize("counts,k", VLLM_CASES)
def test_vllm_expert_conventions(counts, k):
    expert_offsets, blockscale_offsets = vllm_offsets(counts)
    offsets = np.array(expert_offsets, np.int32)
    tokens = expert_offsets[-1]
    assert F.blockscale_offsets(offsets).tolist() == blockscale_offsets
    rng = np.random.default_rng(16)
    x = data((tokens, k), "bfloat16", rng, "heavy")
    gs = rng.uniform(1, 100, len(counts)).astype(np.float32)
    packed, scales, starts = F.scaled_fp4_experts_quant(x, gs, offsets)
    assert starts.tolist() == blockscale_offsets
    assert packed.shape == (tokens, k // 2)  # [D]
    assert scales.shape[1] == 4 * ((k // 16 + 3) // 4)  # [B], [D]: bytes per scale row
    assert scales.shape[0] >= blockscale_offsets[-1]
    flat = scales.reshape(-1)
    written = np.zeros(flat.size, bool)
    for e in range(len(counts)):
        lo, hi = expert_offsets[e], expert_offsets[e + 1]
        if hi == lo:
            continue
        _, linear = ref.scaled_fp4_quant(x[lo:hi], gs[e : e + 1], layout="linear")
        for row in range(lo, hi):
            for kb in range(k // 16):
                at = vllm_scale_byte(row, kb, expert_offsets, blockscale_offsets, k)
                assert flat[at] == linear[row - lo, kb], (e, row, kb)
                written[at] = True
    assert np.all(flat[~written] == 0)  # everything vLLM's kernel does not write is our layout padding, 0x00
    # The silu form takes [m, 2k] (gate || up) and writes the same shapes ([D]).
    xs = data((tokens, 2 * k), "bfloat16", rng)
    p2, s2, b2 = F.silu_and_mul_quant(xs, gs, expert_offsets=offsets)
    assert p2.shape == packed.shape and s2.shape == scales.shape and b2.tolist() == blockscale_offsets


def test_experts_scale_rows_is_the_tight_bound():
    for tokens, experts in itertools.product((0, 1, 5, 127, 128, 129, 300, 1000), (0, 1, 2, 7, 64)):
        for layout in LAYOUT_NAMES:
            rows = ref.LAYOUTS[layout].row_multiple
            bound = F.experts_scale_rows(tokens, experts, layout)
            if experts == 0:
                assert bound == 0
                continue
            # the worst split: min(m, E) experts of one token, the rest on expert 0
            ones = min(tokens, experts)
            counts = [1] * ones + [0] * (experts - ones)
            counts[0] += tokens - ones
            worst = sum(-(-c // rows) * rows for c in counts)
            assert bound == worst, (tokens, experts, layout)
            for _ in range(20):  # and no split needs more
                rng = np.random.default_rng(tokens * 100 + experts)
                split = rng.multinomial(tokens, np.ones(experts) / experts)
                assert sum(-(-int(c) // rows) * rows for c in split) <= bound


# ---------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------
def fake_by_composition(x, gs, **o):
    """dequantize(quantize(x)) with the unfused golden ops."""
    n = x.shape[-1]
    dtype = np.dtype(x.dtype).name
    if o.get("fmt") == "mxfp4":
        packed, scales = mx_rules.scaled_mxfp4_quant(x, o.get("mx_scale_rule", "floor"), layout="linear")
        return ref.dequantize(packed, scales, None, n, layout="linear", dtype=dtype, fmt="mxfp4").reshape(x.shape)
    if o.get("numerics") == "te":
        packed, scales = te.scaled_fp4_quant_te(x, gs, layout="linear", tile=o.get("tile", "1x16"),
                                                row_scaled=o.get("row_scaled", False))
        return ref.dequantize(packed, scales, gs, n, layout="linear", dtype=dtype).reshape(x.shape)
    if o.get("rounding") == "stochastic":
        packed, scales = stochastic.scaled_fp4_quant_sr(x, gs, layout="linear", seed=o["seed"], offset=o["offset"])
    else:
        packed, scales = ref.scaled_fp4_quant(x, gs, layout="linear")
    return ref.dequantize(packed, scales, gs, n, layout="linear", dtype=dtype).reshape(x.shape)


def assert_same_values(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert_bytes_equal(got.view(np.uint8), want.view(np.uint8), what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_equals_quantize_then_dequantize(dtype):
    rng = np.random.default_rng(17)
    for shape in ((6, 40), (2, 3, 48), (1, 7), (33, 64)):
        x = data(shape, dtype, rng, "heavy")
        x.reshape(-1)[::29] = DTYPES[dtype](0.0) * DTYPES[dtype](-1)  # some -0.0
        for name, gs in global_scale_forms(shape, rng):
            assert_same_values(F.fake_quantize(x, gs), fake_by_composition(x, gs), f"ieee {shape} {name}")
            got = F.fake_quantize(x, gs, rounding="stochastic", seed=7, offset=3)
            assert_same_values(got, fake_by_composition(x, gs, rounding="stochastic", seed=7, offset=3),
                               f"sr {shape} {name}")
        gs = ref.compute_global_scale(x)
        assert_same_values(F.fake_quantize(x), fake_by_composition(x, gs), "default global scale")
        for rule in mx_rules.MX_SCALE_RULES:
            assert_same_values(F.fake_quantize(x, fmt="mxfp4", mx_scale_rule=rule),
                               fake_by_composition(x, None, fmt="mxfp4", mx_scale_rule=rule), f"mx {rule}")
        m = math.prod(shape[:-1])
        for tile, row_scaled in (("1x16", False), ("16x16", False), ("1x16", True)):
            gs = te.compute_global_scale_te(x, per_row=row_scaled)
            got = F.fake_quantize(x, gs, numerics="te", tile=tile, row_scaled=row_scaled)
            want = fake_by_composition(x, gs, numerics="te", tile=tile, row_scaled=row_scaled)
            assert_same_values(got, want, f"te {tile} {row_scaled} {shape}")
            assert_same_values(F.fake_quantize(x, None, numerics="te", tile=tile, row_scaled=row_scaled), want,
                               "te default scale")
        assert m >= 1


def test_fake_quantize_four_over_six_and_rht():
    rng = np.random.default_rng(18)
    for dtype in DTYPES:
        x = data((5, 64), dtype, rng, "heavy")
        for e4m3_max, err_mode in ((448, "MAE"), (256, "MSE")):
            packed, scales, amax = te_4over6.scaled_fp4_quant_4over6(x, layout="linear", e4m3_max=e4m3_max,
                                                                     err_mode=err_mode)
            s_enc = te.encode_scale_from_amax_te(amax, e4m3_max=e4m3_max)
            want = ref.dequantize(packed, scales, s_enc, 64, layout="linear", dtype=dtype)
            got = F.fake_quantize(x, numerics="te", four_over_six=True, e4m3_max=e4m3_max, err_mode=err_mode)
            assert_same_values(got, want, f"4/6 {dtype} {e4m3_max} {err_mode}")
        packed, scales, amax = te_rht.scaled_fp4_quant_rht(x, layout="linear")
        transformed = ref.dequantize(packed, scales, te.encode_scale_from_amax_te(amax), 64, layout="linear")
        back = F._inverse_rht_rows(transformed)
        want = back.astype(DTYPES[dtype])
        assert_same_values(F.fake_quantize(x, numerics="te", rht=True), want, f"rht {dtype}")


def test_inverse_rht():
    rng = np.random.default_rng(19)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    forward = te_rht.rht(x, transform_dtype="float32")
    back = F._inverse_rht_rows(forward)
    assert np.max(np.abs(back - x)) < 1e-5  # M^T M = I up to float32 rounding
    # the butterfly of section 6.2, one chunk by the matrix: exact for integers
    y = rng.integers(-50, 50, (3, 16)).astype(np.float32)
    exact = (y.astype(np.float64) @ te_rht.hadamard_matrix().astype(np.float64).T)
    assert np.array_equal(F._inverse_rht_rows(y).astype(np.float64), exact)


def test_saturation_mask_and_straight_through_gradient():
    # block 0: s = 3000 / 6 = 500 saturates the scale at 448: largest value RN(2688 / gs) = 2688
    x = np.zeros((1, 48), np.float32)
    x[0, :5] = [3000, 2688, 2700, -np.inf, -2688.5]
    x[0, 16] = 6.3  # block 1: sf 1.0 (rounded down), 6.3 becomes 6: rounding, not saturation
    x[0, 32:36] = [np.nan, 1e6, 2, 3]  # block 2: NaN-scaled
    mask = F.saturation_mask(x, 1.0)
    assert np.flatnonzero(mask[0]).tolist() == [0, 2, 3, 4]
    assert np.array_equal(F.saturation_mask(x, 1.0, numerics="te"), mask)
    grad = np.arange(1, 49, dtype=np.float32).reshape(1, 48) * -1
    assert np.array_equal(F.fake_quantize_backward(grad, x, 1.0).view(np.uint32), grad.view(np.uint32))
    masked = F.fake_quantize_backward(grad, x, 1.0, zero_saturated=True)
    assert np.all(masked.view(np.uint32)[mask] == 0)  # +0.0, not -0.0
    assert np.array_equal(masked[~mask], grad[~mask])
    # MXFP4: only +-inf lies beyond the format's range
    mx = F.saturation_mask(x, fmt="mxfp4")
    assert np.flatnonzero(mx[0]).tolist() == [3]
    # a per-row scale: the bound is per row
    y = np.full((2, 16), 100.0, np.float32)
    assert F.saturation_mask(y, np.array([1.0, 100.0], np.float32)).sum(axis=1).tolist() == [0, 16]
    g16 = np.ones((2, 16), ml_dtypes.bfloat16)
    assert F.fake_quantize_backward(g16, y, np.array([1.0, 100.0], np.float32), zero_saturated=True).dtype == \
        ml_dtypes.bfloat16


def test_fake_quantize_special_values():
    x = np.array([[np.nan] + [1.0] * 15 + [np.inf] + [2.0] * 15], np.float16)
    out = F.fake_quantize(x, 1.0)
    assert np.all(out.view(np.uint16)[0, :16] == 0x7E00)  # a NaN block decodes to NaN, canonical
    assert out[0, 16] == np.float16(2688.0)  # inf saturates: 6 * 448 / gs
    out = F.fake_quantize(x, np.array([np.nan], np.float32))  # invalid device scale: all NaN
    assert np.all(out.view(np.uint16) == 0x7E00)


# ---------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------
def test_empty_inputs():
    for dtype in DTYPES:
        t = DTYPES[dtype]
        x = np.zeros((0, 40), t)
        assert F.rms_norm(x, np.ones(40, t), 1e-6).shape == (0, 40)
        packed, scales, z = F.rms_norm_quant(x, None, 1e-6, 1.0, residual=np.zeros((0, 40), t))
        assert packed.shape == (0, 24) and scales.shape == (0, 4) and z.shape == (0, 40)
        assert F.silu_and_mul(np.zeros((0, 2, 8), t)).shape == (0, 2, 4)
        packed, scales = F.silu_and_mul_quant(np.zeros((0, 8), t), 1.0, layout="8x4")
        assert packed.shape == (0, 8) and scales.shape == (0, 4)
        assert F.fake_quantize(np.zeros((3, 0, 7), t), 1.0).shape == (3, 0, 7)
        assert F.fake_quantize(x, fmt="mxfp4").shape == (0, 40)
        packed, scales, starts = F.scaled_fp4_experts_quant(x, np.ones(3, np.float32), np.zeros(4, np.int32))
        assert packed.shape == (0, 24) and scales.shape == (0, 4) and starts.tolist() == [0, 0, 0, 0]
        packed, scales = F.scaled_fp4_masked_quant(np.zeros((0, 5, 32), t), 1.0, np.zeros(0, np.int32))
        assert packed.shape == (0, 5, 16) and scales.shape == (0, 128, 4)
        packed, scales = F.scaled_fp4_masked_quant(np.zeros((2, 0, 32), t), 1.0, np.zeros(2, np.int32))
        assert packed.shape == (2, 0, 16) and scales.shape == (2, 0, 4)


# ---------------------------------------------------------------------------
# Refusals (docs/fused_ops.md, section 7)
# ---------------------------------------------------------------------------
X16 = np.ones((4, 32), np.float16)
W16 = np.ones(32, np.float16)
OFF = np.array([0, 2, 4], np.int32)
GS2 = np.ones(2, np.float32)

BAD = [
    ("x dtype", lambda: F.rms_norm(X16.astype(np.int32), None, 1e-6), TypeError, "x must be float16"),
    ("x 0-d", lambda: F.rms_norm(np.float16(1), None, 1e-6), ValueError, "at least one dimension"),
    ("x n=0", lambda: F.rms_norm(np.ones((2, 0), np.float16), None, 1e-6), ValueError, "must be positive"),
    ("weight length", lambda: F.rms_norm(X16, W16[:31], 1e-6), ValueError, r"weight must have shape \(32,\)"),
    ("weight dtype", lambda: F.rms_norm(X16, W16.astype(np.float32), 1e-6), TypeError,
     "weight must have x's dtype float16"),
    ("weight type", lambda: F.rms_norm(X16, [1.0] * 32, 1e-6), TypeError, "weight must be an array"),
    ("eps negative", lambda: F.rms_norm(X16, W16, -1e-6), ValueError, "eps must be finite and >= 0"),
    ("eps NaN", lambda: F.rms_norm(X16, W16, float("nan")), ValueError, "eps must be finite and >= 0"),
    ("eps inf", lambda: F.rms_norm(X16, W16, float("inf")), ValueError, "eps must be finite and >= 0"),
    ("eps huge", lambda: F.rms_norm(X16, W16, 1e39), ValueError, "inf in float32"),
    ("eps type", lambda: F.rms_norm(X16, W16, "1e-6"), TypeError, "eps must be a float"),
    ("eps bool", lambda: F.rms_norm(X16, W16, True), TypeError, "eps must be a float"),
    ("residual shape", lambda: F.rms_norm(X16, W16, 1e-6, residual=X16[:3]), ValueError,
     r"residual must have shape \(4, 32\)"),
    ("residual dtype", lambda: F.rms_norm(X16, W16, 1e-6, residual=X16.astype(np.float32)), TypeError,
     "residual must have x's dtype"),
    ("norm quant gs", lambda: F.rms_norm_quant(X16, W16, 1e-6, 0.0), ValueError, "global_scale must be finite"),
    ("norm quant mx gs", lambda: F.rms_norm_quant(X16, W16, 1e-6, 1.0, fmt="mxfp4"), ValueError,
     "global_scale must be None"),
    ("norm quant padded_n", lambda: F.rms_norm_quant(X16, W16, 1e-6, 1.0, padded_n=40), ValueError,
     "padded_n must be a multiple of 16"),
    ("norm quant layout", lambda: F.rms_norm_quant(X16, W16, 1e-6, 1.0, layout="4x4"), ValueError,
     "layout must be one of"),
    ("silu odd", lambda: F.silu_and_mul(np.ones((2, 31), np.float16)), ValueError, "must be even"),
    ("silu quant odd", lambda: F.silu_and_mul_quant(np.ones((2, 31), np.float16), 1.0), ValueError, "must be even"),
    ("silu both forms", lambda: F.silu_and_mul_quant(X16, GS2, expert_offsets=OFF, expert_counts=OFF[:2]),
     ValueError, "not both"),
    ("offsets dtype", lambda: F.scaled_fp4_experts_quant(X16, GS2, OFF.astype(np.int64)), TypeError,
     "expert_offsets must be int32"),
    ("offsets list", lambda: F.scaled_fp4_experts_quant(X16, GS2, [0, 2, 4]), TypeError,
     "expert_offsets must be an int32 array"),
    ("offsets 2-D", lambda: F.scaled_fp4_experts_quant(X16, GS2, OFF[None]), ValueError,
     "expert_offsets must be 1-D"),
    ("offsets empty", lambda: F.scaled_fp4_experts_quant(X16, GS2, OFF[:0]), ValueError, "E \\+ 1 >= 1"),
    ("offsets start", lambda: F.scaled_fp4_experts_quant(X16, GS2, np.array([1, 2, 4], np.int32)), ValueError,
     r"expert_offsets\[0\] must be 0"),
    ("offsets not monotone", lambda: F.scaled_fp4_experts_quant(X16, GS2, np.array([0, 3, 2], np.int32)),
     ValueError, r"non-decreasing, got expert_offsets\[1\]=3 > expert_offsets\[2\]=2"),
    ("offsets out of range", lambda: F.scaled_fp4_experts_quant(X16, GS2, np.array([0, 2, 5], np.int32)),
     ValueError, r"expert_offsets\[E\]=5 is out of range: x has 4 rows"),
    ("offsets x 3-D", lambda: F.scaled_fp4_experts_quant(X16[None], GS2, OFF), ValueError, r"x must be \[m, n\]"),
    ("experts gs shape", lambda: F.scaled_fp4_experts_quant(X16, np.ones(3, np.float32), OFF), ValueError,
     r"one per expert \(\[E\] = \[2\]\)"),
    ("experts gs dtype", lambda: F.scaled_fp4_experts_quant(X16, GS2.astype(np.float64), OFF), TypeError,
     "global_scale as an array must be float32"),
    ("experts host gs", lambda: F.scaled_fp4_experts_quant(X16, -1.0, OFF), ValueError,
     "global_scale must be finite"),
    ("experts validate", lambda: F.scaled_fp4_experts_quant(X16, GS2, OFF, validate=1), TypeError,
     "validate must be a bool"),
    ("counts above max_m", lambda: F.scaled_fp4_masked_quant(X16.reshape(2, 2, 32), GS2,
                                                              np.array([1, 3], np.int32)), ValueError,
     r"expert_counts\[1\]=3 is out of range: each count must be in \[0, max_m=2\]"),
    ("counts negative", lambda: F.scaled_fp4_masked_quant(X16.reshape(2, 2, 32), GS2,
                                                           np.array([-1, 0], np.int32)), ValueError,
     "out of range"),
    ("counts length", lambda: F.scaled_fp4_masked_quant(X16.reshape(2, 2, 32), GS2, np.zeros(3, np.int32)),
     ValueError, r"expert_counts must have shape \(2,\)"),
    ("counts dtype", lambda: F.scaled_fp4_masked_quant(X16.reshape(2, 2, 32), GS2, np.zeros(2, np.uint32)),
     TypeError, "expert_counts must be int32"),
    ("masked x 2-D", lambda: F.scaled_fp4_masked_quant(X16, GS2, np.zeros(2, np.int32)), ValueError,
     r"x must be \[E, max_m, n\]"),
    ("scale rows args", lambda: F.experts_scale_rows(-1, 2), ValueError, ">= 0"),
    ("fake mx gs", lambda: F.fake_quantize(X16, 1.0, fmt="mxfp4"), ValueError, "global_scale must be None"),
    ("fake rounding", lambda: F.fake_quantize(X16, 1.0, rounding="up"), ValueError, "rounding must be one of"),
    ("fake sr seed", lambda: F.fake_quantize(X16, 1.0, rounding="stochastic"), ValueError, "needs a seed"),
    ("fake sr te", lambda: F.fake_quantize(X16, 1.0, numerics="te", rounding="stochastic", seed=1), ValueError,
     "rounding='stochastic' is defined for"),
    ("fake seed unused", lambda: F.fake_quantize(X16, 1.0, seed=1), ValueError, "apply to rounding='stochastic'"),
    ("fake 4over6 ieee", lambda: F.fake_quantize(X16, four_over_six=True), ValueError, "needs numerics='te'"),
    ("fake 4over6 gs", lambda: F.fake_quantize(X16, 1.0, numerics="te", four_over_six=True), ValueError,
     "pass global_amax"),
    ("fake amax unused", lambda: F.fake_quantize(X16, global_amax=1.0), ValueError, "global_amax applies to"),
    ("fake rht k", lambda: F.fake_quantize(np.ones((2, 40), np.float16), numerics="te", rht=True), ValueError,
     "multiple of 16"),
    ("fake rht 16x16", lambda: F.fake_quantize(X16, numerics="te", rht=True, tile="16x16"), ValueError,
     "1x16 blocks"),
    ("fake tile ieee", lambda: F.fake_quantize(X16, 1.0, tile="16x16"), ValueError, "needs numerics='te'"),
    ("fake mx rule nvfp4", lambda: F.fake_quantize(X16, 1.0, mx_scale_rule="rceil"), ValueError, "fmt='mxfp4'"),
    ("fake te mx", lambda: F.fake_quantize(X16, fmt="mxfp4", numerics="te"), ValueError, "NVFP4 only"),
    ("mask rht", lambda: F.saturation_mask(X16, numerics="te", rht=True), ValueError, "not defined with rht"),
    ("mask option", lambda: F.saturation_mask(X16, 1.0, zero=True), TypeError, "unexpected keyword"),
    ("grad shape", lambda: F.fake_quantize_backward(X16[:2], X16, 1.0), ValueError, "grad must have x's shape"),
    ("grad dtype", lambda: F.fake_quantize_backward(X16.astype(np.int8), X16, 1.0), TypeError, "grad must be"),
    ("grad flag", lambda: F.fake_quantize_backward(X16, X16, 1.0, zero_saturated=1), TypeError,
     "zero_saturated must be a bool"),
    ("grad checks options", lambda: F.fake_quantize_backward(X16, X16, 1.0, fmt="mxfp4"), ValueError,
     "global_scale must be None"),
]


@pytest.mark.parametrize("what,call,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused(what, call, error, message):
    with pytest.raises(error, match=message):
        call()
