"""Rowwise and columnwise NVFP4 in one pass on the GPU (numerics="te",
docs/te_numerics.md sections 5 and 12): x and x^T quantized from one read of
x, the bytes of nvfp4_cupy.reference.scaled_fp4_quant_te(...,
columnwise=True). Reached through scaled_fp4_quant(..., numerics="te",
columnwise=True). Every check runs before the outputs are allocated or the
kernel launched."""

from __future__ import annotations

import numpy as np

from .._format import BLOCK_SIZE, resolve_layout, resolve_padded_n, round_up, row_view
from .._runtime.arrays import frontend_of, global_scale_argument, output_frontend, resolve_stream
from .._runtime.compile import THREADS_PER_BLOCK, ColumnwiseVariant, kernel_constant
from .._runtime.launch import MAX_GRID_Y, MAX_INDEX, VECTOR_BYTES, bound_kernel, rows_allow_vectors
from ..reference import te as _te

ROW_TILES = "row_tiles.cuh"  # the thread-block tile's constants
_DYNAMIC = ("x", "global_scale_ptr", "global_scale_value", "global_scale_t_ptr", "global_scale_t_value", "packed",
            "scales", "packed_t", "scales_t")


def tile_shape(itemsize: int) -> tuple[int, int]:
    """(rows, columns) of x a thread block reads, in this kernel and in
    quantize.cu's 16x16-tile kernel: row_tiles.cuh's kTileRows and
    RowTile::kCols (kTileRowBytes of a row)."""
    return kernel_constant(ROW_TILES, "kTileRows"), kernel_constant(ROW_TILES, "kTileRowBytes") // itemsize


def scaled_fp4_quant_columnwise(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                                global_scale_t=None, row_scaled=False, tile="1x16", stream=None, like=None):
    """(packed, scales, packed_t, scales_t): x [..., n] flattened to [m, n]
    and x^T [n, m] quantized with numerics="te" and 1x16 blocks (or, with
    tile="16x16", one scale a 16x16 tile, TE's weight recipe), in the same
    scale layout; packed_t is uint8 [n, round_up(m, 16) // 2]. `global_scale`
    as in scaled_fp4_quant(numerics="te"): one S_enc (host float or
    one-element float32 device array), or with row_scaled=True one per row
    ([m]). `global_scale_t`, x^T's: by default global_scale; with
    row_scaled=True required, one per column of x ([n])."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    dtype_name = frontend.dtype_name(array.dtype)
    tile_rows, _, row_scaled = _te._check_te_options(tile, True, row_scaled)
    # The golden model's rules for the pair of scales, on stand-ins of their shapes.
    kind = _te._resolve_scales(tuple(array.shape), _stand_in(global_scale), _stand_in(global_scale_t), True,
                               row_scaled)[0]
    if kind not in ("one", "row"):
        raise ValueError("numerics='te' on the GPU takes one global scale, or one per row with row_scaled=True; "
                         f"got one per expert (shape {tuple(global_scale.shape)} for x of shape {array.shape}): "
                         "TransformerEngine defines no expert batch, quantize each expert as its own tensor")
    view = row_view(array.shape, array.strides, array.itemsize, False)
    m, n = view.m, view.n
    scale = global_scale_argument(global_scale, device_id, (m, n))
    scale_t = scale if global_scale_t is None else global_scale_argument(global_scale_t, device_id, (n, m),
                                                                         "x^T (columnwise)")
    padded_n = resolve_padded_n(n, padded_n, BLOCK_SIZE)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    padded_m = round_up(m, BLOCK_SIZE)
    scale_rows, scale_cols = scale_layout.scale_shape(m, padded_n, BLOCK_SIZE)
    scale_rows_t, scale_cols_t = scale_layout.scale_shape(n, padded_m, BLOCK_SIZE)
    rows, cols = tile_shape(array.itemsize)
    row_extent = max(scale_rows, scale_cols_t * BLOCK_SIZE)
    col_extent = max(scale_cols * BLOCK_SIZE, scale_rows_t)
    grid = (-(-row_extent // rows), -(-col_extent // cols), 1)
    if row_extent + rows > MAX_INDEX or col_extent + cols > MAX_INDEX or grid[1] > MAX_GRID_Y:
        raise ValueError(f"x: shape {array.shape} with padded_n={padded_n} is too large for one launch")
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    specs = (((m, padded_n // 2), "uint8"), ((scale_rows, scale_cols), "uint8"), ((n, padded_m // 2), "uint8"),
             ((scale_rows_t, scale_cols_t), "uint8"))
    outputs = tuple(results.outputs(device_id, handle, specs))
    if m == 0:  # every output is empty
        return outputs
    vectors = rows_allow_vectors((view.row_stride * array.itemsize,), n) and array.pointer % VECTOR_BYTES == 0
    kernel = bound_kernel(ColumnwiseVariant(dtype_name, scale_layout, vectors, "row" if row_scaled else "one",
                                            tile_rows > 1), grid,
                          (THREADS_PER_BLOCK, 1, 1),
                          dict(row_stride=view.row_stride, m=m, n=n, padded_n=padded_n, scale_rows=scale_rows,
                               scale_cols=scale_cols, padded_m=padded_m, scale_rows_t=scale_rows_t,
                               scale_cols_t=scale_cols_t), _DYNAMIC)
    kernel(device_id, handle, array.pointer, scale.pointer, scale.value, scale_t.pointer, scale_t.value,
           *(results.pointer(output) for output in outputs))
    return outputs


def _stand_in(global_scale):
    """The golden model's form of a scale argument, for its shape rules: an
    array of the same shape, or the host value as it is."""
    shape = getattr(global_scale, "shape", None)
    if shape is None or not hasattr(global_scale, "__dlpack__"):
        return global_scale
    return np.broadcast_to(np.float32(1), tuple(shape))



