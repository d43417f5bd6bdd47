"""compressed-tensors' nvfp4-pack-quantized checkpoint (compressed-tensors 0.20.1):

- per quantized Linear `M`: `M.weight_packed` uint8 [N, K/2], element 2k in
  the low nibble (compressed_tensors/compressors/nvfp4/helpers.py,
  pack_fp4_to_uint8 / unpack_fp4_from_uint8: `stack((low, high))`),
  `M.weight_scale` float8_e4m3fn [N, K/16] (NVFP4PackedCompressor._compress_scale,
  group strategy: scales [rows, cols // group_size]), `M.weight_global_scale`
  float32 [1], the ENCODE scale 448 * 6 / amax
  (quantization/utils/helpers.py generate_gparam: `scale_data.max *
  quant_data.max / max_val_pos`, `.reshape([1])`); the names are
  NVFP4PackedCompressor.compression_param_names. With calibrated activations
  also `M.input_global_scale` float32 [1], the activations' ENCODE scale
  (generate_gparam of the input amax): the NVFP4 preset's input_activations
  are dynamic "local" (block scales computed at run time from one static
  global scale), for which quantization/lifecycle/initialize.py registers
  `input_global_scale` torch.empty(1) and the load fills it.
- dequantization (NVFP4PackedCompressor.decompress -> forward_helpers._dequantize):
  unpack to bfloat16, scale to bfloat16, then scale / global_scale (float32:
  a bf16 tensor over a float32 [1] tensor), codes * that, to bfloat16.
- config.json "quantization_config": quant_method "compressed-tensors",
  format "nvfp4-pack-quantized", quantization_status "compressed", one
  config group with the NVFP4A16 preset's weights (quantization/quant_scheme.py)
  targeting Linear (the NVFP4 preset's weights and input_activations with
  calibration), "ignore": the Linear modules left unquantized."""

from __future__ import annotations

import numpy as np

from ..safetensors_io import Planned

NAME = "compressed-tensors"
GROUP_SIZE = 16
INPUT_SCALE = "input_global_scale"  # M.input_global_scale: present only with activation calibration
FORMAT = "nvfp4-pack-quantized"


def planned(module: str, n: int, k: int, with_input_scale: bool = False) -> list[Planned]:
    out = [Planned(f"{module}.weight_packed", "U8", (n, k // 2)),
           Planned(f"{module}.weight_scale", "F8_E4M3", (n, k // GROUP_SIZE)),
           Planned(f"{module}.weight_global_scale", "F32", (1,))]
    if with_input_scale:
        out.append(Planned(f"{module}.input_global_scale", "F32", (1,)))
    return out


def arrays(module: str, packed, scales, global_scale: np.float32, input_amax=None) -> dict:
    import ml_dtypes

    out = {f"{module}.weight_packed": packed,
           f"{module}.weight_scale": scales.view(ml_dtypes.float8_e4m3fn),
           f"{module}.weight_global_scale": np.array([global_scale], np.float32)}
    if input_amax is not None:
        out[f"{module}.input_global_scale"] = np.array([input_global_scale(input_amax)], np.float32)
    return out


def input_global_scale(amax) -> np.float32:
    """The ENCODE scale of the activations, generate_gparam(-amax, amax):
    `448.0 * 6.0 / max_val_pos` with max_val_pos = max(amax, float32 tiny), a
    Python number over a float32 tensor, which torch computes as
    reciprocal(max_val_pos) * 2688 (Tensor.__rtruediv__), two float32
    roundings (it can differ from a correctly rounded 2688 / amax in the last
    bit); 1.0 where that overflows (a zero amax: `nan_to_num(..., posinf=1.0)`)."""
    reciprocal = np.float32(1) / max(np.float32(amax), np.finfo(np.float32).tiny)
    with np.errstate(over="ignore"):
        scale = np.float32(reciprocal * np.float32(6 * 448))
    return scale if np.isfinite(scale) else np.float32(1)


def quantized_modules(infos) -> dict[str, dict[str, str]]:
    found = {}
    for name in infos:
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            if f"{module}.weight_scale" in infos and f"{module}.weight_global_scale" in infos:
                found[module] = {"packed": name, "scale": f"{module}.weight_scale",
                                 "global": f"{module}.weight_global_scale"}
    return found


def encode_global_scale(value: np.ndarray) -> np.float32:
    return np.float32(np.asarray(value).reshape(()))


def dequantize(packed: np.ndarray, scale: np.ndarray, global_value: np.ndarray) -> np.ndarray:
    """float32 [N, K] whose bfloat16 rounding is what the decompressor gives."""
    from ... import reference as ref
    import ml_dtypes

    codes = ref.e2m1_values(ref.unpack_codes(packed))
    per_block = scale.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    per_block = per_block / np.float32(np.asarray(global_value).reshape(()))
    n, k = codes.shape
    return (codes.reshape(n, k // GROUP_SIZE, GROUP_SIZE) * per_block[..., None]).reshape(n, k)


def quantization_config(ignore: list[str], activations: bool) -> dict:
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP_SIZE,
               "strategy": "tensor_group", "block_structure": None, "dynamic": False, "actorder": None,
               "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn", "observer": "minmax",
               "observer_kwargs": {}}
    inputs = None
    if activations:  # static input global scale, local (per-block) dynamic scales: the NVFP4 preset
        inputs = {**weights, "dynamic": "local", "observer": "static_minmax"}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None}


def config_files(config: dict | None, exclude_modules: list[str], activations: bool) -> dict[str, dict]:
    if config is None:
        config = {}
    return {"config.json": {**config, "quantization_config": quantization_config(exclude_modules, activations)}}
