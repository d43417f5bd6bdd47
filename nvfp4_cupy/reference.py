"""The golden model: NVFP4 quantization in NumPy and ml_dtypes, defining the
exact bytes every GPU kernel must produce (DESIGN.md). Imports and runs
without CuPy, so bytes can be checked on any laptop.

Independent of the kernels: the FP4/FP8 roundings are ml_dtypes casts, the
scale layouts are the DESIGN.md offset formulas, and the helpers that undo the
layouts use reshapes instead of those formulas.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ._format import (
    BLOCK_SIZE,
    MX_BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    LAYOUTS,
    ScaleLayout,
    block_size_of,
    check_dtype,
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


def quantize_blocks(values: np.ndarray, global_scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] -> (E2M1 codes uint8 [m, padded_n], E4M3 scale
    bytes uint8 [m, padded_n // 16]), DESIGN.md steps 1-6 and special cases."""
    m, padded_n = values.shape
    blocks = values.reshape(m, padded_n // BLOCK_SIZE, BLOCK_SIZE)
    gs = np.float32(global_scale)
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)  # NaN-propagating
        s = gs * (amax / np.float32(E2M1_MAX))
        # ml_dtypes' cast rounds to nearest even but turns overflow into NaN;
        # the contract saturates, and everything >= 448 rounds or saturates to 448.
        sf = np.minimum(s, np.float32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)
        sf_value = sf.astype(np.float32)
        r = np.where(sf_value == 0, np.float32(0), np.minimum(np.float32(1) / (sf_value / gs), _FLT_MAX))
        y = blocks * r[..., None].astype(np.float32)
        codes = np.clip(y, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
        # y is NaN only as inf * 0: a block holding an inf whose sf / gs
        # overflowed, so r = 1 / inf = 0. DESIGN.md is silent; like a
        # satfinite conversion (and the kernels), NaN becomes +6 (code 7).
        codes = np.where(np.isnan(y), np.uint8(7), codes)
    scale_bytes = sf.view(np.uint8).copy()

    # Special cases, in DESIGN.md's order: an invalid global scale NaNs every
    # block; otherwise a block holding a NaN is NaN-scaled with zero codes.
    nan_blocks = np.isnan(amax) if (np.isfinite(gs) and gs > 0) else np.ones_like(amax, dtype=bool)
    scale_bytes[nan_blocks] = E4M3_NAN_BYTE
    codes = codes.copy()
    codes[nan_blocks] = 0
    return codes.reshape(m, padded_n), scale_bytes


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
        amax = np.max(np.abs(blocks), axis=-1)
        usable = np.isfinite(amax) & (amax > 0)
        _, exponent = np.frexp(np.where(usable, amax, 1).astype(np.float64))  # amax = f * 2^e, f in [0.5, 1)
        scale_bytes = np.where(usable, np.clip(exponent - 1 - _E2M1_EMAX + 127, 0, 254), 0).astype(np.uint8)
        scale = scale_bytes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        y = blocks / scale[..., None]
        codes = np.clip(y, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8).copy()
    bad = ~np.isfinite(amax)
    scale_bytes[bad] = E8M0_NAN_BYTE
    codes[bad] = 0
    return codes.reshape(m, padded_n), scale_bytes


def scale_offsets(layout: ScaleLayout | str, rows, ks, scale_cols: int) -> np.ndarray:
    """Byte offset of the scale of block `ks` of row `rows` (DESIGN.md)."""
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


def _global_scale_value(global_scale) -> np.float32:
    """A float32 ndarray of one element stands for a device array: taken as is,
    and an invalid value gives the NaN-scale output. Anything else is a host
    scalar and must be valid."""
    if isinstance(global_scale, np.ndarray):
        if global_scale.dtype != np.float32 or global_scale.size != 1:
            raise ValueError(
                "global_scale as an array must be float32 with one element, got "
                f"dtype {global_scale.dtype} shape {global_scale.shape}"
            )
        return global_scale.reshape(())[()]
    return host_global_scale(global_scale)


def _is_per_expert(x: np.ndarray, global_scale) -> bool:
    """The GPU function's rule: x [E, m, n] with a 1-D float32 array of E scales."""
    return (
        isinstance(global_scale, np.ndarray)
        and global_scale.dtype == np.float32
        and x.ndim == 3
        and global_scale.ndim == 1
        and global_scale.shape[0] == x.shape[0]
    )


def scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, fmt="nvfp4"):
    """Golden NVFP4 quantization of `x` [..., n] (float16, bfloat16 or
    float32, NumPy). Returns (packed uint8 [m, padded_n // 2], scales uint8 in
    the chosen layout), the bytes nvfp4_cupy.scaled_fp4_quant must produce.

    With x [E, m, n] and a float32 array of E global scales, each expert is
    quantized on its own: packed [E, m, padded_n // 2], scales [E, ...] with a
    complete scale tensor per expert. A float32 array of m scales gives each
    row its own. fmt="mxfp4" quantizes to OCP MXFP4 instead (32-value blocks,
    E8M0 scales, global_scale must be None)."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    block_size = block_size_of(fmt)
    if fmt == "mxfp4" and global_scale is not None:
        raise ValueError(f"global_scale must be None for fmt='mxfp4' (MX has no global scale), got {global_scale!r}")
    if fmt == "nvfp4" and _is_per_expert(x, global_scale):
        results = [
            scaled_fp4_quant(x[e], global_scale[e : e + 1], is_sf_swizzled_layout, padded_n, layout=layout)
            for e in range(x.shape[0])
        ]
        if results:
            return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])
        m, n = x.shape[1:]
        padded_n = resolve_padded_n(n, padded_n)
        scale_shape = resolve_layout(is_sf_swizzled_layout, layout).scale_shape(m, padded_n)
        return np.zeros((0, m, padded_n // 2), np.uint8), np.zeros((0, *scale_shape), np.uint8)
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    values = np.zeros((m, padded_n), dtype=np.float32)
    values[:, :n] = x.reshape(m, n).astype(np.float32)
    if fmt == "mxfp4":
        codes, scale_bytes = quantize_mx_blocks(values)
    elif _is_per_row(global_scale, m):
        rows = [quantize_blocks(values[i : i + 1], global_scale[i]) for i in range(m)]
        codes = np.concatenate([r[0] for r in rows])
        scale_bytes = np.concatenate([r[1] for r in rows])
    else:
        codes, scale_bytes = quantize_blocks(values, _global_scale_value(global_scale))
    return _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n, block_size)


def _is_per_row(global_scale, m: int) -> bool:
    """One float32 scale per row (per token), as a 1-D array of length m > 1."""
    return (
        isinstance(global_scale, np.ndarray)
        and global_scale.dtype == np.float32
        and global_scale.ndim == 1
        and global_scale.shape[0] == m > 1
    )


def compute_global_scale(x, per_row: bool = False) -> np.ndarray:
    """448 * 6 / amax(|x|) as float32 [1] (or [m], one per row): 1.0 where
    amax is 0 (or x is empty), NaN where x holds a NaN, 0.0 where the amax is
    inf (both invalid scales: the quantized blocks come out NaN-scaled), and
    FLT_MAX where the quotient would overflow."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    m, n = rows_and_n(x.shape)
    values = x.reshape(m, n).astype(np.float32)
    with np.errstate(all="ignore"):
        if per_row:
            amax = np.max(np.abs(values), axis=1, initial=0.0) if n else np.zeros(m, np.float32)
        else:
            amax = np.array([np.max(np.abs(values), initial=0.0) if values.size else 0.0], np.float32)
        # np.max with initial=0 ignores nothing: a NaN still propagates.
        gs = np.minimum(np.float32(E4M3_MAX * E2M1_MAX) / amax.astype(np.float32), _FLT_MAX)
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


def dequantize(packed, scales, global_scale, n=None, *, layout="swizzled", dtype=np.float32, fmt="nvfp4"):
    """Bytes back to `dtype` [m, n]: e2m1 * float(e4m3) / global_scale, each
    step IEEE float32, then one rounding to `dtype` (float16, bfloat16 or
    float32). NaN results are the dtype's canonical quiet NaN. `global_scale`
    as for scaled_fp4_quant, including one float32 scale per row. For
    fmt="mxfp4": e2m1 * 2^(byte - 127), global_scale None."""
    packed, scales = np.asarray(packed), np.asarray(scales)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"packed must be uint8 [m, padded_n // 2], got {packed.dtype} {packed.shape}")
    m, padded_n = packed.shape[0], packed.shape[1] * 2
    block_size = block_size_of(fmt)
    if padded_n == 0 or padded_n % block_size:
        raise ValueError(f"packed has {padded_n} values a row, not a positive multiple of {block_size}")
    n = padded_n if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 < n <= padded_n:
        raise ValueError(f"n must be an int in [1, {padded_n}], got {n!r}")
    dtype_name = check_dtype(dtype, "dtype")
    scale_shape = resolve_layout(layout=layout).scale_shape(m, padded_n, block_size)
    if scales.dtype != np.uint8 or scales.shape != scale_shape:
        raise ValueError(f"scales must be uint8 of shape {scale_shape}, got {scales.dtype} {scales.shape}")
    row_scales = unswizzle_scales(scales, m, padded_n, layout, fmt)
    if fmt == "mxfp4":
        per_element = np.repeat(row_scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float32), block_size, axis=1)
        gs = np.float32(1)  # dividing by 1 changes nothing: one formula for both formats
    else:
        per_element = np.repeat(e4m3_values(row_scales), block_size, axis=1)
        gs = global_scale.reshape(m, 1) if _is_per_row(global_scale, m) else _global_scale_value(global_scale)
    with np.errstate(all="ignore"):
        values = (e2m1_values(unpack_codes(packed)) * per_element / gs)[:, :n]
        out = values.astype(ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.dtype(dtype_name))
    bits_type, nan_bits = _CANONICAL_NAN_BITS[dtype_name]
    out.view(bits_type)[np.isnan(values)] = nan_bits
    return out
