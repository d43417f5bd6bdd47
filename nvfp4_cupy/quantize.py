"""NVFP4 quantization on the GPU: argument checks, output buffers, launch.

Everything a caller can get wrong is checked here, before any allocation is
written or any kernel launched."""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass

import cupy as cp
import numpy as np

from . import _kernels
from ._compile import QuantizeVariant, Target
from ._format import (
    RowView,
    check_dtype,
    host_global_scale,
    resolve_layout,
    resolve_padded_n,
    row_view,
)

_THREADS_PER_BLOCK = 256
_VECTOR_BYTES = 16
_VECTOR_PIECE = 8  # n % 8 == 0: every 16-byte load lies wholly inside or outside a row
_MAX_GRID_Y = 65535
_MAX_INDEX = 2**31 - 1  # rows and columns are 32-bit in the kernel
_NULL = np.uint64(0)  # no device global scale
_UINT8 = np.dtype(np.uint8)


def _device_array(obj, name: str) -> cp.ndarray:
    """A CuPy array, or any DLPack producer (a torch CUDA tensor) zero-copy."""
    if isinstance(obj, cp.ndarray):
        return obj
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a NumPy (host) array; pass a CuPy array or a CUDA tensor")
    if hasattr(obj, "__dlpack__"):
        try:
            return cp.from_dlpack(obj)
        except Exception as exc:  # the producer's own error says why (CPU tensor, dtype, ...)
            raise TypeError(f"{name}: cannot use {type(obj).__name__} as a CUDA array: {exc}") from None
    raise TypeError(f"{name} must be a CuPy array or a CUDA tensor, got {type(obj).__name__}")


def _byte_range(x: cp.ndarray, view: RowView) -> tuple[int, int]:
    """[first, last) byte addresses x's kernel reads can touch."""
    corners = [
        x.data.ptr + (e * view.expert_stride + r * view.row_stride) * x.itemsize
        for e in (0, view.experts - 1)
        for r in (0, view.m - 1)
    ]
    return min(corners), max(corners) + view.n * x.itemsize


def _check_output(buffer, name: str, shape: tuple[int, int], device_id: int) -> cp.ndarray:
    buffer = _device_array(buffer, name)
    if buffer.dtype is not _UINT8 and buffer.dtype != _UINT8:  # identity first: the common case
        raise TypeError(f"{name} must have dtype uint8, got {buffer.dtype}")
    if buffer.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {buffer.shape}")
    if not buffer.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {buffer.strides}")
    if buffer.data.device_id != device_id:
        raise ValueError(f"{name} is on device {buffer.data.device_id} but x is on device {device_id}")
    return buffer


def _global_scale_argument(global_scale, device_id: int, x_shape: tuple):
    """(device array or None, host float32, per expert): a device scale is
    read by the kernel (no host sync, capturable in CUDA graphs); a host one is
    checked here. A 1-D device array of length E with x of shape [E, m, n]
    gives each expert its own scale."""
    if type(global_scale) is float or (
        isinstance(global_scale, (numbers.Real, np.generic)) and not isinstance(global_scale, np.ndarray)
    ):
        return None, host_global_scale(global_scale), False
    array = _device_array(global_scale, "global_scale")
    if array.dtype != np.float32:
        raise TypeError(f"global_scale as a device array must be float32, got {array.dtype}")
    per_expert = len(x_shape) == 3 and array.ndim == 1 and array.shape[0] == x_shape[0]
    if array.size != 1 and not per_expert:
        raise ValueError(
            f"global_scale as a device array must hold one element, or one per expert for x of shape "
            f"[E, m, n], got shape {array.shape} for x of shape {x_shape}"
        )
    if array.data.device_id != device_id:
        raise ValueError(f"global_scale is on device {array.data.device_id} but x is on device {device_id}")
    return array, np.float32(0), per_expert


def _resolve_stream(stream, device_id: int):
    if stream is None:
        return cp.cuda.get_current_stream()
    if not isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        raise TypeError(f"stream must be a cupy.cuda.Stream or None, got {type(stream).__name__}")
    stream_device = getattr(stream, "device_id", device_id)
    if stream_device not in (-1, device_id):
        raise ValueError(f"stream belongs to device {stream_device} but x is on device {device_id}")
    return stream


def _launch_geometry(scale_rows: int, scale_cols: int):
    """One thread per 16-value block: threads x over block columns (a power of
    two), y over rows, 256 in all. Returns (grid, block)."""
    threads_x = min(_THREADS_PER_BLOCK, 1 << (scale_cols - 1).bit_length())
    threads_y = _THREADS_PER_BLOCK // threads_x
    grid = (-(-scale_rows // threads_y), -(-scale_cols // threads_x))
    return grid, (threads_x, threads_y)


def scaled_fp4_quant(
    x,
    global_scale,
    is_sf_swizzled_layout=True,
    padded_n=None,
    *,
    layout=None,
    out=None,
    out_scale=None,
    stream=None,
):
    """Quantize x [..., n] (float16, bfloat16 or float32 on the GPU) to NVFP4.

    Returns (packed uint8 [m, padded_n // 2], scales uint8 in `layout`), the
    same bytes as nvfp4_cupy.reference.scaled_fp4_quant. `global_scale` is a
    host float, or a 1-element float32 device array read by the kernel.
    `padded_n` (default n rounded up to 16) pads K with zeros in the kernel.
    `out`/`out_scale` may be uninitialized buffers: every byte is written.
    """
    return _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream)


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that follows from x's shape, strides and dtype
    and the layout arguments: worked out once, then reused for every call of
    the same form (serving loops repeat a handful of shapes)."""

    variants: tuple  # (general loads, 16-byte loads)
    view: RowView
    aligned_rows: bool  # 16-byte loads possible if the base pointer is aligned
    packed_shape: tuple
    scale_shape: tuple
    grid: tuple
    block: tuple
    shape_args: tuple  # kernel arguments between x and the global scale
    scale_shape_args: tuple  # the last two kernel arguments


_plans: dict = {}
_MAX_PLANS = 4096


def _make_plan(x, padded_n, is_sf_swizzled_layout, layout, per_expert) -> _Plan:
    dtype_name = check_dtype(x.dtype)
    view = row_view(x.shape, x.strides, x.itemsize, per_expert)
    padded_n = resolve_padded_n(view.n, padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    scale_shape = scale_layout.scale_shape(view.m, padded_n)
    grid, block = _launch_geometry(*scale_shape)
    if scale_shape[0] > _MAX_INDEX or padded_n > _MAX_INDEX or grid[1] > _MAX_GRID_Y or view.experts > _MAX_GRID_Y:
        raise ValueError(f"x: shape {x.shape} with padded_n={padded_n} is too large for one launch")
    batch = (view.experts,) if per_expert else ()
    aligned = all((stride * x.itemsize) % _VECTOR_BYTES == 0 for stride in (view.row_stride, view.expert_stride))
    return _Plan(
        variants=tuple(QuantizeVariant(dtype_name, scale_layout, vector, per_expert) for vector in (False, True)),
        view=view,
        aligned_rows=aligned and view.n % _VECTOR_PIECE == 0,
        packed_shape=batch + (view.m, padded_n // 2),
        scale_shape=batch + scale_shape,
        grid=grid + (view.experts,),
        block=block,
        shape_args=(np.int64(view.row_stride), np.int64(view.expert_stride), np.int32(view.m), np.int32(view.n),
                    np.int32(padded_n)),
        scale_shape_args=(np.int32(scale_shape[0]), np.int32(scale_shape[1])),
    )


def _plan_for(x, padded_n, is_sf_swizzled_layout, layout, per_expert) -> _Plan:
    key = (x.shape, x.strides, x.dtype, padded_n, type(padded_n), is_sf_swizzled_layout,
           type(is_sf_swizzled_layout), layout, per_expert)
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: _make_plan says what is wrong with it
        return _make_plan(x, padded_n, is_sf_swizzled_layout, layout, per_expert)
    if plan is None:
        plan = _make_plan(x, padded_n, is_sf_swizzled_layout, layout, per_expert)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


def _quantize(
    x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, target: Target | None = None
):
    """scaled_fp4_quant, with the conversion target forced when given (tests
    run the sm_80 software path on newer GPUs this way)."""
    x = _device_array(x, "x")
    device_id = x.data.device_id
    global_scale_array, global_scale_value, per_expert = _global_scale_argument(global_scale, device_id, x.shape)
    plan = _plan_for(x, padded_n, is_sf_swizzled_layout, layout, per_expert)
    switch_device = cp.cuda.runtime.getDevice() != device_id
    with cp.cuda.Device(device_id) if switch_device else contextlib.nullcontext():
        allocate_on = contextlib.nullcontext() if stream is None else stream
        stream = _resolve_stream(stream, device_id)
        if out is not None:
            out = _check_output(out, "out", plan.packed_shape, device_id)
        if out_scale is not None:
            out_scale = _check_output(out_scale, "out_scale", plan.scale_shape, device_id)
        if plan.view.m and (out is not None or out_scale is not None):
            _check_no_overlap(x, plan, out, out_scale)
        if out is None or out_scale is None:
            # Allocate on the launch stream, so the pool orders reuse after it.
            with allocate_on:
                if out is None:
                    out = cp.empty(plan.packed_shape, dtype=np.uint8)
                if out_scale is None:
                    out_scale = cp.empty(plan.scale_shape, dtype=np.uint8)
        if plan.view.m == 0 or plan.view.experts == 0:
            return out, out_scale
        vector_loads = plan.aligned_rows and x.data.ptr % _VECTOR_BYTES == 0
        kernel = _kernels.quantize_function(device_id, plan.variants[vector_loads], target)
        scale_pointer = global_scale_array if global_scale_array is not None else _NULL
        kernel(
            plan.grid,
            plan.block,
            (x, *plan.shape_args, scale_pointer, global_scale_value, out, out_scale, *plan.scale_shape_args),
            stream=stream,
        )
    return out, out_scale


def _check_no_overlap(x, plan: _Plan, out, out_scale) -> None:
    ranges = [("x", _byte_range(x, plan.view))] + [
        (name, (buffer.data.ptr, buffer.data.ptr + buffer.nbytes))
        for name, buffer in (("out", out), ("out_scale", out_scale))
        if buffer is not None and buffer.nbytes
    ]
    for i, (name_a, (lo_a, hi_a)) in enumerate(ranges):
        for name_b, (lo_b, hi_b) in ranges[i + 1 :]:
            if lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{name_b} overlaps {name_a} in device memory; pass separate buffers")


def create_fp4_output_tensors(m, n, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, num_experts=None):
    """Uninitialized (packed, scales) buffers for scaled_fp4_quant on the
    current device; with num_experts, [E, ...] buffers for a per-expert call."""
    for name, value in (("m", m), ("n", n)) + ((("num_experts", num_experts),) if num_experts is not None else ()):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    padded_n = resolve_padded_n(int(n), padded_n)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    batch = () if num_experts is None else (int(num_experts),)
    return (
        cp.empty(batch + (int(m), padded_n // 2), dtype=np.uint8),
        cp.empty(batch + scale_layout.scale_shape(int(m), padded_n), dtype=np.uint8),
    )
