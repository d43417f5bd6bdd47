"""convert(): a Hugging Face safetensors model directory -> an NVFP4
checkpoint in ModelOpt's or compressed-tensors' format (docs/checkpoints.md).

Per output shard (same file names as the input's): the header is planned
from the input header alone, then each tensor is read, quantized (or copied)
and written in order, into a temporary file renamed when complete; its
sha256 goes into a per-shard manifest entry (.nvfp4_cupy/SHARD.json), which
--resume checks before skipping a shard. The next tensor is produced while
this one is written (OneAhead); the sha256 runs beside the write. On the GPU
a weight goes from the file to the device through a fixed ring of pinned
memory (staging.DeviceReader), so host memory holds the quantized tensor
being written, the one being produced, and the ring (128 MiB); with --cpu,
the weight being quantized as well.

Global scales: one per weight, 448 * 6 / amax (nvfp4_cupy.compute_global_scale),
except that fused projections (q/k/v, gate/up, w1/w3 of one parent module)
share one: the smallest of their scales, which is 448 * 6 / the largest amax
(RN(c / a) is monotone in a), so every member is quantized as its part of the
fused weight would be. ModelOpt's exporter does the same
(modelopt/torch/export/quant_utils.py preprocess_linear_fusion, called by
unified_export_hf.py _fuse_shared_input_modules: the largest weight
amax and input amax of the fused layers is given to all of them).

Input scales (optional activation calibration, calibrate.py): the model runs
once over the user's tokens before any shard is written, each quantized
Linear's input amax is recorded, fusion groups take the largest, and each
format writes its scale from that amax (ModelOpt's `input_scale`, the decode
direction; compressed-tensors' `input_global_scale`, the encode direction).
Conversion then streams as above."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import reference as ref
from .calibrate import (CALIBRATION_FILE, Calibration, as_samples, measure_input_amax, read_calibration_file,
                        read_tokens, tokens_digest)
from .formats import FORMATS
from .safetensors_io import DTYPES, FLOAT_DTYPES, Planned, read_tensor, sha256_file, write_streaming
from .source import INDEX_FILE, CheckpointError, Source, open_source

# Module-name patterns (fnmatch) left unquantized by default: embeddings, norms,
# lm_head and MoE routers/gates, as ModelOpt's defaults disable them
# ("*lm_head*", "*router*", "*mlp.gate.*", "*block_sparse_moe.gate*",
# "*mlp.shared_expert_gate.*": nvidia-modelopt 0.47.0,
# modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml, loaded as
# _default_disabled_quantizer_cfg in modelopt/torch/quantization/config.py).
# Norms and embeddings are not Linear layers at all; the patterns keep 2-D ones out.
DEFAULT_EXCLUDE = ("*lm_head*", "*embed*", "*norm*", "*router*", "*mlp.gate", "*block_sparse_moe.gate",
                   "*mlp.shared_expert_gate")
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})
MANIFEST_DIR = ".nvfp4_cupy"
MANIFEST_FILE = "nvfp4_cupy_manifest.json"
ALREADY_QUANTIZED = (".weight_packed", ".weight_scale", ".weight_scale_2", ".weight_global_scale", ".input_scale")


@dataclass
class Plan:
    fmt: str
    quantize: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (N, K)
    skipped_k: list[str] = field(default_factory=list)  # weights whose K is not a multiple of 16
    excluded: list[str] = field(default_factory=list)  # 2-D weights left as they are
    groups: dict[str, str] = field(default_factory=dict)  # module -> fusion group key
    # module -> the input amax its input scale is written from (shared across its fusion
    # group); empty for a weight-only checkpoint
    input_amax: dict[str, np.float32] = field(default_factory=dict)

    def ignore_modules(self) -> list[str]:
        return sorted(self.excluded + self.skipped_k)


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped_k: list[str] = field(default_factory=list)
    quantized: int = 0
    calibration: Calibration | None = None  # None: weight-only
    calibration_reused: bool = False
    seconds: float = 0.0
    bytes_read: int = 0


def _fusion_key(module: str) -> str | None:
    parent, _, leaf = module.rpartition(".")
    for members in FUSED:
        if leaf in members:
            return f"{parent}:{'/'.join(sorted(members))}"
    return None


def make_plan(source: Source, fmt: str, exclude=DEFAULT_EXCLUDE) -> Plan:
    plan = Plan(fmt)
    for _, name, info in source.all_tensors():
        if name.endswith(ALREADY_QUANTIZED) or (name.endswith(".weight") and info.dtype == "U8"):
            raise CheckpointError(f"{source.path} is already quantized ({name} is {info.dtype}); "
                                  "convert reads an unquantized model")
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        module = name[: -len(".weight")]
        if any(fnmatch.fnmatchcase(module, p) for p in exclude):
            plan.excluded.append(module)
        elif info.shape[1] % 16 or info.shape[1] == 0 or info.shape[0] == 0:
            plan.skipped_k.append(module)
        else:
            plan.quantize[module] = tuple(info.shape)
            key = _fusion_key(module)
            if key:
                plan.groups[module] = key
    if source.config and source.config.get("quantization_config") or (source.path / "hf_quant_config.json").exists():
        raise CheckpointError(f"{source.path} is already quantized (its config has a quantization_config); "
                              "convert reads an unquantized model")
    # a group of one is no group
    counts = {}
    for key in plan.groups.values():
        counts[key] = counts.get(key, 0) + 1
    plan.groups = {m: k for m, k in plan.groups.items() if counts[k] > 1}
    return plan


class Quantizer:
    """The public ops: the golden model (cpu) or nvfp4_cupy's GPU functions.
    load() brings a weight to where it is quantized (a NumPy array, or a
    CuPy array through staging.DeviceReader), global_scale() and quantize()
    take what load() returned."""

    def __init__(self, cpu: bool, device: int | None = None):
        self.cpu = cpu
        self.device = device
        self._reader = None
        if not cpu:
            try:
                import cupy as cp

                count = cp.cuda.runtime.getDeviceCount()
            except Exception as exc:
                raise CheckpointError(f"no GPU here ({type(exc).__name__}: {exc}); --cpu runs the golden model") from None
            if count == 0:
                raise CheckpointError("no GPU here; --cpu runs the golden model")
            if device is not None and not 0 <= device < count:
                raise CheckpointError(f"--devices: there is no GPU {device} ({count} here)")

    def _ctx(self):
        if self.cpu or self.device is None:
            return contextlib.nullcontext()
        import cupy as cp

        return cp.cuda.Device(self.device)

    def load(self, path: Path, info):
        if self.cpu:
            return read_tensor(path, info)
        with self._ctx():
            if self._reader is None:
                from .staging import DeviceReader

                self._reader = DeviceReader()
            return self._reader.read(path, info)

    def global_scale(self, w) -> np.float32:
        if self.cpu:
            return np.float32(ref.compute_global_scale(w)[0])
        import cupy as cp

        import nvfp4_cupy

        with self._ctx():
            return np.float32(cp.asnumpy(nvfp4_cupy.compute_global_scale(cp.asarray(w)))[0])

    def quantize(self, w, gs: np.float32 | None) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """(packed uint8 [N, K/2], scales uint8 [N, K/16] linear, the global
        scale used): `gs`, or the weight's own when `gs` is None (computed
        from the same upload, so a weight crosses to the GPU once)."""
        if self.cpu:
            gs = self.global_scale(w) if gs is None else gs
            packed, scales = ref.scaled_fp4_quant(w, np.array([gs], np.float32), layout="linear")
            return packed, scales, gs
        import cupy as cp

        import nvfp4_cupy

        with self._ctx():
            x = cp.asarray(w)
            if gs is None:
                gs = self.global_scale(x)
            # a float32 array: the value as is, no host check
            packed, scales = nvfp4_cupy.scaled_fp4_quant(x, cp.asarray(np.array([gs], np.float32)), layout="linear")
            del x
            return cp.asnumpy(packed), cp.asnumpy(scales), gs

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _locations(source: Source) -> dict[str, tuple[str, object]]:
    return {name: (shard, info) for shard, name, info in source.all_tensors()}


def group_scales(source: Source, plan: Plan, quantizer: Quantizer, modules) -> dict[str, np.float32]:
    """The shared global scale of each fusion group that one of `modules` is in."""
    where = _locations(source)
    keys = {plan.groups[m] for m in modules if m in plan.groups}
    scales: dict[str, np.float32] = {}
    for module, key in plan.groups.items():
        if key in keys:
            shard, info = where[f"{module}.weight"]
            gs = quantizer.global_scale(quantizer.load(source.shard_path(shard), info))
            scales[key] = gs if key not in scales else min(scales[key], gs)
    return scales


def _output_plan(source: Source, plan: Plan, shard: str) -> list[Planned]:
    fmt = FORMATS[plan.fmt]
    out = []
    for name, info in source.headers[shard].items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in plan.quantize:
            n, k = plan.quantize[module]
            out += fmt.planned(module, n, k, with_input_scale=module in plan.input_amax)
        else:
            out.append(Planned(name, info.dtype, info.shape))
    return out


def plan_digest(source: Source, plan: Plan, shard: str) -> str:
    """What a shard's bytes depend on: the input shard (name, size, header),
    the format and the set of quantized modules with their fusion groups."""
    from .. import __version__

    infos = source.headers[shard]
    described = {"version": __version__, "format": plan.fmt, "shard": shard,
                 "size": source.shard_path(shard).stat().st_size,
                 "tensors": [[n, i.dtype, list(i.shape), i.begin] for n, i in infos.items()],
                 "quantize": sorted(m for m in plan.quantize if f"{m}.weight" in infos),
                 "groups": sorted({plan.groups[m] for m in plan.groups if f"{m}.weight" in infos})}
    if plan.input_amax:
        described["input_amax"] = {m: float(a) for m, a in sorted(plan.input_amax.items()) if f"{m}.weight" in infos}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _entry_path(out: Path, shard: str) -> Path:
    return out / MANIFEST_DIR / f"{shard}.json"


def verified(out: Path, shard: str, digest: str) -> bool:
    """True when `shard` was written for this plan and its bytes are intact."""
    try:
        entry = json.loads(_entry_path(out, shard).read_text())
        return (entry.get("plan") == digest and (out / shard).is_file()
                and entry.get("size") == (out / shard).stat().st_size and entry.get("sha256") == sha256_file(out / shard))
    except (OSError, ValueError):
        return False


def _write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _progress(total_tensors: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_tensors, unit="tensor", file=sys.stderr, dynamic_ncols=True, disable=False)


class OneAhead:
    """produce(p) for the planned tensors in their order, one tensor ahead on
    a worker thread: reading and quantizing the next tensor overlaps writing
    (and hashing) this one, the three stages a conversion is made of. Host
    memory holds the tensor being written and the one being produced, no
    more. Called with the planned tensors in order; an exception in produce
    comes out of the call for that tensor."""

    def __init__(self, planned: list[Planned], produce) -> None:
        self._planned, self._produce = list(planned), produce
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-convert")
        self._taken = 0
        self._future = self._submit(0)

    def _submit(self, index: int):
        return self._worker.submit(self._produce, self._planned[index]) if index < len(self._planned) else None

    def __call__(self, p: Planned) -> np.ndarray:
        if self._future is None or p is not self._planned[self._taken]:
            raise AssertionError(f"{p.name}: produced out of the planned order")
        value = self._future.result()
        self._taken += 1
        self._future = self._submit(self._taken)
        return value

    def close(self) -> None:
        """Waits for the tensor in flight (if any), then stops the worker."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def convert_shard(source: Source, plan: Plan, shard: str, out: Path, quantizer: Quantizer,
                  shared: dict[str, np.float32], bar=None, started: float | None = None,
                  counters: dict | None = None) -> str:
    """Writes one output shard and its manifest entry; returns its sha256."""
    fmt = FORMATS[plan.fmt]
    infos = source.headers[shard]
    path = source.shard_path(shard)
    pending: dict[str, np.ndarray] = {}
    counters = counters if counters is not None else {"bytes": 0}
    started = started or time.perf_counter()

    def produce(p: Planned) -> np.ndarray:
        if p.name in pending:
            return pending.pop(p.name)
        info = infos[p.name] if p.name in infos else None
        module = None
        for suffix in (".weight", ".weight_packed", ".weight_scale", ".weight_scale_2", ".weight_global_scale",
                       ".input_scale", ".input_global_scale"):
            if p.name.endswith(suffix) and p.name[: -len(suffix)] in plan.quantize:
                module = p.name[: -len(suffix)]
                break
        if module is None:
            value = read_tensor(path, info)
            counters["bytes"] += info.nbytes
        else:
            winfo = infos[f"{module}.weight"]
            w = quantizer.load(path, winfo)
            counters["bytes"] += winfo.nbytes
            key = plan.groups.get(module)
            packed, scales, gs = quantizer.quantize(w, shared[key] if key else None)
            del w
            pending.update(fmt.arrays(module, packed, scales, gs, input_amax=plan.input_amax.get(module)))
            value = pending.pop(p.name)
        if bar is not None and (module is None or p.name == fmt.planned(module, 16, 16)[0].name):
            bar.update(1)
            bar.set_postfix_str(f"{counters['bytes'] / 1e9 / max(time.perf_counter() - started, 1e-9):.2f} GB/s")
        return value

    meta = dict(source.metadata.get(shard) or {})
    meta.setdefault("format", "pt")
    planned = _output_plan(source, plan, shard)
    ahead = OneAhead(planned, produce)
    try:
        digest = write_streaming(out / shard, planned, ahead, meta)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out / shard}: {exc.strerror or exc}") from None
    finally:
        ahead.close()
    entry = {"shard": shard, "plan": plan_digest(source, plan, shard), "sha256": digest,
             "size": (out / shard).stat().st_size, "format": plan.fmt}
    (out / MANIFEST_DIR).mkdir(exist_ok=True)
    _write_text(_entry_path(out, shard), json.dumps(entry, indent=1))
    return digest


def _write_index_and_configs(source: Source, plan: Plan, out: Path) -> None:
    fmt = FORMATS[plan.fmt]
    if source.index is not None or len(source.shards) > 1:
        weight_map, total = {}, 0
        for shard in source.shards:
            for p in _output_plan(source, plan, shard):
                weight_map[p.name] = shard
                total += int(np.prod(p.shape, dtype=np.int64)) * DTYPES[p.dtype].itemsize
        index = {"metadata": {**((source.index or {}).get("metadata") or {}), "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_text(out / INDEX_FILE, json.dumps(index, indent=2))
    files = fmt.config_files(source.config, plan.ignore_modules(), activations=bool(plan.input_amax))
    for name, content in files.items():
        _write_text(out / name, json.dumps(content, indent=2))
    for extra in source.extra_files():
        temp = out / f".{extra.name}.{os.getpid()}.tmp"
        try:
            shutil.copyfile(extra, temp)
            os.replace(temp, out / extra.name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _write_manifest(source: Source, plan: Plan, out: Path) -> dict:
    entries = {}
    for shard in source.shards:
        with contextlib.suppress(OSError, ValueError):
            entries[shard] = json.loads(_entry_path(out, shard).read_text())
    manifest = {"format": plan.fmt, "complete": len(entries) == len(source.shards), "shards": entries,
                "quantized_modules": len(plan.quantize), "ignored_modules": plan.ignore_modules(),
                "skipped_k_not_multiple_of_16": sorted(plan.skipped_k), "weight_only": not plan.input_amax}
    _write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


def _device_worker(args) -> list[str]:
    in_dir, out, fmt, exclude, device, shards, shared, input_amax = args
    source = open_source(in_dir)
    plan = make_plan(source, fmt, exclude)
    plan.input_amax = input_amax
    quantizer = Quantizer(cpu=False, device=device)
    try:
        for shard in shards:
            convert_shard(source, plan, shard, Path(out), quantizer, shared)
    finally:
        quantizer.close()
    return shards


def _calibrate(source: Source, plan: Plan, out: Path, tokens, amax_file, resume: bool, cpu: bool,
               devices) -> tuple[Calibration | None, bool]:
    """(the calibration, whether it was reused rather than measured now)."""
    if tokens is not None and amax_file is not None:
        raise CheckpointError("--calibration-tokens and --calibration-amax exclude each other")
    if amax_file is not None:
        return read_calibration_file(amax_file), True
    if tokens is None:
        return None, False
    if isinstance(tokens, (str, os.PathLike)):
        samples = read_tokens(tokens)
    else:
        samples = as_samples([list(t) for t in tokens], "calibration tokens")
    saved = out / CALIBRATION_FILE
    if resume and saved.is_file():
        with contextlib.suppress(OSError, ValueError, CheckpointError):
            previous = Calibration.from_json(json.loads(saved.read_text()), saved)
            if previous.tokens_sha256 == tokens_digest(samples) and set(plan.quantize) <= set(previous.input_amax):
                return previous, True  # the scales the shards already written were made with
    device = devices[0] if devices else None
    return measure_input_amax(source.path, samples, list(plan.quantize), cpu=cpu, device=device,
                              config=source.config), False


def shared_input_amax(plan: Plan, calibration: Calibration) -> dict[str, np.float32]:
    """Each quantized module's input amax, the largest of its fusion group's
    (ModelOpt's preprocess_linear_fusion: `input_amax = max(...)` for every
    fused layer; q/k/v and gate/up read the same input, so the measured amaxes
    are equal anyway, and the max keeps them one scale whatever the model)."""
    missing = sorted(m for m in plan.quantize if m not in calibration.input_amax)
    if missing:
        raise CheckpointError(f"the calibration has no input amax for {len(missing)} quantized weights "
                              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    amax = {m: np.float32(calibration.input_amax[m]) for m in plan.quantize}
    largest: dict[str, np.float32] = {}
    for module, key in plan.groups.items():
        largest[key] = max(largest.get(key, np.float32(0)), amax[module])
    return {m: largest[plan.groups[m]] if m in plan.groups else a for m, a in amax.items()}


def convert(in_dir, out_dir, fmt: str, *, exclude=DEFAULT_EXCLUDE, cpu: bool = False, resume: bool = False,
            overwrite: bool = False, shard_index: int = 0, num_shards: int = 1, devices=None,
            progress: bool = True, calibration_tokens=None, calibration_amax=None) -> Report:
    """Converts in_dir into out_dir (see the module docstring). `devices`: GPU
    ids, one worker process each, shards spread round-robin over them;
    `shard_index`/`num_shards`: this run writes only the input shards i with
    i % num_shards == shard_index (the configs and index are written by every
    run, identically). The bytes written do not depend on either.

    `calibration_tokens` (a token file, or a list of lists of token ids): run
    the model over them first (on GPU `devices[0]`, or the CPU with `cpu`) and
    write input scales (calibrate.py); `calibration_amax`: a calibration file
    saved by an earlier run instead. Without either the checkpoint is weight-only."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (num_shards >= 1 and 0 <= shard_index < num_shards):
        raise CheckpointError(f"--shard-index {shard_index} must be in 0..{num_shards - 1} (--num-shards {num_shards})")
    if cpu and devices:
        raise CheckpointError("--devices and --cpu exclude each other")
    source = open_source(in_dir)
    out = Path(out_dir)
    if out.resolve() == source.path.resolve():
        raise CheckpointError(f"{out}: the output directory must not be the input directory")
    if out.exists() and not (resume or overwrite):
        raise CheckpointError(f"{out} exists; --resume continues a conversion into it, --overwrite replaces its files")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if not out.parent.is_dir():
        raise CheckpointError(f"cannot write {out}: {out.parent} is not a directory")
    plan = make_plan(source, fmt, exclude)
    if not plan.quantize:
        raise CheckpointError(f"{source.path}: no Linear weight to quantize (2-D, K a multiple of 16, not excluded)")
    if plan.skipped_k:
        warnings.warn(f"left unquantized, K not a multiple of 16: {', '.join(sorted(plan.skipped_k))}", stacklevel=2)
    # checks there is a GPU (and each asked for) before anything is written
    quantizer = Quantizer(cpu=cpu, device=devices[0] if devices else None)
    for device in (devices or ())[1:]:
        Quantizer(cpu=False, device=device)
    # calibration loads the whole model once (and frees it) before anything is written
    calibration, reused = _calibrate(source, plan, out, calibration_tokens, calibration_amax, resume, cpu, devices)
    if calibration is not None:
        plan.input_amax = shared_input_amax(plan, calibration)
    report = Report(skipped_k=sorted(plan.skipped_k), quantized=len(plan.quantize), calibration=calibration,
                    calibration_reused=reused)
    started = time.perf_counter()
    mine = [s for i, s in enumerate(source.shards) if i % num_shards == shard_index]
    todo = []
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        if calibration is not None:
            _write_text(out / CALIBRATION_FILE, json.dumps(calibration.to_json(), indent=1))
        for shard in mine:
            if resume and verified(out, shard, plan_digest(source, plan, shard)):
                report.resumed.append(shard)
            else:
                todo.append(shard)
        modules = [m for m in plan.quantize if any(f"{m}.weight" in source.headers[s] for s in todo)]
        shared = group_scales(source, plan, quantizer, modules)
        if devices and len(devices) > 1:
            import multiprocessing

            work = [(str(source.path), str(out), fmt, tuple(exclude), d, todo[i :: len(devices)], shared,
                     plan.input_amax) for i, d in enumerate(devices)]
            with multiprocessing.get_context("spawn").Pool(len(devices)) as pool:
                for shards in pool.imap_unordered(_device_worker, work):
                    report.written += shards
        else:
            total = sum(len(source.headers[s]) for s in todo)  # one step per input tensor
            bar = _progress(total, progress and sys.stderr.isatty())
            counters = {"bytes": 0}
            try:
                for shard in todo:
                    convert_shard(source, plan, shard, out, quantizer, shared, bar, started, counters)
                    report.written.append(shard)
            finally:
                if bar is not None:
                    bar.close()
            report.bytes_read = counters["bytes"]
        _write_index_and_configs(source, plan, out)
        _write_manifest(source, plan, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        if created and not any(out.glob("*.safetensors")):
            shutil.rmtree(out, ignore_errors=True)  # nothing usable was written: leave no directory
        raise
    finally:
        quantizer.close()
    report.seconds = time.perf_counter() - started
    return report
