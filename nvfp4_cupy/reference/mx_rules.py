"""Golden model of the MXFP4 scale rules: docs/stochastic_rounding_and_mx_rules.md,
section 3. Each rule turns a 32-value block into one E8M0 scale byte and 32
E2M1 codes; packing and scale layouts are docs/format.md's (sections 4, 5).

- "floor": OCP MX v1.0, X = 2^(floor(log2(amax)) - 2), docs/format.md
  section 9 (reference.nvfp4.quantize_mx_blocks, called, not reimplemented).
  Equals torchao's ScaleCalculationMode.FLOOR on finite data.
- "rceil": X = 2^ceil(log2(RN(amax / 6))), codes = e2m1(RN(v * 2^-e)): the
  rule of cuBLAS's "computing scaling and conversion factors" for UE8M0
  scales, of Blackwell kernels (cvt.rp.satfinite.ue8m0x2.f32) and of torchao's
  ScaleCalculationMode.RCEIL, with torchao's special values (inf block 0xFE,
  NaN block 0xFF with codes 0x3, tiny blocks scaled by 1).
- "te_pow2": TransformerEngine's reference NVFP4 quantizer with
  pow_2_scales=True (1x32 tiles, reference_nvfp4.py: cast_to_e8): the same
  exponent as "rceil", but encode = 1 / 2^e always, and TE's cast_to_fp4x2
  (NaN and -0.0 give code 0x0).

The exponent is the exact ceil(log2(d)) of the float32 d = RN(amax / 6): the
exponent of d, plus one unless d is a power of two. torchao's CPU fallback
and TE's reference compute torch.ceil(torch.log2(d)) in float32, which misses
the + 1 when d lies a few float32 ulps above a power of two 2^k with |k| >= 4
(float32 data only); the exact rule is what the hardware conversion and
torchao's GPU path give.
"""

from __future__ import annotations

import numpy as np

from .._format import E2M1_MAX, MX_BLOCK_SIZE, check_dtype, resolve_layout, resolve_padded_n, rows_and_n
from .nvfp4 import (
    E8M0_NAN_BYTE,
    _abs_max,
    _e2m1_codes,
    _lay_out_scales,
    _pack_codes,
    _padded_rows,
    quantize_mx_blocks,
)
from .te import te_e2m1_codes

__all__ = [
    "MX_SCALE_RULES",
    "E8M0_INF_BYTE",
    "RCEIL_NAN_CODE",
    "ceil_log2",
    "check_mx_scale_rule",
    "quantize_mx_blocks_rule",
    "scaled_mxfp4_quant",
]

MX_SCALE_RULES = ("floor", "rceil", "te_pow2")
E8M0_INF_BYTE = 0xFE  # 2^127: the scale of a block holding +-inf (no NaN) under "rceil" and "te_pow2"
RCEIL_NAN_CODE = 0x3  # torchao's code for every value of a NaN block (its bit-trick cast of the default NaN)
_E8M0_BIAS = 127


def check_mx_scale_rule(rule) -> str:
    if not isinstance(rule, str) or rule not in MX_SCALE_RULES:
        raise ValueError(f"mx_scale_rule must be one of {list(MX_SCALE_RULES)}, got {rule!r}")
    return rule


def ceil_log2(d) -> np.ndarray:
    """Exact ceil(log2(d)) of float32 d >= 0 (float64 array): -inf for 0,
    NaN for NaN, inf for inf. For d = f * 2^k with f in [0.5, 1) (frexp,
    exact in float64 for every float32 including subnormals), it is k - 1
    when f = 0.5 (d a power of two) and k otherwise."""
    d = np.asarray(d, dtype=np.float32).astype(np.float64)
    fraction, exponent = np.frexp(d)
    e = np.where(fraction == 0.5, exponent - 1, exponent).astype(np.float64)
    e = np.where(d == 0, -np.inf, e)
    return np.where(np.isfinite(d), e, d)  # NaN stays NaN, +inf stays +inf


def _scale_exponent(amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d = RN(amax / 6) as float32, e = clamp(ceil(log2(d)), -127, 127) as
    float64, NaN for a NaN amax, 127 for an infinite one)."""
    with np.errstate(all="ignore"):
        descale = (amax / np.float32(E2M1_MAX)).astype(np.float32)
    return descale, np.clip(ceil_log2(descale), -_E8M0_BIAS, _E8M0_BIAS)


def _rceil_blocks(blocks: np.ndarray, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, e = _scale_exponent(amax)
    nan, inf = np.isnan(amax), np.isposinf(amax)
    scale_bytes = np.where(nan, E8M0_NAN_BYTE, np.where(inf, E8M0_INF_BYTE, np.nan_to_num(e) + _E8M0_BIAS))
    scale_bytes = scale_bytes.astype(np.uint8)
    # torchao's reciprocal: 2^(127 - byte), except 1.0 for byte 0 (TE's exp2f_rcp) and 2^-127 for 0xFE.
    exponent = np.where(scale_bytes == 0, 0, _E8M0_BIAS - scale_bytes.astype(np.int64))
    rcp = np.ldexp(np.float32(1), exponent).astype(np.float32)
    with np.errstate(all="ignore"):
        codes = _e2m1_codes(blocks * rcp[..., None])
    codes[nan] = RCEIL_NAN_CODE
    return codes, scale_bytes


def _te_pow2_blocks(blocks: np.ndarray, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, e = _scale_exponent(amax)
    nan = np.isnan(amax)
    scale_bytes = np.where(nan, E8M0_NAN_BYTE, np.nan_to_num(e) + _E8M0_BIAS).astype(np.uint8)
    encode = np.ldexp(np.float32(1), -np.nan_to_num(e).astype(np.int64)).astype(np.float32)  # 1 / 2^e, exact
    with np.errstate(all="ignore"):
        codes = te_e2m1_codes(blocks * encode[..., None])  # TE's cast_to_fp4x2: NaN and -0.0 give 0x0
    codes[nan] = 0
    return codes, scale_bytes


def quantize_mx_blocks_rule(values: np.ndarray, rule: str = "floor") -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] -> (E2M1 codes uint8 [m, padded_n], E8M0 scale
    bytes uint8 [m, padded_n // 32]) under the scale rule `rule`."""
    rule = check_mx_scale_rule(rule)
    if rule == "floor":
        return quantize_mx_blocks(values)
    m, padded_n = values.shape
    blocks = values.reshape(m, padded_n // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    amax = _abs_max(blocks, -1)  # NaN-propagating; +inf if an inf and no NaN
    codes, scale_bytes = (_rceil_blocks if rule == "rceil" else _te_pow2_blocks)(blocks, amax)
    return codes.reshape(m, padded_n), scale_bytes


def scaled_mxfp4_quant(x, mx_scale_rule: str = "floor", is_sf_swizzled_layout=True, padded_n=None, *, layout=None):
    """Golden MXFP4 quantization of `x` [..., n] (float16, bfloat16 or
    float32) under `mx_scale_rule` ("floor", "rceil" or "te_pow2"): (packed
    uint8 [m, padded_n // 2], E8M0 scales uint8 in the chosen layout), our
    byte conventions (docs/format.md, sections 4, 5 and 9). With "floor" the
    bytes equal reference.scaled_fp4_quant(x, None, fmt="mxfp4")."""
    rule = check_mx_scale_rule(mx_scale_rule)
    x = np.asarray(x)
    check_dtype(x.dtype)
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n, MX_BLOCK_SIZE)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    codes, scale_bytes = quantize_mx_blocks_rule(_padded_rows(x.reshape(m, n), padded_n), rule)
    return _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n, MX_BLOCK_SIZE)
