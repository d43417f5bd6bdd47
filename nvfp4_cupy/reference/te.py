"""The golden model of numerics="te": NVFP4 with TransformerEngine's
arithmetic (docs/te_numerics.md), in NumPy and ml_dtypes only.

The bytes equal those of TransformerEngine's NVFP4QuantizerRef
(transformer_engine/pytorch/custom_recipes/reference_nvfp4.py, no RHT, no
4over6, no stochastic rounding), mapped to this library's conventions: packed
uint8 [m, padded_n // 2] with the even element in the low nibble, scale bytes
in our layouts (docs/format.md, sections 4 and 5). Written from the arithmetic
that docs/te_numerics.md states; tests/test_reference_te.py holds it to TE's
own code byte for byte.

What it adds to numerics="ieee" (reference/nvfp4.py):

- the per-block arithmetic (docs/te_numerics.md, section 2): block scale
  RN(amax * RN(S_enc * RN(1/6))), encode factor
  min(RN(1 / RN(sf * RN(1 / S_enc))), FLT_MAX) (so a zero-scale block gets
  FLT_MAX, not 0), -0.0 and NaN products give code 0x0;
- the global encode scale of compute_global_scale_te (section 3): FLT_MAX at
  amax = 0, 1.0 at amax = inf;
- 16x16 tiles (section 4), the columnwise output of x^T (section 5), and
  row-scaled NVFP4 with one global scale per row (section 6).
"""

from __future__ import annotations

import numpy as np

from .._format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    check_bool,
    check_dtype,
    global_scale_kind,
    host_global_scale,
    resolve_layout,
    resolve_padded_n,
    round_up,
    rows_and_n,
)
from .nvfp4 import (
    E4M3_NAN_BYTE,
    _FLT_MAX,
    _abs_max,
    _e2m1_codes,
    _e4m3_bytes,
    _lay_out_scales,
    _pack_codes,
    _padded_rows,
    e4m3_values,
)

__all__ = [
    "NUMERICS",
    "TILES",
    "check_numerics",
    "check_tile",
    "encode_scale_from_amax_te",
    "compute_global_scale_te",
    "te_block_scales",
    "te_e4m3_scales",
    "te_reciprocals",
    "te_e2m1_codes",
    "te_nan_scale_invalid_rows",
    "quantize_blocks_te",
    "scaled_fp4_quant_te",
    "quantize_te",
]

NUMERICS = ("ieee", "te")
# tile name -> rows per tile (every tile is 16 values wide)
TILES = {"1x16": 1, "16x16": 16}

_ONE = np.float32(1)
# RN(1 / 6) = 0x3E2AAAAB: TE folds the 1/6 into the global scale (section 2).
_RECIP_E2M1_MAX = np.float32(_ONE / np.float32(E2M1_MAX))


# ---------------------------------------------------------------------------
# Argument checks (docs/te_numerics.md, section 7). The GPU launchers call the
# same functions, so errors read the same in the golden model and on the GPU.
# ---------------------------------------------------------------------------
def check_tile(tile) -> int:
    """Rows per tile of a tile name: "1x16" -> 1, "16x16" -> 16."""
    if not isinstance(tile, str) or tile not in TILES:
        raise ValueError(f"tile must be one of {list(TILES)}, got {tile!r}")
    return TILES[tile]


def check_numerics(numerics, *, fmt="nvfp4", tile="1x16", columnwise=False, row_scaled=False) -> str:
    """The numerics name, after the checks that combine it with the other
    options: "te" is NVFP4 only; 16x16 tiles, the columnwise output and
    row-scaled NVFP4 are TransformerEngine's and need numerics="te"."""
    if not isinstance(numerics, str) or numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {list(NUMERICS)}, got {numerics!r}")
    check_tile(tile)
    columnwise = check_bool(columnwise, "columnwise")
    row_scaled = check_bool(row_scaled, "row_scaled")
    if numerics == "te" and fmt != "nvfp4":
        raise ValueError(f"numerics='te' is NVFP4 only (TransformerEngine's NVFP4 recipe), got fmt={fmt!r}")
    if numerics == "ieee":
        for name, value, default in (("tile", tile, "1x16"), ("columnwise", columnwise, False),
                                     ("row_scaled", row_scaled, False)):
            if value != default:
                raise ValueError(f"{name}={value!r} is TransformerEngine's NVFP4 recipe: it needs numerics='te'")
    return numerics


def _check_te_options(tile, columnwise, row_scaled) -> tuple[int, bool, bool]:
    tile_rows = check_tile(tile)
    columnwise = check_bool(columnwise, "columnwise")
    row_scaled = check_bool(row_scaled, "row_scaled")
    if row_scaled and tile_rows != 1:
        raise ValueError(f"row_scaled=True supports tile='1x16' only (as in TransformerEngine), got tile={tile!r}")
    return tile_rows, columnwise, row_scaled


# ---------------------------------------------------------------------------
# Global encode scale (docs/te_numerics.md, section 3)
# ---------------------------------------------------------------------------
def encode_scale_from_amax_te(amax, *, e4m3_max=E4M3_MAX) -> np.ndarray:
    """TE's global encode scale S_enc from float32 amax values (any shape):
    RN(e4m3_max * 6 / amax) (2688 / amax), clamped to FLT_MAX (so amax = 0
    gives FLT_MAX), and 1.0 where that is 0 (amax = inf). A NaN amax gives
    NaN. `e4m3_max` is TE's nvfp4_e4m3_max: 448, or 256 for Four Over Six
    (docs/te_rht_and_4over6.md, B.1; te_rht.check_te_options checks it);
    e4m3_max * 6 is exact in float32."""
    amax = np.asarray(amax, dtype=np.float32)
    with np.errstate(all="ignore"):
        scale = np.minimum(np.float32(e4m3_max * E2M1_MAX) / amax, _FLT_MAX)  # np.minimum propagates NaN
    return np.where(scale == 0, _ONE, scale).astype(np.float32)


def compute_global_scale_te(x, per_row: bool = False, *, columnwise: bool = False, per_expert: bool = False):
    """TE's global encode scale(s) of x [..., n] (float16, bfloat16 or
    float32), float32: [1] over the whole tensor; with per_row one per row of
    the flattened [m, n] ([m]), or with columnwise as well one per column
    ([n]: the rows of x^T, TE's columnwise amax of row-scaled NVFP4). Without
    per_row, columnwise changes nothing (the same values). per_expert (x
    [E, m, n]) gives a leading E: [E], [E, m] or [E, n]. Empty sets of values
    have amax 0 (scale FLT_MAX)."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    per_row = check_bool(per_row, "per_row")
    columnwise = check_bool(columnwise, "columnwise")
    per_expert = check_bool(per_expert, "per_expert")
    if per_expert:
        if x.ndim != 3:
            raise ValueError(f"x: per_expert needs x of shape [E, m, n], got shape {x.shape}")
        values = x.astype(np.float32)
        axis = (1, 2) if not per_row else (2 if not columnwise else 1)
        return encode_scale_from_amax_te(_abs_max(values, axis))
    m, n = rows_and_n(x.shape)
    values = x.reshape(m, n).astype(np.float32)
    if not per_row:
        return encode_scale_from_amax_te(_abs_max(values, None).reshape(1))
    return encode_scale_from_amax_te(_abs_max(values, 0 if columnwise else 1))


# ---------------------------------------------------------------------------
# Per-block arithmetic (docs/te_numerics.md, section 2). The steps are
# functions of their own because the RHT and Four Over Six golden models
# (te_rht.py, te_4over6.py) and TE's pow-2 MXFP4 rule (mx_rules.py) run them
# too: Four Over Six builds its two candidates' scales its own way, then
# casts, inverts and rounds them with these same steps.
# ---------------------------------------------------------------------------
def _valid_scale(gs: np.ndarray) -> np.ndarray:
    return np.isfinite(gs) & (gs > 0)


def te_e4m3_scales(decode_scale) -> tuple[np.ndarray, np.ndarray]:
    """TE's cast_to_e4m3 of float32 decode scales: clamp to [-448, 448],
    round to nearest even E4M3 -> (scale bytes uint8, their float32 values).
    A NaN gives 0x7F (TE's reference writes 0x7F or 0xFF, by the NaN's sign:
    docs/te_rht_and_4over6.md, A.6). The bound is E4M3's own 448 whatever
    Four Over Six's e4m3_max: TE clamps with FLOAT8_E4M3_MAX."""
    s = np.asarray(decode_scale, dtype=np.float32)
    scale_bytes = np.where(np.isnan(s), np.uint8(E4M3_NAN_BYTE), _e4m3_bytes(s))
    return scale_bytes, e4m3_values(scale_bytes)


def te_block_scales(block_amax, global_encode_scale) -> tuple[np.ndarray, np.ndarray]:
    """The block scales of TE's basic numerics (1x16 blocks, 16x16 tiles):
    sf = e4m3(min(RN(amax * RN(S_enc * RN(1/6))), FLT_MAX)) -> (scale bytes,
    sf values), as te_e4m3_scales. S_enc broadcasts against block_amax
    ([m, 1] against [m, K // 16])."""
    with np.errstate(all="ignore"):
        multiplier = np.asarray(global_encode_scale, np.float32) * _RECIP_E2M1_MAX  # RN(S_enc * RN(1/6))
        s = np.minimum(np.asarray(block_amax, np.float32) * multiplier, _FLT_MAX)  # NaN stays NaN
    return te_e4m3_scales(s)


def te_reciprocals(sf_values, global_encode_scale) -> np.ndarray:
    """TE's encode factor of each block: r = min(RN(1 / RN(sf * RN(1 / S_enc))),
    FLT_MAX), so a zero-scale block gets FLT_MAX (1 / 0 = inf, clamped), not
    0 as in numerics="ieee"; a NaN sf gives a NaN r (and so codes 0x0)."""
    with np.errstate(all="ignore"):
        s_dec = _ONE / np.asarray(global_encode_scale, np.float32)  # RN(1 / S_enc)
        return np.minimum(_ONE / (np.asarray(sf_values, np.float32) * s_dec), _FLT_MAX).astype(np.float32)


def te_e2m1_codes(y) -> np.ndarray:
    """TE's cast_to_fp4x2 of y = RN(v * r): clamp to [-6, 6], round to
    nearest even E2M1, but code 0x0 for an exact zero of either sign and for
    NaN: TE tests x < -0.0 for the negative codes, and NaN passes no test (a
    negative value that rounds to zero still gives 0x8)."""
    y = np.asarray(y)
    return np.where((y == 0) | np.isnan(y), np.uint8(0), _e2m1_codes(y))


def te_nan_scale_invalid_rows(codes: np.ndarray, scale_bytes: np.ndarray, global_encode_scale) -> None:
    """In place: every row whose S_enc ([1] for all rows, or one per row) is
    not finite and > 0 (NaN, +-inf, 0, negative: possible only from a device
    array or a given amax) gets scale 0x7F and codes 0x0 (section 2.1,
    case 1). codes and scale_bytes hold the rows on their first axis."""
    invalid = ~_valid_scale(np.asarray(global_encode_scale, np.float32).reshape(-1))
    rows = np.broadcast_to(invalid, (scale_bytes.shape[0],))
    scale_bytes[rows] = E4M3_NAN_BYTE
    codes[rows] = 0


def quantize_blocks_te(values: np.ndarray, global_encode_scale, tile: str = "1x16") -> tuple[np.ndarray, np.ndarray]:
    """float32 [m, padded_n] -> (E2M1 codes uint8 [m, padded_n], E4M3 scale
    bytes uint8 [m, padded_n // 16]) by TE's arithmetic.

    `global_encode_scale`: S_enc, one float32 for all rows or an [m] array
    (one per row, tile "1x16" only). Its value is not checked: an S_enc that
    is NaN, +-inf, 0 or negative NaN-scales its rows (scale 0x7F, codes 0x0).
    With tile="16x16", m must be a multiple of 16 (the caller pads rows with
    zeros) and each row holds its tile's scale byte: the scale of tile
    (i // 16, k) is at every row i of the tile, as TE stores it."""
    values = np.asarray(values)
    if values.dtype != np.float32 or values.ndim != 2 or values.shape[1] % BLOCK_SIZE:
        raise ValueError(f"values must be float32 [m, padded_n] with padded_n a multiple of 16, got "
                         f"{values.dtype} {values.shape}")
    tile_rows = check_tile(tile)
    m, padded_n = values.shape
    if m % tile_rows:
        raise ValueError(f"values: tile={tile!r} needs rows padded to a multiple of {tile_rows}, got {m}")
    gs = np.asarray(global_encode_scale, dtype=np.float32).reshape(-1)
    if gs.size == 1:
        gs = np.full(m, gs[0], np.float32)
    elif gs.size != m or tile_rows != 1:
        raise ValueError(f"global_encode_scale must hold 1 value, or one per row for tile='1x16', got {gs.size} "
                         f"for {m} rows with tile={tile!r}")
    blocks = values.reshape(m, padded_n // BLOCK_SIZE, BLOCK_SIZE)
    amax = _abs_max(blocks, -1)  # [m, kb]
    if tile_rows > 1:  # one amax per 16x16 tile, repeated on its 16 rows
        tile_amax = amax.reshape(m // tile_rows, tile_rows, padded_n // BLOCK_SIZE).max(axis=1)
        amax = np.repeat(tile_amax, tile_rows, axis=0)
    g = gs[:, None]
    # A block whose s is NaN (a NaN inside, or a NaN S_enc) comes out 0x7F
    # with codes 0x0 through these steps: its sf, r and y are NaN.
    scale_bytes, sf_values = te_block_scales(amax, g)
    with np.errstate(all="ignore"):
        codes = te_e2m1_codes(blocks * te_reciprocals(sf_values, g)[..., None])
    te_nan_scale_invalid_rows(codes, scale_bytes, gs)
    return codes.reshape(m, padded_n), scale_bytes


# ---------------------------------------------------------------------------
# scaled_fp4_quant_te: layout, padding, tiles, columnwise, row-scaled, experts
# ---------------------------------------------------------------------------
def _scale_array(value, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        return np.array([host_global_scale(value)], np.float32)
    if value.dtype != np.float32:
        raise TypeError(f"{name} as an array must be float32, got {value.dtype}")
    return value


def _resolve_scales(x_shape, global_scale, global_scale_t, columnwise, row_scaled):
    """(kind, scales, scales_t): kind "one", "expert", "row" or "expert_row"
    (docs/te_numerics.md, section 7); scales_t None without columnwise."""
    m, n = rows_and_n(x_shape)
    if global_scale_t is not None and not columnwise:
        raise ValueError("global_scale_t is the global scale of the columnwise output: it needs columnwise=True")
    if row_scaled:
        if not isinstance(global_scale, np.ndarray):
            raise ValueError("row_scaled=True needs one global scale per row: a float32 array of shape [m] "
                             f"(m={m}), from compute_global_scale_te(x, per_row=True), got {global_scale!r}")
        scales = _scale_array(global_scale, "global_scale")
        if len(x_shape) == 3 and scales.shape == tuple(x_shape[:2]):
            kind, rows_t = "expert_row", (x_shape[0], x_shape[2])
        elif scales.shape == (m,):
            kind, rows_t = "row", (n,)
        else:
            raise ValueError(f"global_scale for row_scaled=True must have shape [m] (rows of x flattened) or, for an "
                             f"expert batch x [E, m, n], [E, m]; got shape {scales.shape} for x of shape "
                             f"{tuple(x_shape)}")
        if not columnwise:
            return kind, scales, None
        if global_scale_t is None:
            raise ValueError("row_scaled=True with columnwise=True needs global_scale_t, one scale per column of x "
                             f"(shape {list(rows_t)}): compute_global_scale_te(x, per_row=True, columnwise=True"
                             f"{', per_expert=True' if kind == 'expert_row' else ''})")
        if not isinstance(global_scale_t, np.ndarray):
            raise ValueError(f"global_scale_t for row_scaled=True must be a float32 array of shape {list(rows_t)}, "
                             f"got {global_scale_t!r}")
        scales_t = _scale_array(global_scale_t, "global_scale_t")
        if scales_t.shape != rows_t:
            raise ValueError(f"global_scale_t for row_scaled=True must have shape {list(rows_t)} (one per column of "
                             f"x{', per expert' if kind == 'expert_row' else ''}), got shape {scales_t.shape}")
        return kind, scales, scales_t
    scales = _scale_array(global_scale, "global_scale")
    kind = "one" if not isinstance(global_scale, np.ndarray) else global_scale_kind(scales.shape, tuple(x_shape))
    if kind == "row":
        raise ValueError(f"global_scale of shape {scales.shape} is one per row: that is row-scaled NVFP4, pass "
                         "row_scaled=True (numerics='te' has no other per-row scale)")
    scales = scales.reshape(-1)
    if not columnwise:
        return kind, scales, None
    if global_scale_t is None:
        return kind, scales, scales  # TE's columnwise amax is the same values' amax
    scales_t = _scale_array(global_scale_t, "global_scale_t")
    kind_t = "one" if not isinstance(global_scale_t, np.ndarray) else global_scale_kind(scales_t.shape,
                                                                                        tuple(x_shape),
                                                                                        "global_scale_t")
    if kind_t != kind:
        raise ValueError(f"global_scale_t must have the form of global_scale ({kind} scale), got shape "
                         f"{scales_t.shape} for x of shape {tuple(x_shape)}")
    return kind, scales, scales_t.reshape(-1)


def _quantize_matrix(matrix: np.ndarray, gs: np.ndarray, padded_k: int, tile_rows: int, scale_layout):
    """One 2-D matrix [rows, k] -> (packed [rows, padded_k // 2], scales in
    the layout): zero padding to padded_k columns and, for 16x16 tiles, to
    whole tiles of rows; the pad rows are dropped again."""
    rows = matrix.shape[0]
    values = _padded_rows(matrix, padded_k, round_up(rows, tile_rows))
    codes, scale_bytes = quantize_blocks_te(values, gs, "1x16" if tile_rows == 1 else "16x16")
    return _pack_codes(codes[:rows]), _lay_out_scales(scale_bytes[:rows], scale_layout, padded_k)


def scaled_fp4_quant_te(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                        tile="1x16", columnwise=False, row_scaled=False, global_scale_t=None):
    """Golden NVFP4 quantization of x [..., n] with numerics="te"
    (docs/te_numerics.md): TE's NVFP4QuantizerRef bytes in our conventions.

    `global_scale` is the encode scale S_enc (compute_global_scale_te): a host
    float or a float32 array of one element; [E] for an expert batch x
    [E, m, n]; with row_scaled=True, one per row: [m], or [E, m] for an
    expert batch. Returns (packed uint8 [m, padded_n // 2], scales in the
    layout), with [E, ...] for an expert batch.

    tile="16x16": one scale per 16x16 tile, repeated on each of its rows.
    columnwise=True also quantizes x^T (per expert for an expert batch) and
    returns (packed, scales, packed_t, scales_t): packed_t uint8
    [n, round_up(m, 16) // 2], scales_t in the same layout for n rows.
    `global_scale_t` is x^T's global scale; by default global_scale (the same
    values' amax); with row_scaled=True it is required, one per column of x
    ([n], or [E, n])."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    tile_rows, columnwise, row_scaled = _check_te_options(tile, columnwise, row_scaled)
    m, n = rows_and_n(x.shape)
    padded_n = resolve_padded_n(n, padded_n, BLOCK_SIZE)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    kind, scales, scales_t = _resolve_scales(x.shape, global_scale, global_scale_t, columnwise, row_scaled)

    if kind in ("expert", "expert_row"):
        experts, m = x.shape[0], x.shape[1]
        padded_m = round_up(m, BLOCK_SIZE)
        outputs = [np.empty((experts, m, padded_n // 2), np.uint8),
                   np.empty((experts, *scale_layout.scale_shape(m, padded_n)), np.uint8)]
        if columnwise:
            outputs += [np.empty((experts, n, padded_m // 2), np.uint8),
                        np.empty((experts, *scale_layout.scale_shape(n, padded_m)), np.uint8)]
        for e in range(experts):
            gs_e = scales[e] if kind == "expert_row" else scales[e : e + 1]
            results = _quantize_one(x[e].reshape(m, n), gs_e, padded_n, tile_rows, scale_layout,
                                    None if scales_t is None else
                                    scales_t[e] if kind == "expert_row" else scales_t[e : e + 1])
            for out, result in zip(outputs, results):
                out[e] = result
        return tuple(outputs)
    return _quantize_one(x.reshape(m, n), scales, padded_n, tile_rows, scale_layout, scales_t)


def _quantize_one(matrix, scales, padded_n, tile_rows, scale_layout, scales_t):
    packed, scale_tensor = _quantize_matrix(matrix, scales, padded_n, tile_rows, scale_layout)
    if scales_t is None:
        return packed, scale_tensor
    padded_m = round_up(matrix.shape[0], BLOCK_SIZE)
    packed_t, scale_tensor_t = _quantize_matrix(matrix.T, scales_t, padded_m, tile_rows, scale_layout)
    return packed, scale_tensor, packed_t, scale_tensor_t


def quantize_te(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, tile="1x16", columnwise=False,
                row_scaled=False):
    """compute_global_scale_te then scaled_fp4_quant_te, as TE's quantizer
    does in one call: returns (packed, scales, global_scale), and with
    columnwise=True (packed, scales, global_scale, packed_t, scales_t,
    global_scale_t). row_scaled=True gives one global scale per row ([m])
    and, for x^T, one per column of x ([n]). A 3-D x flattens into rows."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    _, columnwise, row_scaled = _check_te_options(tile, columnwise, row_scaled)
    gs = compute_global_scale_te(x, per_row=row_scaled)
    gs_t = compute_global_scale_te(x, per_row=row_scaled, columnwise=True) if columnwise else None
    flat = x.reshape(rows_and_n(x.shape))  # one tensor: a 3-D x is not an expert batch here
    results = scaled_fp4_quant_te(flat, gs, is_sf_swizzled_layout, padded_n, layout=layout, tile=tile,
                                  columnwise=columnwise, row_scaled=row_scaled, global_scale_t=gs_t)
    if not columnwise:
        return results[0], results[1], gs
    return results[0], results[1], gs, results[2], results[3], gs_t
