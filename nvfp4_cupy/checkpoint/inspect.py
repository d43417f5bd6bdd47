"""inspect_checkpoint(): which tensors are NVFP4, their shapes, block scales
and global scales, fused groups sharing a global scale, and (with a reference
directory, the unquantized model) each weight's dequantization error."""

from __future__ import annotations

import numpy as np

from .convert import _fusion_key
from .dequantize import detect_format, dequantized_weights
from .formats import FORMATS
from .safetensors_io import read_tensor
from .source import open_source


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref64 = reference.astype(np.float64)
    noise = np.sum((ref64 - approx.astype(np.float64)) ** 2)
    signal = np.sum(ref64 ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def inspect_checkpoint(path, reference=None) -> dict:
    """{"format", "tensors": [{module, shape, scale_shape, global_scale (encode),
    decode_scale, zero_scales, input_scale (with calibration), ...}], "groups": {key: [global scales]},
    "error": {module: {"sqnr_db", "max_abs"}} (with `reference`), "other": count}."""
    source = open_source(path)
    fmt_name = detect_format(source)
    fmt = FORMATS[fmt_name]
    ref_source = open_source(reference) if reference is not None else None
    ref_where = ({n: (s, i) for s, n, i in ref_source.all_tensors()} if ref_source else {})
    result = {"format": fmt_name, "tensors": [], "groups": {}, "error": {}, "other": 0}
    for shard in source.shards:
        infos = source.headers[shard]
        mods = fmt.quantized_modules(infos)
        owned = {v for names in mods.values() for v in names.values()}
        result["other"] += sum(1 for n in infos if n not in owned and not n.endswith(f".{fmt.INPUT_SCALE}"))
        for module, names in mods.items():
            packed_info = infos[names["packed"]]
            scale = read_tensor(source.shard_path(shard), infos[names["scale"]]).view(np.uint8)
            glob = read_tensor(source.shard_path(shard), infos[names["global"]])
            gs = float(fmt.encode_global_scale(glob))
            result["tensors"].append({
                "module": module, "shard": shard, "shape": [packed_info.shape[0], packed_info.shape[1] * 2],
                "packed": f"{names['packed']} {packed_info.dtype} {list(packed_info.shape)}",
                "scale_shape": list(scale.shape), "global_scale": gs, "decode_scale": float(np.float32(1) / np.float32(gs)),
                "stored_global": f"{names['global']} {list(glob.shape)} = {float(glob.reshape(-1)[0])!r}",
                "zero_scales": int(np.count_nonzero(scale == 0)), "nan_scales": int(np.count_nonzero((scale & 0x7F) == 0x7F)),
            })
            input_name = f"{module}.{fmt.INPUT_SCALE}"
            if input_name in infos:
                value = read_tensor(source.shard_path(shard), infos[input_name])
                result["tensors"][-1]["input_scale"] = f"{input_name} {list(value.shape)} = {float(value.reshape(-1)[0])!r}"
            key = _fusion_key(module)
            if key:
                result["groups"].setdefault(key, []).append(gs)
        if ref_source:
            for module, values in dequantized_weights(source, fmt_name, shard):
                if f"{module}.weight" in ref_where:
                    s, info = ref_where[f"{module}.weight"]
                    ref_w = read_tensor(ref_source.shard_path(s), info).astype(np.float32)
                    approx = values.astype(np.float32)
                    result["error"][module] = {"sqnr_db": sqnr_db(ref_w, approx),
                                               "max_abs": float(np.max(np.abs(ref_w - approx)))}
    return result
