"""RMSNorm on the GPU (docs/fused_ops.md, section 3), bit-exact to
nvfp4_cupy.reference.fused: rms_norm (the normalized rows in x's dtype) and
rms_norm_quant (RMSNorm fused with NVFP4 or MXFP4 quantization: x read once,
packed values and scales written, nothing in between), each with the residual
form of vLLM's fused_add_rms_norm (x + residual normalized, the sum written
back into `residual` in place).

Every argument is checked before anything is allocated or launched, with the
golden model's own checks (reference.fused.check_eps and _check_same,
_format's quantization rules). What follows from the call's form (x's dtype,
shape and strides, layout, padded_n, format, kind of global scale) is worked
out once into a plan and cached, as in ops/quantize.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._format import (
    BLOCK_SIZE,
    NUMPY_DTYPES,
    check_dtype,
    check_fmt_global_scale,
    dtype_name_of,
    quantized_shapes,
    resolve_layout,
    resolve_padded_n,
    row_view,
    rows_and_n,
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
from .._runtime.compile import RUNTIME_LAYOUT_IDS, RmsNormVariant, Target, kernel_constant
from .._runtime.launch import MAX_GRID_Y, MAX_INDEX, VECTOR_BYTES, BoundKernel, rows_allow_vectors
from ..reference.fused import _check_same, check_eps


def _kernel_constant(name: str) -> int:
    return kernel_constant(RmsNormVariant.source, name)


ROW_THREADS = _kernel_constant("kRowThreads")  # one thread block of this many threads a row
# Rows of up to this many values are read once (kept in registers between the
# sum of squares and the normalization); the values of longer rows beyond it
# are read a second time, from L2.
SINGLE_READ_VALUES = ROW_THREADS * _kernel_constant("kRegisterPieces") * BLOCK_SIZE
# The kernel's column arithmetic is 32-bit with a row's last thread block of
# columns past padded_n: keep padded_n well inside int.
MAX_ROW_VALUES = 2**30


def rms_norm(x, weight, eps, residual=None, *, out=None, stream=None, like=None):
    """RMSNorm of x [..., n] (float16, bfloat16 or float32 on the GPU) over
    its last dimension (docs/fused_ops.md, section 3.1): out =
    T(T(z * inv) * weight), inv = 1 / sqrt(mean(z^2) + eps), with z = x, or
    z = T(x + residual). `weight`: [n] of x's dtype, or None. `eps`: a host
    float >= 0. Returns out (x's dtype and shape), and with a residual
    (out, residual): `residual` (x's dtype and shape, C-contiguous, not
    overlapping x) now holds z, written in place; x is not written. `out`: an
    optional C-contiguous buffer of x's dtype and shape. `stream`, `like`: as
    scaled_fp4_quant."""
    launch, outputs = prepare_rms_norm(x, weight, eps, residual, out, stream, like)
    launch()
    return outputs


def rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                   fmt="nvfp4", residual=None, out=None, out_scale=None, stream=None, like=None):
    """RMSNorm fused with quantization (docs/fused_ops.md, section 3.4): the
    bytes of scaled_fp4_quant(rms_norm(x, weight, eps[, residual]),
    global_scale, ...), in one kernel that reads x once. Returns (packed,
    scales), and with a residual (packed, scales, residual), `residual`
    updated in place as in rms_norm. `global_scale`, the layout arguments,
    `padded_n` (K padding written by the kernel), `fmt`, `out`/`out_scale`,
    `stream` and `like` as in scaled_fp4_quant: a host float or a float32
    device array of one element, one per row, or one per expert for x
    [E, m, n]; None with fmt="mxfp4"."""
    launch, outputs = prepare_rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout, padded_n, layout,
                                             fmt, residual, out, out_scale, stream, like)
    launch()
    return outputs


# ---------------------------------------------------------------------------
# Checks (docs/fused_ops.md, section 7), before anything else
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    frontend: object
    x: object  # arrays.Array
    dtype_name: str
    weight: object  # arrays.Array or None
    eps32: np.float32
    residual: object  # arrays.Array or None


def _check_inputs(x, weight, eps, residual) -> _Inputs:
    """x, weight, eps and residual, in the golden model's order and with its
    messages, plus the GPU's own rules (device arrays on x's device,
    contiguous, residual not overlapping x)."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    dtype_name = frontend.dtype_name(array.dtype)
    m, n = rows_and_n(array.shape)
    if n <= 0:
        raise ValueError(f"x: the last dimension n must be positive, got n={n}")
    weight_array = None if weight is None else _like_x(weight, "weight", dtype_name, (n,), array.device_id)
    eps32 = check_eps(eps)
    residual_array = None
    if residual is not None:
        residual_array = _like_x(residual, "residual", dtype_name, array.shape, array.device_id)
        reads = [("x", array.byte_range())] + ([] if weight_array is None else [("weight", weight_array.byte_range())])
        check_disjoint(reads, [("residual", residual_array.byte_range())])
    return _Inputs(frontend, array, dtype_name, weight_array, eps32, residual_array)


def _like_x(obj, name: str, dtype_name: str, shape: tuple, device_id: int):
    """An array argument that must have x's dtype and `shape`: the golden
    model's check (reference.fused._check_same, run on a zero-byte stand-in
    of the same dtype and shape), then on x's device and C-contiguous."""
    array = frontend_of(obj).array(obj, name)
    got = check_dtype(dtype_name_of(array.dtype), name)
    _check_same(np.broadcast_to(np.zeros((), NUMPY_DTYPES[got]), tuple(array.shape)), None, dtype_name, name, shape)
    if array.device_id != device_id:
        raise ValueError(f"{name} is on device {array.device_id} but x is on device {device_id}")
    if 0 not in array.shape and array.strides != c_strides(tuple(array.shape), array.itemsize):
        raise ValueError(f"{name} must be C-contiguous, got strides {array.strides}")
    return array


# ---------------------------------------------------------------------------
# Plans, cached per call form
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element loads, with 16-byte loads (None where the shape forbids them)
    outputs: tuple  # output shapes: (out,) or (packed, scales)
    empty: bool  # nothing to launch


_plans: dict = {}
_MAX_PLANS = 4096


def _cached(key, make):
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: make() says what is wrong with it
        return make()
    if plan is None:
        plan = make()
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


def _check_size(rows: int, experts: int, padded_n: int, shape) -> None:
    if rows > MAX_INDEX or experts > MAX_GRID_Y or padded_n > MAX_ROW_VALUES:
        raise ValueError(f"x: shape {tuple(shape)} with {padded_n} values a row is too large for one launch")


def _kernels(op: str, dtype_name: str, vectors: bool, grid: tuple, static: dict, dynamic: tuple, target) -> tuple:
    return tuple(
        BoundKernel(RmsNormVariant(dtype_name, vector, op), grid, (ROW_THREADS, 1, 1), static, dynamic, target=target)
        if (vectors or not vector) else None
        for vector in (False, True)
    )


def _norm_plan(x, dtype_name: str) -> _Plan:
    def make():
        view = row_view(x.shape, x.strides, x.itemsize, False)
        _check_size(view.m, 1, view.n, x.shape)
        vectors = rows_allow_vectors((view.row_stride * x.itemsize,), view.n)
        kernels = _kernels("norm", dtype_name, vectors, (max(view.m, 1), 1, 1),
                           dict(row_stride=view.row_stride, n=view.n), ("x", "weight", "residual", "eps", "out"),
                           None)
        return _Plan(kernels, (tuple(x.shape),), view.m == 0)

    return _cached(("norm", x.dtype, x.shape, x.strides), make)


def _quant_plan(x, dtype_name: str, padded_n, is_sf_swizzled_layout, layout, scale_kind: str, fmt: str,
                target) -> _Plan:
    def make():
        block_size = check_fmt_global_scale(fmt, None)
        view = row_view(x.shape, x.strides, x.itemsize, scale_kind == "expert")
        k = resolve_padded_n(view.n, padded_n, block_size)
        scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
        scale_rows, scale_cols = scale_layout.scale_shape(view.m, k, block_size)
        _check_size(scale_rows, view.experts, k, x.shape)
        expert_step, row_step = global_scale_steps(scale_kind, view.m)
        static = dict(row_stride=view.row_stride, expert_stride=view.expert_stride, m=view.m, n=view.n, padded_n=k,
                      scale_rows=scale_rows, scale_cols=scale_cols, layout_id=RUNTIME_LAYOUT_IDS[scale_layout.name],
                      gs_row_step=row_step, gs_expert_step=expert_step)
        vectors = rows_allow_vectors((view.row_stride * x.itemsize, view.expert_stride * x.itemsize), view.n)
        dynamic = ("x", "weight", "residual", "eps", "global_scale_ptr", "global_scale_value", "packed", "scales")
        kernels = _kernels(fmt, dtype_name, vectors, (max(scale_rows, 1), max(view.experts, 1), 1), static, dynamic,
                           target)
        shapes = quantized_shapes(tuple(x.shape), padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt)
        return _Plan(kernels, shapes, view.m == 0 or view.experts == 0)

    key = ("quant", x.dtype, x.shape, x.strides, padded_n, type(padded_n), is_sf_swizzled_layout,
           type(is_sf_swizzled_layout), layout, scale_kind, fmt, target)
    return _cached(key, make)


# ---------------------------------------------------------------------------
# Calls: every check and allocation, then a launch to run
# ---------------------------------------------------------------------------
def _pointer(array) -> int:
    return 0 if array is None else array.pointer


def _kernel(plan: _Plan, *pointers: int):
    """The 16-byte kernel where the shape allows it and every pointer of a
    T array (0: absent) is 16-byte aligned, else the element one."""
    aligned = all(pointer % VECTOR_BYTES == 0 for pointer in pointers)
    return plan.kernels[plan.kernels[1] is not None and aligned]


def _reads(inputs: _Inputs, *more) -> list:
    reads = [("x", inputs.x.byte_range())]
    if inputs.weight is not None:
        reads.append(("weight", inputs.weight.byte_range()))
    return reads + [read for read in more if read is not None]


def _writes(inputs: _Inputs, given: dict) -> list:
    writes = [] if inputs.residual is None else [("residual", inputs.residual.byte_range())]
    return writes + [(name, array.byte_range()) for name, array in given.items()]


def prepare_rms_norm(x, weight, eps, residual, out, stream, like):
    """Every check and allocation of an rms_norm call, nothing launched:
    returns (launch, outputs)."""
    inputs = _check_inputs(x, weight, eps, residual)
    array, device_id = inputs.x, inputs.x.device_id
    plan = _norm_plan(array, inputs.dtype_name)
    handle = resolve_stream(stream, device_id, inputs.frontend)
    results = output_frontend(like, inputs.frontend)
    given = {} if out is None else {"out": check_output(out, "out", plan.outputs[0], inputs.dtype_name, device_id, "x")}
    if given and not plan.empty:
        check_disjoint(_reads(inputs), _writes(inputs, given))
    if out is None:
        out = results.allocator(device_id, handle)(plan.outputs[0], inputs.dtype_name)
        out_pointer = results.pointer(out)
    else:
        out_pointer = given["out"].pointer
        out = results.as_frontend((out,))[0]
    outputs = out if residual is None else (out, residual)
    if plan.empty:
        return _nothing, outputs
    kernel = _kernel(plan, array.pointer, _pointer(inputs.weight), _pointer(inputs.residual), out_pointer)
    return functools.partial(kernel, device_id, handle, array.pointer, _pointer(inputs.weight),
                             _pointer(inputs.residual), float(inputs.eps32), out_pointer), outputs


def prepare_rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout, padded_n, layout, fmt, residual, out,
                           out_scale, stream, like, target: Target | None = None):
    """Every check and allocation of an rms_norm_quant call, nothing
    launched: returns (launch, outputs). `target` forces the conversion
    target (tests run the sm_80 software path on newer GPUs this way)."""
    inputs = _check_inputs(x, weight, eps, residual)
    array, device_id = inputs.x, inputs.x.device_id
    # The quantization arguments in the golden model's order (reference.fused._check_quant_args).
    block_size = check_fmt_global_scale(fmt, global_scale)
    resolve_padded_n(array.shape[-1], padded_n, block_size)
    resolve_layout(is_sf_swizzled_layout, layout)
    scale = None if fmt == "mxfp4" else global_scale_argument(global_scale, device_id, array.shape)
    plan = _quant_plan(array, inputs.dtype_name, padded_n, is_sf_swizzled_layout, layout,
                       "one" if scale is None else scale.kind, fmt, target)
    handle = resolve_stream(stream, device_id, inputs.frontend)
    results = output_frontend(like, inputs.frontend)
    given = {name: check_output(buffer, name, shape, "uint8", device_id, "x")
             for name, buffer, shape in (("out", out, plan.outputs[0]), ("out_scale", out_scale, plan.outputs[1]))
             if buffer is not None}
    if (given or inputs.residual is not None) and not plan.empty:
        scale_read = None if scale is None or scale.array is None else ("global_scale", scale.array.byte_range())
        check_disjoint(_reads(inputs, scale_read), _writes(inputs, given))
    empty = results.allocator(device_id, handle)
    packed = out if out is not None else empty(plan.outputs[0], "uint8")
    scales = out_scale if out_scale is not None else empty(plan.outputs[1], "uint8")
    pointers = (given["out"].pointer if "out" in given else results.pointer(packed),
                given["out_scale"].pointer if "out_scale" in given else results.pointer(scales))
    quantized = results.as_frontend((packed, scales)) if given else (packed, scales)
    outputs = quantized if residual is None else (*quantized, residual)
    if plan.empty:
        return _nothing, outputs
    kernel = _kernel(plan, array.pointer, _pointer(inputs.weight), _pointer(inputs.residual))
    scale_pointer, scale_value = (0, 0.0) if scale is None else (scale.pointer, scale.value)
    return functools.partial(kernel, device_id, handle, array.pointer, _pointer(inputs.weight),
                             _pointer(inputs.residual), float(inputs.eps32), scale_pointer, scale_value,
                             *pointers), outputs


def _nothing() -> None:
    """The launch of an empty call."""
