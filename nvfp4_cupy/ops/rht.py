"""TransformerEngine's random Hadamard transform (RHT) + NVFP4 quantization
on the GPU (numerics="te", docs/te_rht_and_4over6.md part A and E.1-E.2),
x [..., K] with K last: the bytes of
nvfp4_cupy.reference.te_rht.scaled_fp4_quant_rht. Every check runs before
the outputs are allocated or a kernel launched."""

from __future__ import annotations

import math

import numpy as np

from .._format import check_bool, global_scale_kind, resolve_layout, resolve_padded_n, row_view
from .._runtime.arrays import c_strides, dtype_name_of, frontend_of, output_frontend, resolve_stream
from .._runtime.compile import RhtVariant, kernel_constant
from .._runtime.launch import VECTOR_BYTES, bound_kernel, launch_geometry, rows_allow_vectors
from ..reference import te_rht as _golden
from .experts import _memset_zero

# Blocks of 16 a quantizer thread takes (rht.cu), blockDim.x apart.
BLOCKS_PER_THREAD = kernel_constant(RhtVariant.source, "kRhtBlocksPerThread")


def scaled_fp4_quant_rht(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                         per_row=False, transform_dtype="input", fmt="nvfp4", stream=None, like=None):
    """RHT then numerics="te" quantization of x [..., K] (float16, bfloat16
    or float32 on the GPU, K a multiple of 16) along K: each 16-value chunk
    transformed (float32 sums in the spec's order, rounded to x's dtype
    unless transform_dtype="float32"), the global amax taken after the
    transform (per row with per_row=True) unless `global_amax` is given (a
    host number, finite and >= 0, or a float32 device array of one element
    or one per row, read by the kernel as it is), then TE's numerics under
    S_enc = 2688 / amax. Returns (packed uint8 [m, padded_n // 2], scales in
    the layout, global_amax): the computed float32 [1] or [m] device array,
    or the given one."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    dtype_name = frontend.dtype_name(array.dtype)
    _golden.check_te_options(fmt=fmt, rht=True)
    per_row = check_bool(per_row, "per_row")
    to_input = _golden._check_transform_dtype(transform_dtype) == "input"
    view = row_view(array.shape, array.strides, array.itemsize, False)
    m, k = view.m, view.n
    _golden._check_rht_k(k)
    padded_n = resolve_padded_n(k, padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    amax_array, amax_value, per_row_amax = amax_argument(global_amax, per_row, device_id, m, k)
    scale_shape = scale_layout.scale_shape(m, padded_n)
    geometry = launch_geometry(scale_shape[0], -(-scale_shape[1] // BLOCKS_PER_THREAD), columns=padded_n,
                               what=f"x: shape {array.shape}")
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    computed = global_amax is None
    specs = (((m, padded_n // 2), "uint8"), (scale_shape, "uint8")) + ((((m if per_row else 1),), "float32"),) * computed
    outputs = tuple(results.outputs(device_id, handle, specs))
    returned = outputs if computed else outputs + (global_amax,)
    if computed:  # the amax kernel maxes into zeros; no values (m = 0) have amax 0
        amax_pointer = results.pointer(outputs[2])
        _memset_zero(amax_pointer, 4 * (m if per_row else 1), device_id, handle)
    if m == 0:
        return returned
    vectors = rows_allow_vectors((view.row_stride * array.itemsize,), k) and array.pointer % VECTOR_BYTES == 0
    variant = RhtVariant(dtype_name, scale_layout, vectors, per_row_amax, to_input)
    packed, scales = (results.pointer(o) for o in outputs[:2])
    if computed:
        amax_kernel = bound_kernel(variant, *_amax_geometry(m, k, f"x: shape {array.shape}"),
                                   dict(row_stride=view.row_stride, m=m, n=k, per_row=int(per_row)), ("x", "amax"))
        amax_kernel(device_id, handle, array.pointer, amax_pointer)
    else:
        amax_pointer = 0 if amax_array is None else amax_array.pointer
    quantize = bound_kernel(variant, *geometry,
                            dict(row_stride=view.row_stride, m=m, n=k, padded_n=padded_n, scale_rows=scale_shape[0],
                                 scale_cols=scale_shape[1]),
                            ("x", "amax_ptr", "amax_value", "packed", "scales"), index=1)
    quantize(device_id, handle, array.pointer, amax_pointer, amax_value, packed, scales)
    return returned


# rht_amax's thread blocks loop over rows, so that a large tensor makes at
# most about this many atomicMax calls on its one amax (a thread block each).
AMAX_THREAD_BLOCKS = 4096


def _amax_geometry(m: int, k: int, what: str) -> tuple:
    """rht_amax's grid and block: launch_geometry's, with grid x (the row
    groups) capped so that grid x * grid y <= AMAX_THREAD_BLOCKS."""
    (rows, columns, batch), block = launch_geometry(m, k // 16, columns=k, what=what)
    return (min(rows, max(1, AMAX_THREAD_BLOCKS // columns)), columns, batch), block


def amax_argument(global_amax, per_row: bool, device_id: int, m: int, k: int):
    """(device array or None, host value, one amax per row) of the
    global_amax argument of TE's quantizers (RHT, Four Over Six), by the
    golden model's rules (te_rht._resolve_global_amax) on stand-ins."""
    stand_in = np.broadcast_to(np.float32(0), (m, k))
    if global_amax is None:
        return None, 0.0, per_row
    if not hasattr(global_amax, "__dlpack__") or np.isscalar(global_amax):
        value = _golden._resolve_global_amax(global_amax, stand_in, per_row)
        return None, float(value[0]), False
    array = frontend_of(global_amax).array(global_amax, "global_amax")
    if dtype_name_of(array.dtype) != "float32":
        raise TypeError(f"global_amax as an array must be float32, got {dtype_name_of(array.dtype)}")
    if array.device_id != device_id:
        raise ValueError(f"global_amax is on device {array.device_id} but x is on device {device_id}")
    _golden._resolve_global_amax(np.broadcast_to(np.float32(0), tuple(array.shape)), stand_in, per_row)
    kind = global_scale_kind(tuple(array.shape), (m, k), name="global_amax")
    if kind == "row" and array.strides != c_strides(array.shape, 4):
        raise ValueError(f"global_amax must be contiguous, got strides {array.strides}")
    return array, 0.0, kind == "row" and math.prod(array.shape) > 1


