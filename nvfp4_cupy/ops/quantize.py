"""NVFP4 (and MXFP4) quantization on the GPU, and quantize(), the one call
that computes the global scale first. Everything a caller can get wrong is
checked before any output is written or any kernel launched.

Everything that follows from the call's form (dtype, shape, strides, layout,
padded_n, format, kind of global scale) is worked out once into a plan and
cached: serving loops repeat a handful of shapes, and a repeated call then
costs reading pointers, allocating outputs and one launch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .._format import (
    check_fmt_global_scale,
    check_int,
    host_global_scale,
    quantized_shapes,
    resolve_layout,
    resolve_padded_n,
    row_view,
)
from .._runtime.arrays import (
    CUPY,
    check_disjoint,
    check_output,
    frontend_of,
    global_scale_argument,
    output_frontend,
    resolve_stream,
)
from .._runtime.compile import QuantizeVariant, Target, wide_blocks_per_thread
from .._runtime.launch import VECTOR_BYTES, BoundKernel, launch_geometry, rows_allow_vectors
from .global_scale import prepare_global_scale


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
    same bytes as nvfp4_cupy.reference.scaled_fp4_quant (docs/format.md).
    `global_scale` is a host float, or a float32 device array read by the
    kernel: one element, one per row of x, or one per expert for x [E, m, n]
    (then packed is [E, m, padded_n // 2] and scales [E, ...], a scale tensor
    per expert). `padded_n` (default n rounded up to 16) pads K with zeros in
    the kernel. `out`/`out_scale` may be uninitialized buffers: every byte is
    written; without them, CuPy outputs share one allocation of CuPy's memory
    pool (one pool call, not two). `stream`: CuPy or torch stream; default
    CuPy's current stream, or torch's for a torch tensor. `like="torch"`
    returns torch tensors.
    """
    if out is None and out_scale is None and stream is None:
        outputs = _repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt)
        if outputs is not None:
            return outputs
    return _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt=fmt)


def _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like=None,
              target: Target | None = None, fmt="nvfp4"):
    """scaled_fp4_quant with the conversion target forced when given (tests
    run the sm_80 software path on newer GPUs this way)."""
    launch, outputs = prepare_quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale,
                                       stream, like, fmt, target)
    launch()
    return outputs


def quantize(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, per_row=False, out=None, out_scale=None,
             stream=None, like=None):
    """compute_global_scale then scaled_fp4_quant, all on the device, in two
    launches: returns (packed, scales, global_scale). Both steps are checked
    before either runs. Streams and CUDA graphs: as compute_global_scale."""
    scale_launch, global_scale = prepare_global_scale(x, per_row, stream, like)
    quantize_launch, (packed, scales) = prepare_quantize(
        x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, "nvfp4"
    )
    scale_launch()
    quantize_launch()
    return packed, scales, global_scale


@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element loads, with 16-byte loads (None where impossible)
    outputs: tuple  # the shapes of packed and scales
    empty: bool  # nothing to launch
    row_span: tuple  # (experts, expert stride, rows, row stride, n) in elements: what the kernel reads

    @property
    def packed_shape(self) -> tuple:
        return self.outputs[0]

    @property
    def scale_shape(self) -> tuple:
        return self.outputs[1]


_plans: dict = {}
_MAX_PLANS = 4096


def _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target) -> _Plan:
    dtype_name = frontend.dtype_name(x.dtype)
    block_size = check_fmt_global_scale(fmt, None)
    view = row_view(x.shape, x.strides, x.itemsize, scale_kind == "expert")
    padded_n = resolve_padded_n(view.n, padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    scale_rows, scale_cols = scale_layout.scale_shape(view.m, padded_n, block_size)
    per_thread = blocks_per_thread(view.experts * scale_rows * scale_cols, dtype_name, fmt)
    grid, block = _geometry(scale_rows, scale_cols, view.experts, padded_n, per_thread,
                            f"x: shape {x.shape} with padded_n={padded_n}")
    static = dict(m=view.m, n=view.n, padded_n=padded_n, scale_rows=scale_rows, scale_cols=scale_cols,
                  row_stride=view.row_stride)
    if fmt == "mxfp4":
        dynamic = ("x", "packed", "scales")
    else:
        static["expert_stride"] = view.expert_stride
        dynamic = ("x", "global_scale_ptr", "global_scale_value", "packed", "scales")
    vectors = rows_allow_vectors((view.row_stride * x.itemsize, view.expert_stride * x.itemsize), view.n)
    kernels = tuple(
        BoundKernel(QuantizeVariant(dtype_name, scale_layout, vector, scale_kind, fmt, per_thread), grid, block, static,
                    dynamic, target=target) if (vectors or not vector) else None
        for vector in (False, True)
    )
    packed_shape, scale_shape = quantized_shapes(x.shape, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt)
    return _Plan(kernels, (packed_shape, scale_shape), view.m == 0 or view.experts == 0,
                 (view.experts, view.expert_stride, view.m, view.row_stride, view.n))


# Wide threads (wide_blocks_per_thread blocks each) pay the per-thread work
# once for several blocks, which is what keeps the 16-bit quantizer off the
# H200's issue limit; but they are fewer, and a thread's blocks are worked on
# one after another. Below this many blocks a launch is latency-bound, and one
# block per thread finishes sooner (measured on the H200: BENCHMARKS.md).
WIDE_MIN_BLOCKS = 1 << 20


def blocks_per_thread(blocks: int, dtype_name: str, fmt: str) -> int:
    """How many blocks each thread of a launch quantizes (`blocks` in all)."""
    return wide_blocks_per_thread(dtype_name, fmt) if blocks >= WIDE_MIN_BLOCKS else 1


def _geometry(scale_rows: int, scale_cols: int, experts: int, padded_n: int, per_thread: int, what: str) -> tuple:
    """(grid, block) covering the scale tensor: a thread per row and
    `per_thread` scale columns."""
    return launch_geometry(scale_rows, -(-scale_cols // per_thread), batch=experts, columns=padded_n, what=what,
                           dense=True)


def _plan_for(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target) -> _Plan:
    # Types are part of the key: padded_n=True must fail like padded_n=1 cannot.
    key = (x.dtype, x.shape, x.strides, padded_n, type(padded_n), is_sf_swizzled_layout,
           type(is_sf_swizzled_layout), layout, scale_kind, fmt, target)
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: _make_plan says what is wrong with it
        return _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target)
    if plan is None:
        plan = _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


# The hot path. A call with no out/out_scale/stream whose signature (x's
# shape, strides, dtype and device, the global scale's kind and form, the
# layout arguments) matches one that passed every check before needs none of
# them again: only the per-call values are read (pointers, a host scale's
# validity, the current stream), outputs allocated, and one launch made.
_repeats: dict = {}


@dataclass(frozen=True)
class _Repeat:
    plan: _Plan
    device_id: int
    frontend: object  # the input's (pointers, current stream)
    results: object  # where outputs are allocated


def _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt):
    """(signature, x pointer, scale pointer) of a call, or None where only
    the full checks can tell."""
    frontend = frontend_of(x)
    read = frontend.signature(x)
    if read is None:
        return None
    if type(global_scale) is float or global_scale is None:
        scale_key, scale_pointer = type(global_scale), 0
    else:
        scale_read = frontend_of(global_scale).signature(global_scale)
        if scale_read is None:
            return None
        scale_key, scale_pointer = scale_read
    key = (read[0], scale_key, padded_n, type(padded_n), is_sf_swizzled_layout, type(is_sf_swizzled_layout), layout,
           like, fmt)
    return key, frontend, read[1], scale_pointer


def _repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt):
    """The outputs of a repeated call, launched; None if this call is not a
    repeat (the caller then takes the full path, which records it)."""
    found = _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt)
    if found is None:
        return None
    key, _, x_pointer, scale_pointer = found
    try:
        repeat = _repeats.get(key)
    except TypeError:  # an unhashable argument: the full path says what is wrong with it
        return None
    if repeat is None:
        return None
    # The one value check the signature cannot cover: a host scale's value.
    scale_value = float(host_global_scale(global_scale)) if type(global_scale) is float else 0.0
    device_id, plan = repeat.device_id, repeat.plan
    handle = repeat.frontend.stream(device_id)
    packed, scales = repeat.results.uint8_outputs(device_id, handle, plan.outputs)
    kernel = plan.kernels[plan.kernels[1] is not None and x_pointer % VECTOR_BYTES == 0]
    pointers = (repeat.results.pointer(packed), repeat.results.pointer(scales))
    if fmt == "mxfp4":
        kernel(device_id, handle, x_pointer, *pointers)
    else:
        kernel(device_id, handle, x_pointer, scale_pointer, scale_value, *pointers)
    return packed, scales


def _record_repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, plan, device_id) -> None:
    found = _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt)
    if found is None or plan.empty or len(_repeats) >= _MAX_PLANS:
        return
    key, frontend = found[0], found[1]
    try:
        _repeats[key] = _Repeat(plan, device_id, frontend, output_frontend(like, frontend))
    except TypeError:
        pass


def prepare_quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt,
                     target: Target | None = None):
    """Every check and allocation of a quantize call, nothing launched:
    returns (launch, (packed, scales)). `target` forces the conversion
    target (tests run the sm_80 software path on newer GPUs this way)."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    check_fmt_global_scale(fmt, global_scale)
    scale = None if fmt == "mxfp4" else global_scale_argument(global_scale, device_id, array.shape)
    plan = _plan_for(frontend, array, padded_n, is_sf_swizzled_layout, layout,
                     "one" if scale is None else scale.kind, fmt, target)
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    given = {name: check_output(buffer, name, shape, "uint8", device_id, "x")
             for name, buffer, shape in (("out", out, plan.packed_shape), ("out_scale", out_scale, plan.scale_shape))
             if buffer is not None}
    if given and not plan.empty:
        reads = [("x", _read_range(array, plan.row_span))]
        if scale is not None and scale.array is not None:
            reads.append(("global_scale", scale.array.byte_range()))
        check_disjoint(reads, [(name, buffer.byte_range()) for name, buffer in given.items()])
    if out is None and out_scale is None:
        packed, scales = results.uint8_outputs(device_id, handle, plan.outputs)
    elif out is None or out_scale is None:
        empty = results.allocator(device_id, handle)
        packed = out if out is not None else empty(plan.packed_shape, "uint8")
        scales = out_scale if out_scale is not None else empty(plan.scale_shape, "uint8")
    else:
        packed, scales = out, out_scale
    outputs = results.as_frontend((packed, scales)) if given else (packed, scales)
    if plan.empty:
        return _nothing, outputs
    pointers = (given["out"].pointer if "out" in given else results.pointer(packed),
                given["out_scale"].pointer if "out_scale" in given else results.pointer(scales))
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % VECTOR_BYTES == 0]
    if not given and stream is None and target is None:
        _record_repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, plan, device_id)
    if scale is None:
        return functools.partial(kernel, device_id, handle, array.pointer, *pointers), outputs
    return functools.partial(kernel, device_id, handle, array.pointer, scale.pointer, scale.value, *pointers), outputs


def _read_range(x, row_span: tuple) -> tuple[int, int]:
    """[first, last) byte addresses x's kernel reads can touch."""
    experts, expert_stride, rows, row_stride, n = row_span
    corners = [x.pointer + (e * expert_stride + r * row_stride) * x.itemsize
               for e in (0, experts - 1) for r in (0, rows - 1)]
    return min(corners), max(corners) + n * x.itemsize


def _nothing() -> None:
    """The launch of an empty call."""


def create_fp4_output_tensors(m, n, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, num_experts=None,
                              fmt="nvfp4"):
    """Uninitialized (packed, scales) buffers for scaled_fp4_quant on the
    current device; with num_experts, [E, ...] buffers for a per-expert call."""
    import cupy as cp

    sizes = {"m": m, "n": n} | ({} if num_experts is None else {"num_experts": num_experts})
    for name, value in sizes.items():
        if check_int(value, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    block_size = check_fmt_global_scale(fmt, None)
    padded_n = resolve_padded_n(int(n), padded_n, block_size)
    scale_shape = resolve_layout(is_sf_swizzled_layout, layout).scale_shape(int(m), padded_n, block_size)
    # The largest geometry any call with these buffers launches (one block a thread).
    _geometry(scale_shape[0], scale_shape[1], int(num_experts or 1), padded_n, 1,
              f"m={m}, padded_n={padded_n}, num_experts={num_experts}")
    batch = () if num_experts is None else (int(num_experts),)
    device = cp.cuda.Device().id
    empty = CUPY.allocator(device, CUPY.stream(device))
    return empty(batch + (int(m), padded_n // 2), "uint8"), empty(batch + scale_shape, "uint8")
