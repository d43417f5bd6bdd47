"""nvfp4_cupy: NVFP4 quantization for CuPy on every NVIDIA GPU from sm_80.

The GPU functions need CuPy and are imported on first use, so that
`nvfp4_cupy.reference` (NumPy and ml_dtypes only) works without it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "scaled_fp4_quant",
    "scaled_fp4_quant_sr",
    "scaled_fp4_quant_rht",
    "scaled_fp4_quant_4over6",
    "create_fp4_output_tensors",
    "dequantize_fp4",
    "compute_global_scale",
    "quantize",
    "fake_quantize",
    "saturation_mask",
    "rms_norm",
    "rms_norm_quant",
    "silu_and_mul",
    "silu_and_mul_quant",
    "scaled_fp4_experts_quant",
    "scaled_fp4_masked_quant",
    "experts_scale_rows",
    "KernelCompileError",
    "KernelCacheWarning",
    "reference",
    "__version__",
]

# public name -> private module that defines it (imported on first use)
_GPU_NAMES = {
    "scaled_fp4_quant": ".ops.quantize",
    "scaled_fp4_quant_sr": ".ops.quantize",
    "scaled_fp4_quant_rht": ".ops.rht",
    "scaled_fp4_quant_4over6": ".ops.four_over_six",
    "create_fp4_output_tensors": ".ops.quantize",
    "quantize": ".ops.quantize",
    "dequantize_fp4": ".ops.dequantize",
    "fake_quantize": ".ops.fake_quantize",
    "saturation_mask": ".ops.fake_quantize",
    "compute_global_scale": ".ops.global_scale",
    "rms_norm": ".ops.rms_norm",
    "rms_norm_quant": ".ops.rms_norm",
    "silu_and_mul": ".ops.experts",
    "silu_and_mul_quant": ".ops.experts",
    "scaled_fp4_experts_quant": ".ops.experts",
    "scaled_fp4_masked_quant": ".ops.experts",
    "experts_scale_rows": ".reference.fused",  # a host computation: no CuPy needed
    "KernelCompileError": "._runtime.nvrtc",
    "KernelCacheWarning": "._runtime.disk_cache",
}


def __getattr__(name: str):
    if name in _GPU_NAMES:
        value = getattr(importlib.import_module(_GPU_NAMES[name], __name__), name)
    elif name == "reference":
        value = importlib.import_module(".reference", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
