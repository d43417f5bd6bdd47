"""NVFP4 (and MXFP4) quantization on the GPU, and quantize(), the one call
that computes the global scale first. Everything a caller can get wrong is
checked before any output is written or any kernel launched.

Everything that follows from the call's form (dtype, shape, strides, layout,
padded_n, format, kind of global scale) is worked out once into a plan and
cached: serving loops repeat a handful of shapes, and a repeated call then
costs reading pointers, allocating outputs and one launch."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .._format import (
    BLOCK_SIZE,
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
from .._runtime.compile import THREADS_PER_BLOCK, QuantizeVariant, Target, wide_blocks_per_thread
from ..reference import stochastic as _stochastic
from ..reference import te as _te
from ..reference.mx_rules import check_mx_scale_rule
from .._runtime.launch import MAX_GRID_Y, MAX_INDEX, VECTOR_BYTES, BoundKernel, launch_geometry, rows_allow_vectors
from . import columnwise as _columnwise
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
    numerics="ieee",
    mx_scale_rule=None,
    row_scaled=False,
    tile="1x16",
    columnwise=False,
    global_scale_t=None,
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

    `numerics="te"` (NVFP4): TransformerEngine's arithmetic, the bytes of
    nvfp4_cupy.reference.scaled_fp4_quant_te (docs/te_numerics.md): one
    global scale (host float or one-element array), or with row_scaled=True
    one per row, [m] (row-scaled NVFP4); no per-expert scales. With it,
    tile="16x16" (one global scale) gives one scale per 16x16 tile, on each
    of the tile's rows (TE's weight recipe, docs/te_numerics.md section 4).
    `mx_scale_rule` (MXFP4 only): None or "floor" (OCP, the default),
    "rceil" or "te_pow2", the bytes of
    nvfp4_cupy.reference.mx_rules.scaled_mxfp4_quant
    (docs/stochastic_rounding_and_mx_rules.md, section 3).

    `columnwise=True` (numerics="te", 1x16 blocks): x and x^T from one read
    of x, returned as (packed, scales, packed_t, scales_t), the bytes of
    scaled_fp4_quant_te(..., columnwise=True) (docs/te_numerics.md section
    5); `global_scale_t` is x^T's global scale (ops/columnwise.py). No
    out/out_scale buffers there.
    """
    if columnwise is not False or global_scale_t is not None:
        return _columnwise_call(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream,
                                like, fmt, numerics, mx_scale_rule, row_scaled, tile, columnwise, global_scale_t)
    options = (numerics, mx_scale_rule, row_scaled, tile)
    if stream is None:
        if out is None and out_scale is None:
            outputs = _repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options)
        elif out is not None and out_scale is not None:
            outputs = _repeat_into(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options, out,
                                   out_scale)
        else:
            outputs = None
        if outputs is not None:
            return outputs
    return _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt=fmt,
                     options=options)


def _columnwise_call(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt,
                     numerics, mx_scale_rule, row_scaled, tile, columnwise, global_scale_t):
    """scaled_fp4_quant with columnwise=True, or with global_scale_t (which
    needs it: the golden model's message)."""
    _te.check_numerics(numerics, fmt=fmt, tile=tile, columnwise=columnwise, row_scaled=row_scaled)
    if not columnwise:
        _te._resolve_scales((1, 1), 1.0, global_scale_t, False, False)  # raises: global_scale_t needs columnwise
    if mx_scale_rule is not None:
        raise ValueError(f"mx_scale_rule is the scale rule of fmt='mxfp4', got mx_scale_rule={mx_scale_rule!r} with "
                         f"fmt={fmt!r}")
    if out is not None or out_scale is not None:
        raise ValueError("out and out_scale are not supported with columnwise=True; use the four returned arrays")
    return _columnwise.scaled_fp4_quant_columnwise(x, global_scale, is_sf_swizzled_layout, padded_n, layout=layout,
                                                   global_scale_t=global_scale_t, row_scaled=row_scaled, tile=tile,
                                                   stream=stream, like=like)


def _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like=None,
              target: Target | None = None, fmt="nvfp4", options=None, stochastic=None):
    """scaled_fp4_quant with the conversion target forced when given (tests
    run the sm_80 software path on newer GPUs this way); with `stochastic`
    ((seed, offset), checked), scaled_fp4_quant_sr."""
    launch, outputs = prepare_quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale,
                                       stream, like, fmt, target, options, stochastic)
    launch()
    return outputs


def quantize(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, per_row=False, out=None, out_scale=None,
             stream=None, like=None, numerics="ieee", tile="1x16"):
    """compute_global_scale then scaled_fp4_quant, all on the device:
    returns (packed, scales, global_scale), the bytes of those two calls.
    A small x (at most ONE_LAUNCH_MAX_BLOCKS blocks, one global scale) takes
    one launch, whose kernel derives the global scale itself; otherwise two
    launches, both checked before either runs. Streams and CUDA graphs: as
    compute_global_scale.

    numerics="te": TransformerEngine's global scale and arithmetic, always
    two launches: the bytes of nvfp4_cupy.reference.quantize_te, with
    per_row=True those of quantize_te(x, row_scaled=True) (row-scaled NVFP4),
    with tile="16x16" those of quantize_te(x, tile="16x16")."""
    if per_row is False and numerics == "ieee" and tile == "1x16":
        if out is None and out_scale is None and stream is None:
            outputs = _repeat(x, OWN_SCALE, is_sf_swizzled_layout, padded_n, layout, like, "nvfp4")
            if outputs is not None:
                return outputs
        if _fits_one_launch(x):
            launch, outputs = prepare_quantize(x, OWN_SCALE, is_sf_swizzled_layout, padded_n, layout, out, out_scale,
                                               stream, like, "nvfp4")
            launch()
            return outputs
    scale_launch, global_scale = prepare_global_scale(x, per_row, stream, like, numerics)
    # a per-row "te" scale is row-scaled NVFP4
    options = (numerics, None, per_row if numerics == "te" else False, tile)
    quantize_launch, (packed, scales) = prepare_quantize(
        x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, "nvfp4",
        options=options
    )
    scale_launch()
    quantize_launch()
    return packed, scales, global_scale


class _OwnScale:
    """The global scale argument of quantize()'s one-launch path: the kernel
    computes it (compute_global_scale's value) and writes it out."""

    def __repr__(self) -> str:
        return "OWN_SCALE"


OWN_SCALE = _OwnScale()

# quantize() makes one launch while x holds at most this many 16-value
# blocks: every thread block of that kernel that has rows of x reads all of
# x for its amax, which costs little from L2 for a few thread blocks, and
# saves the second launch, most of a small call's time. Measured on the
# H200: BENCHMARKS.md.
ONE_LAUNCH_MAX_BLOCKS = 2048


def _fits_one_launch(x) -> bool:
    """A non-empty x small enough for quantize()'s one-launch kernel. Any
    input it cannot read goes to the full checks, which say what is wrong."""
    try:
        shape = frontend_of(x).array(x, "x").shape
    except (TypeError, ValueError):
        return False
    if not shape:
        return False
    blocks = math.prod(shape[:-1]) * -(-shape[-1] // BLOCK_SIZE)
    return 0 < blocks <= ONE_LAUNCH_MAX_BLOCKS


@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element loads, with 16-byte loads (None where impossible)
    outputs: tuple  # (shape, dtype name) of packed and scales, and of the global scale on the OWN_SCALE path
    empty: bool  # nothing to launch
    row_span: tuple  # (experts, expert stride, rows, row stride, n) in elements: what the kernel reads

    @property
    def packed_shape(self) -> tuple:
        return self.outputs[0][0]

    @property
    def scale_shape(self) -> tuple:
        return self.outputs[1][0]


_plans: dict = {}
_MAX_PLANS = 4096

# (numerics, mx_scale_rule, rounding, tile) of a kernel: QuantizeVariant's last four fields.
DEFAULT_ARITHMETIC = ("ieee", "floor", "rn", "1x16")
# scaled_fp4_quant's (numerics, mx_scale_rule, row_scaled, tile) as given.
DEFAULT_OPTIONS = ("ieee", None, False, "1x16")
# The dynamic arguments of the stochastic-rounding kernels past the outputs
# (quantize_nvfp4_sr, fake_quantize): the seed and the offset in 32-bit halves.
SR_WORDS = ("seed_lo", "seed_hi", "offset_lo", "offset_hi")


def sr_words(seed: int, offset: int) -> tuple[int, int, int, int]:
    """SR_WORDS' values: (seed lo, seed hi, offset lo, offset hi)."""
    return seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF, offset >> 32


def check_options(fmt: str, options) -> tuple[tuple[str, str, str, str], bool]:
    """((numerics, mx_scale_rule, "rn", tile), row_scaled) of a call, after
    the golden model's checks (reference.te.check_numerics and
    _check_te_options, mx_rules.check_mx_scale_rule): numerics="te" is NVFP4
    only, and row_scaled and 16x16 tiles need it (not together);
    mx_scale_rule is MXFP4 only."""
    numerics, mx_scale_rule, row_scaled, tile = DEFAULT_OPTIONS if options is None else options
    numerics = _te.check_numerics(numerics, fmt=fmt, tile=tile, row_scaled=row_scaled)
    _te._check_te_options(tile, False, row_scaled)
    if mx_scale_rule is None:
        return (numerics, "floor", "rn", tile), bool(row_scaled)
    if fmt != "mxfp4":
        raise ValueError(f"mx_scale_rule is the scale rule of fmt='mxfp4', got mx_scale_rule={mx_scale_rule!r} with "
                         f"fmt={fmt!r}")
    return (numerics, check_mx_scale_rule(mx_scale_rule), "rn", tile), False


def te_resolved_kind(scale, x_shape: tuple, row_scaled: bool) -> str:
    """The kind of global scale of a numerics="te" call ("one", "row",
    "expert" or "expert_row") by the golden model's rules (reference.te,
    docs/te_numerics.md section 7), read on a stand-in of the device array's
    shape."""
    if scale.array is not None:
        return te_kind_of_shape(tuple(scale.array.shape), x_shape, row_scaled)
    return _te._resolve_scales(tuple(x_shape), scale.value, None, False, row_scaled)[0]


def te_kind_of_shape(scale_shape: tuple, x_shape: tuple, row_scaled: bool) -> str:
    """te_resolved_kind of a global scale array of this shape."""
    stand_in = np.broadcast_to(np.float32(0), tuple(scale_shape))
    return _te._resolve_scales(tuple(x_shape), stand_in, None, False, row_scaled)[0]


def te_scale_kind(scale, x_shape: tuple, row_scaled: bool) -> str:
    """te_resolved_kind, "one" or "row": TransformerEngine defines no expert
    batch, so per-expert scales are refused here."""
    kind = te_resolved_kind(scale, x_shape, row_scaled)
    if kind not in ("one", "row"):
        raise ValueError("numerics='te' on the GPU takes one global scale, or one per row with row_scaled=True; "
                         f"got one per expert (shape {tuple(scale.array.shape)} for x of shape {tuple(x_shape)}): "
                         "TransformerEngine defines no expert batch, quantize each expert as its own tensor")
    return kind


def _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target,
               arithmetic=DEFAULT_ARITHMETIC) -> _Plan:
    dtype_name = frontend.dtype_name(x.dtype)
    block_size = check_fmt_global_scale(fmt, None)
    view = row_view(x.shape, x.strides, x.itemsize, scale_kind == "expert")
    padded_n = resolve_padded_n(view.n, padded_n, block_size)
    scale_layout = resolve_layout(is_sf_swizzled_layout, layout)
    scale_rows, scale_cols = scale_layout.scale_shape(view.m, padded_n, block_size)
    what = f"x: shape {x.shape} with padded_n={padded_n}"
    if _te.check_tile(arithmetic[3]) > 1:  # 16x16 tiles: a thread block a row_tiles.cuh tile
        per_thread = 1
        grid, block = _square_tile_geometry(scale_rows, scale_cols, x.itemsize, what)
    else:
        per_thread = (1 if scale_kind == "own" else
                      blocks_per_thread(view.experts * scale_rows * scale_cols, dtype_name, fmt))
        grid, block = _geometry(scale_rows, scale_cols, view.experts, padded_n, per_thread, what)
    static = dict(m=view.m, n=view.n, padded_n=padded_n, scale_rows=scale_rows, scale_cols=scale_cols,
                  row_stride=view.row_stride)
    if fmt == "mxfp4":
        dynamic = ("x", "packed", "scales")
    elif scale_kind == "own":
        dynamic = ("x", "global_scale_out", "packed", "scales")
    else:
        static["expert_stride"] = view.expert_stride
        dynamic = ("x", "global_scale_ptr", "global_scale_value", "packed", "scales")
        if arithmetic[2] == "sr":
            dynamic += SR_WORDS
    vectors = rows_allow_vectors((view.row_stride * x.itemsize, view.expert_stride * x.itemsize), view.n)
    kernels = tuple(
        BoundKernel(QuantizeVariant(dtype_name, scale_layout, vector, scale_kind, fmt, per_thread, *arithmetic), grid,
                    block, static, dynamic, target=target) if (vectors or not vector) else None
        for vector in (False, True)
    )
    packed_shape, scale_shape = quantized_shapes(x.shape, padded_n, is_sf_swizzled_layout, layout,
                                                 "one" if scale_kind == "own" else scale_kind, fmt)
    outputs = ((packed_shape, "uint8"), (scale_shape, "uint8")) + (((1,), "float32"),) * (scale_kind == "own")
    return _Plan(kernels, outputs, view.m == 0 or view.experts == 0,
                 (view.experts, view.expert_stride, view.m, view.row_stride, view.n))


# Wide threads (wide_blocks_per_thread blocks each) pay the per-thread work
# once for several blocks, which is what keeps the 16-bit quantizer off the
# H200's issue limit; but they are fewer, and a thread's blocks are worked on
# one after another. Below this many blocks a launch is latency-bound, and one
# block per thread finishes sooner (measured on the H200, bf16, us for one /
# four blocks a thread: 4096^2 13.9 / 14.9, 4096 x 7168 22.8 / 22.9,
# 8192 x 4096 25.6 / 25.4, 8192^2 50.7 / 46.5; BENCHMARKS.md).
WIDE_MIN_BLOCKS = 1 << 21


def blocks_per_thread(blocks: int, dtype_name: str, fmt: str) -> int:
    """How many blocks each thread of a launch quantizes (`blocks` in all)."""
    return wide_blocks_per_thread(dtype_name, fmt) if blocks >= WIDE_MIN_BLOCKS else 1


def _geometry(scale_rows: int, scale_cols: int, experts: int, padded_n: int, per_thread: int, what: str) -> tuple:
    """(grid, block) covering the scale tensor: a thread per row and
    `per_thread` scale columns."""
    return launch_geometry(scale_rows, -(-scale_cols // per_thread), batch=experts, columns=padded_n, what=what,
                           dense=True)


def _square_tile_geometry(scale_rows: int, scale_cols: int, itemsize: int, what: str) -> tuple:
    """(grid, block) of the 16x16-tile kernel: a thread block per tile of
    row_tiles.cuh (kTileRows rows x kTileRowBytes of each row), over the
    scale tensor's rows and 16 x its columns, layout padding included."""
    rows, columns = _columnwise.tile_shape(itemsize)
    grid = (-(-scale_rows // rows), -(-(scale_cols * 16) // columns), 1)
    if scale_rows + rows > MAX_INDEX or scale_cols * 16 + columns > MAX_INDEX or grid[1] > MAX_GRID_Y:
        raise ValueError(f"{what} is too large for one launch")
    return grid, (THREADS_PER_BLOCK, 1, 1)


def _plan_for(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target,
              arithmetic=DEFAULT_ARITHMETIC) -> _Plan:
    # Types are part of the key: padded_n=True must fail like padded_n=1 cannot.
    key = (x.dtype, x.shape, x.strides, padded_n, type(padded_n), is_sf_swizzled_layout,
           type(is_sf_swizzled_layout), layout, scale_kind, fmt, target, arithmetic)
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable argument: _make_plan says what is wrong with it
        return _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target, arithmetic)
    if plan is None:
        plan = _make_plan(frontend, x, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target, arithmetic)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


# The hot path. A call with no stream whose signature (x's shape, strides,
# dtype and device, the global scale's kind and form, the layout arguments,
# and those of out and out_scale where both are given) matches one that
# passed every check before needs none of them again: only the per-call
# values are read (pointers, a host scale's validity, the current stream),
# given outputs checked for overlap, the others allocated, and one launch made.
_repeats: dict = {}


@dataclass(frozen=True)
class _Repeat:
    plan: _Plan
    device_id: int
    frontend: object  # the input's (pointers, current stream)
    results: object  # where outputs are allocated


@dataclass(frozen=True)
class _RepeatInto:
    """A repeated call into given out and out_scale: where each array's
    bytes lie relative to its pointer, fixed by the signature, so that the
    overlap check is the full path's on this call's pointers."""

    plan: _Plan
    device_id: int
    frontend: object
    x_span: tuple  # [first, last) bytes the kernel can read, relative to x's pointer
    scale_span: tuple | None  # the same for a device global scale
    out_spans: tuple  # out's and out_scale's, relative to their pointers

    def check_disjoint(self, x_pointer: int, scale_pointer: int, out_pointers: tuple) -> None:
        reads = [("x", (x_pointer + self.x_span[0], x_pointer + self.x_span[1]))]
        if self.scale_span is not None:
            reads.append(("global_scale", (scale_pointer + self.scale_span[0], scale_pointer + self.scale_span[1])))
        check_disjoint(reads, [(name, (pointer + lo, pointer + hi)) for name, pointer, (lo, hi)
                               in zip(("out", "out_scale"), out_pointers, self.out_spans)])


def _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options=DEFAULT_OPTIONS):
    """(signature, x pointer, scale pointer) of a call, or None where only
    the full checks can tell."""
    frontend = frontend_of(x)
    read = frontend.signature(x)
    if read is None:
        return None
    if type(global_scale) is float or global_scale is None or global_scale is OWN_SCALE:
        scale_key, scale_pointer = type(global_scale), 0
    else:
        scale_read = frontend_of(global_scale).signature(global_scale)
        if scale_read is None:
            return None
        scale_key, scale_pointer = scale_read
    key = (read[0], scale_key, padded_n, type(padded_n), is_sf_swizzled_layout, type(is_sf_swizzled_layout), layout,
           like, fmt, options, type(options[2]))
    return key, frontend, read[1], scale_pointer


def _repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options=DEFAULT_OPTIONS):
    """The outputs of a repeated call, launched; None if this call is not a
    repeat (the caller then takes the full path, which records it)."""
    found = _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options)
    if found is None:
        return None
    key, _, x_pointer, scale_pointer = found
    try:
        repeat = _repeats.get(key)
    except TypeError:  # an unhashable argument: the full path says what is wrong with it
        return None
    if repeat is None:
        return None
    scale_value = _host_scale_value(global_scale)
    device_id, plan = repeat.device_id, repeat.plan
    handle = repeat.frontend.stream(device_id)
    outputs, pointers = repeat.results.fresh(device_id, handle, plan.outputs)
    _launch_repeat(plan, device_id, handle, fmt, global_scale, x_pointer, scale_pointer, scale_value, pointers)
    return tuple(outputs)


def _repeat_into(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options, out, out_scale):
    """(out, out_scale) of a repeated call into them, launched; None where
    the full path must decide (a first call, another signature, or buffers
    that overlap: the full path then says which)."""
    found = _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options)
    if found is None:
        return None
    key, _, x_pointer, scale_pointer = found
    out_read = frontend_of(out).signature(out)
    out_scale_read = frontend_of(out_scale).signature(out_scale)
    if out_read is None or out_scale_read is None:
        return None
    try:
        repeat = _repeats.get((key, type(out), out_read[0], type(out_scale), out_scale_read[0]))
    except TypeError:
        return None
    if repeat is None:
        return None
    scale_value = _host_scale_value(global_scale)
    pointers = (out_read[1], out_scale_read[1])
    repeat.check_disjoint(x_pointer, scale_pointer, pointers)
    device_id = repeat.device_id
    handle = repeat.frontend.stream(device_id)
    _launch_repeat(repeat.plan, device_id, handle, fmt, global_scale, x_pointer, scale_pointer, scale_value, pointers)
    return out, out_scale


def _host_scale_value(global_scale) -> float:
    """The one value check the signature cannot cover: a host scale's value.
    A normal float32 number passes as it is (the launch rounds it to
    float32, as host_global_scale does); anything else gets the full check."""
    if type(global_scale) is not float:
        return 0.0
    if not _FLOAT32_NORMAL_MIN <= global_scale <= _FLOAT32_MAX:
        return float(host_global_scale(global_scale))
    return global_scale


def _launch_repeat(plan, device_id, handle, fmt, global_scale, x_pointer, scale_pointer, scale_value, pointers):
    kernel = plan.kernels[plan.kernels[1] is not None and x_pointer % VECTOR_BYTES == 0]
    if fmt == "mxfp4":
        kernel(device_id, handle, x_pointer, pointers[0], pointers[1])
    elif global_scale is OWN_SCALE:
        kernel(device_id, handle, x_pointer, pointers[2], pointers[0], pointers[1])
    else:
        kernel(device_id, handle, x_pointer, scale_pointer, scale_value, pointers[0], pointers[1])


_FLOAT32_NORMAL_MIN = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _record_repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, plan, device_id,
                   options=DEFAULT_OPTIONS, into=None) -> None:
    """Remembers a call that passed the full checks; `into`: (out,
    out_scale, its _RepeatInto) of a call into given outputs."""
    found = _repeat_key(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, options)
    if found is None or plan.empty or len(_repeats) >= _MAX_PLANS:
        return
    key, frontend = found[0], found[1]
    try:
        if into is None:
            _repeats[key] = _Repeat(plan, device_id, frontend, output_frontend(like, frontend))
            return
        out, out_scale, repeat = into
        reads = [frontend_of(buffer).signature(buffer) for buffer in (out, out_scale)]
        if None not in reads:
            _repeats[(key, type(out), reads[0][0], type(out_scale), reads[1][0])] = repeat
    except TypeError:
        pass


def prepare_quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like, fmt,
                     target: Target | None = None, options=None, stochastic=None):
    """Every check and allocation of a quantize call, nothing launched:
    returns (launch, (packed, scales)), or (launch, (packed, scales,
    global_scale)) for global_scale=OWN_SCALE. `target` forces the conversion
    target (tests run the sm_80 software path on newer GPUs this way).
    `options`: scaled_fp4_quant's (numerics, mx_scale_rule, row_scaled).
    `stochastic`: (seed, offset), already checked, for stochastic rounding
    (NVFP4 with the default numerics only; such calls are never recorded
    for the hot path, whose key does not hold the rounding)."""
    options = DEFAULT_OPTIONS if options is None else options
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    own = global_scale is OWN_SCALE
    arithmetic = DEFAULT_ARITHMETIC
    if own:
        scale, scale_kind = None, "own"
    else:
        check_fmt_global_scale(fmt, global_scale)
        arithmetic, row_scaled = check_options(fmt, options)
        scale = None if fmt == "mxfp4" else global_scale_argument(global_scale, device_id, array.shape)
        scale_kind = "one" if scale is None else scale.kind
        if arithmetic[0] == "te":
            scale_kind = te_scale_kind(scale, array.shape, row_scaled)
        if stochastic is not None:  # scaled_fp4_quant_sr: NVFP4, default numerics
            arithmetic = (*arithmetic[:2], "sr", arithmetic[3])
    plan = _plan_for(frontend, array, padded_n, is_sf_swizzled_layout, layout, scale_kind, fmt, target, arithmetic)
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
    # The outputs the caller did not give, in one allocation.
    wanted = (out, out_scale, None)[:len(plan.outputs)]
    fresh = iter(results.outputs(device_id, handle, tuple(spec for spec, buffer in zip(plan.outputs, wanted)
                                                          if buffer is None)))
    allocated = [buffer if buffer is not None else next(fresh) for buffer in wanted]
    outputs = tuple(results.as_frontend(allocated[:2])) + tuple(allocated[2:]) if given else tuple(allocated)
    if plan.empty:
        return _nothing, outputs
    pointers = (given["out"].pointer if "out" in given else results.pointer(allocated[0]),
                given["out_scale"].pointer if "out_scale" in given else results.pointer(allocated[1]))
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % VECTOR_BYTES == 0]
    if not given and stream is None and target is None and stochastic is None:
        _record_repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, plan, device_id, options)
    elif (len(given) == 2 and not own and stream is None and target is None and stochastic is None
          and outputs[0] is out and outputs[1] is out_scale):  # given outputs returned as they are
        def relative(pointer, span):
            return span[0] - pointer, span[1] - pointer

        into = _RepeatInto(plan, device_id, frontend, relative(array.pointer, _read_range(array, plan.row_span)),
                           None if scale is None or scale.array is None else
                           relative(scale.pointer, scale.array.byte_range()),
                           tuple(relative(given[name].pointer, given[name].byte_range()) for name in given))
        _record_repeat(x, global_scale, is_sf_swizzled_layout, padded_n, layout, like, fmt, plan, device_id, options,
                       into=(out, out_scale, into))
    if own:
        return functools.partial(kernel, device_id, handle, array.pointer, results.pointer(allocated[2]),
                                 *pointers), outputs
    if scale is None:
        return functools.partial(kernel, device_id, handle, array.pointer, *pointers), outputs
    words = () if stochastic is None else sr_words(*stochastic)
    return (functools.partial(kernel, device_id, handle, array.pointer, scale.pointer, scale.value, *pointers, *words),
            outputs)


def scaled_fp4_quant_sr(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, seed=None,
                        offset=0, out=None, out_scale=None, stream=None, like=None):
    """scaled_fp4_quant with stochastic rounding of the E2M1 codes: the
    bytes of nvfp4_cupy.reference.stochastic.scaled_fp4_quant_sr
    (docs/stochastic_rounding_and_mx_rules.md, section 2). The scale bytes
    are round-to-nearest's; each 16-value block's codes are rounded with the
    Philox4x32-10 words of its element group under (seed, offset). `seed` is
    required and, like `offset`, an int in [0, 2^64): the same call gives
    the same bytes, and a training loop passes offset=step. NVFP4 only, with
    every kind of global scale and the other arguments of scaled_fp4_quant."""
    return _quantize(x, global_scale, is_sf_swizzled_layout, padded_n, layout, out, out_scale, stream, like,
                     stochastic=_stochastic.check_seed_offset(seed, offset))


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
