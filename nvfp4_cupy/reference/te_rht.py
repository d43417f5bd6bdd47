"""TransformerEngine's random Hadamard transform (RHT) before NVFP4
quantization, in NumPy and ml_dtypes: the golden model of
docs/te_rht_and_4over6.md, part A.

TE applies a fixed 16-point transform, `y = x @ M` with
`M = 0.25 * diag(RHT_SIGNS) @ H16` (H16 the Sylvester Hadamard matrix), to
each 16-value chunk of the columnwise operand (x transposed, so that the
chunks run along the GEMM's reduction dimension, the wgrad GEMM's tokens),
takes the global amax after the transform and quantizes the result with
TE's NVFP4 numerics. We sum the transform in float32 in a defined order (a
four-stage butterfly, docs/te_rht_and_4over6.md, section A.2) and round it
to the input dtype, as TE does (its Python reference runs a matmul in the
input dtype; its GPU kernel rounds its float32 accumulators to bfloat16);
transform_dtype="float32" keeps the float32 sums instead. TE's order of
summation is not ours, so a few bytes differ from TE's reference, in
explained places (section A.6).

Public:
- RHT_SIGNS, hadamard_matrix(): TE's sign vector and the 16x16 transform.
- rht(x): the transform of x [..., K] along K, float32, our order.
- rht_global_amax(x, per_row=False): the amax TE takes after the transform.
- scaled_fp4_quant_rht(x, ...): x [..., K] already oriented with K last:
  RHT along K, then TE numerics. Returns (packed, scales, global_amax).
- scaled_fp4_quant_rht_columnwise(x, ...): TE's columnwise operand of
  x [..., N]: flattened to [M, N], transposed to [N, M], the same call.
- check_te_options(...): which combinations of the TE variants are defined.

TE's basic numerics after the transform are reference/te.py's
(quantize_blocks_te, encode_scale_from_amax_te); this module adds only the
global-amax convention shared with Four Over Six (_resolve_global_amax,
_quantize_te_rows). No torch here: TE's code is only the tests' oracle
(tests/te_oracle.py).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._format import (
    E4M3_MAX,
    NUMPY_DTYPES,
    block_size_of,
    check_bool,
    check_dtype,
    check_int,
    global_scale_kind,
    resolve_layout,
    resolve_padded_n,
    rows_and_n,
)
from .nvfp4 import _abs_max, _lay_out_scales, _pack_codes, _padded_rows
from .te import encode_scale_from_amax_te, quantize_blocks_te

__all__ = [
    "RHT_SIZE",
    "TRANSFORM_DTYPES",
    "RHT_SIGNS",
    "hadamard_matrix",
    "rht",
    "rht_global_amax",
    "scaled_fp4_quant_rht",
    "scaled_fp4_quant_rht_columnwise",
    "check_te_options",
]

RHT_SIZE = 16
# TE's fixed "random" signs (transformer_engine.pytorch.tensor.nvfp4_tensor.
# get_wgrad_sign_vector, the same vector in custom_recipes/reference_nvfp4):
# sign i multiplies input element i of each 16-value chunk.
RHT_SIGNS = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=np.float32)
RHT_SIGNS.setflags(write=False)
_RHT_SCALE = np.float32(0.25)  # 1 / sqrt(16), exact
_TERMS = RHT_SIGNS * _RHT_SCALE  # +-0.25: element i's factor before the butterfly
E4M3_MAX_CHOICES = (448, 256)
ERR_MODES = ("MAE", "MSE")


# ---------------------------------------------------------------------------
# The transform (docs/te_rht_and_4over6.md, sections A.1 and A.2).
# ---------------------------------------------------------------------------
def hadamard_matrix(signed: bool = True) -> np.ndarray:
    """float32 [16, 16] M with y = x @ M for each 16-value chunk x:
    0.25 * diag(RHT_SIGNS) @ H16, H16 by Sylvester's construction
    (H_2n = [[H, H], [H, -H]]). Every entry is +-0.25; M is orthogonal and
    symmetric without the signs. `signed=False` leaves the signs out."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < RHT_SIZE:
        h = np.block([[h, h], [h, -h]])
    if check_bool(signed, "signed"):
        h = RHT_SIGNS[:, None] * h
    return (h * _RHT_SCALE).astype(np.float32)


def _rht_rows(values: np.ndarray) -> np.ndarray:
    """float32 [m, K] (K % 16 == 0) -> float32 [m, K]: each 16-value chunk
    transformed in our order: t_i = RN(x_i * (+-0.25)), then four butterfly
    stages (partners 1, 2, 4, 8 apart), each (a, b) -> (RN(a + b), RN(a - b)).
    Output j is thus a balanced pairwise sum over i in index order of
    t_i * H16[i, j]."""
    m, k = values.shape
    with np.errstate(all="ignore"):
        u = values.reshape(-1, RHT_SIZE) * _TERMS
        for half in (1, 2, 4, 8):
            u = u.reshape(-1, RHT_SIZE // (2 * half), 2, half)
            low, high = u[:, :, 0, :], u[:, :, 1, :]
            u = np.stack([low + high, low - high], axis=2)
    return u.reshape(m, k).astype(np.float32, copy=False)


def _check_rht_k(k: int, what: str = "x's last dimension K") -> None:
    if k <= 0 or k % RHT_SIZE:
        raise ValueError(
            f"the random Hadamard transform works on whole 16-value chunks: {what} must be a positive "
            f"multiple of 16, got {k} (TE refuses it too; pad the tensor with zeros yourself if you mean to)"
        )


TRANSFORM_DTYPES = ("input", "float32")


def _check_transform_dtype(transform_dtype) -> str:
    if not isinstance(transform_dtype, str) or transform_dtype not in TRANSFORM_DTYPES:
        raise ValueError(f"transform_dtype must be 'input' (round the transform to x's dtype, as TE does) or "
                         f"'float32' (keep it in float32), got {transform_dtype!r}")
    return transform_dtype


def _transform(x2d: np.ndarray, dtype_name: str, transform_dtype: str) -> np.ndarray:
    """float32 [m, K]: the transform of the rows of x2d, rounded to x's
    dtype (round to nearest even, overflow to +-inf) for "input"."""
    transformed = _rht_rows(x2d.astype(np.float32))
    if transform_dtype == "input" and dtype_name != "float32":
        with np.errstate(all="ignore"):
            transformed = transformed.astype(NUMPY_DTYPES[dtype_name]).astype(np.float32)
    return transformed


def rht(x, transform_dtype: str = "input") -> np.ndarray:
    """TE's 16-point RHT of x [..., K] (float16, bfloat16 or float32, K a
    multiple of 16) along its last dimension: summed in float32 in our order
    (docs/te_rht_and_4over6.md, section A.2), then rounded to x's dtype as
    TE does (transform_dtype="input", the default) or kept in float32
    (transform_dtype="float32"). Same shape as x, as float32 values."""
    x = np.asarray(x)
    dtype_name = check_dtype(x.dtype)
    transform_dtype = _check_transform_dtype(transform_dtype)
    m, k = rows_and_n(x.shape)
    _check_rht_k(k)
    return _transform(x.reshape(m, k), dtype_name, transform_dtype).reshape(x.shape)


def rht_global_amax(x, per_row: bool = False, transform_dtype: str = "input") -> np.ndarray:
    """max |rht(x)| as float32 [1] (or [m] with per_row): the global amax TE
    takes after the transform (NaN-propagating; 0 for no values)."""
    per_row = check_bool(per_row, "per_row")
    transformed = rht(x, transform_dtype)
    m, k = rows_and_n(transformed.shape)
    return _abs_max(transformed.reshape(m, k), 1 if per_row else None).reshape(-1)


# ---------------------------------------------------------------------------
# Which TE variants combine (docs/te_rht_and_4over6.md, section C).
# ---------------------------------------------------------------------------
def check_te_options(*, fmt="nvfp4", rht=False, four_over_six=False, e4m3_max=None, err_mode=None,
                     err_use_fast_math=None) -> tuple[int, str, bool]:
    """Checks a combination of TE's variants; returns (e4m3_max, err_mode,
    err_use_fast_math) with Four Over Six's defaults (448, "MAE", False)
    filled in. Refuses what TE does not define: either variant with MXFP4,
    Four Over Six with the RHT (TE's recipe: "NVFP4 4over6 quantization does
    not support RHT"), and Four Over Six's settings without Four Over Six
    (TE ignores them there; we do not guess)."""
    block_size_of(fmt)
    rht = check_bool(rht, "rht")
    four_over_six = check_bool(four_over_six, "four_over_six")
    if fmt == "mxfp4" and (rht or four_over_six):
        what = "Four Over Six" if four_over_six else "the random Hadamard transform"
        raise ValueError(f"{what} is defined for fmt='nvfp4' only (TE: NVFP4, not MXFP4), got fmt={fmt!r}")
    if rht and four_over_six:
        raise ValueError(
            "Four Over Six with the random Hadamard transform is not defined: TE refuses it "
            "(\"NVFP4 4over6 quantization does not support RHT\"); use one or the other"
        )
    if not four_over_six:
        given = [f"{name}={value!r}" for name, value in (("e4m3_max", e4m3_max), ("err_mode", err_mode),
                                                         ("err_use_fast_math", err_use_fast_math))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to Four Over Six only (TE ignores them otherwise)")
        return int(E4M3_MAX), "MAE", False
    e4m3_max = 448 if e4m3_max is None else check_int(e4m3_max, "e4m3_max")
    if e4m3_max not in E4M3_MAX_CHOICES:
        raise ValueError(f"e4m3_max must be 448 or 256 (TE's nvfp4_e4m3_max), got e4m3_max={e4m3_max}")
    if err_mode is None:
        err_mode = "MAE"
    if not isinstance(err_mode, str):
        raise TypeError(f"err_mode must be 'MAE' or 'MSE', got {type(err_mode).__name__} {err_mode!r}")
    if err_mode.upper() not in ERR_MODES:
        raise ValueError(f"err_mode must be 'MAE' or 'MSE' (any case), got {err_mode!r}")
    fast = False if err_use_fast_math is None else check_bool(err_use_fast_math, "err_use_fast_math")
    return e4m3_max, err_mode.upper(), fast


# ---------------------------------------------------------------------------
# TE's quantization of rows under a global amax (docs/te_rht_and_4over6.md,
# section A.4). The arithmetic is reference/te.py's; what is ours here is the
# convention: these functions take the global amax, which Four Over Six's
# error needs raw (B.2 step 8), where te.py takes the encode scale S_enc.
# ---------------------------------------------------------------------------
# TE's basic block quantizer under the name tests/test_reference_te_rht_4over6.py
# imports: te.quantize_blocks_te(values, s_enc), 1x16 tiles.
_te_quantize_blocks = quantize_blocks_te


def _resolve_global_amax(global_amax, values: np.ndarray, per_row: bool) -> np.ndarray:
    """float32 [1] or [m]: the amax of `values` (float32 [m, n], after any
    transform) when global_amax is None, else the one given: a host number
    (finite, >= 0) or a float32 array of one element or one per row (used
    as is, like a device array)."""
    m, n = values.shape
    if global_amax is None:
        return _abs_max(values, 1 if per_row else None).reshape(-1)
    if per_row:
        raise ValueError("per_row=True asks for a computed amax per row; with a global_amax given, its shape "
                         "says whether it is per row: pass one or the other")
    if isinstance(global_amax, np.ndarray):
        if global_amax.dtype != np.float32:
            raise TypeError(f"global_amax as an array must be float32, got {global_amax.dtype}")
        global_scale_kind(global_amax.shape, (m, n), name="global_amax")  # one, or one per row
        return global_amax.reshape(-1)
    if isinstance(global_amax, (bool, np.bool_)) or not isinstance(global_amax, numbers.Real):
        raise TypeError(f"global_amax must be None, a float or a float32 array, got {type(global_amax).__name__}")
    value = float(global_amax)
    with np.errstate(over="ignore"):
        as_float32 = float(np.float32(value))
    if not (math.isfinite(value) and value >= 0 and math.isfinite(as_float32)):
        raise ValueError(f"global_amax as a host number must be finite and >= 0 in float32, got {value!r}")
    return np.array([value + 0.0], np.float32)  # -0.0 counts as 0


def _quantize_te_rows(values: np.ndarray, padded_n: int, layout, global_amax, per_row: bool, quantize_blocks=None,
                      e4m3_max: int = 448):
    """The shared tail: amax (after any transform), S_enc, K padding, the
    block quantizer, packing and the scale layout. quantize_blocks(values,
    amax, s_enc) -> (codes, scale bytes) NaN-scales the rows of an invalid
    S_enc itself; None is TE's basic numerics (te.quantize_blocks_te)."""
    amax = _resolve_global_amax(global_amax, values, per_row)
    s_enc = encode_scale_from_amax_te(amax, e4m3_max=e4m3_max)
    padded = _padded_rows(values, padded_n)
    if quantize_blocks is None:
        codes, scale_bytes = quantize_blocks_te(padded, s_enc)
    else:
        codes, scale_bytes = quantize_blocks(padded, amax, s_enc)
    return _pack_codes(codes), _lay_out_scales(scale_bytes, layout, padded_n), amax


# ---------------------------------------------------------------------------
# RHT + TE quantization (docs/te_rht_and_4over6.md, sections A.3 to A.5).
# ---------------------------------------------------------------------------
def scaled_fp4_quant_rht(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                         per_row=False, transform_dtype="input", fmt="nvfp4"):
    """TE's RHT + NVFP4 quantization of x [..., K] (float16, bfloat16 or
    float32), K last: the operand as the GEMM reads it, with the reduction
    dimension K contiguous (for TE's columnwise operand of a tensor use
    scaled_fp4_quant_rht_columnwise). K must be a multiple of 16.

    Each 16-value chunk of each row is transformed (rht: float32 sums in
    our order, rounded to x's dtype unless transform_dtype="float32"), the
    global amax is
    taken after the transform (per row with per_row=True) unless
    `global_amax` is given (a host number or a float32 array of 1 or m
    elements), and the transformed rows are quantized with TE's numerics.
    `padded_n` appends whole zero blocks. Returns (packed uint8
    [m, padded_n // 2], scales uint8 in the layout, global_amax float32 [1]
    or [m]); the GEMM's alpha needs the amax."""
    x = np.asarray(x)
    dtype_name = check_dtype(x.dtype)
    check_te_options(fmt=fmt, rht=True)
    per_row = check_bool(per_row, "per_row")
    transform_dtype = _check_transform_dtype(transform_dtype)
    m, k = rows_and_n(x.shape)
    _check_rht_k(k)
    padded_n = resolve_padded_n(k, padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    transformed = _transform(x.reshape(m, k), dtype_name, transform_dtype)
    return _quantize_te_rows(transformed, padded_n, scale_layout, global_amax, per_row)


def scaled_fp4_quant_rht_columnwise(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                                    per_row=False, transform_dtype="input", fmt="nvfp4"):
    """TE's columnwise (wgrad) operand of x [..., N]: x flattened to [M, N]
    as TE does, transposed to [N, M], then scaled_fp4_quant_rht with K = M
    (M must be a multiple of 16). Returns (packed [N, padded_m // 2],
    scales for N rows of padded_m values, global_amax): TE's data_t,
    scale_t and global_amax_col."""
    x = np.asarray(x)
    check_dtype(x.dtype)
    if x.ndim < 2:
        raise ValueError(f"x must be [..., N] with at least 2 dimensions for a columnwise operand, got shape {x.shape}")
    m, n = rows_and_n(x.shape)
    _check_rht_k(m, "the columnwise operand's K (x's rows M, its leading dimensions flattened)")
    return scaled_fp4_quant_rht(np.ascontiguousarray(x.reshape(m, n).T), global_amax, is_sf_swizzled_layout,
                                padded_n, layout=layout, per_row=per_row, transform_dtype=transform_dtype, fmt=fmt)
