"""The golden model: NVFP4 quantization in NumPy and ml_dtypes, defining the
exact bytes every GPU kernel must produce (docs/format.md). Imports and runs
without CuPy, so bytes can be checked on any laptop.

Independent of the kernels: the FP4/FP8 roundings are ml_dtypes casts, the
scale layouts are the docs/format.md offset formulas, and the helpers that undo the
layouts use reshapes instead of those formulas.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .._format import (
    BLOCK_SIZE,
    DEFAULT_DEQUANTIZE_DTYPE,
    E2M1_MAX,
    E4M3_MAX,
    LAYOUTS,
    MX_BLOCK_SIZE,
    NUMPY_DTYPES,
    ScaleLayout,
    block_size_of,
    check_bool,
    check_dtype,
    check_fmt_global_scale,
    check_scales,
    dequantize_shape,
    global_scale_kind,
    host_global_scale,
    resolve_layout,
    resolve_padded_n,
    rows_and_n,
)

__all__ = [
    "scaled_fp4_quant",
    "compute_global_scale",
    "quantize_blocks",
    "quantize_mx_blocks",
    "scale_offsets",
    "unpack_codes",
    "e2m1_values",
    "e4m3_values",
    "unswizzle_scales",
    "dequantize",
]

E4M3_NAN_BYTE = 0x7F
_FLT_MAX = np.float32(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------
# Steps shared with the other golden models (stochastic, mx_rules, te,
# te_rht, te_4over6), so that each formula is written once.
# ---------------------------------------------------------------------------
def _abs_max(values: np.ndarray, axis) -> np.ndarray:
    """max |v| along axis (None: all), in values' dtype, NaN-propagating
    (np.max ignores no NaN, whatever `initial`), 0 over no values: the block
    amax of every format and the amax of every global scale."""
    with np.errstate(all="ignore"):
        return np.max(np.abs(values), axis=axis, initial=np.float32(0))


def _e2m1_codes(y: np.ndarray) -> np.ndarray:
    """E2M1 codes (uint8) of y rounded to nearest even, saturating at +-6,
    sign kept (-0.0 and a negative value that rounds to zero give 0x8).
    ml_dtypes has no rule for NaN that any contract uses: each caller writes
    its own code for a NaN y (ours 0x7, TE's 0x0) or zeroes the block."""
    with np.errstate(all="ignore"):
        return np.clip(y, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def _e4m3_bytes(s: np.ndarray) -> np.ndarray:
    """E4M3 bytes (uint8) of s rounded to nearest even, saturating at +-448:
    ml_dtypes' cast turns overflow into NaN, and every contract here
    saturates (everything >= 448 rounds or saturates to 448). A NaN gives
    0x7F or 0xFF by its sign: each caller writes its own NaN byte."""
    with np.errstate(all="ignore"):
        return np.clip(s, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def _scale_blocks(values: np.ndarray, global_scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """docs/format.md steps 1-5 and the special cases, all but the E2M1
    rounding: float32 [m, padded_n] -> (y = RN(v * r), float32
    [m, padded_n // 16, 16], and the E4M3 scale bytes uint8
    [m, padded_n // 16], 0x7F where the block is NaN-scaled). quantize_blocks
    rounds y to nearest, stochastic.quantize_blocks_sr stochastically; both
    then zero the codes of the 0x7F blocks (no other block gets 0x7F: a
    scale that is not NaN saturates at 448, 0x7E)."""
    m, padded_n = values.shape
    blocks = values.reshape(m, padded_n // BLOCK_SIZE, BLOCK_SIZE)
    gs = np.float32(global_scale)
    with np.errstate(all="ignore"):
        amax = _abs_max(blocks, -1)
        s = gs * (amax / np.float32(E2M1_MAX))
        scale_bytes = _e4m3_bytes(s)
        sf_value = e4m3_values(scale_bytes)
        r = np.where(sf_value == 0, np.float32(0), np.minimum(np.float32(1) / (sf_value / gs), _FLT_MAX))
        y = blocks * r[..., None].astype(np.float32)

    # Special cases, in docs/format.md's order: an invalid global scale NaNs every
    # block; otherwise a block holding a NaN is NaN-scaled (the caller zeroes its codes).
    nan_blocks = np.isnan(amax) if (np.isfinite(gs) and gs > 0) else np.ones_like(amax, dtype=bool)
    scale_bytes[nan_blocks] = E4M3_NAN_BYTE
    return y, scale_bytes


def quantize_blocks(values: np.ndarray, global_scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] -> (E2M1 codes uint8 [m, padded_n], E4M3 scale
    bytes uint8 [m, padded_n // 16]), docs/format.md steps 1-6 and special cases."""
    y, scale_bytes = _scale_blocks(values, global_scale)
    # y is NaN only as inf * 0: a block holding an inf whose sf / gs
    # overflowed, so r = 1 / inf = 0. docs/format.md, section 3: like a
    # satfinite conversion (and the kernels), NaN becomes +6 (code 7).
    codes = np.where(np.isnan(y), np.uint8(7), _e2m1_codes(y))
    codes[scale_bytes == E4M3_NAN_BYTE] = 0
    return codes.reshape(values.shape), scale_bytes


E8M0_NAN_BYTE = 0xFF
_E2M1_EMAX = 2  # 6 = 1.5 * 2^2


def quantize_mx_blocks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] -> (E2M1 codes [m, padded_n], E8M0 scale bytes
    [m, padded_n // 32]) by the OCP MX v1.0 rule: X = 2^(floor(log2(amax)) -
    2), clamped to E8M0's 2^-127..2^127; codes = e2m1(v / X), saturating at
    +-6. A block of zeros gets X = 2^-127 (byte 0); a block holding a NaN or
    an inf gets the NaN scale 0xFF and zero codes."""
    m, padded_n = values.shape
    blocks = values.reshape(m, padded_n // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    with np.errstate(all="ignore"):
        amax = _abs_max(blocks, -1)
        usable = np.isfinite(amax) & (amax > 0)
        _, exponent = np.frexp(np.where(usable, amax, 1).astype(np.float64))  # amax = f * 2^e, f in [0.5, 1)
        scale_bytes = np.where(usable, np.clip(exponent - 1 - _E2M1_EMAX + 127, 0, 254), 0).astype(np.uint8)
        scale = scale_bytes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        codes = _e2m1_codes(blocks / scale[..., None])
    bad = ~np.isfinite(amax)
    scale_bytes[bad] = E8M0_NAN_BYTE
    codes[bad] = 0
    return codes.reshape(m, padded_n), scale_bytes


def scale_offsets(layout: ScaleLayout | str, rows, ks, scale_cols: int) -> np.ndarray:
    """Byte offset of the scale of block `ks` of row `rows` (docs/format.md)."""
    name = layout if isinstance(layout, str) else layout.name
    rows = np.asarray(rows, dtype=np.int64)
    ks = np.asarray(ks, dtype=np.int64)
    if name == "linear":
        return rows * scale_cols + ks
    if name == "swizzled":
        tile = (rows // 128) * (scale_cols // 4) + ks // 4
        return tile * 512 + (rows % 32) * 16 + ((rows // 32) % 4) * 4 + ks % 4
    if name == "8x4":
        tile = (rows // 8) * (scale_cols // 4) + ks // 4
        return tile * 32 + (rows % 8) * 4 + ks % 4
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {name!r}")


def _lay_out_scales(scale_bytes: np.ndarray, layout: ScaleLayout, padded_n: int, block_size: int = BLOCK_SIZE):
    m, blocks = scale_bytes.shape
    shape = layout.scale_shape(m, padded_n, block_size)
    out = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    rows, ks = np.indices((m, blocks))
    out[scale_offsets(layout, rows, ks, shape[1])] = scale_bytes
    return out.reshape(shape)


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _global_scale_array(global_scale, x_shape) -> tuple[np.ndarray, str]:
    """(float32 scales, kind) for a NumPy float32 array standing for a device
    array: taken as is (an invalid value gives the NaN-scale output), its shape
    read by the GPU's rule (_format.global_scale_kind). A host scalar must be
    valid and is kind "one"."""
    if not isinstance(global_scale, np.ndarray):
        return np.array([host_global_scale(global_scale)], np.float32), "one"
    if global_scale.dtype != np.float32:
        raise TypeError(f"global_scale as an array must be float32, got {global_scale.dtype}")
    kind = global_scale_kind(global_scale.shape, x_shape)
    return global_scale.reshape(-1), kind


def scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, fmt="nvfp4"):
    """Golden NVFP4 quantization of `x` [..., n] (float16, bfloat16 or
    float32, NumPy). Returns (packed uint8 [m, padded_n // 2], scales uint8 in
    the chosen layout), the bytes nvfp4_cupy.scaled_fp4_quant must produce.

    `global_scale`: a host float, or a float32 array standing for the GPU's
    device array: one element, one per row (m scales), or with x [E, m, n]
    one per expert, each expert then quantized on its own into packed
    [E, m, padded_n // 2] and scales [E, ...] (a complete scale tensor per
    expert). fmt="mxfp4" quantizes to OCP MXFP4 instead (32-value blocks, E8M0
    scales, global_scale must be None). docs/format.md has the arithmetic."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    block_size = check_fmt_global_scale(fmt, global_scale)
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    if fmt == "mxfp4":
        codes, scale_bytes = quantize_mx_blocks(_padded_rows(x.reshape(m, n), padded_n))
        return _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n, block_size)
    scales, kind = _global_scale_array(global_scale, x.shape)
    if kind == "expert":
        packed = np.empty((x.shape[0], x.shape[1], padded_n // 2), np.uint8)
        scale_tensors = np.empty((x.shape[0], *scale_layout.scale_shape(x.shape[1], padded_n)), np.uint8)
        for e in range(x.shape[0]):
            packed[e], scale_tensors[e] = scaled_fp4_quant(x[e], scales[e : e + 1], padded_n=padded_n,
                                                           layout=scale_layout.name)
        return packed, scale_tensors
    values = _padded_rows(x.reshape(m, n), padded_n)
    if kind == "row":
        rows = [quantize_blocks(values[i : i + 1], scales[i]) for i in range(m)]
        codes = np.concatenate([r[0] for r in rows]).reshape(m, padded_n)
        scale_bytes = np.concatenate([r[1] for r in rows]).reshape(m, padded_n // block_size)
    else:
        codes, scale_bytes = quantize_blocks(values, scales[0])
    return _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n, block_size)


def _padded_rows(rows: np.ndarray, padded_n: int, padded_m: int | None = None) -> np.ndarray:
    """float32 [m, padded_n] (or [padded_m, padded_n]): the rows, then zeros
    for the K padding (and for the padding rows of TE's 16x16 tiles)."""
    values = np.zeros((rows.shape[0] if padded_m is None else padded_m, padded_n), dtype=np.float32)
    values[: rows.shape[0], : rows.shape[1]] = rows.astype(np.float32)
    return values


def compute_global_scale(x, per_row: bool = False) -> np.ndarray:
    """448 * 6 / amax(|x|) as float32 [1] (or [m], one per row): 1.0 where
    amax is 0 (or x is empty), NaN where x holds a NaN, 0.0 where the amax is
    inf (both invalid scales: the quantized blocks come out NaN-scaled), and
    FLT_MAX where the quotient would overflow."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    per_row = check_bool(per_row, "per_row")
    m, n = rows_and_n(x.shape)
    values = x.reshape(m, n).astype(np.float32)
    amax = _abs_max(values, 1 if per_row else None).reshape(-1)  # [m] or [1]
    with np.errstate(all="ignore"):
        gs = np.minimum(np.float32(E4M3_MAX * E2M1_MAX) / amax, _FLT_MAX)
    return np.where(amax == 0, np.float32(1), gs).astype(np.float32)


# ---------------------------------------------------------------------------
# Helpers to read the bytes back.
# ---------------------------------------------------------------------------
def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """uint8 [m, k // 2] -> E2M1 codes uint8 [m, k] (low nibble first)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes (0..15) -> float32 values."""
    return np.asarray(codes, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def e4m3_values(scale_bytes: np.ndarray) -> np.ndarray:
    """E4M3 bytes -> float32 values (0x7F is NaN)."""
    return np.asarray(scale_bytes, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def unswizzle_scales(scales: np.ndarray, m: int, padded_n: int, layout="swizzled", fmt="nvfp4") -> np.ndarray:
    """A scale tensor in `layout` -> row-major uint8 [m, padded_n // block],
    dropping layout padding. Undoes the tiling with reshapes, independently of
    scale_offsets."""
    scale_layout = resolve_layout(layout=layout)
    block_size = block_size_of(fmt)
    rows, cols = scale_layout.scale_shape(m, padded_n, block_size)
    scales = np.asarray(scales, dtype=np.uint8).reshape(rows, cols)
    blocks = padded_n // block_size
    if scale_layout.name == "swizzled":
        # [row tile, col tile, row % 32, (row // 32) % 4, k % 4]
        tiles = scales.reshape(rows // 128, cols // 4, 32, 4, 4)
        scales = tiles.transpose(0, 3, 2, 1, 4).reshape(rows, cols)
    elif scale_layout.name == "8x4":
        tiles = scales.reshape(rows // 8, cols // 4, 8, 4)
        scales = tiles.transpose(0, 2, 1, 3).reshape(rows, cols)
    return np.ascontiguousarray(scales[:m, :blocks])


_CANONICAL_NAN_BITS = {"float16": (np.uint16, 0x7E00), "bfloat16": (np.uint16, 0x7FC0), "float32": (np.uint32, 0x7FC00000)}


def dequantize(packed, scales, global_scale, n=None, *, layout="swizzled", dtype=DEFAULT_DEQUANTIZE_DTYPE,
               fmt="nvfp4"):
    """Bytes back to `dtype` [m, n] (default float32; [E, m, n] for an expert
    batch packed [E, m, K/2]): e2m1 * float(e4m3) / global_scale, each step
    IEEE float32, then one rounding to `dtype` (float16, bfloat16 or float32).
    NaN results are the dtype's canonical quiet NaN. `global_scale` as for
    scaled_fp4_quant (one, one per row, one per expert). For fmt="mxfp4":
    e2m1 * 2^(byte - 127), global_scale None. docs/format.md, Dequantization."""
    packed, scales = np.asarray(packed), np.asarray(scales)
    shape = dequantize_shape(packed.shape, packed.dtype, n, layout, fmt)
    dtype_name = check_dtype(dtype, "dtype")
    check_scales(scales.dtype, scales.shape, shape.scale_shape)
    check_fmt_global_scale(fmt, global_scale)
    if fmt == "mxfp4":
        gs, kind = np.ones(1, np.float32), "one"  # dividing by 1 changes nothing: one formula for both formats
    else:
        gs, kind = _global_scale_array(global_scale, shape.x_shape)
    if shape.experts is not None:
        out = np.empty(shape.out_shape, NUMPY_DTYPES[dtype_name])
        for e in range(shape.experts):
            expert_gs = gs[e : e + 1] if kind == "expert" else gs[e * shape.m : (e + 1) * shape.m] if kind == "row" else gs
            out[e] = dequantize(packed[e], scales[e], None if fmt == "mxfp4" else expert_gs, shape.n, layout=layout,
                                dtype=dtype, fmt=fmt)
        return out
    row_scales = unswizzle_scales(scales, shape.m, shape.padded_n, layout, fmt)
    if fmt == "mxfp4":
        per_element = row_scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    else:
        per_element = e4m3_values(row_scales)
    per_element = np.repeat(per_element, shape.block_size, axis=1)
    divisor = gs.reshape(shape.m, 1) if kind == "row" else gs[0]
    with np.errstate(all="ignore"):
        values = (e2m1_values(unpack_codes(packed)) * per_element / divisor)[:, : shape.n]
        out = values.astype(NUMPY_DTYPES[dtype_name])
    bits_type, nan_bits = _CANONICAL_NAN_BITS[dtype_name]
    out.view(bits_type)[np.isnan(values)] = nan_bits
    return out
