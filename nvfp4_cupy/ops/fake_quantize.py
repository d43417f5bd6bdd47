"""Fake quantization on the GPU (docs/fused_ops.md, section 6): x ->
dequantize(quantize(x)) in x's dtype in one kernel (cuda_src/fake_quantize.cu),
one read of x and one write, bit-exact to
nvfp4_cupy.reference.fused.fake_quantize; and the saturation mask the
straight-through gradient uses (section 6.3).

The options are those of the golden model and are checked by its own checks
(reference.fused); every quantizer it defines has its GPU kernel (a few
global-scale forms are refused with a ValueError that says so). As in
ops/quantize.py, everything a caller can get wrong is checked before
anything is allocated or launched, and what follows from the call's form is
worked out once into a cached plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._format import LAYOUTS, resolve_padded_n, round_up, row_view, rows_and_n
from .._runtime.arrays import (
    CUPY,
    GlobalScale,
    check_disjoint,
    check_output,
    frontend_of,
    global_scale_argument,
    global_scale_steps,
    output_frontend,
    resolve_stream,
)
from .._runtime.compile import FAKE_QUANTIZERS, FakeQuantizeVariant, RhtVariant, Target
from .._runtime.launch import VECTOR_BYTES, BoundKernel, launch_geometry, rows_allow_vectors
from ..reference import te_rht as _te_rht
from ..reference.fused import _check_fake_options, _fake_options
from .dequantize import blocks_per_thread
from .global_scale import prepare_global_amax, prepare_global_scale
from .quantize import SR_WORDS, _read_range, _square_tile_geometry, sr_words, te_kind_of_shape
from .rht import amax_argument, rht_amax_launcher

# The mask's vector path stores 8 bytes (8 values) at a time.
MASK_VECTOR_BYTES = 8


def fake_quantize(x, global_scale=None, *, fmt="nvfp4", numerics="ieee", tile="1x16", row_scaled=False,
                  rounding="nearest", seed=None, offset=0, mx_scale_rule="floor", four_over_six=False, e4m3_max=None,
                  err_mode=None, err_use_fast_math=None, rht=False, global_amax=None, transform_dtype="input",
                  out=None, stream=None, like=None):
    """dequantize(quantize(x)) for x [..., n] (float16, bfloat16 or float32 on
    the GPU), in x's dtype and shape, in one kernel: the bytes of
    nvfp4_cupy.reference.fused.fake_quantize (docs/fused_ops.md, section 6.1),
    which are also those of dequantize_fp4(*scaled_fp4_quant(x, gs,
    layout="linear"), gs, n, layout="linear", dtype=x.dtype).

    On the GPU now: NVFP4 with numerics="ieee" (rounding="nearest", or
    "stochastic" with a seed and an offset) or "te" (1x16 blocks; with
    row_scaled=True one S_enc per row; four_over_six=True with its e4m3_max,
    err_mode and err_use_fast_math; rht=True with its transform_dtype, n a
    multiple of 16; tile="16x16" with one S_enc for all of x), and MXFP4
    with every mx_scale_rule ("floor", "rceil", "te_pow2"). `global_scale`: a
    host float, or a float32 device array of one element, one per row, or
    one per expert for x [E, m, n]; None computes the global scale on the
    device first (one more read of x): 448 * 6 / amax(|x|), or for
    numerics="te" TE's S_enc (compute_global_scale(x, per_row=row_scaled,
    numerics="te")). Four Over Six and the RHT take `global_amax` instead
    (a host number, or a float32 device array of one, or of one per row of
    x's rows): None computes max |x| (max |RHT(x)| for the
    RHT) on the device first, per row with row_scaled. `out`: a
    C-contiguous buffer of x's dtype and shape (every element is written).
    `stream` and `like` as for scaled_fp4_quant."""
    options = dict(fmt=fmt, numerics=numerics, tile=tile, row_scaled=row_scaled, rounding=rounding, seed=seed,
                   offset=offset, mx_scale_rule=mx_scale_rule, four_over_six=four_over_six, e4m3_max=e4m3_max,
                   err_mode=err_mode, err_use_fast_math=err_use_fast_math, rht=rht, global_amax=global_amax,
                   transform_dtype=transform_dtype)
    launch, result = prepare_fake_quantize(x, global_scale, options, out, stream, like, mask=False)
    launch()
    return result


def saturation_mask(x, global_scale=None, *, out=None, stream=None, like=None, **options):
    """bool, x's shape: where the quantizer clips x beyond the largest
    magnitude its block can hold (docs/fused_ops.md, section 6.3), the bytes
    of nvfp4_cupy.reference.fused.saturation_mask. Options as
    fake_quantize (unknown ones are a TypeError; rht=True is refused: the
    mask is not defined there). `out`: a C-contiguous bool buffer of x's
    shape."""
    launch, result = prepare_fake_quantize(x, global_scale, options, out, stream, like, mask=True)
    launch()
    return result


# The quantizers on the GPU, by (fmt, variant, MX scale rule, rounding) of
# the resolved options (reference.fused._check_fake_options); Four Over Six's
# by its err_mode, the RHT's by its transform_dtype, numerics="te" with 16x16
# tiles "nvfp4_te_tiles".
GPU_QUANTIZERS = {
    ("nvfp4", "ieee", "floor", "nearest"): "nvfp4_ieee",
    ("nvfp4", "ieee", "floor", "stochastic"): "nvfp4_sr",
    ("nvfp4", "te", "floor", "nearest"): "nvfp4_te",
    ("mxfp4", "ieee", "floor", "nearest"): "mxfp4_floor",
    ("mxfp4", "ieee", "rceil", "nearest"): "mxfp4_rceil",
    ("mxfp4", "ieee", "te_pow2", "nearest"): "mxfp4_te_pow2",
}
# The options a GPU quantizer depends on (the others are at their defaults),
# in the order the torch ops take them; Four Over Six's settings are None
# without it.
GPU_OPTIONS = ("fmt", "numerics", "tile", "mx_scale_rule", "row_scaled", "rounding", "seed", "offset", "four_over_six",
               "e4m3_max", "err_mode", "err_use_fast_math", "rht", "transform_dtype")


def gpu_quantizer(global_scale, options: dict, *, mask: bool = False) -> str:
    """The fake_quantize.cu quantizer (a key of FAKE_QUANTIZERS) for these
    options, after the golden model's checks of section 6.4 (`options`: any
    of fake_quantize's keyword options; unknown ones are a TypeError).
    A ValueError for the mask with rht=True (not defined, section 6.3)."""
    return gpu_variant(global_scale, options, mask=mask)[0]


def gpu_variant(global_scale, options: dict, *, mask: bool = False) -> tuple[str, dict]:
    """(gpu_quantizer's quantizer, the call's GPU_OPTIONS in canonical form:
    what the torch ops carry)."""
    args = _fake_options(global_scale, options)
    resolved = _check_fake_options(**args)
    variant = resolved["variant"]
    if mask and variant == "rht":
        raise ValueError("the saturation mask is not defined with rht=True (it would live in the transformed "
                         "domain, docs/fused_ops.md section 6.3); use the plain straight-through gradient")
    rounding = "nearest" if resolved["seed"] is None else "stochastic"
    if variant == "4over6":
        quantizer = f"nvfp4_4over6_{resolved['err_mode'].lower()}"
    elif variant == "rht":
        quantizer = "nvfp4_rht" if args["transform_dtype"] == "input" else "nvfp4_rht_float32"
    elif args["tile"] == "16x16":  # numerics="te" (te.check_numerics refuses tiles with any other)
        quantizer = "nvfp4_te_tiles"
    else:  # every other combination the golden model's checks let through
        quantizer = GPU_QUANTIZERS[(args["fmt"], variant, resolved["rule"], rounding)]
    if mask and quantizer == "nvfp4_sr":
        quantizer = "nvfp4_ieee"  # stochastic rounding has round to nearest's scale bytes, and so its mask
    four_over_six = variant == "4over6"
    settings = (resolved["e4m3_max"], resolved["err_mode"], resolved["fast"]) if four_over_six else (None,) * 3
    return quantizer, dict(zip(GPU_OPTIONS, (args["fmt"], variant if variant in ("ieee", "te") else "te",
                                             args["tile"], resolved["rule"], bool(args["row_scaled"]), rounding,
                                             resolved["seed"], resolved["offset"] or 0, four_over_six, *settings,
                                             variant == "rht", args["transform_dtype"] if variant == "rht" else "input")))


def takes_global_amax(gpu: dict) -> bool:
    """Whether the quantizer of canonical options `gpu` (Four Over Six, the
    RHT) makes its scale from a global amax rather than taking a global scale."""
    return gpu["four_over_six"] or gpu["rht"]


def row_scalar(gpu: dict, global_scale, options: dict):
    """The row's scalar of a call whose canonical options are `gpu`: its
    global_amax or its global scale."""
    return options.get("global_amax") if takes_global_amax(gpu) else global_scale


def scalar_arguments(gpu: dict, scalar) -> dict:
    """row_scalar's inverse: the keyword arguments that pass `scalar`."""
    return dict(global_scale=None, global_amax=scalar) if takes_global_amax(gpu) else dict(global_scale=scalar)


@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element accesses, with 16-byte ones (None where impossible)
    empty: bool  # nothing to launch
    row_span: tuple  # (experts, expert stride, rows, row stride, n) in elements: what the kernel reads


_plans: dict = {}
_MAX_PLANS = 4096


def _make_plan(x, dtype_name: str, scale_kind: str, quantizer: str, mask: bool, settings: tuple, target) -> _Plan:
    view = row_view(x.shape, x.strides, x.itemsize, scale_kind == "expert")
    block = 32 if FAKE_QUANTIZERS[quantizer].fmt == "mxfp4" else 16
    blocks_per_row = -(-view.n // block)
    variants = [FakeQuantizeVariant(dtype_name, quantizer, vector, mask) for vector in (False, True)]
    dynamic = ("x", "global_scale_ptr", "global_scale_value", "out")
    if FAKE_QUANTIZERS[quantizer].tiles:  # a thread block a tile of row_tiles.cuh, as quantize.cu's te_tiles
        grid, block_shape = _square_tile_geometry(view.m, blocks_per_row, x.itemsize, f"x: shape {x.shape}")
        static = dict(row_stride=view.row_stride, m=view.m, n=view.n)
    else:
        steps = blocks_per_thread(view.m * view.experts, blocks_per_row, variants[0].max_blocks_per_thread)
        # launch_geometry maps one thread per unit of a row; here a unit is a thread's `steps` blocks.
        grid, block_shape = launch_geometry(view.m, -(-blocks_per_row // steps), batch=view.experts,
                                            columns=round_up(view.n, block), what=f"x: shape {x.shape}")
        expert_step, row_step = global_scale_steps(scale_kind, view.m)
        static = dict(row_stride=view.row_stride, expert_stride=view.expert_stride, m=view.m, n=view.n,
                      blocks_per_row=blocks_per_row, steps=steps, global_scale_expert_step=expert_step,
                      global_scale_row_step=row_step, denominator=settings[0], fast_math=settings[1])
        # past `out`, the seed and offset halves (zeros for the quantizers without stochastic rounding)
        dynamic += () if mask else SR_WORDS
    vectors = rows_allow_vectors((view.row_stride * x.itemsize, view.expert_stride * x.itemsize), view.n)
    kernels = tuple(BoundKernel(variant, grid, block_shape, static, dynamic, target=target)
                    if (vectors or not variant.vector) else None for variant in variants)
    return _Plan(kernels, view.m == 0 or view.experts == 0,
                 (view.experts, view.expert_stride, view.m, view.row_stride, view.n))


def _plan_for(x, dtype_name, scale_kind, quantizer, mask, settings, target) -> _Plan:
    key = (x.dtype, x.shape, x.strides, scale_kind, quantizer, mask, settings, target)
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(x, dtype_name, scale_kind, quantizer, mask, settings, target)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    return plan


def prepare_fake_quantize(x, global_scale, options: dict, out, stream, like, *, mask: bool,
                          target: Target | None = None):
    """Every check and allocation of a fake_quantize (or, with `mask`,
    saturation_mask) call, nothing launched: returns (launch, result).
    `target` forces the conversion target (tests run the sm_80 software
    path on newer GPUs this way)."""
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    dtype_name = frontend.dtype_name(array.dtype)
    rows, n = rows_and_n(array.shape)
    resolve_padded_n(n, None)  # n >= 1
    quantizer, gpu = gpu_variant(global_scale, options, mask=mask)
    takes_amax = takes_global_amax(gpu)
    if gpu["rht"]:
        _te_rht._check_rht_k(n)
    # the kernel's seed and offset halves (the mask kernel takes none), 6 * e4m3_max and fast math
    words = () if mask or FAKE_QUANTIZERS[quantizer].tiles else sr_words(gpu["seed"] or 0, gpu["offset"])
    settings = (float(6 * (gpu["e4m3_max"] or 448)), int(bool(gpu["err_use_fast_math"])))
    fmt = FAKE_QUANTIZERS[quantizer].fmt
    te_numerics = quantizer in ("nvfp4_te", "nvfp4_te_tiles")
    row_scaled = bool(options.get("row_scaled", False))
    # The row's scalar the kernel reads: the global scale, or (Four Over Six,
    # the RHT) the global amax; None where it is computed on the device first.
    given = row_scalar(gpu, global_scale, options)
    computed_scale = fmt == "nvfp4" and given is None
    scale = None
    if takes_amax and not computed_scale:
        amax_array, amax_value, per_row_amax = amax_argument(given, row_scaled, device_id, rows, n)
        scale = GlobalScale(amax_array, 0 if amax_array is None else amax_array.pointer, amax_value,
                            "row" if per_row_amax else "one")
    elif fmt == "nvfp4" and not computed_scale:
        if te_numerics:  # before the generic shape check, which does not know TE's [E, m] per-row form
            te_fake_scale_kind(global_scale, array.shape, row_scaled)
        scale = global_scale_argument(global_scale, device_id, array.shape)
        if FAKE_QUANTIZERS[quantizer].tiles and scale.kind != "one":
            raise ValueError(f"numerics='te' with 16x16 tiles and a global scale per {scale.kind} is not available on "
                             "the GPU yet (it takes one for all of x); nvfp4_cupy.reference.fused computes it on the CPU")
    # A computed scale is one, or one per row with row_scaled (numerics="te" and its variants).
    scale_kind = scale.kind if scale is not None else "row" if computed_scale and row_scaled else "one"
    plan = _plan_for(array, dtype_name, scale_kind, quantizer, mask, settings, target)
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    out_dtype = "bool" if mask else dtype_name
    given_out = None
    if out is not None:
        given_out = check_output(out, "out", array.shape, out_dtype, device_id, "x")
        if not plan.empty:
            reads = [("x", _read_range(array, plan.row_span))]
            if scale is not None and scale.array is not None:
                reads.append(("global_amax" if takes_amax else "global_scale", scale.array.byte_range()))
            check_disjoint(reads, [("out", given_out.byte_range())])
        result = results.as_frontend((out,))[0]
    else:
        result = results.allocator(device_id, handle)(array.shape, "uint8" if mask else dtype_name)
        if mask:
            result = result.view(np.bool_ if results is CUPY else results.torch.bool)
    if plan.empty:
        return _nothing, result
    out_pointer = given_out.pointer if given_out is not None else results.pointer(result)
    alignment = MASK_VECTOR_BYTES if mask else VECTOR_BYTES
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % VECTOR_BYTES == 0
                          and out_pointer % alignment == 0]
    if computed_scale:
        scale_launch, computed = _computed_scale(x, array, dtype_name, gpu, row_scaled, stream, like, results,
                                                 device_id, handle)
        fake_launch = functools.partial(kernel, device_id, handle, array.pointer, results.pointer(computed), 0.0,
                                        out_pointer, *words)

        def launch(computed=computed) -> None:  # holds the computed scale until both are launched
            scale_launch()
            fake_launch()

        return launch, result
    if scale is None:  # MXFP4: no global scale
        return functools.partial(kernel, device_id, handle, array.pointer, 0, 0.0, out_pointer, *words), result
    return (functools.partial(kernel, device_id, handle, array.pointer, scale.pointer, scale.value, out_pointer, *words),
            result)


def _computed_scale(x, array, dtype_name: str, gpu: dict, row_scaled: bool, stream, like, results, device_id: int,
                    handle: int):
    """(launch, float32 device array) of the row's scalar computed on the
    device: TE's S_enc for numerics="te" (one per row with row_scaled), the
    global amax max |x| (Four Over Six) or max |RHT(x)| (the RHT), each per
    row with row_scaled; else our global scale."""
    if gpu["rht"]:
        rows, n = rows_and_n(array.shape)
        amax = results.allocator(device_id, handle)((rows if row_scaled else 1,), "float32")
        view = row_view(array.shape, array.strides, array.itemsize, False)
        vectors = rows_allow_vectors((view.row_stride * array.itemsize,), n) and array.pointer % VECTOR_BYTES == 0
        variant = RhtVariant(dtype_name, LAYOUTS["linear"], vectors, gpu["transform_dtype"] == "input")
        launch = rht_amax_launcher(variant, array, view.row_stride, rows, n, row_scaled)
        return functools.partial(launch, device_id, handle, results.pointer(amax)), amax
    if gpu["four_over_six"]:
        return prepare_global_amax(x, row_scaled, stream, like)
    if gpu["numerics"] == "te":
        return prepare_global_scale(x, row_scaled, stream, like, "te")
    return prepare_global_scale(x, False, stream, like)


def te_fake_scale_kind(global_scale, x_shape: tuple, row_scaled: bool) -> None:
    """The golden model's numerics="te" scale rules (reference.te) on the
    shape of a global scale array (host values are checked later, with the
    other numerics): fake quantization takes one scale, one per row with
    row_scaled=True, or one per expert of x [E, m, n] (reference.fused
    does); one per row of each expert is not on the GPU yet."""
    shape = getattr(global_scale, "shape", None)
    if shape is None:
        return
    if te_kind_of_shape(tuple(shape), x_shape, row_scaled) == "expert_row":
        raise ValueError("numerics='te' with row_scaled=True and a scale per row of each expert ([E, m]) is not "
                         "available on the GPU yet; nvfp4_cupy.reference.fused computes it on the CPU")


def _nothing() -> None:
    """The launch of an empty call."""
