"""Quantizer bandwidth against the card's own copy ceiling, in one run.

Times with CUDA events around many launches (after warm-up), takes medians,
and rotates among several input buffers so that repeated runs do not read from
L2. Bytes moved = input read once + packed and scales written once.

    python benchmarks/bench_quantize.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nvfp4_cupy as nv  # noqa: E402
from nvfp4_cupy._format import round_up  # noqa: E402

L2_ROTATION_BYTES = 256 * 2**20  # rotate inputs over more than any L2


def time_ms(launch, buffers: int, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of launch(i), i rotating over `buffers` inputs."""
    for i in range(warmup):
        launch(i % buffers)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for i in range(repeats):
        start.record()
        launch(i % buffers)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def copy_ceiling_gbps(nbytes: int = 2**30) -> float:
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    ms = time_ms(lambda i: cp.copyto(dst, src), 1, repeats=20)
    return 2 * nbytes / ms / 1e6


def bench_case(m: int, n: int, padded_n: int, dtype, layout: str) -> dict:
    itemsize = np.dtype(dtype).itemsize
    in_bytes = m * n * itemsize
    count = max(1, min(8, L2_ROTATION_BYTES // max(in_bytes, 1)))
    inputs = [cp.random.standard_normal((m, n), dtype=cp.float32).astype(dtype) for _ in range(count)]
    out, out_scale = nv.create_fp4_output_tensors(m, n, padded_n=padded_n, layout=layout)
    ms = time_ms(lambda i: nv.scaled_fp4_quant(inputs[i], 10.0, padded_n=padded_n, layout=layout,
                                              out=out, out_scale=out_scale), count)
    moved = in_bytes + out.nbytes + out_scale.nbytes
    return {"m": m, "n": n, "padded_n": padded_n, "dtype": np.dtype(dtype).name, "layout": layout,
            "us": ms * 1e3, "bytes": moved, "gbps": moved / ms / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    card = props["name"].decode()
    ceiling = copy_ceiling_gbps()
    print(f"card: {card}; copy ceiling {ceiling:.0f} GB/s (read + write, 1 GiB device-to-device)")
    shapes = [(16384, 16384, 16384), (8192, 7152, 7168), (4096, 4096, 4096), (1, 4096, 4096), (32, 16384, 16384)]
    if not args.quick:
        shapes += [(16384, 7152, 7168), (2048, 8192, 8192), (128, 4096, 4096)]
    dtypes = [cp.float16, cp.float32]
    results = []
    print(f"{'m':>6} {'n':>6} {'pad_n':>6} {'dtype':>8} {'layout':>8} {'us':>9} {'GB/s':>7} {'%ceil':>6}")
    for m, n, padded_n in shapes:
        for dtype in dtypes:
            for layout in ("swizzled", "linear"):
                r = bench_case(m, n, padded_n, dtype, layout)
                r["pct_ceiling"] = 100 * r["gbps"] / ceiling
                results.append(r)
                print(f"{m:>6} {n:>6} {padded_n:>6} {r['dtype']:>8} {layout:>8} {r['us']:>9.1f} "
                      f"{r['gbps']:>7.0f} {r['pct_ceiling']:>6.1f}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "ceiling_gbps": ceiling, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
