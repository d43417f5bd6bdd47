"""The golden model against hand-computed bytes, every rounding tie, every
E2M1 and E4M3 code, and the special values of docs/format.md. CPU only."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from bytes_check import assert_bytes_equal
from nvfp4_cupy import reference as ref

# docs/format.md's E2M1 table, as data: magnitudes of codes 0..7, and for each
# boundary between codes i and i+1 whether the tie goes up.
E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_TIE_GOES_UP = [False, True, False, True, False, True, False]


def e4m3_positive_values() -> list[Fraction]:
    """Every finite E4M3 value >= 0 by its definition (bias 7, 3 mantissa
    bits, no infinity, S.1111.111 is NaN), index = code."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(Fraction(mantissa, 8) * Fraction(1, 2**6))
        else:
            values.append((1 + Fraction(mantissa, 8)) * Fraction(2) ** (exponent - 7))
    return values


def one_block(values, gs=1.0, dtype=np.float32):
    """Quantize a single 16-value row: (codes[16], scale byte)."""
    x = np.asarray(values, dtype=dtype).reshape(1, 16)
    packed, scales = ref.scaled_fp4_quant(x, gs, layout="linear")
    return ref.unpack_codes(packed)[0], int(scales[0, 0])


def test_hand_computed_block():
    # amax 6 and gs 1: s = 1.0 -> E4M3 0x38, r = 1, codes are the values' own.
    values = [6, -6, 0.5, -0.5, 1, 1.5, 2, 3, 4, -4, 0, -0.0, 0.3, -0.2, 5.5, 2.6]
    codes, scale = one_block(values)
    assert scale == 0x38
    expected = [7, 15, 1, 9, 2, 3, 4, 5, 6, 14, 0, 8, 1, 8, 7, 5]
    assert codes.tolist() == expected


def test_hand_computed_scale_and_reciprocal():
    # amax 3, gs 448 * 6 / 3 = 896: s = 896 * 0.5 = 448 -> 0x7E; r = 1 / (448 / 896) = 2.
    values = [3, 1.5, -0.75, 0.2] + [0] * 12
    codes, scale = one_block(values, gs=896.0)
    assert scale == 0x7E
    assert codes[:4].tolist() == [7, 5, 11, 1]  # y = 6, 3, -1.5, 0.4 (0.4 rounds to 0.5)


def test_packing_puts_even_elements_in_low_nibble():
    values = [6, 0.5] + [0] * 14
    packed, _ = ref.scaled_fp4_quant(np.asarray(values, np.float32).reshape(1, 16), 1.0)
    assert packed[0, 0] == 0x17  # low nibble 7 (6.0), high nibble 1 (0.5)


@pytest.mark.parametrize("boundary", range(7))
def test_every_e2m1_tie_and_its_neighbours(boundary):
    lower, upper = E2M1_MAGNITUDES[boundary], E2M1_MAGNITUDES[boundary + 1]
    tie = np.float32((lower + upper) / 2)
    below = np.nextafter(tie, np.float32(0))
    above = np.nextafter(tie, np.float32(10))
    tie_code = boundary + 1 if E2M1_TIE_GOES_UP[boundary] else boundary
    # A 6 in the block pins s = 1 (gs = 1), so r = 1 and y = v.
    for sign, sign_bit in ((1, 0), (-1, 8)):
        values = [6, sign * below, sign * tie, sign * above] + [0] * 12
        codes, scale = one_block(values)
        assert scale == 0x38
        got = codes[1:4].tolist()
        # (a negative value rounding to zero keeps its sign: code 8)
        want = [boundary | sign_bit, tie_code | sign_bit, (boundary + 1) | sign_bit]
        assert got == want, f"boundary {lower}..{upper}: got {got}, want {want}"


def test_all_16_e2m1_codes_round_trip():
    magnitudes = np.array(E2M1_MAGNITUDES, np.float32)
    values = np.concatenate([magnitudes, -magnitudes])  # 16 values, amax 6
    codes, scale = one_block(values)
    assert scale == 0x38
    assert codes.tolist() == list(range(16))
    assert np.array_equal(ref.e2m1_values(codes), values)


def test_e2m1_saturates_and_keeps_sign_of_infinity():
    # The 448 cap leaves r > 1 / amax: y exceeds 6 and must saturate to +-6.
    gs = np.float32(1e6)
    codes, scale = one_block([1.0, -1.0, 0.5] + [0] * 13, gs=gs)
    assert scale == 0x7E
    assert codes[:3].tolist() == [7, 15, 7]


def test_all_256_e4m3_codes():
    values = e4m3_positive_values()
    as_ml = np.array([float(v) for v in values], np.float32).astype(ml_dtypes.float8_e4m3fn)
    assert as_ml.view(np.uint8).tolist() == list(range(0x7F))
    assert np.isnan(ref.e4m3_values(np.array([0x7F, 0xFF], np.uint8))).all()
    negative = ref.e4m3_values(np.arange(0x80, 0xFF, dtype=np.uint8))
    assert np.array_equal(negative, -np.array([float(v) for v in values], np.float32))
    # Each finite code as the exact s of a block: amax = 6 makes s = gs.
    for code in range(1, 0x7F):
        _, scale = one_block([6.0] + [0] * 15, gs=float(values[code]))
        assert scale == code, f"E4M3 code 0x{code:02x}"


def test_e4m3_ties_round_to_even_and_saturate():
    values = e4m3_positive_values()
    for code in range(0x7E):
        tie = (values[code] + values[code + 1]) / 2
        s = np.float32(float(tie))
        assert Fraction(float(s)) == tie
        even = code if code % 2 == 0 else code + 1
        for probe, want in (
            (np.nextafter(s, np.float32(0)), code),
            (s, even),
            (np.nextafter(s, np.float32(1e9)), code + 1),
        ):
            _, scale = one_block([6.0] + [0] * 15, gs=probe)  # s = gs * (6 / 6) = probe
            assert scale == want, f"s={probe!r}: got 0x{scale:02x}, want 0x{want:02x}"
    for s in (448.0, 460.0, 464.0, 1e30):
        _, scale = one_block([6.0] + [0] * 15, gs=s)
        assert scale == 0x7E, f"s={s} must saturate to 448"
    # Below half the smallest subnormal (2^-10) rounds to 0: scale 0, r = 0.
    codes, scale = one_block([6 * 2.0**-10, -1e-4] + [0] * 14)
    assert scale == 0 and codes[:2].tolist() == [0, 8]


def test_nan_block_zeroes_only_itself():
    x = np.ones((2, 32), np.float32)
    x[0, 20] = np.nan
    packed, scales = ref.scaled_fp4_quant(x, 1.0, layout="linear")
    # s = 1 / 6 -> 1.375 * 2^-3 (0x23); r = 1 / 0.171875 puts 1.0 at 5.8 -> code 7.
    assert scales[0].tolist() == [0x23, 0x7F] and scales[1].tolist() == [0x23, 0x23]
    assert packed[0, 8:].tolist() == [0] * 8 and packed[0, :8].tolist() == [0x77] * 8


def test_infinity_saturates_scale_and_codes():
    codes, scale = one_block([np.inf, -np.inf, 1.0] + [0] * 13, gs=1.0)
    assert scale == 0x7E
    assert codes[:3].tolist() == [7, 15, 0]  # 1 * (1 / 448) rounds to 0


def test_zero_blocks_keep_negative_zero_codes():
    codes, scale = one_block([0.0, -0.0] * 8)
    assert scale == 0 and codes.tolist() == [0, 8] * 8


def test_invalid_device_global_scale_nans_every_block_but_not_layout_padding():
    x = np.ones((3, 48), np.float16)
    for bad in (np.inf, -1.0, 0.0, np.nan):
        packed, scales = ref.scaled_fp4_quant(x, np.array([bad], np.float32), padded_n=80)
        assert not packed.any()
        blocks = ref.unswizzle_scales(scales, 3, 80)
        assert (blocks == 0x7F).all(), f"gs={bad}"
        assert int(np.count_nonzero(scales)) == 3 * 5  # layout padding stays 0x00


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan"), 1e39, 1e-50])
def test_invalid_host_global_scale_is_a_value_error(bad):
    with pytest.raises(ValueError, match="global_scale"):
        ref.scaled_fp4_quant(np.ones((1, 16), np.float32), bad)


def test_subnormal_inputs_are_not_flushed():
    # amax = 1e-39 is a float32 subnormal; flushing it would give scale 0.
    # s = 1e38 * amax / 6 = 0.01667 -> 1.125 * 2^-6 (0x09); r = 1 / (sf / gs)
    # overflows and clamps to FLT_MAX, so y = 0.34 (code 1) and -0.17 (code 8).
    tiny = np.float32(1e-39)
    codes, scale = one_block([tiny, -tiny / 2] + [0] * 14, gs=1e38)
    assert scale == 0x09 and codes[:2].tolist() == [1, 8]


def test_padding_columns_are_zero_and_blocks_are_empty():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    packed, scales = ref.scaled_fp4_quant(x, 100.0, padded_n=128, layout="linear")
    assert packed.shape == (5, 64) and scales.shape == (5, 8)
    assert not packed[:, 24:].any() and not scales[:, 3:].any()
    same, same_scales = ref.scaled_fp4_quant(x, 100.0, layout="linear")
    assert_bytes_equal(packed[:, :24], same, "packed data columns")
    assert_bytes_equal(scales[:, :3], same_scales, "scales of data blocks")


def test_bfloat16_and_float16_widen_exactly():
    rng = np.random.default_rng(2)
    x16 = rng.standard_normal((7, 64)).astype(ml_dtypes.bfloat16)
    for x in (x16, x16.astype(np.float16)):
        got = ref.scaled_fp4_quant(x, 37.5)
        want = ref.scaled_fp4_quant(x.astype(np.float32), 37.5)
        assert_bytes_equal(got[0], want[0], f"{x.dtype} packed")
        assert_bytes_equal(got[1], want[1], f"{x.dtype} scales")


def test_leading_dimensions_flatten_into_rows():
    x = np.random.default_rng(3).standard_normal((2, 3, 32)).astype(np.float16)
    got = ref.scaled_fp4_quant(x, 10.0, layout="8x4")
    want = ref.scaled_fp4_quant(x.reshape(6, 32), 10.0, layout="8x4")
    assert_bytes_equal(got[0], want[0], "packed")
    assert_bytes_equal(got[1], want[1], "scales")


def test_dequantize_inverts_within_the_format():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    gs = np.float32(448 * 6 / np.abs(x).max())
    packed, scales = ref.scaled_fp4_quant(x, gs)
    y = ref.dequantize(packed, scales, gs)
    sqnr = 10 * np.log10((x**2).sum() / ((x - y) ** 2).sum())
    assert 18 < sqnr < 23, sqnr  # NVFP4 on Gaussian data: about 20 dB
    # Each dequantized value is exactly code * scale / gs.
    codes = ref.unpack_codes(packed)
    row_scales = np.repeat(ref.e4m3_values(ref.unswizzle_scales(scales, 64, 256)), 16, axis=1)
    assert np.array_equal(y, ref.e2m1_values(codes) * row_scales / gs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"padded_n": 40}, ValueError, "multiple of 16"),
        ({"padded_n": 16}, ValueError, "padded_n must be >= n"),
        ({"padded_n": 64.0}, TypeError, "padded_n must be an int"),
        ({"layout": "4x8"}, ValueError, "layout must be one of"),
        ({"is_sf_swizzled_layout": "yes"}, TypeError, "is_sf_swizzled_layout"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        ref.scaled_fp4_quant(np.ones((2, 32), np.float16), 1.0, **kwargs)


def test_input_errors():
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got dtype int32"):
        ref.scaled_fp4_quant(np.ones((2, 32), np.int32), 1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        ref.scaled_fp4_quant(np.float32(1.0), 1.0)
    with pytest.raises(ValueError, match="n must be positive"):
        ref.scaled_fp4_quant(np.ones((2, 0), np.float32), 1.0)
    with pytest.raises(TypeError, match="global_scale"):
        ref.scaled_fp4_quant(np.ones((2, 32), np.float32), "1.0")


def test_empty_input_gives_empty_outputs():
    packed, scales = ref.scaled_fp4_quant(np.ones((0, 64), np.float16), 1.0)
    assert packed.shape == (0, 32) and scales.shape == (0, 4)


def test_reference_runs_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
        "import numpy as np, nvfp4_cupy\n"
        "from nvfp4_cupy import reference\n"
        "p, s = reference.scaled_fp4_quant(np.ones((3, 32), np.float32), 2.0)\n"
        "assert p.shape == (3, 16) and s.shape == (128, 4)\n"
        "try:\n    nvfp4_cupy.scaled_fp4_quant\nexcept ImportError:\n    print('gpu import refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gpu import refused" in done.stdout


def test_partial_last_block_reads_as_zeros():
    x = np.random.default_rng(5).standard_normal((3, 21)).astype(np.float32)
    padded = np.zeros((3, 32), np.float32)
    padded[:, :21] = x
    got = ref.scaled_fp4_quant(x, 7.0)  # default padded_n: 21 rounded up to 32
    want = ref.scaled_fp4_quant(padded, 7.0)
    assert got[0].shape == (3, 16)
    assert_bytes_equal(got[0], want[0], "packed")
    assert_bytes_equal(got[1], want[1], "scales")


def test_per_expert_global_scales_quantize_each_expert_alone():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 40, 48)).astype(np.float16)
    scales = np.array([10.0, 200.0, np.inf], np.float32)  # the last expert's scale is invalid
    packed, sf = ref.scaled_fp4_quant(x, scales, padded_n=64)
    assert packed.shape == (3, 40, 32) and sf.shape == (3, 128, 4)
    for e in range(2):
        want = ref.scaled_fp4_quant(x[e], float(scales[e]), padded_n=64)
        assert_bytes_equal(packed[e], want[0], f"expert {e} packed")
        assert_bytes_equal(sf[e], want[1], f"expert {e} scales")
    assert not packed[2].any() and int(np.count_nonzero(sf[2] == 0x7F)) == 40 * 4
    # One scale for all experts flattens like vLLM instead.
    flat_packed, flat_sf = ref.scaled_fp4_quant(x, 10.0, padded_n=64)
    assert flat_packed.shape == (120, 32) and flat_sf.shape == (128, 4)
    empty = ref.scaled_fp4_quant(np.zeros((0, 5, 32), np.float32), np.zeros(0, np.float32), layout="8x4")
    assert empty[0].shape == (0, 5, 16) and empty[1].shape == (0, 8, 4)


@pytest.mark.parametrize("gs", [1.0, 3.0, 1e-3, 448 * 6 / 7.5])
def test_dequantize_every_code_with_every_scale(gs):
    """All 16 E2M1 codes x all 256 E4M3 scale bytes, against float64
    arithmetic rounded once to float32 (exact: a*b fits, and one division in
    float64 rounds correctly to float32)."""
    codes = np.tile(np.arange(16, dtype=np.uint8), 16)  # 16 blocks x 16 codes
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 128)
    packed = np.repeat(packed, 16, axis=0)  # 16 rows x 16 blocks = 256 scales
    scale_bytes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = ref.dequantize(packed, scale_bytes, gs, layout="linear")
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    sf = scale_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    want = (np.tile(e2m1, 16)[None, :] * np.repeat(sf, 16, axis=1) / np.float64(np.float32(gs))).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert (got[nan].view(np.uint32) == 0x7FC00000).all()  # canonical NaN


def test_dequantize_rounds_once_to_the_output_dtype():
    packed, scales = ref.scaled_fp4_quant(np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32), 0.37)
    wide = ref.dequantize(packed, scales, 0.37)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        narrow = ref.dequantize(packed, scales, 0.37, dtype=dtype)
        assert narrow.dtype == dtype and np.array_equal(narrow, wide.astype(dtype))
    nan_packed, nan_scales = ref.scaled_fp4_quant(np.full((1, 16), np.nan, np.float32), 1.0, layout="linear")
    out = ref.dequantize(nan_packed, nan_scales, 1.0, layout="linear", dtype=np.float16)
    assert (out.view(np.uint16) == 0x7E00).all()


def test_compute_global_scale_policy():
    x = np.array([[1.0, -3.0], [0.5, 0.25]], np.float32)
    assert ref.compute_global_scale(x).tolist() == [np.float32(2688 / 3)]
    assert ref.compute_global_scale(x, per_row=True).tolist() == [np.float32(2688 / 3), np.float32(2688 / 0.5)]
    assert ref.compute_global_scale(np.zeros((3, 16), np.float16)).tolist() == [1.0]
    assert ref.compute_global_scale(np.zeros((0, 16), np.float16)).tolist() == [1.0]
    assert np.isnan(ref.compute_global_scale(np.array([[1.0, np.nan]], np.float32)))[0]
    assert ref.compute_global_scale(np.array([[1.0, -np.inf]], np.float32)).tolist() == [0.0]
    assert ref.compute_global_scale(np.full((1, 16), 1e-40, np.float32)).tolist() == [np.finfo(np.float32).max]


def test_per_row_global_scales():
    x = np.random.default_rng(9).standard_normal((5, 32)).astype(np.float16)
    scales = ref.compute_global_scale(x, per_row=True)
    packed, sf = ref.scaled_fp4_quant(x, scales, layout="linear")
    for row in range(5):
        want = ref.scaled_fp4_quant(x[row : row + 1], float(scales[row]), layout="linear")
        assert_bytes_equal(packed[row : row + 1], want[0], f"row {row} packed")
        assert_bytes_equal(sf[row : row + 1], want[1], f"row {row} scales")
    back = ref.dequantize(packed, sf, scales, layout="linear")
    # Independently: each code's E2M1 value times its block's E4M3 scale over
    # its own row's global scale; in float64 the product is exact and the
    # quotient rounds correctly to float32.
    e2m1 = np.array(E2M1_MAGNITUDES + [-v for v in E2M1_MAGNITUDES])  # code 8 is -0
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(5, 32)  # low nibble first
    block_scales = np.repeat(sf.view(ml_dtypes.float8_e4m3fn).astype(np.float64), 16, axis=1)
    want = (e2m1[codes] * block_scales / scales.astype(np.float64)[:, None]).astype(np.float32)
    assert back.dtype == np.float32
    assert_bytes_equal(back.view(np.uint32), want.view(np.uint32), "per-row dequantize (float32 bits)")


def mx_block(values, layout="linear"):
    x = np.zeros((1, 32), np.float32)
    x[0, : len(values)] = values
    packed, scales = ref.scaled_fp4_quant(x, None, layout=layout, fmt="mxfp4")
    return ref.unpack_codes(packed)[0], int(scales.reshape(-1)[0])


def test_mxfp4_scale_is_floor_log2_amax_minus_2_at_every_exponent_boundary():
    """OCP MX v1.0: X = 2^(floor(log2(amax)) - 2). At each power of two p,
    amax = p gives exponent log2(p) - 2, one ulp below gives one less."""
    for e in range(-125, 128):
        p = np.float32(2.0) ** e
        _, at = mx_block([p])
        assert at == min(max(e - 2 + 127, 0), 254), f"amax=2^{e}: byte {at}"
        below = np.nextafter(p, np.float32(0))
        _, under = mx_block([below])
        assert under == min(max(e - 3 + 127, 0), 254), f"amax just below 2^{e}: byte {under}"


def test_mxfp4_codes_saturate_above_six_times_the_scale():
    # amax 7.5: X = 2^(2 - 2) = 1, so 7.5 saturates to 6 and 5 is a tie -> 4.
    codes, scale = mx_block([7.5, -5.0, 0.25, 0.3, 1e-9])
    assert scale == 127
    assert codes[:5].tolist() == [7, 14, 0, 1, 0]


def test_mxfp4_special_blocks():
    codes, scale = mx_block([])
    assert scale == 0 and not codes.any()  # zeros: X = 2^-127
    for bad in (np.nan, np.inf, -np.inf):
        codes, scale = mx_block([1.0, bad])
        assert scale == 0xFF and not codes.any()
    _, scale = mx_block([np.float32(1e-45)])  # subnormal amax clamps to 2^-127
    assert scale == 0


def test_mxfp4_layouts_count_32_value_blocks_and_round_trip():
    x = np.random.default_rng(10).standard_normal((130, 200)).astype(np.float32)
    packed, scales = ref.scaled_fp4_quant(x, None, padded_n=256, fmt="mxfp4")
    assert packed.shape == (130, 128) and scales.shape == (256, 8)
    y = ref.dequantize(packed, scales, None, n=200, fmt="mxfp4")
    sqnr = 10 * np.log10((x**2).sum() / ((x - y) ** 2).sum())
    assert 14 < sqnr < 20, sqnr  # coarser than NVFP4: power-of-two scales, 32-value blocks
    with pytest.raises(ValueError, match="multiple of 32"):
        ref.scaled_fp4_quant(x, None, padded_n=208, fmt="mxfp4")
    with pytest.raises(ValueError, match="global_scale must be None"):
        ref.scaled_fp4_quant(x, 1.0, fmt="mxfp4")
    with pytest.raises(ValueError, match="fmt must be one of"):
        ref.scaled_fp4_quant(x, 1.0, fmt="nvfp8")


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones((2, 16), np.int8), {}, TypeError, "x must be float16, bfloat16 or float32, got dtype int8"),
        ("abc", {}, TypeError, "got dtype str"),
        (np.float32(3), {}, ValueError, "at least one dimension"),
    ],
)
def test_compute_global_scale_and_quantize_argument_errors(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        ref.compute_global_scale(x, **kwargs)
    with pytest.raises(error, match=match):
        ref.scaled_fp4_quant(x, 1.0, **kwargs)


def test_rows_of_no_values_are_empty_not_an_error_for_the_global_scale():
    assert ref.compute_global_scale(np.ones((2, 0), np.float32)).tolist() == [1.0]
    with pytest.raises(ValueError, match="n must be positive"):
        ref.scaled_fp4_quant(np.ones((2, 0), np.float32), 1.0)


def test_mxfp4_expert_batch_dequantizes_each_expert_alone():
    x = np.random.default_rng(5).standard_normal((3, 5, 64)).astype(np.float32)
    packed, scales = ref.scaled_fp4_quant(x.reshape(15, 64), None, layout="linear", fmt="mxfp4")
    batch = ref.dequantize(packed.reshape(3, 5, 32), scales.reshape(3, 5, 2), None, layout="linear", fmt="mxfp4")
    rows = ref.dequantize(packed, scales, None, layout="linear", fmt="mxfp4")
    assert batch.shape == (3, 5, 64) and np.array_equal(batch, rows.reshape(3, 5, 64))
