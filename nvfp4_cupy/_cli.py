"""The `nvfp4-cupy` command: demo (the default), bench, info, warm (fill the
kernel cache), and quantize / dequantize for .npy files. User mistakes print
one line on stderr and exit 1 (2 for bad flags, from argparse); no tracebacks
for them, and no output file is written, not even in part.

bfloat16 in .npy files: np.save writes an ml_dtypes bfloat16 array as 2-byte
void ("<V2") and np.load gives it back as such. The CLI reads a V2 array as
bfloat16 and writes bfloat16 the same way; read one with
`np.load(path).view(ml_dtypes.bfloat16)`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from . import __version__
from . import reference as ref
from ._format import FORMATS, LAYOUTS, SUPPORTED_DTYPES

BFLOAT16_ON_DISK = np.dtype("V2")  # what np.load returns for a saved bfloat16 array
BFLOAT16_NOTE = ("bfloat16 .npy files hold 2-byte void (|V2), as np.save writes an ml_dtypes.bfloat16 array: quantize "
                 "reads them as bfloat16, and np.load(path).view(ml_dtypes.bfloat16) reads one back")


class UserError(Exception):
    """A mistake on the command line or in the input files: one line, exit 1."""


def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy

        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as exc:  # no CuPy, or no driver
        return f"{type(exc).__name__}: {exc}"


def _nvrtc_version() -> str:
    """NVRTC's version, or UserError when CuPy or libnvrtc is missing."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        return ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:  # ImportError, or cuda.pathfinder's DynamicLibNotFoundError
        raise UserError(f"NVRTC is not usable ({type(exc).__name__}: {exc}); "
                        "pip install -e '.[cuda12]' (or '.[cuda13]') brings CuPy and NVRTC") from None


@contextlib.contextmanager
def _api_errors(names: dict[str, str]):
    """The API's ValueError/TypeError as a UserError, its parameter names
    (`padded_n`, `x`) replaced by what the user typed (`--padded-n`, a file)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        pattern = r"\b(" + "|".join(map(re.escape, names)) + r")\b"
        raise UserError(re.sub(pattern, lambda match: names[match[1]], str(exc))) from None


def _api_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """API parameter -> flag: each flag's dest is the parameter it sets
    (--padded-n -> padded_n), so the parser is the one source of the names."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def _load_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a .npy array: {exc}") from None
    return array.view(ml_dtypes.bfloat16) if array.dtype == BFLOAT16_ON_DISK else array


def _check_writable(*paths: Path) -> None:
    """Before any work: the folder of each output exists, and no output is a folder."""
    for path in paths:
        if not path.parent.is_dir():
            raise UserError(f"cannot write {path}: {path.parent} is not a directory")
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a directory")


def _save_all(contents: dict[Path, np.ndarray | str]) -> None:
    """Every output or none: each goes to a temporary file beside its name,
    and they are renamed only once all were written."""
    temps = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in contents}
    try:
        for path, content in contents.items():
            with open(temps[path], "wb") as f:
                if isinstance(content, str):
                    f.write(content.encode())
                else:
                    np.save(f, content)
        for path, temp in temps.items():
            os.replace(temp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for temp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def cmd_demo(args) -> int:
    from ._demo import run

    return run(layout=args.layout)


def cmd_info(args) -> int:
    print(f"nvfp4_cupy {__version__}, numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}")
    try:
        import cupy as cp
    except ImportError as exc:
        print(f"cupy: not installed ({exc}); the golden model works, the GPU functions do not")
        return 0
    from ._runtime import disk_cache as _disk_cache

    try:
        print(f"cupy {cp.__version__}, NVRTC {_nvrtc_version()}")
    except UserError as exc:
        print(f"cupy {cp.__version__}; {exc}")
    entries = _disk_cache.entries()
    print(f"kernel cache: {_disk_cache.cache_dir()} ({len(entries)} compiled programs, "
          f"{sum(e.stat().st_size for e in entries)} bytes; `nvfp4-cupy warm` fills it)")
    reason = gpu_unavailable_reason()
    if reason:
        print(f"GPU: none ({reason})")
        return 0
    from ._runtime import kernels as _kernels

    print(f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}")
    for device in range(cp.cuda.runtime.getDeviceCount()):
        props = cp.cuda.runtime.getDeviceProperties(device)
        target = _kernels.device_target(device)
        print(f"GPU {device}: {props['name'].decode()} sm_{props['major']}{props['minor']}: {target.description}")
    return 0


def cmd_warm(args) -> int:
    for capability in args.arch or ():
        if capability < 80:
            raise UserError(f"--arch {capability}: nvfp4_cupy needs sm_80 or newer")
    _nvrtc_version()
    from ._runtime.disk_cache import cache_dir
    from ._runtime.kernels import precompile

    capabilities = args.arch
    if not capabilities:
        reason = gpu_unavailable_reason()
        if reason:
            raise UserError(f"no GPU here ({reason}); name the GPUs to compile for with --arch, e.g. --arch 90")
        import cupy as cp

        capabilities = sorted({int(cp.cuda.Device(d).compute_capability) for d in range(cp.cuda.runtime.getDeviceCount())})
    for capability in capabilities:
        total = 0  # precompile tells it through progress; those it did not compile it loaded

        def progress(done: int, count: int) -> None:
            nonlocal total
            total = count
            if sys.stderr.isatty():
                print(f"\rsm_{capability}: {done}/{count} kernel programs", end="", file=sys.stderr, flush=True)

        compiled = precompile(capability, progress=progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(f"sm_{capability}: compiled {compiled}, loaded {total - compiled} from the cache in {cache_dir()}")
    return 0


def _quantize(x: np.ndarray, global_scale, use_gpu: bool, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    if not use_gpu:
        return ref.scaled_fp4_quant(x, global_scale, **kwargs)
    import cupy as cp

    from . import scaled_fp4_quant

    if isinstance(global_scale, np.ndarray):
        global_scale = cp.asarray(global_scale)
    return tuple(cp.asnumpy(a) for a in scaled_fp4_quant(cp.asarray(x), global_scale, **kwargs))


def cmd_quantize(args) -> int:
    no_global_scale = "MXFP4 has no global scale"
    if args.fmt == "mxfp4" and args.global_scale is not None:
        raise UserError(f"--global-scale does not apply to --fmt mxfp4 ({no_global_scale})")
    if args.fmt == "mxfp4" and args.per_row:
        raise UserError(f"--per-row does not apply to --fmt mxfp4 ({no_global_scale})")
    if args.per_row and args.global_scale is not None:
        raise UserError("--per-row computes a global scale per row: it cannot be given with --global-scale")
    prefix = args.output
    outputs = [Path(f"{prefix}.packed.npy"), Path(f"{prefix}.scales.npy"), Path(f"{prefix}.json")]
    _check_writable(*outputs)
    x = _load_npy(args.input)
    if x.dtype.name not in SUPPORTED_DTYPES:
        raise UserError(f"{args.input}: dtype {x.dtype} is not one of {', '.join(SUPPORTED_DTYPES)}")
    use_gpu = not args.cpu and gpu_unavailable_reason() is None
    with _api_errors({**args.api_flags, "x": args.input}):
        # Rows, as the README says: leading dimensions flatten (so one scale
        # per row can never read as one per expert of an [E, m, n] input).
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim else x
        if args.fmt == "mxfp4":
            global_scale = None
        elif args.global_scale is not None:
            global_scale = args.global_scale  # a Python float: the API checks it (finite and > 0 in float32)
        else:
            global_scale = ref.compute_global_scale(rows, per_row=args.per_row)
        packed, scales = _quantize(rows, global_scale, use_gpu, padded_n=args.padded_n, layout=args.layout, fmt=args.fmt)
    meta = {
        "format": args.fmt,
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "n": int(x.shape[-1]),
        "padded_n": int(packed.shape[-1] * 2),
        "layout": args.layout,
        # float32, as the kernels used it (valid here: the API accepted it)
        "global_scale": None if global_scale is None else np.atleast_1d(np.float32(global_scale)).astype(float).tolist(),
        "computed_on": "gpu" if use_gpu else "cpu (golden model)",
    }
    _save_all(dict(zip(outputs, (packed, scales, json.dumps(meta, indent=1)))))
    print(f"{args.input} {list(x.shape)} {x.dtype} -> {outputs[0]} {list(packed.shape)}, "
          f"{outputs[1]} {list(scales.shape)}, {outputs[2]} ({meta['computed_on']})")
    return 0




def _parse_devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        devices = [int(d) for d in text.split(",")]
    except ValueError:
        raise UserError(f"--devices {text}: a comma-separated list of GPU ids, e.g. 0,1") from None
    if not devices or min(devices) < 0:
        raise UserError(f"--devices {text}: non-negative GPU ids, e.g. 0,1 (0,0: two workers on GPU 0)")
    return devices


def cmd_convert(args) -> int:
    import warnings

    try:
        from .checkpoint import DEFAULT_EXCLUDE, CheckpointError, convert
    except ImportError as exc:
        raise UserError(f"the checkpoint commands need the checkpoint extra ({exc})") from None
    exclude = ([] if args.no_default_exclude else list(DEFAULT_EXCLUDE)) + list(args.exclude or [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = convert(args.input, args.output, args.format, exclude=exclude, cpu=args.cpu, resume=args.resume,
                             overwrite=args.overwrite, shard_index=args.shard_index, num_shards=args.num_shards,
                             devices=_parse_devices(args.devices), progress=not args.no_progress,
                             calibration_tokens=args.calibration_tokens, calibration_amax=args.calibration_amax)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
    for w in caught:
        print(f"nvfp4-cupy convert: warning: {w.message}", file=sys.stderr)
    where = "cpu (golden model)" if args.cpu else "gpu"
    print(f"{args.input} -> {args.output} ({args.format}, {where}): {report.quantized} Linear weights to NVFP4, "
          f"{len(report.written)} shards written, {len(report.resumed)} already there (verified), "
          f"{report.seconds:.1f} s")
    calibration = report.calibration
    if calibration is None:
        print("weight-only: no input_scale (no activation calibration); "
              + ("hf_quant_config.json says quant_algo W4A16_NVFP4, which loaders run with unquantized activations"
                 if args.format == "modelopt" else
                 "quantization_config has input_activations null (W4A16), which loaders run with unquantized "
                 "activations"))
    else:
        how = "reused from the calibration file" if report.calibration_reused else "measured"
        print(f"W4A4: input scales from the input amax of each Linear ({how}: {calibration.samples} samples, "
              f"{calibration.tokens} tokens, on {calibration.device}); "
              + ("hf_quant_config.json says quant_algo NVFP4" if args.format == "modelopt" else
                 "quantization_config has NVFP4 input_activations (dynamic local, static global scale)"))
    return 0


def cmd_dequantize_checkpoint(args) -> int:
    from .checkpoint import CheckpointError, dequantize_checkpoint

    try:
        shards = dequantize_checkpoint(args.input, args.output, overwrite=args.overwrite)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.input} -> {args.output}: {len(shards)} shards, NVFP4 weights as bfloat16")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import CheckpointError, inspect_checkpoint

    try:
        result = inspect_checkpoint(args.input, args.reference)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.input}: {result['format']}, {len(result['tensors'])} NVFP4 weights, {result['other']} other tensors")
    for t in result["tensors"]:
        line = (f"  {t['module']}: [{t['shape'][0]}, {t['shape'][1]}] {t['packed']}, scales {t['scale_shape']} E4M3 "
                f"({t['zero_scales']} zero, {t['nan_scales']} NaN), global scale {t['global_scale']:.6g} "
                f"(decode {t['decode_scale']:.6g}; {t['stored_global']})")
        if "input_scale" in t:
            line += f", activations {t['input_scale']}"
        err = result["error"].get(t["module"])
        if err:
            line += f", SQNR {err['sqnr_db']:.2f} dB, max |err| {err['max_abs']:.3g}"
        print(line)
    for key, scales in sorted(result["groups"].items()):
        shared = "shared" if len(set(scales)) == 1 else "NOT shared"
        print(f"  fused {key}: {len(scales)} weights, global scale {shared}")
    if result["error"]:
        sqnr = [e["sqnr_db"] for e in result["error"].values()]
        print(f"error vs {args.reference}: SQNR min {min(sqnr):.2f} dB, mean {sum(sqnr) / len(sqnr):.2f} dB "
              f"over {len(sqnr)} weights")
    return 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What `quantize` writes to PREFIX.json and `dequantize` reads: key -> (check, what it must be).
META_KEYS = {
    "format": (lambda v: isinstance(v, str) and v in FORMATS, f"one of {sorted(FORMATS)}"),
    "shape": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v),
              "a list of sizes (non-negative integers)"),
    "dtype": (lambda v: isinstance(v, str) and v in SUPPORTED_DTYPES, f"one of {list(SUPPORTED_DTYPES)}"),
    "n": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "layout": (lambda v: isinstance(v, str) and v in LAYOUTS, f"one of {sorted(LAYOUTS)}"),
    "global_scale": (lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(
        isinstance(g, (int, float)) and not isinstance(g, bool) for g in v)), "null or a list of numbers"),
}


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: holds a JSON {type(meta).__name__}, not the object `quantize` writes")
    for key, (valid, expected) in META_KEYS.items():
        if key not in meta:
            raise UserError(f'{path}: no "{key}" (quantize writes {", ".join(META_KEYS)})')
        if not valid(meta[key]):
            raise UserError(f'{path}: "{key}" must be {expected}, got {json.dumps(meta[key])}')
    return meta


def cmd_dequantize(args) -> int:
    prefix = args.input
    files = {"packed": f"{prefix}.packed.npy", "scales": f"{prefix}.scales.npy"}
    output = Path(args.output)
    _check_writable(output)
    meta = _read_meta(Path(f"{prefix}.json"))
    packed, scales = _load_npy(files["packed"]), _load_npy(files["scales"])
    dtype = args.dtype or meta["dtype"]
    with _api_errors(files), np.errstate(over="ignore"):  # a hand-edited scale may overflow float32: the API says so
        gs = None if meta["global_scale"] is None else np.array(meta["global_scale"], np.float32)
        y = ref.dequantize(packed, scales, gs, n=meta["n"], layout=meta["layout"], dtype=dtype, fmt=meta["format"])
    shape = meta["shape"]
    if list(y.shape) != [math.prod(shape[:-1]), shape[-1]]:
        raise UserError(f'{prefix}.json: "shape" {shape} does not fit the {list(y.shape)} values of {files["packed"]}')
    _save_all({output: y.reshape(shape)})
    note = " (2-byte void: np.load(path).view(ml_dtypes.bfloat16) reads it)" if dtype == "bfloat16" else ""
    print(f"{prefix}.* -> {output} {shape} {dtype}{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvfp4-cupy",
        description="NVFP4 quantization on every NVIDIA GPU from sm_80, bit-exact to a NumPy golden model. "
        "Without a command: the demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info,warm,quantize,dequantize,convert,dequantize-checkpoint,inspect}")
    demo = sub.add_parser("demo", help="quantize a built-in LLM-like activation and check every byte (default)")
    demo.add_argument("--layout", default="swizzled", choices=sorted(LAYOUTS), help="scale layout")
    sub.add_parser("bench", help="the benchmark, on a GPU (see `nvfp4-cupy bench --help`)", add_help=False)
    sub.add_parser("info", help="versions, GPUs and their conversion path, the kernel cache")
    warm = sub.add_parser("warm", help="compile every kernel into the disk cache (e.g. when building an image)")
    warm.add_argument("--arch", type=int, action="append", metavar="CC",
                      help="compute capability to compile for, e.g. 90; repeatable; no GPU needed "
                      "(default: the GPUs present)")
    dtypes = ", ".join(SUPPORTED_DTYPES)
    quantize = sub.add_parser(
        "quantize", help="quantize a .npy file into PREFIX.packed.npy / .scales.npy / .json",
        description=f"Quantize a .npy array of {dtypes} into PREFIX.packed.npy, PREFIX.scales.npy and "
        f"PREFIX.json, on the GPU if there is one, else with the golden model. {BFLOAT16_NOTE}.")
    quantize.add_argument("input", help=f"a .npy array of {dtypes}, shape [..., n]")
    quantize.add_argument("output", help="output prefix")
    quantize.add_argument("--global-scale", type=float, help="default: 448 * 6 / amax of the input (nvfp4 only)")
    quantize.add_argument("--per-row", action="store_true", help="one computed global scale per row (nvfp4 only)")
    quantize.add_argument("--padded-n", type=int, help="output K (default n rounded up to the block)")
    quantize.add_argument("--layout", default="swizzled", choices=sorted(LAYOUTS))
    quantize.add_argument("--fmt", default="nvfp4", choices=sorted(FORMATS))
    quantize.add_argument("--cpu", action="store_true", help="use the golden model even when a GPU is there")
    quantize.set_defaults(api_flags=_api_flags(quantize))
    dequantize = sub.add_parser(
        "dequantize", help="PREFIX.* from `quantize` back to a .npy array",
        description=f"Dequantize PREFIX.* from `quantize` with the golden model into a .npy array. {BFLOAT16_NOTE}.")
    dequantize.add_argument("input", help="the prefix given to quantize")
    dequantize.add_argument("output", help="output .npy file (written under exactly this name)")
    dequantize.add_argument("--dtype", choices=SUPPORTED_DTYPES, help="default: the quantized input's")
    convert = sub.add_parser(
        "convert", help="a Hugging Face safetensors model -> an NVFP4 checkpoint (ModelOpt or compressed-tensors)",
        description="Quantize every Linear weight of a Hugging Face safetensors model directory to NVFP4 and write "
                    "it in a serving engine's format; everything else is carried over (docs/checkpoints.md).")
    convert.add_argument("input", help="model directory (safetensors shards, with or without an index)")
    convert.add_argument("output", help="output directory (must not exist, unless --resume or --overwrite)")
    convert.add_argument("--format", required=True, choices=["modelopt", "compressed-tensors"])
    convert.add_argument("--exclude", action="append", metavar="PATTERN",
                         help="module-name pattern (fnmatch) left unquantized, repeatable; added to the defaults")
    convert.add_argument("--no-default-exclude", action="store_true",
                         help="drop the default patterns (embeddings, norms, lm_head, routers)")
    convert.add_argument("--cpu", action="store_true", help="the golden model instead of the GPU")
    convert.add_argument("--resume", action="store_true", help="keep shards already written and verified")
    convert.add_argument("--overwrite", action="store_true", help="write into an existing directory")
    convert.add_argument("--devices", help="GPU ids, e.g. 0,1: one worker process per id (0,0: two on GPU 0)")
    convert.add_argument("--shard-index", type=int, default=0, help="this machine's part (0-based)")
    convert.add_argument("--num-shards", type=int, default=1, help="how many parts the shards are split into")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.add_argument("--calibration-tokens", metavar="FILE",
                         help="token ids to calibrate the activations' input scales with (W4A4): one sample per "
                              "line of whitespace-separated ids, or .json (list of lists), or .npy (2-D ints); the "
                              "model runs once on the GPU (on the CPU with --cpu)")
    convert.add_argument("--calibration-amax", metavar="FILE",
                         help="input scales from a calibration file an earlier run wrote (nvfp4_cupy_calibration.json)")
    deq = sub.add_parser("dequantize-checkpoint", help="an NVFP4 checkpoint back to a bfloat16 safetensors model",
                         description="Dequantize every NVFP4 weight with its format's own arithmetic into bfloat16.")
    deq.add_argument("input", help="NVFP4 checkpoint directory (ModelOpt or compressed-tensors)")
    deq.add_argument("output", help="output directory (must not exist, unless --overwrite)")
    deq.add_argument("--overwrite", action="store_true")
    insp = sub.add_parser("inspect", help="which tensors of a checkpoint are NVFP4, their scales and error",
                          description="List the NVFP4 weights, their block and global scales, fused groups, and "
                                      "with --reference the dequantization error against the unquantized model.")
    insp.add_argument("input", help="NVFP4 checkpoint directory")
    insp.add_argument("--reference", help="the unquantized model directory, for an error summary")
    return parser


COMMANDS = {"demo": cmd_demo, "info": cmd_info, "warm": cmd_warm, "quantize": cmd_quantize, "dequantize": cmd_dequantize,
            "convert": cmd_convert, "dequantize-checkpoint": cmd_dequantize_checkpoint, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "bench" if argv[:1] == ["bench"] else None
    try:
        if command == "bench":  # its own parser: it imports CuPy only once it knows there is a GPU
            from ._bench import run as bench

            return bench(argv[1:])
        args = build_parser().parse_args(argv or ["demo"])
        command = args.command or "demo"
        return COMMANDS[command](args)
    except BrokenPipeError:  # `nvfp4-cupy info | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit does not fail on flush
        return 0
    except UserError as exc:
        print(f"nvfp4-cupy {command}: error: {exc}", file=sys.stderr)
        return 1
