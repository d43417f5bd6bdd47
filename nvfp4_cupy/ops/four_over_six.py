"""TransformerEngine's Four Over Six NVFP4 quantization on the GPU
(cuda_src/four_over_six.cu; docs/te_rht_and_4over6.md, parts B and E.3):
the bytes of nvfp4_cupy.reference.te_4over6.scaled_fp4_quant_4over6. Every
check runs before the outputs are allocated or a kernel launched."""

from __future__ import annotations

from .._runtime.arrays import frontend_of
from .._runtime.compile import FourOverSixVariant, kernel_constant
from .._runtime.launch import VECTOR_BYTES, bound_kernel, rows_allow_vectors
from ..reference import te_rht as _te_rht
from .global_scale import prepare_global_amax
from .rht import prepare_amax_call

_DYNAMIC = ("x", "amax_ptr", "amax_value", "packed", "scales")
# Blocks of 16 a thread quantizes (four_over_six.cu), blockDim.x apart.
BLOCKS_PER_THREAD = kernel_constant(FourOverSixVariant.source, "k4over6BlocksPerThread")


def scaled_fp4_quant_4over6(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                            err_mode="MAE", e4m3_max=448, err_use_fast_math=False, per_row=False, rht=False,
                            fmt="nvfp4", stream=None, like=None):
    """TE's Four Over Six quantization of x [..., n] (float16, bfloat16 or
    float32 on the GPU) along n: each block of 16 quantized with its scale
    mapped to 6 and to 4, the candidate with the smaller error kept
    (`err_mode` "MAE" or "MSE", measured on TE's float16 candidate with
    `err_use_fast_math`), under S_enc = 6 * e4m3_max / A (e4m3_max 448 or
    256). A = max |x| (per row with per_row=True), computed on the device,
    unless `global_amax` is given (a host number, finite and >= 0, or a
    float32 device array of one element or one per row, read by the kernel
    as it is). rht=True and fmt="mxfp4" are refused, as TE refuses them.
    Returns (packed uint8 [m, padded_n // 2], scales in the layout,
    global_amax): the computed float32 [1] or [m] device array, or the
    given one."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    dtype_name = frontend.dtype_name(array.dtype)
    e4m3_max, err_mode, fast_math = _te_rht.check_te_options(
        fmt=fmt, rht=rht, four_over_six=True, e4m3_max=e4m3_max, err_mode=err_mode,
        err_use_fast_math=err_use_fast_math)
    call = prepare_amax_call(frontend, array, global_amax, per_row, is_sf_swizzled_layout, padded_n, layout, stream,
                             like, BLOCKS_PER_THREAD)
    m, n, results, handle = call.m, call.n, call.results, call.handle
    if global_amax is None:  # A = max |x| over the unpadded values, in one launch
        launch_amax, returned_amax = prepare_global_amax(x, call.per_row, stream, like)
    packed, scales = results.outputs(device_id, handle,
                                     (((m, call.padded_n // 2), "uint8"), (call.scale_shape, "uint8")))
    if global_amax is None:
        launch_amax()
        amax_pointer = results.pointer(returned_amax)
    else:
        returned_amax, amax_pointer = global_amax, call.amax_pointer
    if m == 0:
        return packed, scales, returned_amax
    row_stride = call.view.row_stride
    vectors = rows_allow_vectors((row_stride * array.itemsize,), n) and array.pointer % VECTOR_BYTES == 0
    variant = FourOverSixVariant(dtype_name, call.scale_layout, vectors, err_mode == "MSE")
    kernel = bound_kernel(variant, *call.geometry,
                          dict(row_stride=row_stride, m=m, n=n, padded_n=call.padded_n, scale_rows=call.scale_shape[0],
                               scale_cols=call.scale_shape[1], denominator=float(6 * e4m3_max),
                               fast_math=int(fast_math), per_row=int(call.per_row_amax)), _DYNAMIC)
    kernel(device_id, handle, array.pointer, amax_pointer, call.amax_value, results.pointer(packed),
           results.pointer(scales))
    return packed, scales, returned_amax
