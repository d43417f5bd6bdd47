"""nvfp4_cupy for torch users, who never touch CuPy: the ops take and return
torch CUDA tensors, outputs come from torch's caching allocator, and the
kernels run on torch's current stream.

Two ways in, the same bytes:
- the functions here (`nvfp4_cupy.torch.scaled_fp4_quant(x, gs)`, ...): in
  eager mode they go straight to the launcher, without the dispatcher, so a
  call costs about what a torch op costs;
- `torch.ops.nvfp4.*`, registered with torch.library with fake (meta)
  implementations: torch.compile traces through them without a graph break
  and CUDA graphs capture them. The functions here use these while torch.compile
  traces, so one spelling works everywhere.

The ops have no gradient: an input that requires grad (with grad mode on) is
a TypeError that says so; fake_quantize (issue 16, for QAT) is the exception,
with its straight-through gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._format import DEFAULT_DEQUANTIZE_DTYPE, dtype_name_of, is_host_scalar, quantized_shapes, rows_and_n
from .ops import dequantize as _dequantize
from .ops import global_scale as _global_scale
from .ops import quantize as _quantize

__all__ = ["scaled_fp4_quant", "scaled_fp4_quant_sr", "dequantize_fp4", "compute_global_scale", "quantize"]

_LIKE = "torch"


def scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, out=None,
                     out_scale=None, fmt="nvfp4", numerics="ieee", mx_scale_rule=None, row_scaled=False, tile="1x16",
                     columnwise=False, global_scale_t=None):
    """nvfp4_cupy.scaled_fp4_quant for torch tensors: (packed, scales) as
    torch uint8 tensors, with columnwise=True (packed, scales, packed_t,
    scales_t). `global_scale` (and `global_scale_t`): a float or a float32
    CUDA tensor."""
    if torch.compiler.is_compiling():
        _no_outputs_while_compiling(out=out, out_scale=out_scale)
        layout_name = _layout_name(is_sf_swizzled_layout, layout)
        tensor, value = _split_scale(global_scale)
        if columnwise is not False or global_scale_t is not None:
            tensor_t, value_t = (tensor, value) if global_scale_t is None else _split_scale(global_scale_t)
            return torch.ops.nvfp4.scaled_fp4_quant_columnwise(x, tensor, value, tensor_t, value_t, padded_n,
                                                               layout_name, numerics, row_scaled, tile, columnwise)
        return torch.ops.nvfp4.scaled_fp4_quant(x, tensor, value, padded_n, layout_name, fmt, numerics, mx_scale_rule,
                                                row_scaled, tile)
    return _quantize.scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout, padded_n, layout=layout, out=out,
                                      out_scale=out_scale, like=_LIKE, fmt=fmt, numerics=numerics,
                                      mx_scale_rule=mx_scale_rule, row_scaled=row_scaled, tile=tile,
                                      columnwise=columnwise, global_scale_t=global_scale_t)


def scaled_fp4_quant_sr(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, seed=None,
                        offset=0, out=None, out_scale=None):
    """nvfp4_cupy.scaled_fp4_quant_sr (stochastic rounding) for torch
    tensors: (packed, scales) as torch uint8 tensors."""
    if torch.compiler.is_compiling():
        from .reference.stochastic import check_seed_offset

        _no_outputs_while_compiling(out=out, out_scale=out_scale)
        seed, offset = check_seed_offset(seed, offset)
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.scaled_fp4_quant_sr(x, tensor, value, padded_n,
                                                   _layout_name(is_sf_swizzled_layout, layout), _as_int64(seed),
                                                   _as_int64(offset))
    return _quantize.scaled_fp4_quant_sr(x, global_scale, is_sf_swizzled_layout, padded_n, layout=layout, seed=seed,
                                         offset=offset, out=out, out_scale=out_scale, like=_LIKE)


def dequantize_fp4(packed, scales, global_scale, n=None, *, layout="swizzled", dtype=None, out=None, fmt="nvfp4"):
    """nvfp4_cupy.dequantize_fp4 for torch tensors; `dtype` a torch dtype or
    a name (default float32)."""
    dtype_name = _dtype_name(dtype)
    if torch.compiler.is_compiling():
        _no_outputs_while_compiling(out=out)
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.dequantize_fp4(packed, scales, tensor, value, n, layout, dtype_name, fmt)
    return _dequantize.dequantize_fp4(packed, scales, global_scale, n, layout=layout, dtype=dtype_name, out=out,
                                      like=_LIKE, fmt=fmt)


def compute_global_scale(x, per_row=False, *, numerics="ieee"):
    """nvfp4_cupy.compute_global_scale for torch tensors: a float32 tensor."""
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4.compute_global_scale(x, per_row, numerics)
    return _global_scale.compute_global_scale(x, per_row, like=_LIKE, numerics=numerics)


def quantize(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, per_row=False, out=None, out_scale=None,
             numerics="ieee", tile="1x16"):
    """nvfp4_cupy.quantize for torch tensors: (packed, scales, global_scale)."""
    if torch.compiler.is_compiling():
        _no_outputs_while_compiling(out=out, out_scale=out_scale)
        return torch.ops.nvfp4.quantize(x, padded_n, _layout_name(is_sf_swizzled_layout, layout), per_row, numerics,
                                        tile)
    return _quantize.quantize(x, is_sf_swizzled_layout, padded_n, layout=layout, per_row=per_row, out=out,
                              out_scale=out_scale, like=_LIKE, numerics=numerics, tile=tile)


def _layout_name(is_sf_swizzled_layout, layout) -> str:
    from ._format import resolve_layout

    return resolve_layout(is_sf_swizzled_layout, layout).name


def _split_scale(global_scale):
    """(tensor or None, host value): a registered op's arguments have one type each."""
    if is_host_scalar(global_scale):
        return None, float(global_scale)
    return global_scale, 0.0


def _no_outputs_while_compiling(**buffers) -> None:
    """The registered ops allocate their outputs (a traced graph cannot
    write into a caller's buffer through them): refuse out= buffers rather
    than ignore them."""
    given = [name for name, buffer in buffers.items() if buffer is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: output buffers are not supported under torch.compile; "
                         "use the returned tensors")


def _dtype_name(dtype) -> str:
    return DEFAULT_DEQUANTIZE_DTYPE if dtype is None else dtype_name_of(dtype)


# ---------------------------------------------------------------------------
# torch.library registrations: torch.ops.nvfp4.*
# ---------------------------------------------------------------------------
def _scale_kind(global_scale: Optional[torch.Tensor], x_shape) -> str:
    from ._format import global_scale_kind

    return "one" if global_scale is None else global_scale_kind(tuple(global_scale.shape), tuple(x_shape))


@torch.library.custom_op("nvfp4::scaled_fp4_quant", mutates_args=())
def _scaled_fp4_quant_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                         padded_n: Optional[int], layout: str, fmt: str, numerics: str = "ieee",
                         mx_scale_rule: Optional[str] = None, row_scaled: bool = False,
                         tile: str = "1x16") -> tuple[torch.Tensor, torch.Tensor]:
    scale = None if fmt == "mxfp4" else (global_scale if global_scale is not None else global_scale_value)
    # Through the public function: a repeated call takes its hot path.
    return _quantize.scaled_fp4_quant(x, scale, True, padded_n, layout=layout, like=_LIKE, fmt=fmt, numerics=numerics,
                                      mx_scale_rule=mx_scale_rule, row_scaled=row_scaled, tile=tile)


@_scaled_fp4_quant_op.register_fake
def _(x, global_scale, global_scale_value, padded_n, layout, fmt, numerics="ieee", mx_scale_rule=None,
      row_scaled=False, tile="1x16"):
    # row_scaled: one scale per row of x flattened, even where the shape reads per expert ([E, 1, n]).
    kind = "one" if fmt == "mxfp4" else "row" if row_scaled else _scale_kind(global_scale, x.shape)
    return _fake_quantized(x, padded_n, layout, kind, fmt)


@torch.library.custom_op("nvfp4::scaled_fp4_quant_columnwise", mutates_args=())
def _scaled_fp4_quant_columnwise_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                                    global_scale_t: Optional[torch.Tensor], global_scale_t_value: float,
                                    padded_n: Optional[int], layout: str, numerics: str, row_scaled: bool, tile: str,
                                    columnwise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = global_scale if global_scale is not None else global_scale_value
    scale_t = global_scale_t if global_scale_t is not None else global_scale_t_value
    return _quantize.scaled_fp4_quant(x, scale, True, padded_n, layout=layout, like=_LIKE, numerics=numerics,
                                      row_scaled=row_scaled, tile=tile, columnwise=columnwise, global_scale_t=scale_t)


@_scaled_fp4_quant_columnwise_op.register_fake
def _(x, global_scale, global_scale_value, global_scale_t, global_scale_t_value, padded_n, layout, numerics,
      row_scaled, tile, columnwise):
    m, n = rows_and_n(tuple(x.shape))
    packed, scales = _fake_quantized(x.new_empty((m, n)), padded_n, layout, "one", "nvfp4")
    packed_t, scales_t = _fake_quantized(x.new_empty((n, m)), -(-m // 16) * 16, layout, "one", "nvfp4")
    return packed, scales, packed_t, scales_t


def _fake_quantized(x, padded_n, layout, kind, fmt):
    """Empty (packed, scales) of a quantization of x: the fake of the quantizing ops."""
    packed_shape, scale_shape = quantized_shapes(tuple(x.shape), padded_n, True, layout, kind, fmt)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8)


# The schema's int is int64: the ops take a seed or offset in [0, 2^64) as
# the int64 of the same 64 bits.
_U64 = 1 << 64


def _as_int64(value: int) -> int:
    return value - _U64 if value >= _U64 >> 1 else value


@torch.library.custom_op("nvfp4::scaled_fp4_quant_sr", mutates_args=())
def _scaled_fp4_quant_sr_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                            padded_n: Optional[int], layout: str, seed: int,
                            offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = global_scale if global_scale is not None else global_scale_value
    return _quantize.scaled_fp4_quant_sr(x, scale, True, padded_n, layout=layout, seed=seed % _U64,
                                         offset=offset % _U64, like=_LIKE)


@_scaled_fp4_quant_sr_op.register_fake
def _(x, global_scale, global_scale_value, padded_n, layout, seed, offset):
    return _fake_quantized(x, padded_n, layout, _scale_kind(global_scale, x.shape), "nvfp4")


@torch.library.custom_op("nvfp4::dequantize_fp4", mutates_args=())
def _dequantize_fp4_op(packed: torch.Tensor, scales: torch.Tensor, global_scale: Optional[torch.Tensor],
                       global_scale_value: float, n: Optional[int], layout: str, dtype: str,
                       fmt: str) -> torch.Tensor:
    scale = None if fmt == "mxfp4" else (global_scale if global_scale is not None else global_scale_value)
    return _dequantize.dequantize_fp4(packed, scales, scale, n, layout=layout, dtype=dtype, like=_LIKE, fmt=fmt)


@_dequantize_fp4_op.register_fake
def _(packed, scales, global_scale, global_scale_value, n, layout, dtype, fmt):
    from ._format import dequantize_shape

    shape = dequantize_shape(tuple(packed.shape), "uint8", n, layout, fmt)
    return packed.new_empty(shape.out_shape, dtype=getattr(torch, dtype))


@torch.library.custom_op("nvfp4::compute_global_scale", mutates_args=())
def _compute_global_scale_op(x: torch.Tensor, per_row: bool, numerics: str = "ieee") -> torch.Tensor:
    return _global_scale.compute_global_scale(x, per_row, like=_LIKE, numerics=numerics)


@_compute_global_scale_op.register_fake
def _(x, per_row, numerics="ieee"):
    from ._format import rows_and_n

    return x.new_empty((rows_and_n(tuple(x.shape))[0] if per_row else 1,), dtype=torch.float32)


@torch.library.custom_op("nvfp4::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, padded_n: Optional[int], layout: str, per_row: bool, numerics: str = "ieee",
                 tile: str = "1x16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize.quantize(x, True, padded_n, layout=layout, per_row=per_row, like=_LIKE, numerics=numerics,
                              tile=tile)


@_quantize_op.register_fake
def _(x, padded_n, layout, per_row, numerics="ieee", tile="1x16"):
    from ._format import rows_and_n

    packed_shape, scale_shape = quantized_shapes(tuple(x.shape), padded_n, True, layout, "one", "nvfp4")
    rows = rows_and_n(tuple(x.shape))[0] if per_row else 1
    return (x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8),
            x.new_empty((rows,), dtype=torch.float32))


# ---------------------------------------------------------------------------
# SiLU-and-mul and expert quantization (issue 16, items 2 and 4; ops/experts.py):
# eager functions and torch.ops.nvfp4.{silu_and_mul, silu_and_mul_quant,
# scaled_fp4_experts_quant, scaled_fp4_masked_quant}
# ---------------------------------------------------------------------------
from .ops import experts as _experts  # noqa: E402  (kept with its block)

__all__ += ["silu_and_mul", "silu_and_mul_quant", "scaled_fp4_experts_quant", "scaled_fp4_masked_quant"]


def silu_and_mul(x):
    """nvfp4_cupy.silu_and_mul for torch tensors: [..., 2n] -> [..., n]."""
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4.silu_and_mul(x)
    return _experts.silu_and_mul(x, like=_LIKE)


def silu_and_mul_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, fmt="nvfp4",
                       expert_offsets=None, expert_counts=None, validate=True):
    """nvfp4_cupy.silu_and_mul_quant for torch tensors: (packed, scales), or
    (packed, scales, blockscale_offsets) with expert_offsets."""
    if torch.compiler.is_compiling():
        if expert_offsets is not None and expert_counts is not None:
            raise ValueError("pass expert_offsets or expert_counts, not both")
        tensor, value = _split_scale(global_scale)
        layout_name = _layout_name(is_sf_swizzled_layout, layout)
        if expert_offsets is not None:
            return torch.ops.nvfp4.scaled_fp4_experts_quant(x, tensor, value, expert_offsets, padded_n, layout_name,
                                                            fmt, validate, True)
        if expert_counts is not None:
            return torch.ops.nvfp4.scaled_fp4_masked_quant(x, tensor, value, expert_counts, padded_n, layout_name,
                                                           fmt, validate, True)
        return torch.ops.nvfp4.silu_and_mul_quant(x, tensor, value, padded_n, layout_name, fmt)
    return _experts.silu_and_mul_quant(x, global_scale, is_sf_swizzled_layout, padded_n, layout=layout, fmt=fmt,
                                       expert_offsets=expert_offsets, expert_counts=expert_counts, validate=validate,
                                       like=_LIKE)


def scaled_fp4_experts_quant(x, global_scale, expert_offsets, is_sf_swizzled_layout=True, padded_n=None, *,
                             layout=None, fmt="nvfp4", validate=True):
    """nvfp4_cupy.scaled_fp4_experts_quant for torch tensors: (packed,
    scales, blockscale_offsets int32 [E + 1])."""
    if torch.compiler.is_compiling():
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.scaled_fp4_experts_quant(x, tensor, value, expert_offsets, padded_n,
                                                        _layout_name(is_sf_swizzled_layout, layout), fmt, validate,
                                                        False)
    return _experts.scaled_fp4_experts_quant(x, global_scale, expert_offsets, is_sf_swizzled_layout, padded_n,
                                             layout=layout, fmt=fmt, validate=validate, like=_LIKE)


def scaled_fp4_masked_quant(x, global_scale, expert_counts, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                            fmt="nvfp4", validate=True):
    """nvfp4_cupy.scaled_fp4_masked_quant for torch tensors: (packed, scales)."""
    if torch.compiler.is_compiling():
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.scaled_fp4_masked_quant(x, tensor, value, expert_counts, padded_n,
                                                       _layout_name(is_sf_swizzled_layout, layout), fmt, validate,
                                                       False)
    return _experts.scaled_fp4_masked_quant(x, global_scale, expert_counts, is_sf_swizzled_layout, padded_n,
                                            layout=layout, fmt=fmt, validate=validate, like=_LIKE)


def _op_scale(global_scale: Optional[torch.Tensor], global_scale_value: float, fmt: str):
    return None if fmt == "mxfp4" else (global_scale if global_scale is not None else global_scale_value)


def _gated_n(x, silu: bool) -> int:
    return x.shape[-1] // 2 if silu else x.shape[-1]


@torch.library.custom_op("nvfp4::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return _experts.silu_and_mul(x, like=_LIKE)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("nvfp4::silu_and_mul_quant", mutates_args=())
def _silu_and_mul_quant_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                           padded_n: Optional[int], layout: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _experts.silu_and_mul_quant(x, _op_scale(global_scale, global_scale_value, fmt), True, padded_n,
                                       layout=layout, fmt=fmt, like=_LIKE)


@_silu_and_mul_quant_op.register_fake
def _(x, global_scale, global_scale_value, padded_n, layout, fmt):
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    kind = "one" if fmt == "mxfp4" else _scale_kind(global_scale, out_shape)
    packed_shape, scale_shape = quantized_shapes(tuple(out_shape), padded_n, True, layout, kind, fmt)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8)


@torch.library.custom_op("nvfp4::scaled_fp4_experts_quant", mutates_args=())
def _scaled_fp4_experts_quant_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                                 expert_offsets: torch.Tensor, padded_n: Optional[int], layout: str, fmt: str,
                                 validate: bool, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = _op_scale(global_scale, global_scale_value, fmt)
    if silu:
        return _experts.silu_and_mul_quant(x, scale, True, padded_n, layout=layout, fmt=fmt,
                                           expert_offsets=expert_offsets, validate=validate, like=_LIKE)
    return _experts.scaled_fp4_experts_quant(x, scale, expert_offsets, True, padded_n, layout=layout, fmt=fmt,
                                             validate=validate, like=_LIKE)


@_scaled_fp4_experts_quant_op.register_fake
def _(x, global_scale, global_scale_value, expert_offsets, padded_n, layout, fmt, validate, silu):
    from ._format import block_size_of, resolve_layout, resolve_padded_n

    # The shapes follow from x's and the offsets' shapes (the host bound of
    # experts_scale_rows), never from the offsets' values.
    block_size = block_size_of(fmt)
    tokens, experts = x.shape[0], expert_offsets.shape[0] - 1
    k = resolve_padded_n(_gated_n(x, silu), padded_n, block_size)
    scale_layout = resolve_layout(layout=layout)
    cols = scale_layout.scale_shape(0, k, block_size)[1]
    rows = _experts.experts_scale_rows(tokens, experts, scale_layout.name)
    return (x.new_empty((tokens, k // 2), dtype=torch.uint8), x.new_empty((rows, cols), dtype=torch.uint8),
            x.new_empty((experts + 1,), dtype=torch.int32))


@torch.library.custom_op("nvfp4::scaled_fp4_masked_quant", mutates_args=())
def _scaled_fp4_masked_quant_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: float,
                                expert_counts: torch.Tensor, padded_n: Optional[int], layout: str, fmt: str,
                                validate: bool, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _op_scale(global_scale, global_scale_value, fmt)
    if silu:
        return _experts.silu_and_mul_quant(x, scale, True, padded_n, layout=layout, fmt=fmt,
                                           expert_counts=expert_counts, validate=validate, like=_LIKE)
    return _experts.scaled_fp4_masked_quant(x, scale, expert_counts, True, padded_n, layout=layout, fmt=fmt,
                                            validate=validate, like=_LIKE)


@_scaled_fp4_masked_quant_op.register_fake
def _(x, global_scale, global_scale_value, expert_counts, padded_n, layout, fmt, validate, silu):
    shape = (x.shape[0], x.shape[1], _gated_n(x, silu))
    packed_shape, scale_shape = quantized_shapes(shape, padded_n, True, layout, "expert", fmt)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8)


# ---------------------------------------------------------------------------
# Fake quantization (issue 16, item 3; ops/fake_quantize.py): fake_quantize
# with a straight-through gradient, torch.ops.nvfp4.{fake_quantize,
# saturation_mask}
# ---------------------------------------------------------------------------
from ._format import check_bool  # noqa: E402  (kept with its block)
from .ops import fake_quantize as _fake_quantize  # noqa: E402

__all__ += ["fake_quantize", "saturation_mask"]


def fake_quantize(x, global_scale=None, *, zero_saturated=False, **options):
    """dequantize(quantize(x)) in x's dtype and shape, in one kernel
    (nvfp4_cupy.fake_quantize, docs/fused_ops.md section 6), with the
    straight-through gradient of section 6.3: grad_x = grad, or with
    zero_saturated=True +0.0 where the quantizer clipped x (the saturation
    mask, recomputed from x in the backward pass). No gradient flows to
    `global_scale` (a float, a float32 CUDA tensor of one, per row or per
    expert scales, or None for 448 * 6 / amax(|x|) computed on the device)
    or to `global_amax` (Four Over Six, the RHT). `options`: those of
    nvfp4_cupy.fake_quantize (fmt, ...), checked as it checks them. Works
    under torch.compile (no graph break) and in training steps."""
    zero_saturated = check_bool(zero_saturated, "zero_saturated")
    gpu = _fake_quantize.gpu_variant(global_scale, options)[1]  # every option check, before anything runs
    scalar = _fake_quantize.row_scalar(gpu, global_scale, options)
    tensor, value = _optional_scale(scalar)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                  for t in (x, scalar))
    if torch.compiler.is_compiling() or needs_grad:
        return torch.ops.nvfp4.fake_quantize(x, tensor, value, *_op_options(gpu), zero_saturated)
    return _fake_quantize.fake_quantize(x, **_fake_quantize.scalar_arguments(gpu, scalar), **gpu, like=_LIKE)


def saturation_mask(x, global_scale=None, **options):
    """nvfp4_cupy.saturation_mask for torch tensors: a bool tensor of x's
    shape (docs/fused_ops.md, section 6.3)."""
    gpu = _fake_quantize.gpu_variant(global_scale, options, mask=True)[1]
    scalar = _fake_quantize.row_scalar(gpu, global_scale, options)
    tensor, value = _optional_scale(scalar)
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4.saturation_mask(x, tensor, value, *_op_options(gpu))
    # A mask is never differentiated: x's autograd history does not matter here.
    return _fake_quantize.saturation_mask(x.detach(), **_fake_quantize.scalar_arguments(gpu, scalar), **gpu,
                                         like=_LIKE)


def _optional_scale(global_scale):
    """(tensor or None, host value or None): both None when the scale is to
    be computed from x."""
    if global_scale is None:
        return None, None
    return _split_scale(global_scale)


def _scale_of(global_scale: Optional[torch.Tensor], global_scale_value: Optional[float]):
    """The launcher's global scale (or amax): a detached tensor (no gradient
    flows to it), a host value, or None."""
    return global_scale.detach() if global_scale is not None else global_scale_value


# The options a GPU quantizer depends on (ops/fake_quantize.GPU_OPTIONS), as
# the ops carry them: the seed and the offset as the int64 of their 64 bits
# (the seed -1, unread, where rounding is "nearest"). The row's scalar (the
# global scale, or Four Over Six's and the RHT's global amax) is carried as
# (global_scale, global_scale_value).
def _op_options(gpu: dict) -> tuple:
    seed = -1 if gpu["seed"] is None else _as_int64(gpu["seed"])
    return tuple(seed if name == "seed" else _as_int64(gpu[name]) if name == "offset" else gpu[name]
                 for name in _fake_quantize.GPU_OPTIONS)


def _gpu_options(options: tuple) -> dict:
    """_op_options' inverse: the keyword options of the launchers."""
    gpu = dict(zip(_fake_quantize.GPU_OPTIONS, options))
    gpu["seed"] = None if gpu["rounding"] == "nearest" else gpu["seed"] % _U64
    gpu["offset"] %= _U64
    return gpu


def _launch_arguments(global_scale, global_scale_value, options: tuple) -> dict:
    gpu = _gpu_options(options)
    return dict(_fake_quantize.scalar_arguments(gpu, _scale_of(global_scale, global_scale_value)), **gpu)


@torch.library.custom_op("nvfp4::fake_quantize", mutates_args=())
def _fake_quantize_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: Optional[float],
                      fmt: str, numerics: str, tile: str, mx_scale_rule: str, row_scaled: bool, rounding: str,
                      seed: int, offset: int, four_over_six: bool, e4m3_max: Optional[int], err_mode: Optional[str],
                      err_use_fast_math: Optional[bool], rht: bool, transform_dtype: str,
                      zero_saturated: bool) -> torch.Tensor:
    # detach: the backward may run with grad mode on (create_graph), and the
    # launcher refuses tensors that require grad.
    options = (fmt, numerics, tile, mx_scale_rule, row_scaled, rounding, seed, offset, four_over_six, e4m3_max,
               err_mode, err_use_fast_math, rht, transform_dtype)
    return _fake_quantize.fake_quantize(x.detach(), **_launch_arguments(global_scale, global_scale_value, options),
                                        like=_LIKE)


@_fake_quantize_op.register_fake
def _(x, global_scale, global_scale_value, *options_and_zero_saturated):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nvfp4::saturation_mask", mutates_args=())
def _saturation_mask_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], global_scale_value: Optional[float],
                        fmt: str, numerics: str, tile: str, mx_scale_rule: str, row_scaled: bool, rounding: str,
                        seed: int, offset: int, four_over_six: bool, e4m3_max: Optional[int], err_mode: Optional[str],
                        err_use_fast_math: Optional[bool], rht: bool, transform_dtype: str) -> torch.Tensor:
    options = (fmt, numerics, tile, mx_scale_rule, row_scaled, rounding, seed, offset, four_over_six, e4m3_max,
               err_mode, err_use_fast_math, rht, transform_dtype)
    return _fake_quantize.saturation_mask(x.detach(), **_launch_arguments(global_scale, global_scale_value, options),
                                          like=_LIKE)


@_saturation_mask_op.register_fake
def _(x, global_scale, global_scale_value, *options):
    return torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format)


def _fake_quantize_setup_context(ctx, inputs, output):
    x, global_scale, global_scale_value, *gpu_options, zero_saturated = inputs
    ctx.zero_saturated = zero_saturated
    if zero_saturated:  # the mask is recomputed from x: keep x only when it is needed
        ctx.save_for_backward(x, global_scale)
        ctx.global_scale_value, ctx.gpu_options = global_scale_value, gpu_options


def _fake_quantize_backward(ctx, grad):
    """The straight-through gradient (docs/fused_ops.md, section 6.3): one
    gradient for x, None for every other input."""
    nothing = (None,) * (len(_fake_quantize.GPU_OPTIONS) + 3)
    if not ctx.zero_saturated:
        return grad, *nothing
    x, global_scale = ctx.saved_tensors
    mask = torch.ops.nvfp4.saturation_mask(x, global_scale, ctx.global_scale_value, *ctx.gpu_options)
    return torch.where(mask, grad.new_zeros(()), grad), *nothing


_fake_quantize_op.register_autograd(_fake_quantize_backward, setup_context=_fake_quantize_setup_context)


# ---------------------------------------------------------------------------
# RMSNorm, alone and fused with quantization (issue 16, item 1;
# ops/rms_norm.py): eager functions and torch.ops.nvfp4.{rms_norm,
# rms_norm_quant} and, for the residual form, which writes x + residual back
# into `residual`, torch.ops.nvfp4.{fused_add_rms_norm,
# fused_add_rms_norm_quant} (declared as mutating it, so torch.compile and
# CUDA graphs see the write; as in vLLM, a separate op, so that the plain
# form stays a pure function that inductor lowers). The functions return
# the residual; the registered ops do not (an op cannot return an alias of
# its input).
# ---------------------------------------------------------------------------
from .ops import rms_norm as _rms_norm  # noqa: E402  (kept with its block)

__all__ += ["rms_norm", "rms_norm_quant"]


def rms_norm(x, weight, eps, residual=None, *, out=None):
    """nvfp4_cupy.rms_norm for torch tensors: out, or (out, residual) with
    `residual` updated in place."""
    if torch.compiler.is_compiling():
        _no_outputs_while_compiling(out=out)
        if residual is None:
            return torch.ops.nvfp4.rms_norm(x, weight, float(eps))
        return torch.ops.nvfp4.fused_add_rms_norm(x, weight, float(eps), residual), residual
    return _rms_norm.rms_norm(x, weight, eps, residual, out=out, like=_LIKE)


def rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                   fmt="nvfp4", residual=None, out=None, out_scale=None):
    """nvfp4_cupy.rms_norm_quant for torch tensors: (packed, scales), or
    (packed, scales, residual) with `residual` updated in place.
    `global_scale`: a float or a float32 CUDA tensor (None for MXFP4)."""
    if torch.compiler.is_compiling():
        _no_outputs_while_compiling(out=out, out_scale=out_scale)
        tensor, value = _split_scale(global_scale)
        arguments = (x, weight, float(eps), tensor, value, padded_n, _layout_name(is_sf_swizzled_layout, layout), fmt)
        if residual is None:
            return torch.ops.nvfp4.rms_norm_quant(*arguments)
        packed, scales = torch.ops.nvfp4.fused_add_rms_norm_quant(*arguments, residual)
        return packed, scales, residual
    return _rms_norm.rms_norm_quant(x, weight, eps, global_scale, is_sf_swizzled_layout, padded_n, layout=layout,
                                    fmt=fmt, residual=residual, out=out, out_scale=out_scale, like=_LIKE)


def _rms_norm_op_body(x, weight, eps, residual):
    result = _rms_norm.rms_norm(x, weight, eps, residual, like=_LIKE)
    return result if residual is None else result[0]


def _rms_norm_quant_op_body(x, weight, eps, global_scale, global_scale_value, padded_n, layout, fmt, residual):
    scale = None if fmt == "mxfp4" else (global_scale if global_scale is not None else global_scale_value)
    packed, scales, *_ = _rms_norm.rms_norm_quant(x, weight, eps, scale, True, padded_n, layout=layout, fmt=fmt,
                                                  residual=residual, like=_LIKE)
    return packed, scales


def _rms_norm_quant_fake(x, global_scale, padded_n, layout, fmt):
    kind = "one" if fmt == "mxfp4" else _scale_kind(global_scale, x.shape)
    packed_shape, scale_shape = quantized_shapes(tuple(x.shape), padded_n, True, layout, kind, fmt)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8)


@torch.library.custom_op("nvfp4::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _rms_norm_op_body(x, weight, eps, None)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("nvfp4::fused_add_rms_norm", mutates_args=("residual",))
def _fused_add_rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                           residual: torch.Tensor) -> torch.Tensor:
    return _rms_norm_op_body(x, weight, eps, residual)


@_fused_add_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    return x.new_empty(x.shape)


@torch.library.custom_op("nvfp4::rms_norm_quant", mutates_args=())
def _rms_norm_quant_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                       global_scale: Optional[torch.Tensor], global_scale_value: float, padded_n: Optional[int],
                       layout: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_quant_op_body(x, weight, eps, global_scale, global_scale_value, padded_n, layout, fmt, None)


@_rms_norm_quant_op.register_fake
def _(x, weight, eps, global_scale, global_scale_value, padded_n, layout, fmt):
    return _rms_norm_quant_fake(x, global_scale, padded_n, layout, fmt)


@torch.library.custom_op("nvfp4::fused_add_rms_norm_quant", mutates_args=("residual",))
def _fused_add_rms_norm_quant_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                                 global_scale: Optional[torch.Tensor], global_scale_value: float,
                                 padded_n: Optional[int], layout: str, fmt: str,
                                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_quant_op_body(x, weight, eps, global_scale, global_scale_value, padded_n, layout, fmt, residual)


@_fused_add_rms_norm_quant_op.register_fake
def _(x, weight, eps, global_scale, global_scale_value, padded_n, layout, fmt, residual):
    return _rms_norm_quant_fake(x, global_scale, padded_n, layout, fmt)


# ---------------------------------------------------------------------------
# TE's random Hadamard transform and Four Over Six (issue 15, items 4 and 5;
# ops/rht.py, ops/four_over_six.py): eager functions and
# torch.ops.nvfp4.{scaled_fp4_quant_rht, scaled_fp4_quant_4over6}. The ops
# always return three tensors: the third is the computed amax, or empty where
# one was given (the functions then return the given one, as in eager mode).
# ---------------------------------------------------------------------------
from .ops import four_over_six as _four_over_six  # noqa: E402  (kept with its block)
from .ops import rht as _rht  # noqa: E402

__all__ += ["scaled_fp4_quant_rht", "scaled_fp4_quant_4over6"]


def scaled_fp4_quant_rht(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                         per_row=False, transform_dtype="input"):
    """nvfp4_cupy.scaled_fp4_quant_rht for torch tensors: (packed, scales,
    global_amax). `global_amax`: None (computed), a float or a float32 CUDA
    tensor."""
    if torch.compiler.is_compiling():
        tensor, value = _split_amax(global_amax)
        packed, scales, amax = torch.ops.nvfp4.scaled_fp4_quant_rht(
            x, tensor, value, padded_n, _layout_name(is_sf_swizzled_layout, layout), per_row, transform_dtype)
        return packed, scales, amax if global_amax is None else global_amax
    return _rht.scaled_fp4_quant_rht(x, global_amax, is_sf_swizzled_layout, padded_n, layout=layout, per_row=per_row,
                                     transform_dtype=transform_dtype, like=_LIKE)


def scaled_fp4_quant_4over6(x, global_amax=None, is_sf_swizzled_layout=True, padded_n=None, *, layout=None,
                            err_mode="MAE", e4m3_max=448, err_use_fast_math=False, per_row=False):
    """nvfp4_cupy.scaled_fp4_quant_4over6 for torch tensors: (packed, scales,
    global_amax). `global_amax`: None (computed), a float or a float32 CUDA
    tensor."""
    if torch.compiler.is_compiling():
        tensor, value = _split_amax(global_amax)
        packed, scales, amax = torch.ops.nvfp4.scaled_fp4_quant_4over6(
            x, tensor, value, padded_n, _layout_name(is_sf_swizzled_layout, layout), err_mode, e4m3_max,
            err_use_fast_math, per_row)
        return packed, scales, amax if global_amax is None else global_amax
    return _four_over_six.scaled_fp4_quant_4over6(
        x, global_amax, is_sf_swizzled_layout, padded_n, layout=layout, err_mode=err_mode, e4m3_max=e4m3_max,
        err_use_fast_math=err_use_fast_math, per_row=per_row, like=_LIKE)


def _split_amax(global_amax):
    """(tensor or None, host value or None): None and None for a computed amax."""
    return (None, None) if global_amax is None else _split_scale(global_amax)


def _amax_of(tensor: Optional[torch.Tensor], value: Optional[float]):
    return tensor if tensor is not None else value


def _fake_te_quantized(x, tensor, value, padded_n, layout, per_row):
    packed, scales = _fake_quantized(x, padded_n, layout, "one", "nvfp4")
    computed = tensor is None and value is None
    amax_shape = ((rows_and_n(tuple(x.shape))[0] if per_row else 1) if computed else 0,)
    return packed, scales, x.new_empty(amax_shape, dtype=torch.float32)


def _amax_or_empty(x, returned, computed: bool) -> torch.Tensor:
    return returned if computed else x.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("nvfp4::scaled_fp4_quant_rht", mutates_args=())
def _scaled_fp4_quant_rht_op(x: torch.Tensor, global_amax: Optional[torch.Tensor], global_amax_value: Optional[float],
                             padded_n: Optional[int], layout: str, per_row: bool,
                             transform_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    amax = _amax_of(global_amax, global_amax_value)
    packed, scales, returned = _rht.scaled_fp4_quant_rht(x, amax, True, padded_n, layout=layout, per_row=per_row,
                                                         transform_dtype=transform_dtype, like=_LIKE)
    return packed, scales, _amax_or_empty(x, returned, amax is None)


@_scaled_fp4_quant_rht_op.register_fake
def _(x, global_amax, global_amax_value, padded_n, layout, per_row, transform_dtype):
    return _fake_te_quantized(x, global_amax, global_amax_value, padded_n, layout, per_row)


@torch.library.custom_op("nvfp4::scaled_fp4_quant_4over6", mutates_args=())
def _scaled_fp4_quant_4over6_op(x: torch.Tensor, global_amax: Optional[torch.Tensor],
                                global_amax_value: Optional[float], padded_n: Optional[int], layout: str,
                                err_mode: str, e4m3_max: int, err_use_fast_math: bool,
                                per_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    amax = _amax_of(global_amax, global_amax_value)
    packed, scales, returned = _four_over_six.scaled_fp4_quant_4over6(
        x, amax, True, padded_n, layout=layout, err_mode=err_mode, e4m3_max=e4m3_max,
        err_use_fast_math=err_use_fast_math, per_row=per_row, like=_LIKE)
    return packed, scales, _amax_or_empty(x, returned, amax is None)


@_scaled_fp4_quant_4over6_op.register_fake
def _(x, global_amax, global_amax_value, padded_n, layout, err_mode, e4m3_max, err_use_fast_math, per_row):
    return _fake_te_quantized(x, global_amax, global_amax_value, padded_n, layout, per_row)
