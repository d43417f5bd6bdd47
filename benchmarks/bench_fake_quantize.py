"""Fake quantization on the GPU (issue 16, item 3), against the card's copy
bandwidth in the same run: fake_quantize (one kernel: x read once, the result
written once) vs the unfused pair scaled_fp4_quant then dequantize_fp4 (linear
scales, x's dtype out), bf16 x at 16384 x 16384, 16384 x 7168 and
4096 x 7168, NVFP4 with a device global scale (and MXFP4 at 16384 x 16384).
Targets: >= 90% of the copy ceiling for the bytes it moves (read x + write
x) at 16384^2, and >= 2x faster than the unfused pair.

Every op writes into preallocated outputs, so that only kernels are timed.
Before timing, the fused result is checked against the unfused one on the
GPU (bit for bit). Device times: nvfp4_cupy._bench.graph_time_us (CUDA-graph
replays, inputs rotated over 256 MiB so that they come from HBM, medians).

    python benchmarks/bench_fake_quantize.py [--json results.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_cupy._bench import _inputs, card_name, copy_ceiling_gbps, graph_time_us, write_report  # noqa: E402

SHAPES = ((16384, 16384, "nvfp4"), (16384, 7168, "nvfp4"), (4096, 7168, "nvfp4"), (16384, 16384, "mxfp4"))
DTYPE = "bfloat16"


def bench_shape(m: int, n: int, fmt: str, ceiling: float) -> dict:
    import cupy as cp

    import nvfp4_cupy as nv

    x = _inputs(m, n, DTYPE)
    gs = cp.asarray(np.array([448 * 6 / 4.0], np.float32)) if fmt == "nvfp4" else None
    out = cp.empty_like(x[0])
    packed, scales = nv.create_fp4_output_tensors(m, n, layout="linear", fmt=fmt)
    unfused_out = cp.empty_like(x[0])

    def fused(i):
        nv.fake_quantize(x[i], gs, fmt=fmt, out=out)

    def unfused(i):
        nv.scaled_fp4_quant(x[i], gs, layout="linear", out=packed, out_scale=scales, fmt=fmt)
        nv.dequantize_fp4(packed, scales, gs, n=n, layout="linear", dtype=DTYPE, out=unfused_out, fmt=fmt)

    fused(0)
    unfused(0)
    exact = bool(cp.array_equal(out.view(cp.uint16), unfused_out.view(cp.uint16)))
    fused_us = graph_time_us(fused, len(x))
    unfused_us = graph_time_us(unfused, len(x))
    moved = 2 * x[0].nbytes
    gbps = moved / fused_us / 1e3
    return {"op": "fake_quantize", "fmt": fmt, "m": m, "n": n, "dtype": DTYPE, "fused_us": fused_us,
            "unfused_us": unfused_us, "speedup": unfused_us / fused_us, "bytes": moved, "gbps": gbps,
            "pct_copy": 100 * gbps / ceiling, "fused_equals_unfused": exact}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    card = card_name()
    ceiling = copy_ceiling_gbps()["copy_kernel_gbps"]
    print(f"{card}: copy ceiling {ceiling:.0f} GB/s (read + write)")
    print(f"{'op':<15}{'fmt':<7}{'m x n':>14}{'fused us':>10}{'unfused us':>12}{'speedup':>9}{'% copy':>8}"
          f"{'exact':>7}")
    rows = []
    for m, n, fmt in SHAPES:
        row = bench_shape(m, n, fmt, ceiling)
        rows.append(row)
        print(f"{row['op']:<15}{fmt:<7}{m:>7} x {n:<5}{row['fused_us']:>10.1f}{row['unfused_us']:>12.1f}"
              f"{row['speedup']:>8.2f}x{row['pct_copy']:>7.1f}%{'yes' if row['fused_equals_unfused'] else 'NO':>7}")
    write_report(args.json, card, ceiling, fake_quantize=rows)
    return 0 if all(row["fused_equals_unfused"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
