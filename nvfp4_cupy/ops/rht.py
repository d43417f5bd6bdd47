"""TransformerEngine's random Hadamard transform (RHT) + NVFP4 quantization
on the GPU (numerics="te", docs/te_rht_and_4over6.md part A and E.1-E.2),
x [..., K] with K last: the bytes of
nvfp4_cupy.reference.te_rht.scaled_fp4_quant_rht. Every check runs before
the outputs are allocated or a kernel launched."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
    to_input = _golden._check_transform_dtype(transform_dtype) == "input"
    call = prepare_amax_call(frontend, array, global_amax, per_row, is_sf_swizzled_layout, padded_n, layout, stream,
                             like, BLOCKS_PER_THREAD, _golden._check_rht_k)
    m, k, results, handle = call.m, call.n, call.results, call.handle
    computed = global_amax is None
    amax_rows = m if call.per_row else 1
    specs = (((m, call.padded_n // 2), "uint8"), (call.scale_shape, "uint8")) + (((amax_rows,), "float32"),) * computed
    outputs = tuple(results.outputs(device_id, handle, specs))
    returned = outputs if computed else outputs + (global_amax,)
    row_stride = call.view.row_stride
    vectors = rows_allow_vectors((row_stride * array.itemsize,), k) and array.pointer % VECTOR_BYTES == 0
    variant = RhtVariant(dtype_name, call.scale_layout, vectors, to_input)
    if computed:
        amax_pointer = results.pointer(outputs[2])
        rht_amax_launcher(variant, array, row_stride, m, k, call.per_row)(device_id, handle, amax_pointer)
    else:
        amax_pointer = call.amax_pointer
    if m == 0:
        return returned
    quantize = bound_kernel(variant, *call.geometry,
                            dict(row_stride=row_stride, m=m, n=k, padded_n=call.padded_n,
                                 scale_rows=call.scale_shape[0], scale_cols=call.scale_shape[1],
                                 per_row=int(call.per_row_amax)),
                            ("x", "amax_ptr", "amax_value", "packed", "scales"), index=1)
    quantize(device_id, handle, array.pointer, amax_pointer, call.amax_value, *(results.pointer(o) for o in outputs[:2]))
    return returned


def rht_amax_launcher(variant: RhtVariant, array, row_stride: int, m: int, k: int, per_row: bool):
    """launch(device_id, stream handle, amax pointer): zeroes the float32
    amax ([m] with per_row, else [1]) and maxes max |y| over the transformed
    rows of x [m, k] into it with `variant`'s rht_amax (no launch for m = 0:
    no values have amax 0)."""
    kernel = None
    if m:
        kernel = bound_kernel(variant, *_amax_geometry(m, k, f"x: shape {array.shape}"),
                              dict(row_stride=row_stride, m=m, n=k, per_row=int(per_row)), ("x", "amax"))
    return functools.partial(_zero_and_max, 4 * (m if per_row else 1), kernel, array.pointer)


def _zero_and_max(amax_bytes: int, kernel, x_pointer: int, device_id: int, handle: int, amax_pointer: int) -> None:
    _memset_zero(amax_pointer, amax_bytes, device_id, handle)  # the kernel maxes into zeros
    if kernel is not None:
        kernel(device_id, handle, x_pointer, amax_pointer)


# rht_amax's thread blocks loop over rows, so that a large tensor makes at
# most about this many atomicMax calls on its one amax (a thread block each).
AMAX_THREAD_BLOCKS = 4096


def _amax_geometry(m: int, k: int, what: str) -> tuple:
    """rht_amax's grid and block: launch_geometry's, with grid x (the row
    groups) capped so that grid x * grid y <= AMAX_THREAD_BLOCKS."""
    (rows, columns, batch), block = launch_geometry(m, k // 16, columns=k, what=what)
    return (min(rows, max(1, AMAX_THREAD_BLOCKS // columns)), columns, batch), block


@dataclass(frozen=True)
class AmaxCall:
    """What TE's quantizers that take a global amax (the RHT, Four Over Six)
    work out before allocating: the rows, the output shapes and the grid of
    a quantizer of blocks_per_thread blocks a thread, and the amax argument."""

    view: object
    m: int
    n: int
    padded_n: int
    per_row: bool  # the amax is computed per row
    scale_layout: object
    scale_shape: tuple
    geometry: tuple
    amax_array: object  # a given device array, or None
    amax_value: float  # a given host value (0.0 otherwise)
    per_row_amax: bool  # the kernel reads one amax a row
    handle: int
    results: object

    @property
    def amax_pointer(self) -> int:
        """The given device amax (0: a host value or none)."""
        return 0 if self.amax_array is None else self.amax_array.pointer


def prepare_amax_call(frontend, array, global_amax, per_row, is_sf_swizzled_layout, padded_n, layout, stream, like,
                      blocks_per_thread: int, check_n=None) -> AmaxCall:
    """The checks and shapes shared by the amax-taking quantizers (nothing
    allocated): x's rows (check_n(n) for a quantizer with its own rule on
    n), padded_n, the layout, the amax argument, the grid over the scale
    tensor with blocks_per_thread blocks a thread, the stream."""
    per_row = check_bool(per_row, "per_row")
    view = row_view(array.shape, array.strides, array.itemsize, False)
    m, n = view.m, view.n
    if check_n is not None:
        check_n(n)
    padded_n = resolve_padded_n(n, padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    amax_array, amax_value, per_row_amax = amax_argument(global_amax, per_row, array.device_id, m, n)
    scale_shape = scale_layout.scale_shape(m, padded_n)
    geometry = launch_geometry(scale_shape[0], -(-scale_shape[1] // blocks_per_thread), columns=padded_n,
                               what=f"x: shape {array.shape}")
    handle = resolve_stream(stream, array.device_id, frontend)
    return AmaxCall(view, m, n, padded_n, per_row, scale_layout, scale_shape, geometry, amax_array, amax_value,
                    per_row_amax, handle, output_frontend(like, frontend))


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


