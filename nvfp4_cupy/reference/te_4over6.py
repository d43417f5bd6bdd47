"""TransformerEngine's Four Over Six (nvfp4_use_4over6) NVFP4 quantization in
NumPy and ml_dtypes: the golden model of docs/te_rht_and_4over6.md, part B,
byte-identical to TE's Python reference (custom_recipes/reference_nvfp4.py).

Each 16-value block is quantized twice with TE's numerics, once with its
scale mapped to 6 (the usual NVFP4 scale) and once mapped to 4 (the scale
times 1.5, so the block's largest value lands on E2M1's 4); the candidate
with the smaller error (MAE or MSE, summed in a fixed order) is kept, ties
going to map-to-6. The global scale uses an E4M3 bound of 448 or 256 (256
leaves room for the 1.5x scale below E4M3's 448).

Public:
- scaled_fp4_quant_4over6(x, ...) -> (packed, scales, global_amax).
- fp16_candidate(codes, scale_bytes): TE's fast-math candidate decode.
- accuracy_table(...), format_accuracy_table(table): SQNR and MSE of ieee,
  te, Four Over Six (MAE, MSE; E4M3 bound 448 and 256), RHT and stochastic
  rounding on three kinds of data.
"""

from __future__ import annotations

import math

import numpy as np

from .._format import (
    BLOCK_SIZE,
    E2M1_MAX,
    NUMPY_DTYPES,
    check_bool,
    check_dtype,
    resolve_layout,
    resolve_padded_n,
    rows_and_n,
)
from .nvfp4 import _abs_max, compute_global_scale, dequantize, e2m1_values, e4m3_values, scaled_fp4_quant
from .te import (
    encode_scale_from_amax_te,
    quantize_te,
    te_e2m1_codes,
    te_e4m3_scales,
    te_nan_scale_invalid_rows,
    te_reciprocals,
)
from .stochastic import scaled_fp4_quant_sr
from .te_rht import RHT_SIZE, _quantize_te_rows, check_te_options, hadamard_matrix, scaled_fp4_quant_rht

__all__ = ["scaled_fp4_quant_4over6", "fp16_candidate", "accuracy_table", "format_accuracy_table"]

_F32 = np.float32
_MAP4_FACTOR = np.float32(1.5)
# TE's fast-math decode builds the E2M1 x E4M3 product as float16 bits; a NaN
# scale gives the float16 NaN 0x7E00, which TE's decoder then reads as a
# normal number: exponent field 31, fraction 0x200, 1.5 * 2^16.
FP16_NAN_AS_DECODED = np.float32(98304.0)


def fp16_candidate(codes, scale_bytes) -> np.ndarray:
    """TE's fast-math candidate value (float32) of E2M1 `codes` under E4M3
    `scale_bytes` (broadcast together): the product e2m1 * e4m3, which
    float16 holds exactly (at most 8 significant bits, 0 or 2^-10 <= |p| <= 2688).
    The sign is (code is negative) XOR (scale byte's bit 7); code 0x8 (-0)
    counts as positive, so a zero product takes the scale's sign. A NaN
    scale byte (0x7F or 0xFF) gives +98304 whatever the code."""
    codes = np.asarray(codes, np.uint8)
    scale_bytes = np.asarray(scale_bytes, np.uint8)
    q = e2m1_values(codes)
    magnitude = np.abs(q) * e4m3_values(scale_bytes & np.uint8(0x7F))  # exact
    negative = (q < 0) ^ (scale_bytes >= 0x80)
    value = np.where(negative, -magnitude, magnitude)
    return np.where((scale_bytes & 0x7F) == 0x7F, FP16_NAN_AS_DECODED, value).astype(np.float32)


def _four_over_six_blocks(values: np.ndarray, amax: np.ndarray, s_enc: np.ndarray, e4m3_max: int, err_mode: str,
                          fast: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, K] -> (codes [m, K], scale bytes [m, K // 16]),
    docs/te_rht_and_4over6.md, section B.2. The candidates' scales are Four
    Over Six's own (RN(RN(amax / 6) * S_enc), times 1.5 for map to 4); their
    cast, reciprocal and codes are TE's basic steps (reference/te.py)."""
    m, k = values.shape
    blocks = values.reshape(m, k // BLOCK_SIZE, BLOCK_SIZE)
    amax = np.asarray(amax, np.float32).reshape(-1, 1)  # [1 or m, 1]: per tensor or per row
    s_enc = np.asarray(s_enc, np.float32).reshape(-1, 1)
    block_amax = _abs_max(blocks, -1)
    with np.errstate(all="ignore"):
        base = (block_amax / _F32(E2M1_MAX)) * s_enc
        candidates = []
        for decode_scale in (base * _MAP4_FACTOR, base):  # map to 4, map to 6
            scale_bytes, scale_value = te_e4m3_scales(decode_scale)
            codes = te_e2m1_codes(blocks * te_reciprocals(scale_value, s_enc)[..., None])
            candidates.append((codes, scale_bytes, scale_value))
        if fast:
            reference = blocks * s_enc[..., None]  # RN(v * S_enc)
        else:
            denom = _F32(E2M1_MAX * e4m3_max)
        errors = []
        for codes, scale_bytes, scale_value in candidates:
            q = e2m1_values(codes)
            candidate = fp16_candidate(codes, scale_bytes[..., None]) if fast else None
            err = np.zeros(block_amax.shape, np.float32)
            for i in range(BLOCK_SIZE):  # in element order, from +0
                if fast:
                    diff = candidate[..., i] - reference[..., i]
                else:
                    diff = ((q[..., i] * scale_value) * amax) / denom - blocks[..., i]
                err = err + (diff * diff if err_mode == "MSE" else np.abs(diff))
            errors.append(err)
        pick4 = errors[0] < errors[1]  # ties and NaN errors keep map-to-6
    (codes4, bytes4, _), (codes6, bytes6, _) = candidates
    codes, scale_bytes = np.where(pick4[..., None], codes4, codes6), np.where(pick4, bytes4, bytes6)
    te_nan_scale_invalid_rows(codes, scale_bytes, s_enc)
    return codes.reshape(m, k), scale_bytes


def scaled_fp4_quant_4over6(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                            err_mode="MAE", e4m3_max=448, err_use_fast_math=False, per_row=False, rht=False,
                            fmt="nvfp4"):
    """TE's Four Over Six NVFP4 quantization of x [..., n] (float16, bfloat16
    or float32) along its last dimension, byte-identical to TE's reference
    with nvfp4_use_4over6=True (docs/te_rht_and_4over6.md, part B).

    `err_mode` "MAE" or "MSE" (TE's nvfp4_4over6_err_mode); `e4m3_max` 448 or
    256 (TE's nvfp4_e4m3_max: the E4M3 bound in the global scale
    e4m3_max * 6 / amax; TE's recipe uses 256 by default, its quantizer 448);
    `err_use_fast_math` measures the error on TE's float16 product of the
    candidate instead of in the input's domain. The global amax is max |x|
    (per row with per_row=True) unless `global_amax` is given (a host number
    or a float32 array of 1 or m elements). `rht=True` and fmt="mxfp4" are
    refused, as TE refuses them. Returns (packed uint8 [m, padded_n // 2],
    scales uint8 in the layout, global_amax float32 [1] or [m])."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    e4m3_max, err_mode, fast = check_te_options(fmt=fmt, rht=rht, four_over_six=True, e4m3_max=e4m3_max,
                                                err_mode=err_mode, err_use_fast_math=err_use_fast_math)
    per_row = check_bool(per_row, "per_row")
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    return _quantize_te_rows(
        x.reshape(m, n).astype(np.float32), padded_n, scale_layout, global_amax, per_row,
        lambda v, amax, s_enc: _four_over_six_blocks(v, amax, s_enc, e4m3_max, err_mode, fast), e4m3_max)


# ---------------------------------------------------------------------------
# Accuracy (docs/te_rht_and_4over6.md, section D).
# ---------------------------------------------------------------------------
DATA_KINDS = ("gaussian", "heavy-tailed", "weight-like")
METHODS = ("ieee", "te", "4/6 MAE 448", "4/6 MSE 448", "4/6 MAE 256", "4/6 MSE 256", "te + RHT", "SR, one seed",
           "SR, mean of 50 seeds")
SR_SEEDS = 50  # TE's own SR test averages 50 results (tests/pytorch/nvfp4/test_nvfp4_sr_quantize.py)


def _data(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal(shape)
    if kind == "heavy-tailed":  # activations: a Gaussian times a log-normal with sigma 3, per element
        return rng.standard_normal(shape) * np.exp(3 * rng.standard_normal(shape))
    if kind == "weight-like":  # Student-t (5 dof), 0.02 wide, each output row scaled by a log-normal (sigma 0.5)
        return 0.02 * rng.standard_t(5, shape) * np.exp(0.5 * rng.standard_normal((shape[0], 1)))
    raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")


def _te_dequantize(packed, scales, amax, e4m3_max, n):
    """e2m1 * sf / S_enc in float32 (our dequantize with S_enc as the global
    scale): what TE's GEMM alpha amax / (6 * e4m3_max) gives back."""
    s_enc = encode_scale_from_amax_te(amax, e4m3_max=e4m3_max)
    return dequantize(packed, scales, s_enc, n, layout="linear")


def _inverse_rht(values: np.ndarray) -> np.ndarray:
    """float64 [m, K]: M^-1 = M^T per 16-value chunk (M is orthogonal)."""
    m, k = values.shape
    return (values.astype(np.float64).reshape(-1, RHT_SIZE) @ hadamard_matrix().astype(np.float64).T).reshape(m, k)


def accuracy_table(m: int = 256, n: int = 1024, dtype="bfloat16", seed: int = 0) -> dict:
    """{data kind: {method: (SQNR in dB, MSE)}} of quantizing then
    dequantizing an [m, n] matrix of each kind (DATA_KINDS) in `dtype`,
    against the dtype's values, in float64. Methods (METHODS): our default
    NVFP4 numerics with compute_global_scale ("ieee"), TE's basic numerics
    ("te"), Four Over Six per error mode and E4M3 bound, and TE's numerics
    after the RHT along each row ("te + RHT", measured after the inverse
    transform: the GEMM's two transforms cancel), and stochastic rounding
    (reference.stochastic, the "ieee" scales) of one seed and the mean of
    SR_SEEDS seeds' dequantized values (the error of an average of many
    steps, as TE measures SR). SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    dtype_name = check_dtype(dtype, "dtype")
    if n % RHT_SIZE:
        raise ValueError(f"n must be a multiple of 16 for the RHT column, got n={n}")
    rng = np.random.default_rng(seed)
    table = {}
    for kind in DATA_KINDS:
        x = _data(kind, (m, n), rng).astype(np.float32).astype(NUMPY_DTYPES[dtype_name])
        exact = x.astype(np.float64)
        results = {}
        gs = compute_global_scale(x)
        packed, scales = scaled_fp4_quant(x, gs, layout="linear")
        results["ieee"] = dequantize(packed, scales, gs, n, layout="linear")
        packed, scales, te_gs = quantize_te(x, layout="linear")
        results["te"] = dequantize(packed, scales, te_gs, n, layout="linear")
        for e4m3_max in (448, 256):
            for mode in ("MAE", "MSE"):
                packed, scales, amax = scaled_fp4_quant_4over6(x, layout="linear", err_mode=mode, e4m3_max=e4m3_max)
                results[f"4/6 {mode} {e4m3_max}"] = _te_dequantize(packed, scales, amax, e4m3_max, n)
        packed, scales, amax = scaled_fp4_quant_rht(x, layout="linear")
        results["te + RHT"] = _inverse_rht(_te_dequantize(packed, scales, amax, 448, n))
        draws = [dequantize(*scaled_fp4_quant_sr(x, gs, layout="linear", seed=seed), gs, n, layout="linear")
                 for seed in range(SR_SEEDS)]
        results["SR, one seed"] = draws[0]
        results["SR, mean of 50 seeds"] = np.mean(np.stack(draws).astype(np.float64), axis=0)
        signal = float(np.sum(exact * exact))
        table[kind] = {}
        for method in METHODS:
            err = exact - results[method].astype(np.float64)
            noise = float(np.sum(err * err))
            sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
            table[kind][method] = (sqnr, noise / exact.size)
    return table


def format_accuracy_table(table: dict) -> str:
    """A Markdown table of accuracy_table's result: SQNR in dB (MSE)."""
    kinds = list(table)
    lines = ["| method | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for method in METHODS:
        cells = [f"{table[kind][method][0]:.2f} dB ({table[kind][method][1]:.3g})" for kind in kinds]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
