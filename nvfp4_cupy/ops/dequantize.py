"""NVFP4 / MXFP4 back to float16, bfloat16 or float32 on the GPU, bit-exact
to nvfp4_cupy.reference.dequantize (docs/format.md, Dequantization)."""

from __future__ import annotations

from dataclasses import dataclass

from .._format import (
    BLOCK_SIZE,
    DEFAULT_DEQUANTIZE_DTYPE,
    check_dtype,
    check_fmt_global_scale,
    check_scales,
    dequantize_shape,
    resolve_layout,
)
from .._runtime.arrays import (
    c_strides,
    check_disjoint,
    check_output,
    frontend_of,
    global_scale_argument,
    global_scale_steps,
    output_frontend,
    resolve_stream,
)
from .._runtime.compile import DequantizeVariant
from .._runtime.launch import VECTOR_BYTES, VECTOR_PIECE, BoundKernel, launch_geometry

# Blocks a thread takes (the kernel's `steps`): the most the kernel allows
# while the launch keeps THREADS_WANTED threads (about one wave of a 132-SM
# GPU at the four 256-thread blocks an SM the kernel's registers allow), fewer
# for small tensors, down to one. More blocks a thread pay its fixed work
# (indices, loads in flight, the scale tables) once for all of them.
THREADS_WANTED = 1 << 17
# The kernel's segments of threads x (cuda_src/dequantize.cu) need at least 8.
MIN_THREADS_X = 8


def dequantize_fp4(packed, scales, global_scale, n=None, *, layout="swizzled", dtype=DEFAULT_DEQUANTIZE_DTYPE,
                   out=None, stream=None, like=None, fmt="nvfp4"):
    """packed uint8 [m, padded_n // 2] (or [E, m, padded_n // 2], an expert
    batch) and its scales (in `layout`) -> `dtype` [m, n] (default float32; n
    defaults to padded_n): e2m1 * float(e4m3) / global_scale in IEEE float32,
    then one rounding to dtype; NaN results are the dtype's canonical quiet
    NaN. `global_scale`: a host float, or a float32 device array of one
    element, one per row or one per expert. fmt="mxfp4": E8M0 scales of
    32-value blocks, global_scale None."""
    frontend = frontend_of(packed)
    source = frontend.array(packed, "packed")
    shape = dequantize_shape(source.shape, source.dtype, n, layout, fmt)
    if source.strides != c_strides(source.shape, 1):
        raise ValueError(f"packed must be C-contiguous, got strides {source.strides}")
    dtype_name = check_dtype(dtype, "dtype")
    device_id = source.device_id
    scale_array = frontend_of(scales).array(scales, "scales")
    check_scales(scale_array.dtype, scale_array.shape, shape.scale_shape)
    check_output(scales, "scales", shape.scale_shape, "uint8", device_id, "packed")
    check_fmt_global_scale(fmt, global_scale)
    if fmt == "mxfp4":
        scale = global_scale_argument(1.0, device_id, shape.x_shape, "packed")
    else:
        scale = global_scale_argument(global_scale, device_id, shape.x_shape, "packed")
    plan = _plan_for(shape, layout, dtype_name, fmt, scale.kind)
    handle = resolve_stream(stream, device_id, frontend, "packed")
    results = output_frontend(like, frontend)
    if out is not None:
        target = check_output(out, "out", shape.out_shape, dtype_name, device_id, "packed")
        reads = [("packed", source.byte_range()), ("scales", scale_array.byte_range())]
        if scale.array is not None:
            reads.append(("global_scale", scale.array.byte_range()))
        check_disjoint(reads, [("out", target.byte_range())])
        out_pointer = target.pointer
    else:
        out = results.allocator(device_id, handle)(shape.out_shape, dtype_name)
        out_pointer = results.pointer(out)
    if shape.m and shape.experts != 0:
        kernel = plan.kernels[plan.kernels[1] is not None and out_pointer % VECTOR_BYTES == 0]
        kernel(device_id, handle, source.pointer, scale_array.pointer, scale.pointer, scale.value, out_pointer)
    return results.as_frontend((out,))[0]


@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element stores, with 16-byte stores (None where impossible)


_plans: dict = {}


def _plan_for(shape, layout, dtype_name, fmt, scale_kind) -> _Plan:
    key = (shape, layout, dtype_name, fmt, scale_kind)
    plan = _plans.get(key)
    if plan is None:
        scale_layout = resolve_layout(layout=layout)
        batch = shape.experts if shape.experts is not None else 1
        variants = [DequantizeVariant(dtype_name, scale_layout, vector, fmt) for vector in (False, True)]
        steps = blocks_per_thread(shape.m * batch, shape.padded_n // BLOCK_SIZE, variants[0].max_blocks_per_thread)
        # launch_geometry maps one thread per unit of a row; here a unit is a
        # thread's `steps` blocks.
        grid, block = launch_geometry(shape.m, max(-(-(shape.padded_n // BLOCK_SIZE) // steps), MIN_THREADS_X),
                                      batch=batch, columns=shape.padded_n,
                                      what=f"packed of shape {shape.out_shape[:-1] + (shape.padded_n // 2,)}")
        expert_step, row_step = global_scale_steps(scale_kind, shape.m)
        static = dict(m=shape.m, n=shape.n, blocks_per_row=shape.padded_n // BLOCK_SIZE, steps=steps,
                      global_scale_expert_step=expert_step, global_scale_row_step=row_step,
                      scale_expert_stride=shape.scale_shape[-2] * shape.scale_shape[-1],
                      scale_cols=shape.scale_shape[-1])
        dynamic = ("packed", "scales", "global_scale_ptr", "global_scale_value", "out")
        plan = _plans[key] = _Plan(tuple(
            BoundKernel(variant, grid, block, static, dynamic)
            if (shape.n % VECTOR_PIECE == 0 or not variant.vector_stores) else None
            for variant in variants
        ))
    return plan


def blocks_per_thread(rows: int, blocks_per_row: int, most: int) -> int:
    """The kernel's `steps` for `rows` rows of `blocks_per_row` blocks: the
    largest power of two up to `most` that leaves THREADS_WANTED threads."""
    steps = most
    while steps > 1 and rows * -(-blocks_per_row // steps) < THREADS_WANTED:
        steps //= 2
    return steps
