"""Golden model of the fused operations (docs/fused_ops.md), in NumPy and
ml_dtypes only: RMSNorm (and its fused residual add) and SiLU-and-mul, each
alone and fused with NVFP4/MXFP4 quantization; grouped experts with offsets
and the masked expert batch (vLLM's scaled_fp4_experts_quant and
silu_and_mul_scaled_fp4_experts_quant conventions); fake quantization
(quantize then dequantize) with its straight-through gradient.

Every float32 step is specified to the bit in docs/fused_ops.md, so that a GPU
kernel can match these bytes exactly:

- fma32: an IEEE binary32 fused multiply-add, emulated exactly with float64
  round-to-odd (section 2.1);
- exp32 and silu32: a defined range reduction and degree-7 polynomial made of
  fma, mul and exponent-field arithmetic only (sections 2.2, 2.3);
- sum_of_squares: the mean of squares summed in a fixed order, 256 virtual
  lanes of 8-element chunks and a fixed pairwise tree, independent of a
  kernel's block size (section 3.2).

The fused functions are written as one pass over rows and blocks, the way a
kernel works (per-row global scales, blocks quantized by nvfp4.quantize_blocks,
scale bytes placed by the layout formulas); tests/test_reference_fused.py
holds them to the unfused golden ops run one after another, bit for bit.
"""

from __future__ import annotations

import numbers

import ml_dtypes
import numpy as np

from .._format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    NUMPY_DTYPES,
    check_bool,
    check_dtype,
    check_fmt_global_scale,
    check_int,
    host_global_scale,
    resolve_layout,
    resolve_padded_n,
    round_up,
    rows_and_n,
)
from . import mx_rules, stochastic, te, te_4over6, te_rht
from .nvfp4 import (
    _CANONICAL_NAN_BITS,
    compute_global_scale,
    _global_scale_array,
    _lay_out_scales,
    _pack_codes,
    _padded_rows,
    e2m1_values,
    e4m3_values,
    quantize_blocks,
    quantize_mx_blocks,
    scale_offsets,
    unpack_codes,
)

__all__ = [
    # float32 primitives (docs/fused_ops.md, section 2)
    "fma32",
    "exp32",
    "silu32",
    "EXP_CONSTANTS",
    # RMSNorm (section 3)
    "RMS_CHUNK",
    "RMS_LANES",
    "check_eps",
    "sum_of_squares",
    "rms_inverse",
    "rms_norm",
    "rms_norm_quant",
    # SiLU-and-mul (section 4)
    "silu_and_mul",
    "silu_and_mul_quant",
    # experts (section 5)
    "blockscale_offsets",
    "experts_scale_rows",
    "scaled_fp4_experts_quant",
    "scaled_fp4_masked_quant",
    # fake quantization (section 6)
    "fake_quantize",
    "saturation_mask",
    "fake_quantize_backward",
]

_F32 = np.float32
_ONE = np.float32(1)


def _f32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


# ---------------------------------------------------------------------------
# float32 primitives (docs/fused_ops.md, section 2)
# ---------------------------------------------------------------------------
def fma32(a, b, c) -> np.ndarray:
    """IEEE binary32 fma(a, b, c) = RN(a * b + c) with one rounding, for
    float32 arrays (broadcast). Emulated exactly: a * b is exact in float64
    (24 + 24 bits), p + c is computed in float64 and rounded to odd with an
    error-free TwoSum (53 >= 24 + 2 bits, so the one RN to float32 that
    follows is the correctly rounded result: Boldo and Melquiond, "Emulation
    of FMA and correctly rounded sums: proved algorithms using rounding to
    odd", 2008). Infinities and NaN follow IEEE (inf * 0 is NaN); the sign of
    an exact zero is IEEE's; subnormal results are kept."""
    a64 = np.asarray(a, np.float32).astype(np.float64)
    b64 = np.asarray(b, np.float32).astype(np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        p = a64 * b64  # exact: no rounding, no overflow, no underflow in float64
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)  # TwoSum: p + c = s + err exactly
        bits = np.asarray(s).view(np.int64)
        to_odd = np.isfinite(s) & (err != 0) & ((bits & 1) == 0)
        # s is never 0 when err != 0 (an exact sum that underflows is representable)
        bits = np.where(to_odd, np.where((err > 0) == (s > 0), bits + 1, bits - 1), bits)
        return np.asarray(bits).view(np.float64).astype(np.float32)


# exp32's constants (docs/fused_ops.md, section 2.2), float32 bit patterns.
EXP_CONSTANTS = {
    "LOW": 0xC2D00000,  # -104: below it exp rounds to +0 (exp(-104) < 2^-150)
    "HIGH": 0x42B20000,  # 89: above it exp overflows (exp(89) > FLT_MAX)
    "LOG2E": 0x3FB8AA3B,  # RN(1 / ln 2) = 1.44269502...
    "SHIFTER": 0x4B400000,  # 1.5 * 2^23: RN(t * LOG2E + SHIFTER) - SHIFTER rounds to an integer
    "LN2_HI": 0x3F318000,  # 0.693359375 = 355 / 512 (9 significant bits: k * LN2_HI is exact)
    "LN2_LO": 0xB95E8083,  # RN(ln 2 - LN2_HI) = -2.12194440e-4
    # C_i = RN(1 / i!), i = 0..7
    "C0": 0x3F800000,
    "C1": 0x3F800000,
    "C2": 0x3F000000,
    "C3": 0x3E2AAAAB,
    "C4": 0x3D2AAAAB,
    "C5": 0x3C088889,
    "C6": 0x3AB60B61,
    "C7": 0x39500D01,
}
_K = {name: _f32(bits) for name, bits in EXP_CONSTANTS.items()}
_POLY = [_K[f"C{i}"] for i in range(8)]


def _pow2(e: np.ndarray) -> np.ndarray:
    """2^e as float32 for integer e in [-126, 127], from the exponent field."""
    return ((np.asarray(e, np.int64) + 127) << 23).astype(np.uint32).view(np.float32)


def exp32(t) -> np.ndarray:
    """exp(t) for float32 t, docs/fused_ops.md section 2.2, bit for bit:
    NaN gives NaN; t is clamped to [-104, 89]; k = nearest integer to
    t * LOG2E (ties to even) by the shifter fma; r = t - k ln 2 in two fmas
    (Cody and Waite); p = the degree-7 Taylor polynomial of exp at r by Horner
    with fma; result p * 2^e1 * 2^e2 with e1 = floor(k / 2), e2 = k - e1 (two
    roundings, the first exact). Error below 1 ulp (section 2.4)."""
    t = np.asarray(t, np.float32)
    nan = np.isnan(t)
    with np.errstate(all="ignore"):
        tc = np.minimum(np.maximum(np.where(nan, _F32(0), t), _K["LOW"]), _K["HIGH"])
        j = fma32(tc, _K["LOG2E"], _K["SHIFTER"])
        kf = (j - _K["SHIFTER"]).astype(np.float32)  # exact
        r = fma32(kf, -_K["LN2_HI"], tc)
        r = fma32(kf, -_K["LN2_LO"], r)
        p = np.broadcast_to(_POLY[7], t.shape).astype(np.float32)
        for c in reversed(_POLY[:7]):
            p = fma32(p, r, c)
        k = kf.astype(np.int64)
        e1 = k >> 1  # floor(k / 2)
        result = ((p * _pow2(e1)).astype(np.float32) * _pow2(k - e1)).astype(np.float32)
    return np.where(nan, np.float32(np.nan), result).astype(np.float32)


def silu32(x) -> np.ndarray:
    """silu(x) = RN(x / RN(1 + exp32(-x))) for float32 x (docs/fused_ops.md,
    section 2.3): IEEE division, no reciprocal. silu(-inf) is NaN and
    silu(x) is -0.0 for x < -88.7 (exp overflows), as in PyTorch."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        return (x / (_ONE + exp32(-x))).astype(np.float32)


# ---------------------------------------------------------------------------
# Shared argument checks (docs/fused_ops.md, section 7)
# ---------------------------------------------------------------------------
def _check_x(x, name: str = "x") -> tuple[np.ndarray, str, int, int]:
    x = np.asarray(x)
    dtype_name = check_dtype(x.dtype, name)
    m, n = rows_and_n(x.shape, name)
    if n <= 0:
        raise ValueError(f"{name}: the last dimension n must be positive, got n={n}")
    return x, dtype_name, m, n


def check_eps(eps) -> np.float32:
    """eps as the float32 the kernels add: a real number (not a bool), finite
    and >= 0 (a NaN, an infinity or a negative eps is a ValueError)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"eps must be finite and >= 0, got eps={value!r}")
    with np.errstate(over="ignore"):
        eps32 = np.float32(value)
    if not np.isfinite(eps32):
        raise ValueError(f"eps must be finite and >= 0 in float32, got eps={value!r} (inf in float32)")
    return eps32


def _check_same(array, like: np.ndarray, dtype_name: str, name: str, shape) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be an array of x's dtype {dtype_name}, got {type(array).__name__}")
    if check_dtype(array.dtype, name) != dtype_name:
        raise TypeError(f"{name} must have x's dtype {dtype_name}, got dtype {np.dtype(array.dtype).name}")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(array.shape)}")
    return array


def _to_dtype(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """float32 -> dtype, round to nearest even (overflow to +-inf, subnormals
    kept), every NaN as the dtype's canonical quiet NaN (docs/format.md,
    section 8)."""
    with np.errstate(all="ignore"):
        out = values.astype(NUMPY_DTYPES[dtype_name])
    bits_type, nan_bits = _CANONICAL_NAN_BITS[dtype_name]
    out.view(bits_type)[np.isnan(values)] = nan_bits
    return out


# ---------------------------------------------------------------------------
# RMSNorm (docs/fused_ops.md, section 3)
# ---------------------------------------------------------------------------
RMS_CHUNK = 8  # consecutive elements per chunk
RMS_LANES = 256  # virtual lanes: 8 groups of 32
_GROUP = 32


def sum_of_squares(z) -> np.ndarray:
    """float32 [m, n] -> float32 [m]: sum of z^2 per row in the order of
    docs/fused_ops.md, section 3.2. Chunk c holds elements 8c..8c+7; lane
    v (0..255) owns the chunks c = v mod 256, in increasing c, and sums its
    elements in index order from +0.0 with acc = fma(z, z, acc) (elements
    >= n are absent). Then lane v = 32g + l: a pairwise tree inside each
    group of 32 (partners 16, 8, 4, 2, 1 apart), then over the 8 group sums
    (partners 4, 2, 1 apart), each step one float32 addition."""
    z = np.asarray(z, np.float32)
    m, n = z.shape
    per_lane = max(1, -(-n // (RMS_CHUNK * RMS_LANES)))
    padded = np.zeros((m, per_lane * RMS_LANES * RMS_CHUNK), np.float32)
    padded[:, :n] = z
    chunks = padded.reshape(m, per_lane, RMS_LANES, RMS_CHUNK)
    acc = np.zeros((m, RMS_LANES), np.float32)
    for c in range(per_lane):
        for j in range(RMS_CHUNK):
            if c * RMS_LANES * RMS_CHUNK + j >= n:  # no lane has an element here (nor later)
                break
            v = chunks[:, c, :, j]
            acc = fma32(v, v, acc)  # fma(0, 0, acc) = acc: absent elements change nothing
    with np.errstate(all="ignore"):
        lanes = acc.reshape(m, RMS_LANES // _GROUP, _GROUP)
        half = _GROUP // 2
        while half:
            lanes = (lanes[..., :half] + lanes[..., half : 2 * half]).astype(np.float32)
            half //= 2
        groups = lanes[..., 0]
        half = groups.shape[1] // 2
        while half:
            groups = (groups[:, :half] + groups[:, half : 2 * half]).astype(np.float32)
            half //= 2
    return groups[:, 0]


def rms_inverse(sum_sq, n: int, eps32) -> np.ndarray:
    """1 / sqrt(mean + eps) per row (docs/fused_ops.md, section 3.1, steps 3-6):
    ms = RN(S / n), d = RN(ms + eps), q = RN(sqrt(d)) (correctly rounded),
    inv = RN(1 / q). No rsqrt: two IEEE roundings, sqrt then division."""
    with np.errstate(all="ignore"):
        ms = (np.asarray(sum_sq, np.float32) / np.float32(n)).astype(np.float32)
        d = (ms + np.float32(eps32)).astype(np.float32)
        return (_ONE / np.sqrt(d)).astype(np.float32)


def _rms_norm_rows(x2d: np.ndarray, dtype_name: str, weight, eps32, res2d):
    """The arithmetic of docs/fused_ops.md, section 3.1, on rows [m, n]:
    returns (out float32 values, exactly representable in dtype; z in dtype
    or None without a residual)."""
    z_dtype = None
    with np.errstate(all="ignore"):
        if res2d is None:
            z32 = x2d.astype(np.float32)
        else:
            z_dtype = _to_dtype((x2d.astype(np.float32) + res2d.astype(np.float32)).astype(np.float32), dtype_name)
            z32 = z_dtype.astype(np.float32)
        inv = rms_inverse(sum_of_squares(z32), x2d.shape[1], eps32)
        y = (z32 * inv[:, None]).astype(np.float32)
        normed = y.astype(NUMPY_DTYPES[dtype_name]).astype(np.float32)  # RN to dtype (NaN stays NaN)
        if weight is not None:
            normed = (normed * weight.astype(np.float32)[None, :]).astype(np.float32)
            normed = normed.astype(NUMPY_DTYPES[dtype_name]).astype(np.float32)
    return normed, z_dtype


def _check_rms_args(x, weight, eps, residual):
    x, dtype_name, m, n = _check_x(x)
    if weight is not None:
        weight = _check_same(weight, x, dtype_name, "weight", (n,))
    eps32 = check_eps(eps)
    if residual is not None:
        residual = _check_same(residual, x, dtype_name, "residual", x.shape)
    return x, dtype_name, m, n, weight, eps32, residual


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm of x [..., n] (float16, bfloat16 or float32) over its last
    dimension, docs/fused_ops.md section 3.1: with z = x, or z =
    dtype(x + residual) when `residual` is given,
    out = dtype(dtype(RN(z * inv)) * weight), inv = 1 / sqrt(mean(z^2) + eps).
    `weight` is [n] of x's dtype, or None (no scaling). `eps` is a host
    float >= 0. Returns out (x's dtype and shape), and with a residual
    (out, z): z is the updated residual, which the GPU writes back into
    `residual` in place (vLLM's fused_add_rms_norm)."""
    x, dtype_name, m, n, weight, eps32, residual = _check_rms_args(x, weight, eps, residual)
    out, z = _rms_norm_rows(x.reshape(m, n), dtype_name, weight, eps32,
                            None if residual is None else residual.reshape(m, n))
    out = _to_dtype(out, dtype_name).reshape(x.shape)
    return out if residual is None else (out, z.reshape(x.shape))


# ---------------------------------------------------------------------------
# Quantizing rows, as a kernel does: every row knows its global scale
# ---------------------------------------------------------------------------
def _row_scales(global_scale, x_shape, m: int) -> tuple[np.ndarray, str]:
    """(float32 [m] the global scale of each row, kind) by docs/format.md,
    section 6.2 (a host scalar must be valid; array values are not checked)."""
    scales, kind = _global_scale_array(global_scale, x_shape)
    if kind == "one":
        return np.full(m, scales[0], np.float32), kind
    if kind == "row":
        return scales.astype(np.float32), kind
    return np.repeat(scales, x_shape[1]).astype(np.float32), kind  # expert: x [E, rows, n]


def _quantize_rows(values: np.ndarray, row_gs, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, K] -> (codes [m, K], scale bytes [m, K / B]): each row
    quantized under its own global scale (docs/format.md, sections 2, 3 and
    9). Rows that share a scale (bit for bit) are quantized together."""
    if fmt == "mxfp4":
        return quantize_mx_blocks(values)
    m, k = values.shape
    codes = np.zeros((m, k), np.uint8)
    scale_bytes = np.zeros((m, k // BLOCK_SIZE), np.uint8)
    bits = np.asarray(row_gs, np.float32).view(np.uint32)
    for pattern in np.unique(bits):
        rows = np.flatnonzero(bits == pattern)
        codes[rows], scale_bytes[rows] = quantize_blocks(values[rows], np.uint32(pattern).view(np.float32))
    return codes, scale_bytes


def _checked_row_scales(global_scale, x_shape, fmt: str):
    """(row_gs float32 [m] or None for MXFP4, kind): the global scale's
    checks, before any arithmetic."""
    if fmt == "mxfp4":
        return None, "one"
    return _row_scales(global_scale, x_shape, rows_and_n(x_shape)[0])


def _quantized_output(values: np.ndarray, x_shape, scale_kind, padded_n: int, scale_layout, fmt: str):
    """Rows of float32 values [m, n] of an x of shape x_shape -> (packed,
    scales), as scaled_fp4_quant lays them out: one scale tensor, or one
    per expert for a per-expert global scale (x [E, m, n]). scale_kind is
    _checked_row_scales' result."""
    block = BLOCK_SIZE if fmt == "nvfp4" else 32
    row_gs, kind = scale_kind
    codes, scale_bytes = _quantize_rows(_padded_rows(values, padded_n), row_gs, fmt)
    packed = _pack_codes(codes)
    if kind != "expert":
        return packed, _lay_out_scales(scale_bytes, scale_layout, padded_n, block)
    experts, rows = x_shape[0], x_shape[1]
    tensors = [_lay_out_scales(scale_bytes[e * rows : (e + 1) * rows], scale_layout, padded_n, block)
               for e in range(experts)]
    scale_shape = (experts, *scale_layout.scale_shape(rows, padded_n, block))
    scales = np.stack(tensors) if experts else np.zeros(scale_shape, np.uint8)
    return packed.reshape(experts, rows, padded_n // 2), scales


def _check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout):
    block = check_fmt_global_scale(fmt, global_scale)
    padded_n = resolve_padded_n(n, padded_n, block)
    return padded_n, resolve_layout(is_sf_swizzled_layout, layout)


def rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                   fmt="nvfp4", residual=None):
    """RMSNorm fused with quantization (docs/fused_ops.md, section 3.4): the
    bytes of scaled_fp4_quant(rms_norm(x, weight, eps[, residual]),
    global_scale, ...), computed in one pass. Returns (packed, scales), and
    with a residual (packed, scales, z), z the updated residual (x's dtype;
    written back into `residual` by the GPU). `global_scale`, layouts,
    padded_n and fmt as in scaled_fp4_quant (docs/format.md)."""
    x, dtype_name, m, n, weight, eps32, residual = _check_rms_args(x, weight, eps, residual)
    padded_n, scale_layout = _check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    scale_kind = _checked_row_scales(global_scale, x.shape, fmt)
    values, z = _rms_norm_rows(x.reshape(m, n), dtype_name, weight, eps32,
                               None if residual is None else residual.reshape(m, n))
    packed, scales = _quantized_output(values, x.shape, scale_kind, padded_n, scale_layout, fmt)
    return (packed, scales) if residual is None else (packed, scales, z.reshape(x.shape))


# ---------------------------------------------------------------------------
# SiLU-and-mul (docs/fused_ops.md, section 4)
# ---------------------------------------------------------------------------
def _check_gated(x):
    x = np.asarray(x)
    dtype_name = check_dtype(x.dtype)
    rows_and_n(x.shape)
    width = x.shape[-1]
    if width <= 0 or width % 2:
        raise ValueError(f"x: the last dimension must be even and positive ([..., 2n]: gate then up), got {width}")
    return x, dtype_name, width // 2


def _silu_and_mul_rows(x2d: np.ndarray) -> np.ndarray:
    """[m, 2n] -> float32 [m, n]: RN(silu32(gate) * up), not yet rounded to
    the dtype."""
    n = x2d.shape[1] // 2
    gate = x2d[:, :n].astype(np.float32)
    up = x2d[:, n:].astype(np.float32)
    with np.errstate(all="ignore"):
        return (silu32(gate) * up).astype(np.float32)


def silu_and_mul(x):
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (float16, bfloat16 or
    float32), docs/fused_ops.md section 4.1: silu32 in float32, the product
    rounded to float32, then once to x's dtype. Returns [..., n]."""
    x, dtype_name, n = _check_gated(x)
    m = rows_and_n(x.shape)[0]
    out = _to_dtype(_silu_and_mul_rows(x.reshape(m, 2 * n)), dtype_name)
    return out.reshape(*x.shape[:-1], n)


def silu_and_mul_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, fmt="nvfp4",
                       expert_offsets=None, expert_counts=None, validate=True):
    """SiLU-and-mul fused with quantization (docs/fused_ops.md, section 4.2):
    the bytes of quantizing silu_and_mul(x) ([..., n] in x's dtype).

    - dense (neither offsets nor counts): scaled_fp4_quant's rules; returns
      (packed, scales).
    - expert_offsets (int32 [E + 1]), x [m, 2n] sorted by expert:
      scaled_fp4_experts_quant of the result (vLLM's
      silu_and_mul_scaled_fp4_experts_quant); returns (packed, scales,
      blockscale_offsets).
    - expert_counts (int32 [E]), x [E, max_m, 2n]: scaled_fp4_masked_quant of
      the result; returns (packed, scales)."""
    x, dtype_name, n = _check_gated(x)
    if expert_offsets is not None and expert_counts is not None:
        raise ValueError("pass expert_offsets (tokens sorted by expert) or expert_counts (a masked [E, max_m, 2n] "
                         "batch), not both")
    m = rows_and_n(x.shape)[0]
    out_shape = (*x.shape[:-1], n)

    def values():  # computed after every check, as a kernel launches after them
        return _to_dtype(_silu_and_mul_rows(x.reshape(m, 2 * n)), dtype_name).astype(np.float32)

    if expert_offsets is not None:
        return _experts_quant(values, out_shape, global_scale, expert_offsets, padded_n, is_sf_swizzled_layout,
                              layout, fmt, validate)
    if expert_counts is not None:
        return _masked_quant(values, out_shape, global_scale, expert_counts, padded_n, is_sf_swizzled_layout,
                             layout, fmt, validate)
    padded_n, scale_layout = _check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    scale_kind = _checked_row_scales(global_scale, out_shape, fmt)
    return _quantized_output(values(), out_shape, scale_kind, padded_n, scale_layout, fmt)


# ---------------------------------------------------------------------------
# Experts (docs/fused_ops.md, section 5)
# ---------------------------------------------------------------------------
def _check_int32_vector(array, name: str, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be an int32 array ({what}), got {type(array).__name__}")
    if array.dtype != np.int32:
        raise TypeError(f"{name} must be int32 ({what}), got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D ({what}), got shape {tuple(array.shape)}")
    return array


def _check_offsets(expert_offsets, tokens: int, validate: bool) -> np.ndarray:
    """int64 [E + 1] offsets: checked (validate=True) or sanitized as the
    kernel does without a check (docs/fused_ops.md, section 5.4)."""
    offsets = _check_int32_vector(expert_offsets, "expert_offsets", "[E + 1], tokens of expert e are rows "
                                  "expert_offsets[e]:expert_offsets[e + 1]")
    if offsets.shape[0] < 1:
        raise ValueError("expert_offsets must hold E + 1 >= 1 values, got an empty array")
    values = offsets.astype(np.int64)
    if check_bool(validate, "validate"):
        if values[0] != 0:
            raise ValueError(f"expert_offsets[0] must be 0, got {int(values[0])}")
        steps = np.flatnonzero(np.diff(values) < 0)
        if steps.size:
            e = int(steps[0])
            raise ValueError(f"expert_offsets must be non-decreasing, got expert_offsets[{e}]={int(values[e])} > "
                             f"expert_offsets[{e + 1}]={int(values[e + 1])}")
        if values[-1] > tokens:
            raise ValueError(f"expert_offsets[E]={int(values[-1])} is out of range: x has {tokens} rows (tokens)")
        return values
    return np.maximum.accumulate(np.clip(values, 0, tokens))


def _check_counts(expert_counts, experts: int, max_m: int, validate: bool) -> np.ndarray:
    counts = _check_int32_vector(expert_counts, "expert_counts", "[E], the valid rows of each expert")
    if counts.shape[0] != experts:
        raise ValueError(f"expert_counts must have shape ({experts},) (one per expert of x [E, max_m, n]), got "
                         f"{tuple(counts.shape)}")
    values = counts.astype(np.int64)
    if check_bool(validate, "validate"):
        bad = np.flatnonzero((values < 0) | (values > max_m))
        if bad.size:
            e = int(bad[0])
            raise ValueError(f"expert_counts[{e}]={int(values[e])} is out of range: each count must be in "
                             f"[0, max_m={max_m}]")
        return values
    return np.clip(values, 0, max_m)


def _expert_scales(global_scale, experts: int, fmt: str) -> np.ndarray | None:
    """float32 [E]: one global scale per expert, from a host scalar or a
    one-element array (the same for all) or a float32 [E] array."""
    check_fmt_global_scale(fmt, global_scale)
    if fmt == "mxfp4":
        return None
    if not isinstance(global_scale, np.ndarray):
        return np.full(experts, host_global_scale(global_scale), np.float32)
    if global_scale.dtype != np.float32:
        raise TypeError(f"global_scale as an array must be float32, got {global_scale.dtype}")
    if global_scale.size == 1:
        return np.full(experts, global_scale.reshape(-1)[0], np.float32)
    if global_scale.shape != (experts,):
        raise ValueError(f"global_scale as an array must hold one element or one per expert ([E] = [{experts}]), "
                         f"got shape {tuple(global_scale.shape)}")
    return global_scale.astype(np.float32)


def _layout_rows(scale_layout) -> int:
    return scale_layout.row_multiple


def experts_scale_rows(num_tokens: int, num_experts: int, layout="swizzled") -> int:
    """Rows of the grouped scale tensor (docs/fused_ops.md, section 5.2): the
    most that sum(round_up(count_e, R)) can reach for num_tokens tokens over
    num_experts experts, R the layout's row tile (128, 8 or 1), known on the
    host without reading the offsets: 0 without experts, else
    R * (min(m, E) + (m - min(m, E)) // R) for m tokens."""
    tokens = check_int(num_tokens, "num_tokens")
    experts = check_int(num_experts, "num_experts")
    if tokens < 0 or experts < 0:
        raise ValueError(f"num_tokens and num_experts must be >= 0, got {tokens} and {experts}")
    rows = _layout_rows(resolve_layout(layout=layout))
    if experts == 0:
        return 0
    first = min(tokens, experts)
    return rows * (first + (tokens - first) // rows)


def _blockscale_offsets(offsets: np.ndarray, rows: int) -> np.ndarray:
    counts = np.diff(offsets)
    out = np.zeros(offsets.shape[0], np.int64)
    out[1:] = np.cumsum(-(-counts // rows) * rows)
    return out


def blockscale_offsets(expert_offsets, layout="swizzled") -> np.ndarray:
    """int32 [E + 1]: the first scale row of each expert, vLLM's
    compute_expert_blockscale_offsets for the swizzled layout (each expert's
    rows rounded up to 128): b[0] = 0, b[e + 1] = b[e] + round_up(count_e,
    R), R = 128, 8 or 1 (linear, where b = expert_offsets). The offsets are
    checked (non-decreasing from 0)."""
    offsets = _check_offsets(expert_offsets, np.iinfo(np.int64).max, True)
    return _blockscale_offsets(offsets, _layout_rows(resolve_layout(layout=layout))).astype(np.int32)


def _experts_quant(values, x_shape, global_scale, expert_offsets, padded_n, is_sf_swizzled_layout, layout, fmt,
                   validate):
    """The grouped quantizer: values() gives the float32 rows [m, n] (each
    exactly a value of the dtype) once every argument is checked; rows of
    expert e go to scale rows b[e] + (row - o[e])."""
    if len(x_shape) != 2:
        raise ValueError(f"x must be [m, n] (tokens sorted by expert) with expert_offsets, got shape {tuple(x_shape)}")
    tokens, n = x_shape
    padded_n, scale_layout = _check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    offsets = _check_offsets(expert_offsets, tokens, validate)
    experts = offsets.shape[0] - 1
    gs = _expert_scales(global_scale, experts, fmt)
    block = BLOCK_SIZE if fmt == "nvfp4" else 32
    tile_rows = _layout_rows(scale_layout)
    starts = _blockscale_offsets(offsets, tile_rows)
    scale_rows = experts_scale_rows(tokens, experts, scale_layout.name)
    cols = scale_layout.scale_shape(0, padded_n, block)[1]
    scales = np.zeros(scale_rows * cols, np.uint8)
    codes = np.zeros((tokens, padded_n), np.uint8)  # rows outside every expert stay 0x00

    values = values()
    row = np.arange(tokens)
    covered = (row >= offsets[0]) & (row < offsets[-1])
    expert = np.searchsorted(offsets, row, side="right") - 1  # the last e with o[e] <= row: the nonempty one
    rows = row[covered]
    expert = expert[covered]
    if rows.size:
        row_gs = None if gs is None else gs[expert]
        row_codes, row_bytes = _quantize_rows(_padded_rows(values[rows], padded_n), row_gs, fmt)
        codes[rows] = row_codes
        scale_row = starts[expert] + (rows - offsets[expert])
        ks = np.arange(padded_n // block)
        where = scale_offsets(scale_layout, scale_row[:, None], ks[None, :], cols)
        scales[where] = row_bytes
    return _pack_codes(codes), scales.reshape(scale_rows, cols), starts.astype(np.int32)


def scaled_fp4_experts_quant(x, global_scale, expert_offsets, is_sf_swizzled_layout=True, padded_n=None, *,
                             layout=None, fmt="nvfp4", validate=True):
    """Grouped expert quantization (docs/fused_ops.md, section 5.2), vLLM's
    scaled_fp4_experts_quant: x [m, n] holds m tokens sorted by expert,
    expert e owning rows expert_offsets[e]:expert_offsets[e + 1] (int32
    [E + 1], from 0, non-decreasing, at most m; rows from expert_offsets[E]
    on belong to no expert and give 0x00). Expert e is quantized under
    global_scale[e] (float32 [E]; or one scale for all). Its scales form a
    complete scale tensor of round_up(count_e, R) rows starting at scale row
    b[e] = blockscale_offsets(expert_offsets)[e].

    Returns (packed uint8 [m, padded_n / 2], scales uint8
    [experts_scale_rows(m, E), cols], blockscale_offsets int32 [E + 1]).
    validate=False skips the offset checks and uses the sanitized offsets
    of section 5.4 (what the GPU does without a host read)."""
    x, dtype_name, m, n = _check_x(x)
    return _experts_quant(lambda: x.astype(np.float32), x.shape, global_scale, expert_offsets, padded_n,
                          is_sf_swizzled_layout, layout, fmt, validate)


def _masked_quant(values, x_shape, global_scale, expert_counts, padded_n, is_sf_swizzled_layout, layout, fmt,
                  validate):
    if len(x_shape) != 3:
        raise ValueError(f"x must be [E, max_m, n] with expert_counts, got shape {tuple(x_shape)}")
    experts, max_m, n = x_shape
    padded_n, scale_layout = _check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    counts = _check_counts(expert_counts, experts, max_m, validate)
    gs = _expert_scales(global_scale, experts, fmt)
    block = BLOCK_SIZE if fmt == "nvfp4" else 32
    rows = experts * max_m
    row_gs = None if gs is None else np.repeat(gs, max_m)
    codes, scale_bytes = _quantize_rows(_padded_rows(values().reshape(rows, n), padded_n), row_gs, fmt)
    masked = (np.arange(max_m)[None, :] >= counts[:, None]).reshape(rows)
    codes[masked] = 0
    scale_bytes[masked] = 0
    packed = _pack_codes(codes).reshape(experts, max_m, padded_n // 2)
    scale_shape = scale_layout.scale_shape(max_m, padded_n, block)
    scales = np.zeros((experts, *scale_shape), np.uint8)
    for e in range(experts):
        scales[e] = _lay_out_scales(scale_bytes[e * max_m : (e + 1) * max_m], scale_layout, padded_n, block)
    return packed, scales


def scaled_fp4_masked_quant(x, global_scale, expert_counts, is_sf_swizzled_layout=True, padded_n=None, *,
                            layout=None, fmt="nvfp4", validate=True):
    """Masked expert batch (docs/fused_ops.md, section 5.3), FlashInfer's
    scaled_fp4_grouped_quantize: x [E, max_m, n], expert e's valid rows are
    0..expert_counts[e] - 1 (int32 [E], each in [0, max_m]); they are
    quantized under global_scale[e] (float32 [E], or one for all). The
    other rows are not read: their packed bytes and scale bytes are 0x00.
    Returns (packed [E, max_m, padded_n / 2], scales [E, rows, cols]), a
    complete scale tensor per expert (docs/format.md, section 6.3)."""
    x, dtype_name, m, n = _check_x(x)
    return _masked_quant(lambda: x.astype(np.float32), x.shape, global_scale, expert_counts, padded_n,
                         is_sf_swizzled_layout, layout, fmt, validate)


# ---------------------------------------------------------------------------
# Fake quantization (docs/fused_ops.md, section 6)
# ---------------------------------------------------------------------------
ROUNDINGS = ("nearest", "stochastic")


def _check_fake_options(fmt, global_scale, numerics, tile, row_scaled, rounding, seed, offset, mx_scale_rule,
                        four_over_six, e4m3_max, err_mode, err_use_fast_math, rht, global_amax, transform_dtype):
    """The combinations of section 6.4; returns the resolved options."""
    block_size_of_fmt = check_fmt_global_scale(fmt, global_scale)
    numerics = te.check_numerics(numerics, fmt=fmt, tile=tile, row_scaled=row_scaled)
    te._check_te_options(tile, False, row_scaled)
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    e4m3_max, err_mode, fast = te_rht.check_te_options(fmt=fmt, rht=rht, four_over_six=four_over_six,
                                                       e4m3_max=e4m3_max, err_mode=err_mode,
                                                       err_use_fast_math=err_use_fast_math)
    rule = mx_rules.check_mx_scale_rule(mx_scale_rule)
    if fmt == "nvfp4" and rule != "floor":
        raise ValueError(f"mx_scale_rule={rule!r} is an MXFP4 scale rule: it needs fmt='mxfp4'")
    variant = "rht" if rht else "4over6" if four_over_six else numerics
    if variant in ("rht", "4over6"):
        if numerics != "te":
            what = "the random Hadamard transform" if rht else "Four Over Six"
            raise ValueError(f"{what} is TransformerEngine's: it needs numerics='te'")
        if global_scale is not None:
            raise ValueError("with rht=True or four_over_six=True the global scale comes from the global amax: pass "
                             "global_amax (or None to take max |x|), not global_scale")
        if tile != "1x16":
            raise ValueError(f"rht=True and four_over_six=True quantize 1x16 blocks (as TE does), got tile={tile!r}")
        te_rht._check_transform_dtype(transform_dtype)
    elif global_amax is not None:
        raise ValueError("global_amax applies to rht=True and four_over_six=True only; pass global_scale")
    if rounding == "stochastic":
        if fmt != "nvfp4" or variant != "ieee":
            raise ValueError("rounding='stochastic' is defined for fmt='nvfp4' with numerics='ieee' only "
                             "(docs/stochastic_rounding_and_mx_rules.md)")
        seed, offset = stochastic.check_seed_offset(seed, offset)
    elif seed is not None or offset != 0:
        raise ValueError("seed and offset apply to rounding='stochastic' only")
    return dict(block=block_size_of_fmt, variant=variant, rule=rule, e4m3_max=e4m3_max, err_mode=err_mode,
                fast=fast, seed=seed, offset=offset)


def _fake_parts(x, dtype_name, m, n, global_scale, o, tile, row_scaled, global_amax, transform_dtype):
    """-> (codes [m, K], scale bytes [m, K / B], S float32 [m] (None for
    MXFP4)) for the m rows of x flattened, K = round_up(n, B)."""
    block = o["block"]
    k = round_up(n, block)
    x2d = x.reshape(m, n)
    values = _padded_rows(x2d, k)
    variant = o["variant"]
    if variant == "ieee" and o["block"] == 32:  # MXFP4
        codes, scale_bytes = mx_rules.quantize_mx_blocks_rule(values, o["rule"])
        return codes, scale_bytes, None
    if variant == "ieee":
        if global_scale is None:
            global_scale = compute_global_scale(x)
        row_gs, _ = _row_scales(global_scale, x.shape, m)
        if o["seed"] is None:
            codes, scale_bytes = _quantize_rows(values, row_gs, "nvfp4")
        else:
            rand8 = stochastic.group_random_bytes(o["seed"], o["offset"], m, k)
            codes = np.zeros((m, k), np.uint8)
            scale_bytes = np.zeros((m, k // BLOCK_SIZE), np.uint8)
            bits = row_gs.view(np.uint32)
            for pattern in np.unique(bits):
                rows = np.flatnonzero(bits == pattern)
                codes[rows], scale_bytes[rows] = stochastic.quantize_blocks_sr(
                    values[rows], np.uint32(pattern).view(np.float32), rand8[rows])
        return codes, scale_bytes, row_gs
    if variant == "te":
        if global_scale is None:
            global_scale = te.compute_global_scale_te(x, per_row=row_scaled)
        packed, scales = te.scaled_fp4_quant_te(x, global_scale, layout="linear", tile=tile, row_scaled=row_scaled)
        gs = te._scale_array(global_scale, "global_scale").reshape(-1).astype(np.float32)
        if gs.size == 1:
            row_gs = np.full(m, gs[0], np.float32)
        elif row_scaled:  # [m], or [E, rows] for an expert batch: one per row either way
            row_gs = gs
        else:  # per expert, x [E, rows, n]
            row_gs = np.repeat(gs, x.shape[1]).astype(np.float32)
        return unpack_codes(packed.reshape(m, k // 2)), scales.reshape(m, k // BLOCK_SIZE), row_gs
    if variant == "4over6":
        packed, scales, amax = te_4over6.scaled_fp4_quant_4over6(
            x2d, global_amax, layout="linear", err_mode=o["err_mode"], e4m3_max=o["e4m3_max"],
            err_use_fast_math=o["fast"], per_row=row_scaled)
        s_enc = te.encode_scale_from_amax_te(amax, e4m3_max=o["e4m3_max"])
    else:  # rht
        packed, scales, amax = te_rht.scaled_fp4_quant_rht(x2d, global_amax, layout="linear", per_row=row_scaled,
                                                           transform_dtype=transform_dtype)
        s_enc = te.encode_scale_from_amax_te(amax)
    row_gs = np.broadcast_to(s_enc.reshape(-1), (m,)).astype(np.float32) if s_enc.size == 1 else s_enc
    return unpack_codes(packed), scales.reshape(m, k // BLOCK_SIZE), row_gs.astype(np.float32)


def _inverse_rht_rows(y: np.ndarray) -> np.ndarray:
    """float32 [m, K] -> float32 [m, K]: the inverse of te_rht's transform
    (M^-1 = M^T = 0.25 * H16 @ diag(signs)), docs/fused_ops.md section 6.2:
    t = RN(y * 0.25), the same four butterfly stages (partners 1, 2, 4, 8
    apart, (a, b) -> (RN(a + b), RN(a - b))), then element i times sign i."""
    m, k = y.shape
    with np.errstate(all="ignore"):
        u = (y.reshape(-1, te_rht.RHT_SIZE) * np.float32(0.25)).astype(np.float32)
        for half in (1, 2, 4, 8):
            u = u.reshape(-1, te_rht.RHT_SIZE // (2 * half), 2, half)
            low, high = u[:, :, 0, :], u[:, :, 1, :]
            u = np.stack([low + high, low - high], axis=2).astype(np.float32)
        u = u.reshape(-1, te_rht.RHT_SIZE) * te_rht.RHT_SIGNS
    return u.reshape(m, k).astype(np.float32)


def _decode(codes, scale_bytes, row_gs, block: int) -> np.ndarray:
    """float32 [M, K]: RN(RN(e2m1 * sf) / S) per value (NVFP4) or
    RN(e2m1 * 2^(b - 127)) (MXFP4; 0xFF is NaN), docs/format.md section 8."""
    with np.errstate(all="ignore"):
        if row_gs is None:
            scale = scale_bytes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
            return (e2m1_values(codes) * np.repeat(scale, block, axis=1)).astype(np.float32)
        product = (e2m1_values(codes) * np.repeat(e4m3_values(scale_bytes), block, axis=1)).astype(np.float32)
        return (product / row_gs[:, None]).astype(np.float32)


def _fake_setup(x, global_scale, fmt, numerics, tile, row_scaled, rounding, seed, offset, mx_scale_rule,
                four_over_six, e4m3_max, err_mode, err_use_fast_math, rht, global_amax, transform_dtype):
    x, dtype_name, m, n = _check_x(x)
    o = _check_fake_options(fmt, global_scale, numerics, tile, row_scaled, rounding, seed, offset, mx_scale_rule,
                            four_over_six, e4m3_max, err_mode, err_use_fast_math, rht, global_amax, transform_dtype)
    if o["variant"] == "rht":
        te_rht._check_rht_k(n)
    return x, dtype_name, m, n, o


def fake_quantize(x, global_scale=None, *, fmt="nvfp4", numerics="ieee", tile="1x16", row_scaled=False,
                  rounding="nearest", seed=None, offset=0, mx_scale_rule="floor", four_over_six=False, e4m3_max=None,
                  err_mode=None, err_use_fast_math=None, rht=False, global_amax=None, transform_dtype="input"):
    """dequantize(quantize(x)) in x's dtype and shape (docs/fused_ops.md,
    section 6.1): every value decoded as RN(RN(e2m1 * sf) / S) (NVFP4) or
    RN(e2m1 * 2^(b - 127)) (MXFP4), then rounded once to x's dtype, NaN
    canonical. The quantizer is chosen by the options, each the golden model
    of its document:

    - NVFP4 "ieee" (docs/format.md): global_scale as in scaled_fp4_quant (one,
      per row, per expert), None for compute_global_scale(x);
      rounding="stochastic" with seed/offset for stochastic rounding.
    - numerics="te" (docs/te_numerics.md): tile "1x16" or "16x16",
      row_scaled; global_scale is TE's S_enc (None for
      compute_global_scale_te).
    - numerics="te" with four_over_six=True (e4m3_max, err_mode,
      err_use_fast_math) or rht=True (transform_dtype; the result is
      transformed back, section 6.2): global_amax (None for max |x|) instead
      of global_scale.
    - fmt="mxfp4" with mx_scale_rule "floor", "rceil" or "te_pow2"."""
    x, dtype_name, m, n, o = _fake_setup(x, global_scale, fmt, numerics, tile, row_scaled, rounding, seed, offset,
                                         mx_scale_rule, four_over_six, e4m3_max, err_mode, err_use_fast_math, rht,
                                         global_amax, transform_dtype)
    codes, scale_bytes, row_gs = _fake_parts(x, dtype_name, m, n, global_scale, o, tile, row_scaled, global_amax,
                                             transform_dtype)
    values = _decode(codes, scale_bytes, row_gs, o["block"])
    if o["variant"] == "rht":
        values = _inverse_rht_rows(values)
    return _to_dtype(values[:, :n], dtype_name).reshape(x.shape)


def saturation_mask(x, global_scale=None, **options) -> np.ndarray:
    """bool, x's shape: where the quantizer clipped x_i beyond the format's
    range (docs/fused_ops.md, section 6.3). NVFP4 (every numerics): the
    block's scale byte is 0x7E (448, the largest) and |float32(x_i)| >
    RN(2688 / S) (the largest magnitude that block can hold), so every
    +-inf in a valid block. MXFP4: x_i is +-inf (E8M0 reaches 2^127: no
    finite value is beyond MXFP4's range). Refused with rht=True. Options
    as fake_quantize."""
    args = _fake_options(global_scale, options)
    x, dtype_name, m, n, o = _fake_setup(x, **args)
    if o["variant"] == "rht":
        raise ValueError("the saturation mask is not defined with rht=True (it would live in the transformed "
                         "domain); use the plain straight-through gradient")
    v = x.reshape(m, n).astype(np.float32)
    if o["block"] == 32:
        return np.isinf(v).reshape(x.shape)
    _, scale_bytes, row_gs = _fake_parts(x, dtype_name, m, n, args["global_scale"], o, args["tile"],
                                            args["row_scaled"], args["global_amax"], args["transform_dtype"])
    with np.errstate(all="ignore"):
        largest = (np.float32(E2M1_MAX * E4M3_MAX) / row_gs).astype(np.float32)  # RN(2688 / S), 2688 exact
    at_max = np.repeat(scale_bytes == 0x7E, BLOCK_SIZE, axis=1)[:, :n]
    return (at_max & (np.abs(v) > largest[:, None])).reshape(x.shape)


_FAKE_DEFAULTS = dict(fmt="nvfp4", numerics="ieee", tile="1x16", row_scaled=False, rounding="nearest", seed=None,
                      offset=0, mx_scale_rule="floor", four_over_six=False, e4m3_max=None, err_mode=None,
                      err_use_fast_math=None, rht=False, global_amax=None, transform_dtype="input")


def _fake_options(global_scale, options: dict) -> dict:
    unknown = set(options) - set(_FAKE_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; the options are those of fake_quantize")
    return dict(_FAKE_DEFAULTS, **options, global_scale=global_scale)


def fake_quantize_backward(grad, x, global_scale=None, *, zero_saturated=False, **options) -> np.ndarray:
    """The straight-through gradient of fake_quantize (docs/fused_ops.md,
    section 6.3): grad itself (a copy), or with zero_saturated=True +0.0
    where saturation_mask(x, ...) holds. `grad` has x's shape and a supported
    float dtype, and is returned in that dtype. No gradient flows to the
    global scale."""
    grad = np.asarray(grad)
    check_dtype(grad.dtype, "grad")
    x = np.asarray(x)
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    zero_saturated = check_bool(zero_saturated, "zero_saturated")
    if not zero_saturated:
        _fake_setup(x, **_fake_options(global_scale, options))  # the same checks as the forward
        return grad.copy()
    mask = saturation_mask(x, global_scale, **options)
    return np.where(mask, np.zeros((), grad.dtype), grad).astype(grad.dtype)
