"""NVIDIA ModelOpt's NVFP4 Hugging Face checkpoint, as its exporter writes it
(nvidia-modelopt 0.47.0):

- per quantized Linear `M`: `M.weight` uint8 [N, K/2] (element 2k in the low
  nibble: modelopt/torch/quantization/qtensor/nvfp4_tensor.py, NVFP4QTensor.quantize,
  `(q_weight[..., 1::2] << 4) | q_weight[..., 0::2]`), `M.weight_scale`
  float8_e4m3fn [N, K/16] (linear, row-major: get_weights_scaling_factor
  reduces blocks along the last dim), `M.weight_scale_2` float32 0-dim, the
  DECODE scale amax / (6 * 448) (get_weights_scaling_factor_2), and
  `M.input_scale` float32 0-dim (amax / (6 * 448) of the activations,
  get_activation_scaling_factor) only when activations were calibrated.
- dequantization (NVFP4QTensor.dequantize, the non-fast path):
  e2m1 * (float32(weight_scale) * weight_scale_2), float32, then to dtype.
- hf_quant_config.json {"producer", "quantization": {"quant_algo",
  "kv_cache_quant_algo", "group_size", "exclude_modules"}}
  (modelopt/torch/export/quant_utils.py get_quant_config), and config.json's
  "quantization_config" from convert_hf_quant_config_format
  (modelopt/torch/export/convert_hf_config.py), quant_method "modelopt".
- quant_algo "NVFP4" is W4A4 (needs input_scale); "W4A16_NVFP4" is the
  weight-only variant (modelopt/torch/export/model_config.py,
  QUANTIZATION_W4A16_NVFP4), which convert_hf_quant_config_format maps to a
  group with weights only.

We write weight_scale_2 = float32(1) / global_scale in float32, global_scale
being our (encode) scale 448 * 6 / amax, the same inversion compressed-tensors'
ModelOpt converter applies the other way
(compressed_tensors/entrypoints/convert/converters/modelopt_nvfp4.py:
weight_global_scale = 1 / weight_scale_2)."""

from __future__ import annotations

import numpy as np

from ..safetensors_io import Planned

NAME = "modelopt"
QUANT_CONFIG_FILE = "hf_quant_config.json"
GROUP_SIZE = 16
INPUT_SCALE = "input_scale"  # M.input_scale: present only with activation calibration
PRODUCER = "nvfp4_cupy"


def planned(module: str, n: int, k: int, with_input_scale: bool = False) -> list[Planned]:
    out = [Planned(f"{module}.weight", "U8", (n, k // 2)),
           Planned(f"{module}.weight_scale", "F8_E4M3", (n, k // GROUP_SIZE)),
           Planned(f"{module}.weight_scale_2", "F32", ())]
    if with_input_scale:
        out.append(Planned(f"{module}.input_scale", "F32", ()))
    return out


def arrays(module: str, packed, scales, global_scale: np.float32, input_amax=None) -> dict:
    import ml_dtypes

    out = {f"{module}.weight": packed,
           f"{module}.weight_scale": scales.view(ml_dtypes.float8_e4m3fn),
           f"{module}.weight_scale_2": np.array(np.float32(1) / np.float32(global_scale), np.float32)}
    if input_amax is not None:
        out[f"{module}.input_scale"] = np.array(input_scale(input_amax), np.float32)
    return out


def input_scale(amax) -> np.float32:
    """The DECODE scale of the activations, NVFP4QTensor.get_activation_scaling_factor:
    amax / (maxbound 6 * 448) in float32, where the input quantizer's
    export_amax (a dynamic block quantizer: no clamp) first replaces a zero
    amax by maxbound (TensorQuantizer._sanitize_export_amax)."""
    amax = np.float32(amax)
    return np.float32(np.float32(6) if amax == 0 else amax) / np.float32(6 * 448)


def quantized_modules(infos) -> dict[str, dict[str, str]]:
    """{module: {"packed", "scale", "global"}} for each NVFP4 Linear in a header."""
    found = {}
    for name, info in infos.items():
        if name.endswith(".weight_scale_2"):
            module = name[: -len(".weight_scale_2")]
            w = infos.get(f"{module}.weight")
            if w is not None and w.dtype == "U8" and f"{module}.weight_scale" in infos:
                found[module] = {"packed": f"{module}.weight", "scale": f"{module}.weight_scale", "global": name}
    return found


def encode_global_scale(value: np.ndarray) -> np.float32:
    """Our encode scale from the stored decode scale (for reports)."""
    return np.float32(1) / np.float32(np.asarray(value).reshape(()))


def dequantize(packed: np.ndarray, scale: np.ndarray, global_value: np.ndarray) -> np.ndarray:
    """float32 [N, K], as NVFP4QTensor.dequantize computes it."""
    from ... import reference as ref

    import ml_dtypes

    # ModelOpt's table (nvfp4_tensor.py, e2m1_values) decodes code 8 as +0, not -0
    codes = np.abs(ref.e2m1_values(ref.unpack_codes(packed))) * np.where(ref.unpack_codes(packed) > 8, -1, 1).astype(np.float32)
    per_block = scale.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    per_block = per_block * np.float32(np.asarray(global_value).reshape(()))
    n, k = codes.shape
    return (codes.reshape(n, k // GROUP_SIZE, GROUP_SIZE) * per_block[..., None]).reshape(n, k)


def hf_quant_config(exclude_modules: list[str], activations: bool) -> dict:
    from ... import __version__

    return {"producer": {"name": PRODUCER, "version": __version__},
            "quantization": {"quant_algo": "NVFP4" if activations else "W4A16_NVFP4",
                             "kv_cache_quant_algo": None, "group_size": GROUP_SIZE,
                             "exclude_modules": exclude_modules}}


def quantization_config(hf_config: dict) -> dict:
    """convert_hf_quant_config_format's output for NVFP4 / W4A16_NVFP4
    (tests compare against the function itself)."""
    q = hf_config["quantization"]
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": q["group_size"]}
    group = {"weights": weights, "targets": ["Linear"]}
    if q["quant_algo"] == "NVFP4":
        group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float",
                                       "group_size": q["group_size"]}, **group}
    return {"config_groups": {"group_0": group}, "ignore": q["exclude_modules"], "quant_algo": q["quant_algo"],
            "producer": hf_config["producer"], "quant_method": "modelopt"}


def config_files(config: dict | None, exclude_modules: list[str], activations: bool) -> dict[str, dict]:
    """The JSON files to write: hf_quant_config.json and config.json."""
    hf = hf_quant_config(exclude_modules, activations)
    files = {QUANT_CONFIG_FILE: hf}
    if config is not None:
        files["config.json"] = {**config, "quantization_config": quantization_config(hf)}
    return files
