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
a TypeError that says so (see issue 16's fake quantization for QAT).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._format import DEFAULT_DEQUANTIZE_DTYPE, dtype_name_of, is_host_scalar, quantized_shapes
from .ops import dequantize as _dequantize
from .ops import global_scale as _global_scale
from .ops import quantize as _quantize

__all__ = ["scaled_fp4_quant", "dequantize_fp4", "compute_global_scale", "quantize"]

_LIKE = "torch"


def scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, out=None,
                     out_scale=None, fmt="nvfp4"):
    """nvfp4_cupy.scaled_fp4_quant for torch tensors: (packed, scales) as
    torch uint8 tensors. `global_scale`: a float or a float32 CUDA tensor."""
    if torch.compiler.is_compiling():
        layout_name = _layout_name(is_sf_swizzled_layout, layout)
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.scaled_fp4_quant(x, tensor, value, padded_n, layout_name, fmt)
    return _quantize.scaled_fp4_quant(x, global_scale, is_sf_swizzled_layout, padded_n, layout=layout, out=out,
                                      out_scale=out_scale, like=_LIKE, fmt=fmt)


def dequantize_fp4(packed, scales, global_scale, n=None, *, layout="swizzled", dtype=None, out=None, fmt="nvfp4"):
    """nvfp4_cupy.dequantize_fp4 for torch tensors; `dtype` a torch dtype or
    a name (default float32)."""
    dtype_name = _dtype_name(dtype)
    if torch.compiler.is_compiling():
        tensor, value = _split_scale(global_scale)
        return torch.ops.nvfp4.dequantize_fp4(packed, scales, tensor, value, n, layout, dtype_name, fmt)
    return _dequantize.dequantize_fp4(packed, scales, global_scale, n, layout=layout, dtype=dtype_name, out=out,
                                      like=_LIKE, fmt=fmt)


def compute_global_scale(x, per_row=False):
    """nvfp4_cupy.compute_global_scale for torch tensors: a float32 tensor."""
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4.compute_global_scale(x, per_row)
    return _global_scale.compute_global_scale(x, per_row, like=_LIKE)


def quantize(x, is_sf_swizzled_layout=True, padded_n=None, *, layout=None, per_row=False, out=None, out_scale=None):
    """nvfp4_cupy.quantize for torch tensors: (packed, scales, global_scale)."""
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4.quantize(x, padded_n, _layout_name(is_sf_swizzled_layout, layout), per_row)
    return _quantize.quantize(x, is_sf_swizzled_layout, padded_n, layout=layout, per_row=per_row, out=out,
                              out_scale=out_scale, like=_LIKE)


def _layout_name(is_sf_swizzled_layout, layout) -> str:
    from ._format import resolve_layout

    return resolve_layout(is_sf_swizzled_layout, layout).name


def _split_scale(global_scale):
    """(tensor or None, host value): a registered op's arguments have one type each."""
    if is_host_scalar(global_scale):
        return None, float(global_scale)
    return global_scale, 0.0


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
                         padded_n: Optional[int], layout: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    scale = None if fmt == "mxfp4" else (global_scale if global_scale is not None else global_scale_value)
    launch, outputs = _quantize.prepare_quantize(x, scale, True, padded_n, layout, None, None, None, _LIKE, fmt)
    launch()
    return outputs


@_scaled_fp4_quant_op.register_fake
def _(x, global_scale, global_scale_value, padded_n, layout, fmt):
    kind = "one" if fmt == "mxfp4" else _scale_kind(global_scale, x.shape)
    packed_shape, scale_shape = quantized_shapes(tuple(x.shape), padded_n, True, layout, kind, fmt)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8)


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
def _compute_global_scale_op(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    return _global_scale.compute_global_scale(x, per_row, like=_LIKE)


@_compute_global_scale_op.register_fake
def _(x, per_row):
    from ._format import rows_and_n

    return x.new_empty((rows_and_n(tuple(x.shape))[0] if per_row else 1,), dtype=torch.float32)


@torch.library.custom_op("nvfp4::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, padded_n: Optional[int], layout: str,
                 per_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize.quantize(x, True, padded_n, layout=layout, per_row=per_row, like=_LIKE)


@_quantize_op.register_fake
def _(x, padded_n, layout, per_row):
    from ._format import rows_and_n

    packed_shape, scale_shape = quantized_shapes(tuple(x.shape), padded_n, True, layout, "one", "nvfp4")
    rows = rows_and_n(tuple(x.shape))[0] if per_row else 1
    return (x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.uint8),
            x.new_empty((rows,), dtype=torch.float32))
