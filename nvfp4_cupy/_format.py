"""What both the golden model and the GPU launcher must agree on before any
arithmetic: block size, scale layouts and their shapes, and the checks on
shape, padding, layout and global-scale arguments. Pure Python and NumPy."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 16  # NVFP4: values per E4M3 scale
MX_BLOCK_SIZE = 32  # MXFP4: values per E8M0 scale
FORMATS = {"nvfp4": BLOCK_SIZE, "mxfp4": MX_BLOCK_SIZE}
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
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
        if not isinstance(is_sf_swizzled_layout, (bool, np.bool_)):
            raise TypeError(
                f"is_sf_swizzled_layout must be a bool, got {type(is_sf_swizzled_layout).__name__}"
            )
        return LAYOUTS["swizzled" if is_sf_swizzled_layout else "linear"]
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def resolve_padded_n(n: int, padded_n: int | None, block_size: int = BLOCK_SIZE) -> int:
    """Output K: defaults to n rounded up to a whole block; must cover n and be
    a multiple of the block size (16 for NVFP4, 32 for MXFP4)."""
    if n <= 0:
        raise ValueError(f"x: the last dimension n must be positive, got n={n}")
    if padded_n is None:
        return round_up(n, block_size)
    padded_n = _as_int(padded_n, "padded_n")
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


def check_dtype(dtype, name: str = "x") -> str:
    dtype_name = _DTYPE_NAMES.get(dtype)  # hot path: one dict lookup per call
    if dtype_name is None:
        dtype_name = np.dtype(dtype).name
        if dtype_name not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got dtype {dtype_name}")
        _DTYPE_NAMES[dtype] = dtype_name
    return dtype_name


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
        raise TypeError(
            f"global_scale must be a float or a 1-element float32 device array, got {type(value).__name__}"
        )
    gs = _to_float32(float(value))
    if not (math.isfinite(gs) and gs > 0):
        raise ValueError(
            f"global_scale must be finite and > 0 in float32, got {value!r} (float32: {float(gs)})"
        )
    return gs
