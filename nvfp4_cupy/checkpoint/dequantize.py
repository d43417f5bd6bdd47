"""dequantize_checkpoint(): an NVFP4 checkpoint (either format) back to a
bfloat16 safetensors model, each weight computed with its format's own
dequantization arithmetic (formats/*.py: dequantize), so the result equals
what that format's library gives, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes

from .calibrate import CALIBRATION_FILE
from .formats import FORMATS, compressed_tensors, modelopt
from .safetensors_io import Planned, read_tensor, write_streaming
from .source import INDEX_FILE, CheckpointError, Source, open_source


def detect_format(source: Source) -> str:
    if (source.path / modelopt.QUANT_CONFIG_FILE).is_file():
        return modelopt.NAME
    qc = (source.config or {}).get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors" and qc.get("format") == compressed_tensors.FORMAT:
        return compressed_tensors.NAME
    if qc.get("quant_method") == "modelopt":
        return modelopt.NAME
    for fmt in FORMATS.values():
        if any(fmt.quantized_modules(source.headers[s]) for s in source.shards):
            return fmt.NAME
    raise CheckpointError(f"{source.path}: no NVFP4 checkpoint (neither ModelOpt's nor compressed-tensors' tensors)")


def dequantized_weights(source: Source, fmt_name: str, shard: str):
    """Yields (module, float32 [N, K] as the format's library computes it, before its bf16 rounding)."""
    fmt = FORMATS[fmt_name]
    infos = source.headers[shard]
    path = source.shard_path(shard)
    for module, names in fmt.quantized_modules(infos).items():
        packed, scale, glob = (read_tensor(path, infos[names[k]]) for k in ("packed", "scale", "global"))
        yield module, fmt.dequantize(packed, scale, glob)


def dequantize_checkpoint(in_dir, out_dir, *, overwrite: bool = False) -> list[str]:
    source = open_source(in_dir)
    fmt_name = detect_format(source)
    fmt = FORMATS[fmt_name]
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; --overwrite replaces its files")
    if not out.parent.is_dir():
        raise CheckpointError(f"cannot write {out}: {out.parent} is not a directory")
    created = not out.exists()
    out.mkdir(exist_ok=True)
    weight_map = {}
    try:
        for shard in source.shards:
            infos = source.headers[shard]
            mods = fmt.quantized_modules(infos)
            owned = {v: m for m, names in mods.items() for v in names.values()}
            planned = []
            for name, info in infos.items():
                if name in owned:
                    module = owned[name]
                    if name == mods[module]["packed"]:
                        n, half = info.shape
                        planned.append(Planned(f"{module}.weight", "BF16", (n, half * 2)))
                elif name.endswith((".input_scale", ".input_global_scale")):
                    continue
                else:
                    planned.append(Planned(name, info.dtype, info.shape))
            path = source.shard_path(shard)

            def produce(p: Planned, infos=infos, path=path, mods=mods):
                module = p.name[: -len(".weight")]
                if p.name.endswith(".weight") and module in mods:
                    names = mods[module]
                    packed, scale, glob = (read_tensor(path, infos[names[k]]) for k in ("packed", "scale", "global"))
                    return fmt.dequantize(packed, scale, glob).astype(ml_dtypes.bfloat16)
                return read_tensor(path, infos[p.name])

            write_streaming(out / shard, planned, produce, {"format": "pt"})
            weight_map.update({p.name: shard for p in planned})
        if source.index is not None:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if source.config is not None:
            config = {k: v for k, v in source.config.items() if k != "quantization_config"}
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"
            (out / "config.json").write_text(json.dumps(config, indent=2))
        for extra in source.extra_files():
            if extra.name not in (modelopt.QUANT_CONFIG_FILE, "nvfp4_cupy_manifest.json", CALIBRATION_FILE):
                shutil.copyfile(extra, out / extra.name)
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return source.shards
