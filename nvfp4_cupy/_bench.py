"""The benchmark: the quantizer against the card's own copy bandwidth, in one
run on one card (`nvfp4-cupy bench`, or benchmarks/bench_quantize.py).

Device times come from CUDA events around CUDA-graph replays of 20 launches
(warm-up first, medians of 15 replays), with inputs rotated over 256 MiB so
they come from HBM, not L2. Bytes moved = input read once + packed and scales
written once. Host overhead is measured separately, with the GPU waiting on
the host.

CuPy is imported inside the functions that measure, so that `nvfp4-cupy
bench` without a GPU (or without CuPy) is one error line, and the PyTorch
baseline (torch_quantize) runs on a CPU for its test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._cli import UserError, gpu_unavailable_reason
from ._format import NUMPY_DTYPES, SUPPORTED_DTYPES, round_up

L2_ROTATION_BYTES = 256 * 2**20
LAUNCHES_PER_GRAPH = 20
DTYPES = SUPPORTED_DTYPES
LAYOUTS = ("swizzled", "linear", "8x4")
# (m, n, padded_n): decode (small m) to prefill, K from 4096 to 16384, and the
# non-aligned K = 7152 that CUTLASS wants padded to 7168.
SHAPES = (
    (1, 4096, 4096),
    (8, 7152, 7168),
    (32, 16384, 16384),
    (2048, 4096, 4096),
    (4096, 7152, 7168),
    (8192, 8192, 8192),
    (16384, 7152, 7168),
    (16384, 16384, 16384),
)
QUICK_SHAPES = ((1, 4096, 4096), (4096, 7152, 7168), (16384, 16384, 16384))
# Where the PyTorch baseline is timed (bf16, swizzled): the "N x torch.compile" shapes.
TORCH_SHAPES = ((16384, 16384, 16384), (8192, 8192, 8192), (4096, 7152, 7168))


def graph_time_us(launch, buffers: int, repeats: int = 15) -> float:
    """Median device microseconds of one launch(i), i rotating over inputs."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(3):  # compile, load, first touch
            launch(i % buffers)
        stream.synchronize()
        stream.begin_capture()
        for i in range(LAUNCHES_PER_GRAPH):
            launch(i % buffers)
        graph = stream.end_capture()
        graph.launch(stream)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / LAUNCHES_PER_GRAPH)
    return statistics.median(times)


def copy_ceiling_gbps(nbytes: int = 2**30) -> dict:
    """Device-to-device copy of 1 GiB, bytes read + written: by a plain
    16-byte-per-thread kernel (the ceiling used) and by cudaMemcpyAsync."""
    import cupy as cp

    from ._runtime.compile import source_dir

    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    copy = cp.RawModule(code=(source_dir() / "bench_copy.cu").read_text()).get_function("copy_16_bytes_per_thread")
    vectors = nbytes // 16
    kernel_us = graph_time_us(lambda i: copy((-(-vectors // 256),), (256,), (src, dst, np.int64(vectors))), 1)
    kind = cp.cuda.runtime.memcpyDeviceToDevice
    memcpy_us = graph_time_us(
        lambda i: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, kind, cp.cuda.get_current_stream().ptr),
        1,
    )
    return {"copy_kernel_gbps": 2 * nbytes / kernel_us / 1e3, "memcpy_gbps": 2 * nbytes / memcpy_us / 1e3}


def _inputs(m: int, n: int, dtype: str) -> list:
    import cupy as cp

    one = m * n * np.dtype(cp.float32).itemsize
    count = max(2, min(16, -(-L2_ROTATION_BYTES // max(one, 1))))
    base = cp.random.standard_normal((m, n), dtype=cp.float32)
    return [(base * (1 + 0.01 * i)).astype(NUMPY_DTYPES[dtype]) for i in range(count)]


def bench_quantizer(m, n, padded_n, dtype, layout, ceiling) -> dict:
    import cupy as cp

    from . import create_fp4_output_tensors, scaled_fp4_quant

    inputs = _inputs(m, n, dtype)
    out, out_scale = create_fp4_output_tensors(m, n, padded_n=padded_n, layout=layout)
    us = graph_time_us(
        lambda i: scaled_fp4_quant(inputs[i], 10.0, padded_n=padded_n, layout=layout, out=out, out_scale=out_scale),
        len(inputs),
    )
    moved = inputs[0].nbytes + out.nbytes + out_scale.nbytes
    row = {"kind": "fused", "m": m, "n": n, "padded_n": padded_n, "dtype": dtype, "layout": layout,
           "us": us, "bytes": moved, "gbps": moved / us / 1e3}
    row["pct_ceiling"] = 100 * row["gbps"] / ceiling
    if padded_n != n:
        # Quantize-then-pad: our kernel at K = n, then a padding copy of the
        # packed values into preallocated K-padded buffers (the best case
        # for that approach: no allocation in the loop).
        plain, plain_scale = create_fp4_output_tensors(m, n, layout=layout)
        padded = cp.zeros((m, padded_n // 2), dtype=cp.uint8)

        def quantize_then_pad(i):
            scaled_fp4_quant(inputs[i], 10.0, layout=layout, out=plain, out_scale=plain_scale)
            padded[:, : n // 2] = plain
            padded[:, n // 2 :] = 0

        row["unfused_us"] = graph_time_us(quantize_then_pad, len(inputs))
        row["fusion_speedup"] = row["unfused_us"] / us
    return row


def bench_neighbours(m, n, padded_n, ceiling) -> list[dict]:
    """Dequantize (bf16 out) and the on-device global scale (bf16 in), and
    MXFP4 quantization, on the same shape."""
    import cupy as cp

    from . import compute_global_scale, create_fp4_output_tensors, dequantize_fp4, scaled_fp4_quant

    x = _inputs(m, n, "bfloat16")
    packed, scales = scaled_fp4_quant(x[0], 10.0, padded_n=padded_n)
    gs = cp.asarray([10.0], dtype=cp.float32)
    out = cp.empty((m, n), dtype=x[0].dtype)
    mx_out, mx_scale = create_fp4_output_tensors(m, n, padded_n=padded_n, fmt="mxfp4")
    cases = (
        ("dequantize", lambda i: dequantize_fp4(packed, scales, gs, n=n, dtype=x[0].dtype, out=out),
         packed.nbytes + scales.nbytes + out.nbytes, 1),
        ("global scale", lambda i: compute_global_scale(x[i]), x[0].nbytes, len(x)),
        ("mxfp4 quantize", lambda i: scaled_fp4_quant(x[i], None, padded_n=padded_n, out=mx_out, out_scale=mx_scale,
                                                       fmt="mxfp4"), x[0].nbytes + mx_out.nbytes + mx_scale.nbytes, len(x)),
    )
    rows = []
    for kind, launch, moved, buffers in cases:
        us = graph_time_us(launch, buffers)
        rows.append({"kind": kind, "m": m, "n": n, "padded_n": padded_n, "dtype": "bfloat16", "layout": "swizzled",
                     "us": us, "bytes": moved, "gbps": moved / us / 1e3, "pct_ceiling": 100 * moved / us / 1e3 / ceiling})
    return rows


_FLT_MAX = 3.4028234663852886e38


def torch_quantize(x, global_scale: float, padded_n: int):
    """The PyTorch baseline the benchmark times (eager and under
    torch.compile): NVFP4 of x [m, n] (bf16, fp16 or fp32, any device) with
    K padding, as plain tensor operations. Returns (packed uint8 [m,
    padded_n // 2], scales uint8 in the 128x4 swizzled layout), torch tensors.

    The golden model's arithmetic step for step, so that the bench compares
    like for like: tests/test_bench_baseline.py holds it to
    reference.scaled_fp4_quant byte for byte, for finite inputs only: NaN and
    inf are not handled (no NaN scales, no special blocks). The global scale
    is taken as float32, as by the kernels."""
    import torch

    gs = float(np.float32(global_scale))

    def div(a, b):
        # float32 a / b, correctly rounded. In float64, then rounded: exact
        # even where the backend multiplies by the reciprocal instead
        # (CUDA eager with a scalar divisor, Inductor with a constant one) or
        # divides approximately, since the error stays far below the gap
        # between a float32 quotient and a float32 rounding boundary.
        return (a.double() / b).float() if isinstance(a, torch.Tensor) else (a / b.double()).float()

    rows, cols = x.shape
    v = torch.nn.functional.pad(x.float(), (0, padded_n - cols)).view(rows, padded_n // 16, 16)
    amax = v.abs().amax(-1)
    sf = (gs * div(amax, 6.0)).clamp(max=448).to(torch.float8_e4m3fn)  # RNE, saturated by the clamp
    sf_value = sf.float()
    r = torch.where(sf_value == 0, 0.0, div(1.0, div(sf_value, gs)).clamp(max=_FLT_MAX))
    y = v * r.unsqueeze(-1)
    a = y.abs()
    # E2M1 round-to-nearest-even as thresholds on |y| (exact: y is computed
    # exactly as by the golden model); ties go to the even code.
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
            + (a > 2.5).int() + (a >= 3.5).int() + (a > 5).int()) | (torch.signbit(y).int() << 3)
    code = code.view(rows, padded_n).to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    kb = padded_n // 16
    scales = torch.zeros(round_up(rows, 128), round_up(kb, 4), dtype=torch.uint8, device=x.device)
    scales[:rows, :kb] = sf.view(torch.uint8)
    # [row tile, (row // 32) % 4, row % 32, k tile, k % 4] -> [row tile, k tile, row % 32, (row // 32) % 4, k % 4]
    swizzled = scales.view(-1, 4, 32, round_up(kb, 4) // 4, 4).permute(0, 3, 2, 1, 4).contiguous()
    return packed, swizzled.view(scales.shape)


def torch_reference(m, n, padded_n, ceiling) -> list[dict]:
    """torch_quantize, eager and under torch.compile, on a bf16 input of this
    shape; each row says whether its bytes equal ours (bit-exact to the golden
    model) on that input, the condition for comparing the times."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    from . import scaled_fp4_quant

    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    ours = scaled_fp4_quant(x, 10.0, padded_n=padded_n, like="torch")
    moved = x.numel() * 2 + m * padded_n // 2 + round_up(m, 128) * round_up(padded_n // 16, 4)
    rows = []
    for label, fn in (("torch eager", torch_quantize), ("torch.compile", torch.compile(torch_quantize))):
        got = fn(x, 10.0, padded_n)
        same = all(torch.equal(a, b) for a, b in zip(got, ours))
        for _ in range(3):
            fn(x, 10.0, padded_n)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(15):
            start.record()
            fn(x, 10.0, padded_n)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        us = statistics.median(times)
        rows.append({"kind": label, "m": m, "n": n, "padded_n": padded_n, "dtype": "bfloat16", "layout": "swizzled",
                     "us": us, "bytes": moved, "gbps": moved / us / 1e3, "pct_ceiling": 100 * moved / us / 1e3 / ceiling,
                     "bytes_match_ours": same})
    return rows


def host_overhead() -> dict:
    """Host microseconds per call for a 1x4096 fp16 input (the GPU idles,
    waiting on the host), and device microseconds per kernel in a replayed
    graph of such calls."""
    import cupy as cp

    from . import create_fp4_output_tensors, scaled_fp4_quant

    x = cp.random.standard_normal((1, 4096), dtype=cp.float32).astype(cp.float16)
    out, out_scale = create_fp4_output_tensors(1, 4096)
    gs = cp.asarray([10.0], dtype=cp.float32)
    for _ in range(200):
        scaled_fp4_quant(x, 10.0, out=out, out_scale=out_scale)
    cp.cuda.Device().synchronize()
    result = {}
    for label, call in (
        ("host_us_out", lambda: scaled_fp4_quant(x, 10.0, out=out, out_scale=out_scale)),
        ("host_us_device_scale", lambda: scaled_fp4_quant(x, gs, out=out, out_scale=out_scale)),
        ("host_us_alloc", lambda: scaled_fp4_quant(x, 10.0)),
    ):
        samples = []
        for _ in range(7):
            count = 2000
            started = time.perf_counter()
            for _ in range(count):
                call()
            samples.append((time.perf_counter() - started) * 1e6 / count)
            cp.cuda.Device().synchronize()
        result[label] = statistics.median(samples)
    result["graph_replay_us_per_kernel"] = graph_time_us(
        lambda i: scaled_fp4_quant(x, gs, out=out, out_scale=out_scale), 1
    )
    return result


_FIRST_CALL = """
import os, time, cupy as cp
cp.zeros(1).sum(); cp.cuda.Device().synchronize()  # CUDA context and CuPy up first
import nvfp4_cupy as nv
x = cp.ones((128, 4096), dtype=cp.float16)
t = time.perf_counter(); nv.scaled_fp4_quant(x, 1.0); cp.cuda.Device().synchronize()
print(time.perf_counter() - t)
"""


def first_call_seconds() -> dict:
    """A fresh process's first call (compile + load), with an empty kernel
    cache and then with the cache that run left on disk."""
    from ._runtime import disk_cache as _disk_cache

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CUPY_CACHE_DIR": cache, _disk_cache.ENV_VAR: os.path.join(cache, "nvfp4_cupy")}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        times = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True)
            times.append(float(done.stdout.strip().splitlines()[-1]))
    return {"first_call_empty_cache_s": times[0], "first_call_warm_cache_s": times[1]}


def plot(results, ceiling, card, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for dtype, marker in zip(DTYPES, "os^"):
        rows = [r for r in results if r["kind"] == "fused" and r["dtype"] == dtype]
        ax.scatter([r["bytes"] for r in rows], [r["gbps"] for r in rows], marker=marker, label=f"nvfp4_cupy {dtype}")
    torch_rows = [r for r in results if r["kind"].startswith("torch")]
    if torch_rows:
        ax.scatter([r["bytes"] for r in torch_rows], [r["gbps"] for r in torch_rows], marker="x", c="k", label="torch (eager / compile)")
    ax.axhline(ceiling, color="r", linestyle="--", label=f"copy ceiling {ceiling:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved per call")
    ax.set_ylabel("achieved GB/s")
    ax.set_title(f"NVFP4 quantization on {card}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(argv: list[str]) -> int:
    """`nvfp4-cupy bench ARGS`; mistakes raise UserError (see _cli.main)."""
    parser = argparse.ArgumentParser(prog="nvfp4-cupy bench", description="Benchmark the quantizer against the copy "
                                     "ceiling, on a CUDA GPU (BENCHMARKS.md).")
    parser.add_argument("--quick", action="store_true", help="three shapes, fp16 and fp32, swizzled only")
    parser.add_argument("--json", type=Path, default=Path("bench_results.json"), help="results file (default %(default)s)")
    parser.add_argument("--png", type=Path, default=Path("bench_bandwidth.png"), help="plot file (default %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason:
        raise UserError(f"the benchmark needs a CUDA GPU and CuPy ({reason})")
    for path in (args.json, args.png):  # found out now, not after minutes of measuring
        if not path.parent.is_dir():
            raise UserError(f"cannot write {path}: {path.parent} is not a directory")
    import cupy as cp

    device = cp.cuda.Device()
    card = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    copies = copy_ceiling_gbps()
    ceiling = max(copies.values())
    print(f"card {card} (sm_{device.compute_capability}), CuPy {cp.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"copy ceiling {ceiling:.0f} GB/s, read + write (copy kernel {copies['copy_kernel_gbps']:.0f}, "
          f"cudaMemcpyAsync {copies['memcpy_gbps']:.0f})")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = ("float16", "float32") if args.quick else DTYPES
    layouts = ("swizzled",) if args.quick else LAYOUTS
    cases = [(s, d, l) for s in shapes for d in dtypes for l in layouts]
    results = []
    header = f"{'m':>6} {'n':>6} {'pad_n':>6} {'dtype':>8} {'layout':>8} {'us':>9} {'GB/s':>6} {'%ceil':>6} {'unfused us':>10} {'fused x':>7}"
    print(header)
    for i, ((m, n, padded_n), dtype, layout) in enumerate(cases):
        r = bench_quantizer(m, n, padded_n, dtype, layout, ceiling)
        results.append(r)
        unfused = f"{r['unfused_us']:>10.1f} {r['fusion_speedup']:>7.2f}" if "unfused_us" in r else ""
        print(f"{m:>6} {n:>6} {padded_n:>6} {dtype:>8} {layout:>8} {r['us']:>9.1f} {r['gbps']:>6.0f} "
              f"{r['pct_ceiling']:>6.1f} {unfused}   [{i + 1}/{len(cases)}]", flush=True)
    for m, n, padded_n in ((16384, 16384, 16384), (4096, 7152, 7168)):
        for r in bench_neighbours(m, n, padded_n, ceiling):
            results.append(r)
            print(f"{r['kind']:>14}: {m}x{n}->{padded_n} bf16 {r['us']:.1f} us, {r['gbps']:.0f} GB/s, "
                  f"{r['pct_ceiling']:.1f}% of ceiling")
    if not args.no_torch:
        for m, n, padded_n in TORCH_SHAPES:
            torch_rows = torch_reference(m, n, padded_n, ceiling)
            if not torch_rows:
                continue
            ours = next((r for r in results if r["kind"] == "fused" and r["dtype"] == "bfloat16"
                         and r["layout"] == "swizzled" and (r["m"], r["n"]) == (m, n)), None)
            ours = ours or bench_quantizer(m, n, padded_n, "bfloat16", "swizzled", ceiling)
            for r in torch_rows:
                # A ratio only against a baseline that wrote the same bytes.
                if r["bytes_match_ours"]:
                    r["our_speedup"] = r["us"] / ours["us"]
                results.append(r)
                extra = (f"  (ours {ours['us']:.1f} us, {r['our_speedup']:.1f}x faster)" if "our_speedup" in r
                         else "  (bytes DIFFER from ours: no ratio)")
                print(f"{r['kind']:>14}: {m}x{n}->{padded_n} bf16 swizzled {r['us']:.1f} us, {r['gbps']:.0f} GB/s{extra}")
    host = host_overhead()
    print("host: " + ", ".join(f"{k} {v:.2f}" for k, v in host.items()))
    first = first_call_seconds()
    print("first call: " + ", ".join(f"{k} {v:.3f}" for k, v in first.items()))
    args.json.write_text(json.dumps({"card": card, "cupy": cp.__version__, "date": time.strftime("%Y-%m-%d"),
                                     "ceiling_gbps": ceiling, "copies": copies, "results": results, "host": host, "first_call": first},
                                    indent=1))
    plotted = plot(results, ceiling, card, args.png)
    print(f"wrote {args.json}" + (f" and {args.png}" if plotted else " (no matplotlib: no plot)"))
    return 0


def main(argv=None) -> int:
    """benchmarks/bench_quantize.py: the same as `nvfp4-cupy bench`."""
    from ._cli import main as cli

    return cli(["bench", *(sys.argv[1:] if argv is None else argv)])
