"""NVFP4 back to float16 / bfloat16 / float32 on the GPU, bit-exact to
nvfp4_cupy.reference.dequantize."""

from __future__ import annotations

import cupy as cp
import numpy as np

from . import _kernels
from ._compile import DequantizeVariant
from ._format import BLOCK_SIZE, block_size_of, check_dtype, resolve_layout
from ._launch import (
    MAX_GRID_Y,
    MAX_INDEX,
    NULL,
    VECTOR_BYTES,
    VECTOR_PIECE,
    as_like,
    byte_range,
    check_disjoint,
    check_like,
    check_output,
    device_array,
    global_scale_argument,
    launch_geometry,
    resolve_stream,
)

_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def _output_dtype(dtype):
    name = check_dtype(dtype, "dtype")
    if name == "bfloat16":
        import ml_dtypes

        return name, np.dtype(ml_dtypes.bfloat16)
    return name, _DTYPES[name]


def dequantize_fp4(
    packed, scales, global_scale, n=None, *, layout="swizzled", dtype=np.float16, out=None, stream=None, like=None,
    fmt="nvfp4",
):
    """packed uint8 [m, padded_n // 2] and its scales (in `layout`) -> `dtype`
    [m, n] (n defaults to padded_n): e2m1 * float(e4m3) / global_scale in
    IEEE float32, then one rounding to dtype; NaN results are the dtype's
    canonical quiet NaN. `global_scale`: a host float, or a float32 device
    array of one element or one per row. fmt="mxfp4": E8M0 scales of
    32-value blocks, global_scale None."""
    check_like(like)
    source, packed = packed, device_array(packed, "packed")
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"packed must be uint8 [m, padded_n // 2], got {packed.dtype} {packed.shape}")
    if not packed.flags.c_contiguous:
        raise ValueError(f"packed must be C-contiguous, got strides {packed.strides}")
    m, padded_n = packed.shape[0], packed.shape[1] * 2
    block_size = block_size_of(fmt)
    if padded_n % block_size:
        raise ValueError(f"packed has {padded_n} values a row, not a multiple of {block_size}")
    n = padded_n if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
    if not 0 < n <= padded_n:
        raise ValueError(f"n must be in [1, {padded_n}] (the values a row of packed holds), got n={n}")
    n = int(n)
    scale_layout = resolve_layout(layout=layout)
    dtype_name, out_dtype = _output_dtype(dtype)
    grid, block = launch_geometry(m, padded_n // BLOCK_SIZE)
    if m > MAX_INDEX or padded_n > MAX_INDEX or grid[1] > MAX_GRID_Y:
        raise ValueError(f"packed: shape {packed.shape} is too large for one launch")
    device_id = packed.data.device_id
    scales = check_output(scales, "scales", scale_layout.scale_shape(m, padded_n, block_size), device_id,
                          source="packed")
    if fmt == "mxfp4":
        if global_scale is not None:
            raise ValueError(f"global_scale must be None for fmt='mxfp4', got {global_scale!r}")
        global_scale_array, global_scale_value, which = None, np.float32(1), "one"
    else:
        # [m, K] is 2-D, so only "one" or "row" can come back.
        global_scale_array, global_scale_value, which = global_scale_argument(global_scale, device_id, (m, padded_n))
    with cp.cuda.Device(device_id):
        stream = resolve_stream(stream, device_id, source)
        if out is not None:
            out = check_output(out, "out", (m, n), device_id, out_dtype, source="packed")
            reads = [("packed", byte_range(packed)), ("scales", byte_range(scales))]
            if global_scale_array is not None:
                reads.append(("global_scale", byte_range(global_scale_array)))
            check_disjoint(reads, [("out", byte_range(out))])
        else:
            with stream:  # the pool then orders the buffer's reuse after this launch
                out = cp.empty((m, n), dtype=out_dtype)
        if m == 0:
            return as_like((out,), like)[0]
        vector_stores = out.data.ptr % VECTOR_BYTES == 0 and n % VECTOR_PIECE == 0
        (kernel,) = _kernels.kernel_functions(device_id, DequantizeVariant(dtype_name, scale_layout, vector_stores, fmt))
        kernel(
            grid,
            block,
            (
                packed,
                scales,
                np.int32(m),
                np.int32(n),
                np.int32(padded_n),
                global_scale_array if global_scale_array is not None else NULL,
                global_scale_value,
                np.int32(which == "row"),
                out,
                np.int32(scales.shape[1]),
            ),
            stream=stream,
        )
    return as_like((out,), like)[0]
