"""NVFP4 quantization on the GPU: argument checks, output buffers, launch.

Everything a caller can get wrong is checked here, before any allocation is
written or any kernel launched."""

from __future__ import annotations

import contextlib
import functools
import numbers
from dataclasses import dataclass

import cupy as cp
import numpy as np

from . import _kernels
from ._compile import QuantizeVariant, Target
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
from ._format import RowView, block_size_of, check_dtype, resolve_layout, resolve_padded_n, row_view



def _byte_range(x: cp.ndarray, view: RowView) -> tuple[int, int]:
    """[first, last) byte addresses x's kernel reads can touch."""
    corners = [
        x.data.ptr + (e * view.expert_stride + r * view.row_stride) * x.itemsize
        for e in (0, view.experts - 1)
        for r in (0, view.m - 1)
    ]
    return min(corners), max(corners) + view.n * x.itemsize


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
    like=None,
    fmt="nvfp4",
):
    """Quantize x [..., n] (float16, bfloat16 or float32 on the GPU) to NVFP4
    (or, with fmt="mxfp4" and global_scale None, to OCP MXFP4).

    Returns (packed uint8 [m, padded_n // 2], scales uint8 in `layout`), the
    same bytes as nvfp4_cupy.reference.scaled_fp4_quant. `global_scale` is a
    host float, or a float32 device array read by the kernel: one element,
    one per row of x, or one per expert for x [E, m, n] (then packed is
    [E, m, padded_n // 2] and scales [E, ...], a scale tensor per expert).
    `padded_n` (default n rounded up to 16) pads K with zeros in the kernel.
    `out`/`out_scale` may be uninitialized buffers: every byte is written.
    `stream`: CuPy or torch stream; default CuPy's current stream, or torch's
    for a torch tensor. `like="torch"` returns torch tensors (zero-copy).
    """
    return _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt=fmt)


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


def _make_plan(x, padded_n, is_sf_swizzled_layout, layout, global_scales, fmt) -> _Plan:
    dtype_name = check_dtype(x.dtype)
    block_size = block_size_of(fmt)
    per_expert = global_scales == "expert"
    view = row_view(x.shape, x.strides, x.itemsize, per_expert)
    padded_n = resolve_padded_n(view.n, padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    scale_shape = scale_layout.scale_shape(view.m, padded_n, block_size)
    grid, block = launch_geometry(*scale_shape)
    if scale_shape[0] > MAX_INDEX or padded_n > MAX_INDEX or grid[1] > MAX_GRID_Y or view.experts > MAX_GRID_Y:
        raise ValueError(f"x: shape {x.shape} with padded_n={padded_n} is too large for one launch")
    batch = (view.experts,) if per_expert else ()
    aligned = all((stride * x.itemsize) % VECTOR_BYTES == 0 for stride in (view.row_stride, view.expert_stride))
    return _Plan(
        variants=tuple(
            QuantizeVariant(dtype_name, scale_layout, vector, global_scales, fmt) for vector in (False, True)
        ),
        view=view,
        aligned_rows=aligned and view.n % VECTOR_PIECE == 0,
        packed_shape=batch + (view.m, padded_n // 2),
        scale_shape=batch + scale_shape,
        grid=grid + (view.experts,),
        block=block,
        shape_args=(np.int64(view.row_stride),)
        + (() if fmt == "mxfp4" else (np.int64(view.expert_stride),))
        + (np.int32(view.m), np.int32(view.n), np.int32(padded_n)),
        scale_shape_args=(np.int32(scale_shape[0]), np.int32(scale_shape[1])),
    )


def _plan_for(x, padded_n, is_sf_swizzled_layout, layout, global_scales, fmt) -> _Plan:
    key = (x.shape, x.strides, x.dtype, padded_n, type(padded_n), is_sf_swizzled_layout,
           type(is_sf_swizzled_layout), layout, global_scales, fmt)
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: _make_plan says what is wrong with it
        return _make_plan(x, padded_n, is_sf_swizzled_layout, layout, global_scales, fmt)
    if plan is None:
        plan = _make_plan(x, padded_n, is_sf_swizzled_layout, layout, global_scales, fmt)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


def _quantize(
    x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like=None,
    target: Target | None = None, fmt="nvfp4",
):
    """scaled_fp4_quant, with the conversion target forced when given (tests
    run the sm_80 software path on newer GPUs this way)."""
    launch, outputs = prepare_quantize(
        x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, target, fmt
    )
    launch()
    return outputs


def prepare_quantize(
    x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like=None,
    target: Target | None = None, fmt="nvfp4",
):
    """Every check and allocation of a quantize call, nothing launched:
    returns (launch, (packed, scales)). quantize() checks both of its steps
    this way before running either."""
    check_like(like)
    source, x = x, device_array(x, "x")
    device_id = x.data.device_id
    if fmt == "mxfp4":
        if global_scale is not None:
            raise ValueError(f"global_scale must be None for fmt='mxfp4' (MX has no global scale), got {global_scale!r}")
        global_scale_array, global_scale_value, which = None, None, "one"
    else:
        global_scale_array, global_scale_value, which = global_scale_argument(global_scale, device_id, x.shape)
    plan = _plan_for(x, padded_n, is_sf_swizzled_layout, layout, which, fmt)
    switch_device = cp.cuda.runtime.getDevice() != device_id
    with cp.cuda.Device(device_id) if switch_device else contextlib.nullcontext():
        launch_on_current = stream is None and source is x
        stream = resolve_stream(stream, device_id, source)
        if out is not None:
            out = check_output(out, "out", plan.packed_shape, device_id)
        if out_scale is not None:
            out_scale = check_output(out_scale, "out_scale", plan.scale_shape, device_id)
        if plan.view.m and (out is not None or out_scale is not None):
            reads = [("x", _byte_range(x, plan.view))]
            if global_scale_array is not None:
                reads.append(("global_scale", byte_range(global_scale_array)))
            check_disjoint(reads, [(name, byte_range(b)) for name, b in (("out", out), ("out_scale", out_scale)) if b is not None])
        if out is None or out_scale is None:
            # Allocate on the launch stream, so the pool orders reuse after it.
            with contextlib.nullcontext() if launch_on_current else stream:
                if out is None:
                    out = cp.empty(plan.packed_shape, dtype=np.uint8)
                if out_scale is None:
                    out_scale = cp.empty(plan.scale_shape, dtype=np.uint8)
        outputs = as_like((out, out_scale), like)
        if plan.view.m == 0 or plan.view.experts == 0:
            return _nothing, outputs
        vector_loads = plan.aligned_rows and x.data.ptr % VECTOR_BYTES == 0
        (kernel,) = _kernels.kernel_functions(device_id, plan.variants[vector_loads], target)
        if fmt == "mxfp4":
            args = (x, *plan.shape_args, out, out_scale, *plan.scale_shape_args)
        else:
            scale_pointer = global_scale_array if global_scale_array is not None else NULL
            args = (x, *plan.shape_args, scale_pointer, global_scale_value, out, out_scale, *plan.scale_shape_args)
    if not switch_device:
        return functools.partial(kernel, plan.grid, plan.block, args, stream=stream), outputs

    def launch_on_device() -> None:
        with cp.cuda.Device(device_id):
            kernel(plan.grid, plan.block, args, stream=stream)

    return launch_on_device, outputs


def _nothing() -> None:
    """The launch of an empty call."""


def create_fp4_output_tensors(
    m, n, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, num_experts=None, fmt="nvfp4"
):
    """Uninitialized (packed, scales) buffers for scaled_fp4_quant on the
    current device; with num_experts, [E, ...] buffers for a per-expert call."""
    for name, value in (("m", m), ("n", n)) + ((("num_experts", num_experts),) if num_experts is not None else ()):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    block_size = block_size_of(fmt)
    padded_n = resolve_padded_n(int(n), padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    if m > MAX_INDEX or padded_n > MAX_INDEX or (num_experts or 0) > MAX_GRID_Y:
        raise ValueError(f"m={m}, padded_n={padded_n}, num_experts={num_experts} is too large for one launch")
    batch = () if num_experts is None else (int(num_experts),)
    return (
        cp.empty(batch + (int(m), padded_n // 2), dtype=np.uint8),
        cp.empty(batch + scale_layout.scale_shape(int(m), padded_n, block_size), dtype=np.uint8),
    )
