"""The global scale computed on the GPU (no host sync), and the one-call
quantize that uses it."""

from __future__ import annotations

import cupy as cp
import numpy as np

from . import _kernels
from ._compile import GlobalScaleVariant
from ._format import BLOCK_SIZE, check_dtype, row_view
from ._launch import (
    MAX_GRID_Y,
    MAX_INDEX,
    VECTOR_BYTES,
    VECTOR_PIECE,
    as_like,
    check_like,
    device_array,
    launch_geometry,
    resolve_stream,
)
from ._quantize import prepare_quantize


def compute_global_scale(x, per_row=False, *, stream=None, like=None):
    """448 * 6 / amax(|x|) as a float32 device array [1] (or [m], one per row
    of x [..., n]), computed on the device: scaled_fp4_quant takes it without
    a host sync. 1.0 where amax is 0 or x is empty; a NaN in x gives NaN and
    an inf gives 0.0, both invalid scales, so every block quantized with them
    is NaN-scaled and bad calibration data cannot pass unnoticed; a tiny amax
    clamps to FLT_MAX. Bit-exact to nvfp4_cupy.reference.compute_global_scale."""
    check_like(like)
    launch, result = _prepare_global_scale(x, per_row, stream)
    launch()
    return as_like((result,), like)[0]


def _prepare_global_scale(x, per_row, stream):
    """Checks and the result buffer, nothing launched: (launch, float32 result)."""
    if not isinstance(per_row, (bool, np.bool_)):
        raise TypeError(f"per_row must be a bool, got {type(per_row).__name__} {per_row!r}")
    source, x = x, device_array(x, "x")
    dtype_name = check_dtype(x.dtype)
    view = row_view(x.shape, x.strides, x.itemsize, per_expert=False)
    device_id = x.data.device_id
    with cp.cuda.Device(device_id):
        stream = resolve_stream(stream, device_id, source)
        with stream:  # the pool orders the buffer's reuse after this stream
            result = cp.empty(view.m if per_row else 1, dtype=cp.uint32)
    vector_loads = (
        x.data.ptr % VECTOR_BYTES == 0 and (view.row_stride * x.itemsize) % VECTOR_BYTES == 0 and view.n % VECTOR_PIECE == 0
    )
    grid, block = launch_geometry(view.m, -(-view.n // BLOCK_SIZE))
    if view.m > MAX_INDEX or view.n > MAX_INDEX or grid[1] > MAX_GRID_Y:
        raise ValueError(f"x: shape {x.shape} is too large for one launch")
    with cp.cuda.Device(device_id):
        amax, finish = _kernels.kernel_functions(device_id, GlobalScaleVariant(dtype_name, vector_loads))

    def launch() -> None:
        if not result.size:
            return
        with cp.cuda.Device(device_id):
            # amax bits start at 0, then become scales in place.
            cp.cuda.runtime.memsetAsync(result.data.ptr, 0, result.nbytes, stream.ptr)
            if view.m and view.n:
                amax(grid, block, (x, np.int64(view.row_stride), np.int32(view.m), np.int32(view.n),
                                   np.int32(bool(per_row)), result), stream=stream)
            finish((-(-result.size // 256),), (256,), (result, np.int32(result.size)), stream=stream)

    return launch, result.view(cp.float32)


def quantize(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, per_row=False, out=None, out_scale=None,
             stream=None, like=None):
    """compute_global_scale then scaled_fp4_quant, all on the device:
    returns (packed, scales, global_scale). Both steps are checked before
    either runs."""
    check_like(like)
    scale_launch, global_scale = _prepare_global_scale(x, per_row, stream)
    quantize_launch, (packed, scales) = prepare_quantize(
        x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like
    )
    scale_launch()
    quantize_launch()
    return packed, scales, as_like((global_scale,), like)[0]
