"""The golden model: NumPy and ml_dtypes only (no CuPy, no GPU), defining the
exact bytes every kernel must produce (docs/format.md). One module per
format family; this package re-exports their public functions.

- nvfp4: NVFP4 and MXFP4 (OCP floor rule) quantization, the global scale,
  dequantization and the helpers that read the bytes back.

TransformerEngine's recipe and the other variants (specified in docs/),
imported by module (`from nvfp4_cupy.reference import te`):

- te: numerics="te" (TE's arithmetic) and row-scaled NVFP4, both on the GPU
  too; 16x16 tiles and the columnwise output, golden only so far
  (docs/te_numerics.md);
- te_rht, te_4over6: the random Hadamard transform and Four over Six, golden
  only so far (docs/te_rht_and_4over6.md);
- philox, stochastic: stochastic rounding from a Philox4x32-10 stream
  (scaled_fp4_quant_sr on the GPU); mx_rules: the MXFP4 scale rules floor,
  rceil and TE's pow-2, on the GPU too
  (docs/stochastic_rounding_and_mx_rules.md);
- fused: RMSNorm + quantize, SiLU-and-mul + quantize, grouped experts with
  offsets or counts, fake quantization (docs/fused_ops.md).
"""

from .._format import LAYOUTS
from . import nvfp4
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

__all__ = [*nvfp4.__all__, "LAYOUTS", "E4M3_NAN_BYTE", "E8M0_NAN_BYTE"]
