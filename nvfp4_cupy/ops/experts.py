"""SiLU-and-mul (alone, and fused with NVFP4/MXFP4 quantization) and expert
quantization on the GPU (docs/fused_ops.md, sections 4 and 5), bit-exact to
nvfp4_cupy.reference.fused: one kernel family, cuda_src/experts.cu.

- silu_and_mul(x): [..., 2n] -> [..., n] in x's dtype.
- silu_and_mul_quant(x, gs, ...): quantize(silu_and_mul(x)) in one pass;
  with expert_offsets or expert_counts, the expert forms below.
- scaled_fp4_experts_quant(x, gs, expert_offsets, ...): tokens sorted by
  expert (vLLM's layout: each expert's scales padded to the layout's row
  tile, starting at blockscale_offsets[e]).
- scaled_fp4_masked_quant(x, gs, expert_counts, ...): an [E, max_m, n] batch
  whose rows past each expert's count are neither read nor quantized.

Every argument is checked before anything is allocated or launched, with the
golden model's own checks (reference.fused) run on zero-memory NumPy stand-ins
of the device arrays' dtypes and shapes. validate=True also reads the offsets
or counts on the host (one device-to-host copy, which waits for the launch
stream); validate=False reads nothing back (the call can be captured in a CUDA
graph) and the kernel sanitizes the values as section 5.4 says.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from cupy.cuda import runtime

from .._format import (
    NUMPY_DTYPES,
    check_fmt_global_scale,
    dtype_name_of,
    host_global_scale,
    is_host_scalar,
    quantized_shapes,
    row_view,
)
from .._runtime.arrays import (
    c_strides,
    frontend_of,
    global_scale_argument,
    global_scale_steps,
    output_frontend,
    resolve_stream,
)
from .._runtime.compile import (
    EXPERT_KERNELS,
    THREADS_PER_BLOCK,
    RUNTIME_LAYOUT_IDS,
    ExpertsVariant,
    SiluAndMulVariant,
    experts_blocks_per_thread,
    kernel_constant,
)
from .._runtime.launch import VECTOR_BYTES, BoundKernel, bound_kernel, launch_geometry, rows_allow_vectors
from ..reference import fused as _golden
from ..reference.fused import experts_scale_rows

__all__ = ["silu_and_mul", "silu_and_mul_quant", "scaled_fp4_experts_quant", "scaled_fp4_masked_quant",
           "experts_scale_rows"]

MAX_EXPERTS = kernel_constant(ExpertsVariant.source, "kMaxExperts")  # the offsets the kernel stages
_SILU_VALUES_PER_THREAD = 16  # silu_and_mul's outputs a thread


def silu_and_mul(x, *, stream=None, like=None):
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (gate then up; float16,
    bfloat16 or float32 on the GPU), in x's dtype: silu32 and the product in
    float32, one rounding to the dtype, NaN canonical (docs/fused_ops.md,
    section 4.1). Returns [..., n]."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    dtype_name = frontend.dtype_name(array.dtype)
    _, _, n = _golden._check_gated(_stand_in(array, dtype_name))
    view = row_view(array.shape, array.strides, array.itemsize, False)
    # The last thread block's columns reach past the row by up to a block of threads' values.
    grid, block = launch_geometry(view.m, -(-n // _SILU_VALUES_PER_THREAD),
                                  columns=2 * n + THREADS_PER_BLOCK * _SILU_VALUES_PER_THREAD,
                                  what=f"x: shape {array.shape}", dense=True)
    handle = resolve_stream(stream, array.device_id, frontend)
    results = output_frontend(like, frontend)
    out = results.allocator(array.device_id, handle)((*array.shape[:-1], n), dtype_name)
    if view.m == 0:
        return out
    kernel = bound_kernel(SiluAndMulVariant(dtype_name), grid, block, dict(row_stride=view.row_stride, m=view.m, n=n),
                          ("x", "out", "vector_access"))
    vectors = rows_allow_vectors((view.row_stride * array.itemsize,), n) and array.pointer % VECTOR_BYTES == 0
    kernel(array.device_id, handle, array.pointer, results.pointer(out), int(vectors))
    return out


def silu_and_mul_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, fmt="nvfp4",
                       expert_offsets=None, expert_counts=None, validate=True, stream=None, like=None):
    """SiLU-and-mul fused with quantization, in one pass: the bytes of
    scaled_fp4_quant(silu_and_mul(x), global_scale, ...) (docs/fused_ops.md,
    section 4.2; the product is rounded to x's dtype before quantizing).

    - dense: x [..., 2n]; global_scale a host float, or a float32 device array
      of one element, one per row, or one per expert for x [E, m, 2n].
      Returns (packed, scales) as scaled_fp4_quant lays them out.
    - expert_offsets (int32 [E + 1] on the device), x [m, 2n] sorted by
      expert: vLLM's silu_and_mul_scaled_fp4_experts_quant; returns (packed,
      scales, blockscale_offsets), as scaled_fp4_experts_quant.
    - expert_counts (int32 [E] on the device), x [E, max_m, 2n]: as
      scaled_fp4_masked_quant (masked rows are not read).
    """
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    dtype_name = frontend.dtype_name(array.dtype)
    _, _, n = _golden._check_gated(_stand_in(array, dtype_name))
    if expert_offsets is not None and expert_counts is not None:
        raise ValueError("pass expert_offsets (tokens sorted by expert) or expert_counts (a masked [E, max_m, 2n] "
                         "batch), not both")
    if expert_offsets is not None:
        return _grouped(frontend, array, dtype_name, n, True, global_scale, expert_offsets, is_sf_swizzled_layout,
                        padded_n, layout, fmt, validate, stream, like)
    if expert_counts is not None:
        return _masked(frontend, array, dtype_name, n, True, global_scale, expert_counts, is_sf_swizzled_layout,
                       padded_n, layout, fmt, validate, stream, like)
    return _dense_silu(frontend, array, dtype_name, n, global_scale, is_sf_swizzled_layout, padded_n, layout, fmt,
                       stream, like)


def scaled_fp4_experts_quant(x, global_scale, expert_offsets, is_sf_swizzled_layout=True, padded_n=None, *,
                             layout=None, fmt="nvfp4", validate=True, stream=None, like=None):
    """vLLM's scaled_fp4_experts_quant (docs/fused_ops.md, section 5.2): x
    [m, n] holds m tokens sorted by expert, expert e owning rows
    expert_offsets[e]:expert_offsets[e + 1] (int32 [E + 1] on the device, at
    most 1024 experts); rows from expert_offsets[E] on belong to no expert and
    give 0x00. Expert e is quantized under global_scale[e] (a float32 device
    array [E], or one scale for all: a host float or a one-element array;
    None with fmt="mxfp4"). Its scales form a complete scale tensor of
    round_up(count_e, R) rows (R = 128, 8 or 1 by layout) from scale row b[e].

    Returns (packed uint8 [m, padded_n / 2], scales uint8
    [experts_scale_rows(m, E, layout), cols], blockscale_offsets int32
    [E + 1], the b computed on the device). validate=False skips the host
    check of the offsets (no device-to-host copy)."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    dtype_name = frontend.dtype_name(array.dtype)
    _, _, _, n = _golden._check_x(_stand_in(array, dtype_name))
    return _grouped(frontend, array, dtype_name, n, False, global_scale, expert_offsets, is_sf_swizzled_layout,
                    padded_n, layout, fmt, validate, stream, like)


def scaled_fp4_masked_quant(x, global_scale, expert_counts, is_sf_swizzled_layout=True, padded_n=None, *,
                            layout=None, fmt="nvfp4", validate=True, stream=None, like=None):
    """The masked expert batch (docs/fused_ops.md, section 5.3; FlashInfer's
    scaled_fp4_grouped_quantize): x [E, max_m, n], rows 0..expert_counts[e] - 1
    of expert e (int32 [E] on the device, each in [0, max_m]) quantized under
    global_scale[e] (float32 [E], or one scale for all); the other rows are
    not read, their bytes 0x00. Returns (packed [E, max_m, padded_n / 2],
    scales [E, rows, cols]), a complete scale tensor per expert."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    dtype_name = frontend.dtype_name(array.dtype)
    _, _, _, n = _golden._check_x(_stand_in(array, dtype_name))
    return _masked(frontend, array, dtype_name, n, False, global_scale, expert_counts, is_sf_swizzled_layout,
                   padded_n, layout, fmt, validate, stream, like)


# ---------------------------------------------------------------------------
# The three launches
# ---------------------------------------------------------------------------
def _dense_silu(frontend, array, dtype_name, n, global_scale, is_sf_swizzled_layout, padded_n, layout, fmt, stream,
                like):
    out_shape = (*array.shape[:-1], n)
    padded_n, scale_layout = _golden._check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    device_id = array.device_id
    if fmt == "mxfp4":
        scale = global_scale_argument(1.0, device_id, out_shape)  # unused by the MXFP4 kernel
    else:
        scale = global_scale_argument(global_scale, device_id, out_shape)
    view = row_view(array.shape, array.strides, array.itemsize, scale.kind == "expert")
    kernel = _batch_kernel(array, view, dtype_name, n, True, fmt, scale_layout, padded_n,
                           global_scale_steps(scale.kind, view.m))
    shapes = quantized_shapes(out_shape, padded_n, is_sf_swizzled_layout, layout, scale.kind, fmt)
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    packed, scales = results.outputs(device_id, handle, tuple((shape, "uint8") for shape in shapes))
    if view.m and view.experts:
        kernel(device_id, handle, array.pointer, scale.pointer, scale.value, 0, results.pointer(packed),
               results.pointer(scales), int(_vectors(array, view, n)))
    return packed, scales


def _masked(frontend, array, dtype_name, n, silu, global_scale, expert_counts, is_sf_swizzled_layout, padded_n,
            layout, fmt, validate, stream, like):
    if len(array.shape) != 3:
        what = "[E, max_m, 2n]" if silu else "[E, max_m, n]"
        raise ValueError(f"x must be {what} with expert_counts, got shape {tuple(array.shape)}")
    experts, max_m = array.shape[0], array.shape[1]
    padded_n, scale_layout = _golden._check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    device_id = array.device_id
    counts = _int32_device_vector(expert_counts, "expert_counts", device_id)
    _golden._check_counts(_stand_in(counts), experts, max_m, validate)
    scale_pointer, scale_value, expert_step = _expert_scale(global_scale, experts, fmt, device_id)
    view = row_view(array.shape, array.strides, array.itemsize, True)
    kernel = _batch_kernel(array, view, dtype_name, n, silu, fmt, scale_layout, padded_n, (expert_step, 0))
    handle = resolve_stream(stream, device_id, frontend)
    if validate and experts:
        _golden._check_counts(_read_host(counts, handle), experts, max_m, True)
    shapes = quantized_shapes((experts, max_m, n), padded_n, is_sf_swizzled_layout, layout, "expert", fmt)
    results = output_frontend(like, frontend)
    packed, scales = results.outputs(device_id, handle, tuple((shape, "uint8") for shape in shapes))
    if max_m and experts:
        kernel(device_id, handle, array.pointer, scale_pointer, scale_value, counts.pointer, results.pointer(packed),
               results.pointer(scales), int(_vectors(array, view, n)))
    return packed, scales


def _grouped(frontend, array, dtype_name, n, silu, global_scale, expert_offsets, is_sf_swizzled_layout, padded_n,
             layout, fmt, validate, stream, like):
    if len(array.shape) != 2:
        what = "[m, 2n]" if silu else "[m, n]"
        raise ValueError(f"x must be {what} (tokens sorted by expert) with expert_offsets, got shape "
                         f"{tuple(array.shape)}")
    tokens = array.shape[0]
    padded_n, scale_layout = _golden._check_quant_args(fmt, global_scale, n, padded_n, is_sf_swizzled_layout, layout)
    device_id = array.device_id
    offsets = _int32_device_vector(expert_offsets, "expert_offsets", device_id)
    _golden._check_offsets(_stand_in(offsets), tokens, validate)
    experts = offsets.shape[0] - 1
    if experts > MAX_EXPERTS:
        raise ValueError(f"expert_offsets: at most {MAX_EXPERTS} experts a call (the kernel stages the offsets in "
                         f"shared memory), got E={experts}")
    scale_pointer, scale_value, expert_step = _expert_scale(global_scale, experts, fmt, device_id)
    view = row_view(array.shape, array.strides, array.itemsize, False)
    block_size = check_fmt_global_scale(fmt, None)
    scale_rows = experts_scale_rows(tokens, experts, scale_layout.name)
    scale_cols = scale_layout.scale_shape(0, padded_n, block_size)[1]
    per_thread = experts_blocks_per_thread(dtype_name, fmt, silu)
    grid, block = launch_geometry(tokens, -(-scale_cols // per_thread),
                                  columns=_column_extent(padded_n, array.shape[1], per_thread, block_size),
                                  what=f"x: shape {tuple(array.shape)} with padded_n={padded_n}", dense=True)
    layout_id = RUNTIME_LAYOUT_IDS[scale_layout.name]
    variant = ExpertsVariant(dtype_name, fmt)
    row_map = bound_kernel(variant, (grouped_map_blocks(tokens, experts), 1, 1), (THREADS_PER_BLOCK, 1, 1),
                           dict(m=tokens, scale_rows=scale_rows, scale_cols=scale_cols, layout_id=layout_id,
                                experts=experts, row_tile=scale_layout.row_multiple),
                           ("expert_offsets", "row_map", "scales", "blockscale_offsets"),
                           index=EXPERT_KERNELS.index("grouped_row_map"))
    quantize = bound_kernel(variant, grid, block,
                            dict(row_stride=view.row_stride, m=tokens, n=n, padded_n=padded_n, scale_cols=scale_cols,
                                 layout_id=layout_id, gs_expert_step=expert_step),
                            ("x", "global_scale_ptr", "global_scale_value", "row_map", "packed", "scales",
                             "vector_loads"),
                            index=EXPERT_KERNELS.index("grouped_silu" if silu else "grouped"))
    handle = resolve_stream(stream, device_id, frontend)
    if validate:
        _golden._check_offsets(_read_host(offsets, handle), tokens, True)
    results = output_frontend(like, frontend)
    packed, scales, starts = results.outputs(
        device_id, handle, (((tokens, padded_n // 2), "uint8"), ((scale_rows, scale_cols), "uint8"),
                            ((experts + 1,), "int32")))
    # Each token row's (expert, scale row): the kernels' scratch, freed (stream-ordered) after the call.
    row_entries = results.allocator(device_id, handle)((max(tokens, 1), 2), "int32")
    row_map(device_id, handle, offsets.pointer, results.pointer(row_entries), results.pointer(scales),
            results.pointer(starts))
    if tokens:
        quantize(device_id, handle, array.pointer, scale_pointer, scale_value, results.pointer(row_entries),
                 results.pointer(packed), results.pointer(scales), int(_vectors(array, view, n)))
    return packed, scales, starts


# grouped_row_map's grid: a thread block per THREADS_PER_BLOCK token rows and
# per expert (each zeroes its padding rows), at least GROUPED_MAP_MIN_BLOCKS
# (the rows past the last expert's tiles, zeroed by every thread, can be
# many) and at most GROUPED_MAP_MAX_BLOCKS; each stages the offsets once.
GROUPED_MAP_MIN_BLOCKS = 132
GROUPED_MAP_MAX_BLOCKS = 1024


def grouped_map_blocks(tokens: int, experts: int) -> int:
    """The thread blocks of grouped_row_map for a call."""
    wanted = max(-(-tokens // THREADS_PER_BLOCK), experts, GROUPED_MAP_MIN_BLOCKS)
    return min(GROUPED_MAP_MAX_BLOCKS, wanted)


def _column_extent(padded_n: int, row_values: int, per_thread: int, block_size: int) -> int:
    """The largest column a thread of these kernels computes: the last thread
    block of a row reaches past padded_n by up to a block of threads' blocks
    (the kernels' column arithmetic is 32-bit: launch_geometry bounds this)."""
    return max(padded_n, row_values) + THREADS_PER_BLOCK * per_thread * block_size


def _batch_kernel(array, view, dtype_name, n, silu, fmt, scale_layout, padded_n, gs_steps) -> BoundKernel:
    """quantize_batch over view.experts batches of view.m rows (dense, per
    expert, or masked with counts), its geometry checked: launched with
    (x, global_scale_ptr, global_scale_value, expert_counts, packed, scales,
    vector_loads)."""
    block_size = check_fmt_global_scale(fmt, None)
    scale_rows, scale_cols = scale_layout.scale_shape(view.m, padded_n, block_size)
    per_thread = experts_blocks_per_thread(dtype_name, fmt, silu)
    grid, block = launch_geometry(scale_rows, -(-scale_cols // per_thread), batch=view.experts,
                                  columns=_column_extent(padded_n, view.n, per_thread, block_size),
                                  what=f"x: shape {tuple(array.shape)} with padded_n={padded_n}", dense=True)
    static = dict(row_stride=view.row_stride, expert_stride=view.expert_stride, m=view.m, n=n, padded_n=padded_n,
                  scale_rows=scale_rows, scale_cols=scale_cols, layout_id=RUNTIME_LAYOUT_IDS[scale_layout.name],
                  gs_expert_step=gs_steps[0], gs_row_step=gs_steps[1])
    return bound_kernel(ExpertsVariant(dtype_name, fmt), grid, block, static,
                        ("x", "global_scale_ptr", "global_scale_value", "expert_counts", "packed", "scales",
                         "vector_loads"), index=EXPERT_KERNELS.index("batch_silu" if silu else "batch"))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _vectors(array, view, n: int) -> bool:
    """16-byte loads: aligned rows, and n % 8 == 0 so that no 16-byte piece
    straddles n (for SiLU-and-mul, the gate/up boundary too)."""
    strides = (view.row_stride * array.itemsize, view.expert_stride * array.itemsize)
    return rows_allow_vectors(strides, n) and array.pointer % VECTOR_BYTES == 0


def _stand_in(array, dtype_name: str | None = None) -> np.ndarray:
    """A zero-memory NumPy array of a device array's dtype and shape: what the
    golden model's checks read (they never read its values)."""
    name = dtype_name or dtype_name_of(array.dtype)
    try:
        dtype = NUMPY_DTYPES.get(name) or np.dtype(name)
    except TypeError:
        raise TypeError(f"unsupported device array dtype {name}") from None
    return np.broadcast_to(np.zeros((), dtype), array.shape)


def _int32_device_vector(value, name: str, device_id: int):
    """The device array (CuPy or torch, on x's device, contiguous) of expert
    offsets or counts; the golden model's checks then read its dtype and shape.
    A NumPy array is refused: the kernel reads the values on the device."""
    if value is None or is_host_scalar(value) or isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be an int32 device array (CuPy or a CUDA tensor), got {type(value).__name__}")
    if isinstance(value, np.ndarray):
        raise TypeError(f"{name} is a NumPy (host) array, but the kernel reads it on the device: pass a CuPy array "
                        "or a CUDA tensor")
    array = frontend_of(value).array(value, name)
    if array.device_id != device_id:
        raise ValueError(f"{name} is on device {array.device_id} but x is on device {device_id}")
    if len(array.shape) == 1 and array.shape[0] > 1 and array.strides != c_strides(array.shape, array.itemsize):
        raise ValueError(f"{name} must be contiguous, got strides {array.strides}")
    return array


def _expert_scale(global_scale, experts: int, fmt: str, device_id: int) -> tuple[int, float, int]:
    """(device pointer or 0, host value, expert step) of an expert batch's
    global scale: a host scalar or a one-element array for all experts, or a
    float32 [E] device array (the golden model's _expert_scales rules)."""
    check_fmt_global_scale(fmt, global_scale)
    if fmt == "mxfp4":
        return 0, 0.0, 0
    if is_host_scalar(global_scale) or not hasattr(global_scale, "__dlpack__"):
        return 0, float(host_global_scale(global_scale)), 0
    array = frontend_of(global_scale).array(global_scale, "global_scale")
    if array.device_id != device_id:
        raise ValueError(f"global_scale is on device {array.device_id} but x is on device {device_id}")
    _golden._expert_scales(_stand_in(array), experts, fmt)
    size = math.prod(array.shape)
    if size > 1 and array.strides != c_strides(array.shape, 4):
        raise ValueError(f"global_scale must be contiguous, got strides {array.strides}")
    return array.pointer, 0.0, int(size > 1)


def _read_host(array, handle: int) -> np.ndarray:
    """The values of a small int32 device array, copied on the launch stream
    (after the work that made them) and waited for."""
    host = np.empty(array.shape, np.int32)
    if host.size:
        with _on_device(array.device_id):
            runtime.memcpyAsync(host.ctypes.data, array.pointer, host.nbytes, runtime.memcpyDeviceToHost, handle)
            runtime.streamSynchronize(handle)
    return host


def _memset_zero(pointer: int, nbytes: int, device_id: int, handle: int) -> None:
    with _on_device(device_id):
        runtime.memsetAsync(pointer, 0, nbytes, handle)


@contextlib.contextmanager
def _on_device(device_id: int):
    previous = runtime.getDevice()
    if previous == device_id:
        yield
        return
    runtime.setDevice(device_id)
    try:
        yield
    finally:
        runtime.setDevice(previous)
