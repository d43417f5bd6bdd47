"""Golden model of NVFP4 quantization with stochastic rounding (SR) of the
E2M1 codes: docs/stochastic_rounding_and_mx_rules.md, section 2.

Everything but the rounding of the codes is docs/format.md's default
numerics: the same scale bytes (round-to-nearest E4M3, sections 2 and 3), the
same special cases, the same y = RN(v * r), packing and layouts. Only
step 6's round-to-nearest E2M1 becomes the stochastic rounding of the PTX
instruction cvt.rs.satfinite.e2m1x4.f32, fed by Philox4x32-10:

- Element group g = the index of a 16-value block among all blocks of the
  output, row-major over [rows, padded_n / 16] (rows flattened over experts
  and leading dimensions). Group g draws words (x0, x1, x2, x3) =
  Philox4x32-10(key = (seed lo, seed hi), counter = (offset lo, offset hi,
  g lo, g hi)), philox.sr_words.
- Word x_j feeds one cvt.rs.satfinite.e2m1x4.f32 d, {v3, v2, v1, v0}, x_j for
  the block's values v0..v3 = elements 4j..4j+3 (TE's and torchao's operand
  order, which packs d straight into our nibble order). By the PTX ISA, a (v3)
  takes rbits[31:24], b (v2) rbits[15:8], e (v1) rbits[23:16] and f (v0)
  rbits[7:0]: element 4j + i uses byte (x_j >> RBITS_SHIFT[i]) & 0xFF.
- With that byte R, a = |y| rounds away from zero iff the carry out of
  (the first 8 bits of a's fraction below E2M1's last place) + R is set:
  with u = E2M1's ulp at a (0.5 below 2, 1 below 4, 2 from 4) and
  T = floor(a * 256 / u), the magnitude is ((T + R) >> 8) * u, saturated at 6.

TransformerEngine's pure-Python reference (reference_nvfp4.py, TE 2.20.2)
has no stochastic rounding: SR exists only in TE's CUDA kernels, where the
scales are those of round-to-nearest and only the E2M1 conversion changes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .._format import (
    BLOCK_SIZE,
    E2M1_MAX,
    check_dtype,
    check_int,
    resolve_layout,
    resolve_padded_n,
    rows_and_n,
)
from .nvfp4 import (
    E4M3_NAN_BYTE,
    _global_scale_array,
    _lay_out_scales,
    _pack_codes,
    _padded_rows,
    _scale_blocks,
)
from .philox import sr_words

__all__ = [
    "RBITS_SHIFT",
    "check_seed_offset",
    "cvt_rs_satfinite_e2m1x4",
    "element_random_bytes",
    "group_random_bytes",
    "quantize_blocks_sr",
    "scaled_fp4_quant_sr",
    "sr_e2m1",
]

# Element i (0..3) of a four-value group fed to one cvt.rs.satfinite.e2m1x4.f32
# (as operand f, e, b, a) -> the bit position of its random byte in rbits.
RBITS_SHIFT = (0, 16, 8, 24)
_U64_LIMIT = 1 << 64


def check_seed_offset(seed, offset) -> tuple[int, int]:
    """(seed, offset) as ints in [0, 2^64). SR without a seed is a mistake,
    not a request for fresh entropy: the bytes must be reproducible."""
    if seed is None:
        raise ValueError(
            "stochastic rounding needs a seed: pass seed=<int in [0, 2**64)> (and offset=<int>), so that "
            "the golden model and the GPU draw the same Philox bits and give the same bytes"
        )
    seed, offset = check_int(seed, "seed"), check_int(offset, "offset")
    for name, value in (("seed", seed), ("offset", offset)):
        if not 0 <= value < _U64_LIMIT:
            raise ValueError(f"{name} must be in [0, 2**64), got {name}={value}")
    return seed, offset


def sr_e2m1(y, rand8) -> np.ndarray:
    """E2M1 codes (uint8) of float32 `y` rounded stochastically with the 8
    random bits `rand8` (uint8, same shape), the per-value rule of
    cvt.rs.satfinite: a = |y|, u = 0.5 (a < 2), 1 (a < 4) or 2,
    T = floor(a * 256 / u), magnitude = min(((T + R) >> 8) * u, 6); the sign
    bit is y's (so -0.0 and negatives that round to 0 give 0x8); NaN gives
    0x7 (+6), as satfinite does. Exact values never move (their low 8 bits
    are 0); P(away from zero) = (T & 255) / 256 for uniform R."""
    y, rand = np.broadcast_arrays(np.asarray(y, dtype=np.float32), np.asarray(rand8, dtype=np.uint8))
    rand = rand.astype(np.int64)
    nan = np.isnan(y)
    a = np.where(nan, np.float32(0), np.minimum(np.abs(y), np.float32(E2M1_MAX))).astype(np.float64)
    ulp = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))
    fixed = np.floor(a * (256.0 / ulp)).astype(np.int64)  # a in units of ulp / 256: exact, a has <= 24 bits
    magnitude = np.minimum(((fixed + rand) >> 8) * ulp, E2M1_MAX)
    codes = magnitude.astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    codes = codes | (np.signbit(y).astype(np.uint8) << 3)
    return np.where(nan, np.uint8(7), codes).astype(np.uint8)


def cvt_rs_satfinite_e2m1x4(a, b, e, f, rbits) -> np.ndarray:
    """Emulation of PTX `cvt.rs.satfinite.e2m1x4.f32 d, {a, b, e, f}, rbits`
    (uint16 d, elementwise over arrays): d[15:12] = a, d[11:8] = b,
    d[7:4] = e, d[3:0] = f, each rounded by sr_e2m1 with its rbits byte
    (a: [31:24], b: [15:8], e: [23:16], f: [7:0], the PTX ISA's "upper 8 bits
    of both 16-bit halves for a, b; lower 8 bits for e, f")."""
    rbits = np.asarray(rbits, dtype=np.uint32)
    out = np.zeros(np.broadcast(a, b, e, f, rbits).shape, dtype=np.uint16)
    for value, nibble, shift in ((f, 0, RBITS_SHIFT[0]), (e, 1, RBITS_SHIFT[1]), (b, 2, RBITS_SHIFT[2]),
                                 (a, 3, RBITS_SHIFT[3])):
        byte = ((rbits >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.uint8)
        out |= sr_e2m1(value, byte).astype(np.uint16) << np.uint16(4 * nibble)
    return out


def element_random_bytes(words) -> np.ndarray:
    """uint32 [..., 4] Philox words of element groups -> uint8 [..., 16], the
    random byte of each of a group's 16 elements: element 4j + i takes
    (word j >> RBITS_SHIFT[i]) & 0xFF."""
    words = np.asarray(words, dtype=np.uint32)
    shifts = np.array(RBITS_SHIFT, dtype=np.uint32)
    return ((words[..., :, None] >> shifts) & np.uint32(0xFF)).astype(np.uint8).reshape(words.shape[:-1] + (16,))


def group_random_bytes(seed: int, offset: int, rows: int, padded_n: int, first_row: int = 0) -> np.ndarray:
    """uint8 [rows, padded_n]: each element's random byte, for rows
    first_row.. of an output with padded_n values a row (group
    g = row * padded_n / 16 + k)."""
    blocks = padded_n // BLOCK_SIZE
    groups = np.arange(first_row * blocks, (first_row + rows) * blocks, dtype=np.uint64)
    return element_random_bytes(sr_words(seed, offset, groups)).reshape(rows, padded_n)


def quantize_blocks_sr(values: np.ndarray, global_scale: np.float32,
                       rand8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] and its random bytes (uint8 [m, padded_n]) ->
    (E2M1 codes [m, padded_n], E4M3 scale bytes [m, padded_n // 16]): the
    scale bytes and special cases of nvfp4.quantize_blocks, the codes
    stochastically rounded from the same y = RN(v * r)."""
    y, scale_bytes = _scale_blocks(values, global_scale)  # quantize_blocks' steps 1-5 and special cases
    codes = sr_e2m1(y, rand8.reshape(y.shape))
    codes[scale_bytes == E4M3_NAN_BYTE] = 0  # NaN-scaled blocks (invalid gs, NaN inside): zero codes
    return codes.reshape(values.shape), scale_bytes


def _quantize_rows_sr(values, scales, kind, seed, offset, first_row):
    m, padded_n = values.shape
    rand8 = group_random_bytes(seed, offset, m, padded_n, first_row)
    if kind == "row":
        parts = [quantize_blocks_sr(values[i : i + 1], scales[i], rand8[i : i + 1]) for i in range(m)]
        return (np.concatenate([p[0] for p in parts]).reshape(m, padded_n),
                np.concatenate([p[1] for p in parts]).reshape(m, padded_n // BLOCK_SIZE))
    return quantize_blocks_sr(values, scales[0], rand8)


def scaled_fp4_quant_sr(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, seed=None,
                        offset=0):
    """Golden NVFP4 quantization of `x` [..., n] with stochastic rounding of
    the codes: (packed uint8 [m, padded_n // 2], scales uint8 in the chosen
    layout), or [E, ...] of both for a global scale per expert, exactly as
    reference.scaled_fp4_quant except for the codes. `seed` (required) and
    `offset` are ints in [0, 2^64); the same (x, global_scale, seed, offset)
    always gives the same bytes, and a different seed or offset draws
    independent bits. docs/stochastic_rounding_and_mx_rules.md, section 2."""
    seed, offset = check_seed_offset(seed, offset)
    x = np.asarray(x)
    check_dtype(x.dtype)
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n, BLOCK_SIZE)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    scales, kind = _global_scale_array(global_scale, x.shape)
    if kind == "expert":
        experts, rows = x.shape[0], x.shape[1]
        packed = np.empty((experts, rows, padded_n // 2), np.uint8)
        scale_tensors = np.empty((experts, *scale_layout.scale_shape(rows, padded_n)), np.uint8)
        for e in range(experts):
            codes, scale_bytes = _quantize_rows_sr(_padded_rows(x[e], padded_n), scales[e : e + 1], "one", seed,
                                                   offset, e * rows)
            packed[e], scale_tensors[e] = _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n)
        return packed, scale_tensors
    codes, scale_bytes = _quantize_rows_sr(_padded_rows(x.reshape(m, n), padded_n), scales, kind, seed, offset, 0)
    return _pack_codes(codes), _lay_out_scales(scale_bytes, scale_layout, padded_n)
