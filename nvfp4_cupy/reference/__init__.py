"""The golden model: NumPy and ml_dtypes only (no CuPy, no GPU), defining the
exact bytes every kernel must produce (docs/format.md). One module per
format family; this package re-exports their public functions.

- nvfp4: NVFP4 and MXFP4 (OCP floor rule) quantization, the global scale,
  dequantization and the helpers that read the bytes back.
"""

from .._format import LAYOUTS
from .nvfp4 import (
    E4M3_NAN_BYTE,
    E8M0_NAN_BYTE,
    compute_global_scale,
    dequantize,
    e2m1_values,
    e4m3_values,
    quantize_blocks,
    quantize_mx_blocks,
    scale_offsets,
    scaled_fp4_quant,
    unpack_codes,
    unswizzle_scales,
)

__all__ = [
    "scaled_fp4_quant",
    "compute_global_scale",
    "quantize_blocks",
    "quantize_mx_blocks",
    "scale_offsets",
    "unpack_codes",
    "e2m1_values",
    "e4m3_values",
    "unswizzle_scales",
    "dequantize",
    "LAYOUTS",
    "E4M3_NAN_BYTE",
    "E8M0_NAN_BYTE",
]
