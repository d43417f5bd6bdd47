"""What both the golden model and the GPU launchers must agree on before any
arithmetic (docs/format.md): block sizes, dtypes, scale layouts and their
shapes, which global scale applies, and every argument check the two share.
Pure Python, NumPy and ml_dtypes: the golden model imports it without CuPy."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import ml_dtypes
import numpy as np

BLOCK_SIZE = 16  # NVFP4: values per E4M3 scale
MX_BLOCK_SIZE = 32  # MXFP4: values per E8M0 scale
FORMATS = {"nvfp4": BLOCK_SIZE, "mxfp4": MX_BLOCK_SIZE}
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
# dtype name -> NumPy dtype (bfloat16 is ml_dtypes'): the one map the package,
# tests and benchmarks use.
NUMPY_DTYPES = {name: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name) for name in SUPPORTED_DTYPES}
UINT8 = np.dtype(np.uint8)
# Output dtype of dequantize when none is given, golden model and GPU alike:
# float32 holds e2m1 * e4m3 / global_scale exactly as computed (docs/format.md).
DEFAULT_DEQUANTIZE_DTYPE = "float32"
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103  # float32(x) rounds to inf from here up


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ScaleLayout:
    """A scale-tensor layout: its name in the API, its kernel struct, and how
    far it rounds rows and block columns up."""

    name: str
    cuda_struct: str
    row_multiple: int
    col_multiple: int

    def scale_shape(self, m: int, padded_n: int, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
        blocks = padded_n // block_size
        return round_up(m, self.row_multiple), round_up(blocks, self.col_multiple)


LAYOUTS = {
    "swizzled": ScaleLayout("swizzled", "nvfp4::SwizzledScales", 128, 4),
    "linear": ScaleLayout("linear", "nvfp4::LinearScales", 1, 1),
    "8x4": ScaleLayout("8x4", "nvfp4::Tiled8x4Scales", 8, 4),
}


def resolve_layout(is_sf_swizzled_layout: bool = True, layout: str | None = None) -> ScaleLayout:
    """`layout` wins over the vLLM-style boolean when given."""
    if layout is None:
        return LAYOUTS["swizzled" if check_bool(is_sf_swizzled_layout, "is_sf_swizzled_layout") else "linear"]
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def check_int(value, name: str) -> int:
    """An int argument: any integral type but bool (a TypeError, as True is
    almost always a mistake for a size)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def resolve_padded_n(n: int, padded_n: int | None, block_size: int = BLOCK_SIZE) -> int:
    """Output K: defaults to n rounded up to a whole block; must cover n and be
    a multiple of the block size (16 for NVFP4, 32 for MXFP4)."""
    if n <= 0:
        raise ValueError(f"x: the last dimension n must be positive, got n={n}")
    if padded_n is None:
        return round_up(n, block_size)
    padded_n = check_int(padded_n, "padded_n")
    if padded_n % block_size:
        raise ValueError(f"padded_n must be a multiple of {block_size}, got padded_n={padded_n}")
    if padded_n < n:
        raise ValueError(f"padded_n must be >= n, got padded_n={padded_n} < n={n}")
    return padded_n


def block_size_of(fmt: str) -> int:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


_DTYPE_NAMES: dict = {}


def dtype_name_of(dtype) -> str:
    """A dtype's name, for NumPy/CuPy dtypes and types, names, and torch
    dtypes (torch.bfloat16 -> "bfloat16") alike. Memoized: launchers ask on
    every call, and np.dtype(torch dtype) fails slowly before the fallback."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype).replace("torch.", "")
        _DTYPE_NAMES[dtype] = name
    return name


def check_dtype(dtype, name: str = "x") -> str:
    """The name of a supported dtype."""
    dtype_name = dtype_name_of(dtype)
    if dtype_name not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got dtype {dtype_name}")
    return dtype_name


def check_fmt_global_scale(fmt: str, global_scale) -> int:
    """The block size of `fmt`; MXFP4 has no global scale, so one given with
    it is a mistake."""
    block_size = block_size_of(fmt)
    if fmt == "mxfp4" and global_scale is not None:
        raise ValueError(f"global_scale must be None for fmt='mxfp4' (MX has no global scale), got {global_scale!r}")
    return block_size


def global_scale_kind(scale_shape: tuple[int, ...], x_shape: tuple[int, ...], name: str = "global_scale") -> str:
    """Which global scale each block uses, from the shape of a float32 scale
    array: "expert" for E scales with x [E, m, n] (checked first), "one" for a
    single element, "row" for one per row of x [..., n]."""
    if len(scale_shape) == 1 and len(x_shape) == 3 and scale_shape[0] == x_shape[0]:
        return "expert"
    if math.prod(scale_shape) == 1:
        return "one"
    if len(scale_shape) == 1 and len(x_shape) >= 1 and scale_shape[0] == math.prod(x_shape[:-1]):
        return "row"
    raise ValueError(
        f"{name} as an array must hold one element, one per expert for x of shape [E, m, n], or one per "
        f"row, got shape {tuple(scale_shape)} for x of shape {tuple(x_shape)}"
    )


def quantized_shapes(x_shape: tuple[int, ...], padded_n, is_sf_swizzled_layout, layout, scale_kind: str,
                     fmt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(packed shape, scales shape) of quantizing x of this shape: [m, K/2]
    and the layout's scale tensor, or [E, ...] of both for an expert batch."""
    block_size = block_size_of(fmt)
    m, n = rows_and_n(x_shape)
    batch = ()
    if scale_kind == "expert":
        batch, m = (x_shape[0],), x_shape[1]
    padded_n = resolve_padded_n(n, padded_n, block_size)
    scale_shape = resolve_layout(is_sf_swizzled_layout, layout).scale_shape(m, padded_n, block_size)
    return batch + (m, padded_n // 2), batch + scale_shape


@dataclass(frozen=True)
class DequantizeShape:
    """What packed's shape says: `experts` (None for a plain [m, K/2]) batches
    of m rows of padded_n values, n of them kept, scales of scale_shape."""

    experts: int | None
    m: int
    n: int
    padded_n: int
    block_size: int
    scale_shape: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (() if self.experts is None else (self.experts,)) + (self.m, self.n)

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The shape of the x these bytes came from (for global_scale_kind)."""
        return self.out_shape


def dequantize_shape(packed_shape, packed_dtype, n, layout, fmt, name: str = "packed") -> DequantizeShape:
    """Checks packed's dtype and shape ([m, K/2], or [E, m, K/2] for an
    expert batch) and n, for the golden model and the GPU alike."""
    if dtype_name_of(packed_dtype) != "uint8":
        raise TypeError(f"{name} must be uint8, got dtype {dtype_name_of(packed_dtype)}")
    if len(packed_shape) not in (2, 3):
        raise ValueError(f"{name} must be [m, padded_n // 2] or [E, m, padded_n // 2], got shape {tuple(packed_shape)}")
    block_size = block_size_of(fmt)
    m, padded_n = packed_shape[-2], packed_shape[-1] * 2
    if padded_n == 0 or padded_n % block_size:
        raise ValueError(f"{name} has {padded_n} values a row, not a positive multiple of {block_size}")
    n = padded_n if n is None else check_int(n, "n")
    if not 0 < n <= padded_n:
        raise ValueError(f"n must be in [1, {padded_n}] (the values a row of {name} holds), got n={n}")
    experts = packed_shape[0] if len(packed_shape) == 3 else None
    scale_shape = resolve_layout(layout=layout).scale_shape(m, padded_n, block_size)
    return DequantizeShape(experts, m, n, padded_n, block_size,
                           (() if experts is None else (experts,)) + scale_shape)


def check_scales(dtype, shape: tuple[int, ...], expected: tuple[int, ...], name: str = "scales") -> None:
    if dtype_name_of(dtype) != "uint8":
        raise TypeError(f"{name} must be uint8, got dtype {dtype_name_of(dtype)}")
    if tuple(shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(shape)}")


@dataclass(frozen=True)
class RowView:
    """How the kernel walks x: `experts` batches of `m` rows of `n` values,
    rows `row_stride` elements apart, batches `expert_stride` apart."""

    experts: int
    m: int
    n: int
    row_stride: int
    expert_stride: int


def row_view(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, per_expert: bool) -> RowView:
    """x's layout in elements, without copying: the last dimension must be
    contiguous; per_expert keeps dimension 0 of a 3-D x as the expert batch,
    otherwise all leading dimensions must flatten into evenly strided rows
    (any C-contiguous array, and views such as h[:, :4096])."""
    m, n = rows_and_n(shape)
    if 0 in shape:  # nothing to read; empty arrays may report any strides
        return RowView(shape[0] if per_expert else 1, shape[1] if per_expert else m, n, n, 0)
    if n > 1 and strides[-1] != itemsize:
        raise ValueError(
            f"x: the last dimension must be contiguous (stride {itemsize} bytes), got strides "
            f"{strides}; pass cupy.ascontiguousarray(x)"
        )
    if any(stride % itemsize for stride in strides):
        raise ValueError(f"x: strides {strides} are not whole numbers of {itemsize}-byte elements")
    if per_expert:
        if len(shape) != 3:
            raise ValueError(f"x: a global scale per expert needs x of shape [E, m, n], got shape {shape}")
        return RowView(shape[0], shape[1], n, strides[1] // itemsize, strides[0] // itemsize)
    leading = [(size, stride) for size, stride in zip(shape[:-1], strides[:-1]) if size > 1]
    for (_, stride_outer), (size_inner, stride_inner) in zip(leading, leading[1:]):
        if stride_outer != stride_inner * size_inner:
            raise ValueError(
                f"x: leading dimensions of shape {shape} with strides {strides} do not "
                "flatten into evenly strided rows; pass cupy.ascontiguousarray(x)"
            )
    row_stride = leading[-1][1] // itemsize if leading else n
    return RowView(1, m, n, row_stride, 0)


def rows_and_n(shape: tuple[int, ...], name: str = "x") -> tuple[int, int]:
    """[..., n] -> (m, n): leading dimensions flatten into rows."""
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (shape [..., n]), got a 0-d array")
    return math.prod(shape[:-1]), shape[-1]


def _to_float32(value: float) -> np.float32:
    """float -> float32 without NumPy's overflow warning (and its cost)."""
    if math.isfinite(value) and abs(value) >= _FLOAT32_OVERFLOW:
        return np.float32(math.copysign(math.inf, value))
    return np.float32(value)


def host_global_scale(value) -> np.float32:
    """A host global scale (Python or NumPy number) as the float32 the kernels
    use; it must be finite and > 0 there. (Only a scale held in a device array
    can be invalid at run time: the kernels then write NaN scales.)"""
    if type(value) is not float and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"global_scale must be a float or a float32 array, got {type(value).__name__}")
    gs = _to_float32(float(value))
    if not (math.isfinite(gs) and gs > 0):
        shown = f"{float(value)!r}" + ("" if float(gs) == float(value) or math.isnan(value) else f" ({float(gs)} in float32)")
        raise ValueError(f"global_scale must be finite and > 0 in float32, got {shown}")
    return gs


def is_host_scalar(value) -> bool:
    """A Python or NumPy number (not an array): a host global scale."""
    return type(value) is float or (isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, np.ndarray))
