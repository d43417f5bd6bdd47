"""The `nvfp4-cupy` command: demo (the default), bench, info, warm (fill the
kernel cache), and quantize / dequantize for .npy files. User mistakes print
one line on stderr and exit 1 (2 for bad flags, from argparse); no tracebacks
for them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from . import reference as ref


class UserError(Exception):
    """A mistake on the command line or in the input files: one line, exit 1."""


def _gpu_unavailable() -> str | None:
    try:
        import cupy

        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as exc:  # no CuPy, or no driver
        return f"{type(exc).__name__}: {exc}"


def cmd_demo(args) -> int:
    from ._demo import run

    return run(layout=args.layout)


def cmd_info(args) -> int:
    import ml_dtypes

    print(f"nvfp4_cupy {__version__}, numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}")
    try:
        import cupy as cp
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        print(f"cupy: not installed ({exc}); the golden model works, the GPU functions do not")
        return 0
    from . import _disk_cache

    print(f"cupy {cp.__version__}, NVRTC {'.'.join(map(str, nvrtc.getVersion()))}")
    entries = _disk_cache.entries()
    print(f"kernel cache: {_disk_cache.cache_dir()} ({len(entries)} compiled programs, "
          f"{sum(e.stat().st_size for e in entries)} bytes; `nvfp4-cupy warm` fills it)")
    reason = _gpu_unavailable()
    if reason:
        print(f"GPU: none ({reason})")
        return 0
    from . import _kernels

    print(f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}")
    for device in range(cp.cuda.runtime.getDeviceCount()):
        props = cp.cuda.runtime.getDeviceProperties(device)
        target = _kernels.device_target(device)
        print(f"GPU {device}: {props['name'].decode()} sm_{props['major']}{props['minor']}: {target.description}")
    return 0


def cmd_warm(args) -> int:
    try:
        from . import _disk_cache, _kernels
    except ImportError as exc:
        raise UserError(f"warm needs CuPy ({exc})") from None
    capabilities = args.arch
    if not capabilities:
        reason = _gpu_unavailable()
        if reason:
            raise UserError(f"no GPU here ({reason}); name the GPUs to compile for with --arch, e.g. --arch 90")
        import cupy as cp

        capabilities = sorted({int(cp.cuda.Device(d).compute_capability) for d in range(cp.cuda.runtime.getDeviceCount())})
    for capability in capabilities:
        if capability < 80:
            raise UserError(f"--arch {capability}: nvfp4_cupy needs sm_80 or newer")

        def progress(done: int, total: int) -> None:
            print(f"\rsm_{capability}: {done}/{total} kernel programs", end="", file=sys.stderr, flush=True)

        compiled = _kernels.precompile(capability, progress=progress if sys.stderr.isatty() else None)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(f"sm_{capability}: compiled {compiled}, the rest were cached, in {_disk_cache.cache_dir()}")
    return 0


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a .npy array: {exc}") from None


def cmd_quantize(args) -> int:
    x = _load_npy(args.input)
    if x.dtype.name not in ("float16", "bfloat16", "float32"):
        raise UserError(f"{args.input}: dtype {x.dtype} is not float16, bfloat16 or float32")
    mx = args.fmt == "mxfp4"
    use_gpu = not args.cpu and _gpu_unavailable() is None
    if mx:
        global_scale = None
    elif args.global_scale is not None:
        global_scale = np.float32(args.global_scale)
    else:
        global_scale = ref.compute_global_scale(x, per_row=args.per_row)
    kwargs = dict(padded_n=args.padded_n, layout=args.layout, fmt=args.fmt)
    if use_gpu:
        import cupy as cp

        from . import scaled_fp4_quant

        gs = global_scale if (global_scale is None or np.ndim(global_scale) == 0) else cp.asarray(global_scale)
        packed, scales = (cp.asnumpy(a) for a in scaled_fp4_quant(cp.asarray(x), gs, **kwargs))
    else:
        packed, scales = ref.scaled_fp4_quant(x, global_scale, **kwargs)
    prefix = Path(args.output)
    np.save(f"{prefix}.packed.npy", packed)
    np.save(f"{prefix}.scales.npy", scales)
    meta = {
        "format": args.fmt,
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "n": int(x.shape[-1]),
        "padded_n": int(packed.shape[-1] * 2),
        "layout": args.layout,
        "global_scale": None if global_scale is None else np.atleast_1d(global_scale).astype(float).tolist(),
        "computed_on": "gpu" if use_gpu else "cpu (golden model)",
    }
    Path(f"{prefix}.json").write_text(json.dumps(meta, indent=1))
    print(f"{args.input} {list(x.shape)} {x.dtype} -> {prefix}.packed.npy {list(packed.shape)}, "
          f"{prefix}.scales.npy {list(scales.shape)}, {prefix}.json ({meta['computed_on']})")
    return 0


def cmd_dequantize(args) -> int:
    prefix = Path(args.input)
    try:
        meta = json.loads(Path(f"{prefix}.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {prefix}.json: {exc}") from None
    packed, scales = _load_npy(f"{prefix}.packed.npy"), _load_npy(f"{prefix}.scales.npy")
    gs = meta["global_scale"]
    gs = None if gs is None else (np.float32(gs[0]) if len(gs) == 1 else np.array(gs, np.float32))
    y = ref.dequantize(packed, scales, gs, n=meta["n"], layout=meta["layout"], dtype=args.dtype or meta["dtype"],
                       fmt=meta["format"])
    np.save(args.output, y.reshape(meta["shape"]))
    print(f"{prefix}.* -> {args.output} {meta['shape']} {y.dtype}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvfp4-cupy",
        description="NVFP4 quantization on every NVIDIA GPU from sm_80, bit-exact to a NumPy golden model. "
        "Without a command: the demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info,warm,quantize,dequantize}")
    demo = sub.add_parser("demo", help="quantize a built-in LLM-like activation and check every byte (default)")
    demo.add_argument("--layout", default="swizzled", choices=sorted(ref.LAYOUTS), help="scale layout")
    sub.add_parser("bench", help="the benchmark (see `nvfp4-cupy bench --help`)", add_help=False)
    sub.add_parser("info", help="versions, GPUs and their conversion path, the kernel cache")
    warm = sub.add_parser("warm", help="compile every kernel into the disk cache (e.g. when building an image)")
    warm.add_argument("--arch", type=int, action="append", metavar="CC",
                      help="compute capability to compile for, e.g. 90; repeatable; no GPU needed "
                      "(default: the GPUs present)")
    quantize = sub.add_parser("quantize", help="quantize a .npy file into PREFIX.packed.npy / .scales.npy / .json")
    quantize.add_argument("input", help="a .npy array of float16, bfloat16 or float32, shape [..., n]")
    quantize.add_argument("output", help="output prefix")
    quantize.add_argument("--global-scale", type=float, help="default: 448 * 6 / amax of the input")
    quantize.add_argument("--per-row", action="store_true", help="one computed global scale per row")
    quantize.add_argument("--padded-n", type=int, help="output K (default n rounded up to the block)")
    quantize.add_argument("--layout", default="swizzled", choices=sorted(ref.LAYOUTS))
    quantize.add_argument("--fmt", default="nvfp4", choices=["nvfp4", "mxfp4"])
    quantize.add_argument("--cpu", action="store_true", help="use the golden model even when a GPU is there")
    dequantize = sub.add_parser("dequantize", help="PREFIX.* from `quantize` back to a .npy array")
    dequantize.add_argument("input", help="the prefix given to quantize")
    dequantize.add_argument("output", help="output .npy file")
    dequantize.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: the input's")
    return parser


COMMANDS = {"demo": cmd_demo, "info": cmd_info, "warm": cmd_warm, "quantize": cmd_quantize, "dequantize": cmd_dequantize}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from ._bench import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv or ["demo"])
    try:
        return COMMANDS[args.command or "demo"](args)
    except BrokenPipeError:  # `nvfp4-cupy info | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit does not fail on flush
        return 0
    except (UserError, ValueError, TypeError) as exc:
        print(f"nvfp4-cupy {args.command}: error: {exc}", file=sys.stderr)
        return 1
