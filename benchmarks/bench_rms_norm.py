"""RMSNorm + quantize on the GPU (issue 16, item 1), against the card's copy
bandwidth in the same run: rms_norm_quant (one kernel: x read once, packed
and scales written; with a residual also the residual read and written back)
vs our own unfused pair, rms_norm then scaled_fp4_quant (a bf16 intermediate
written and read again), bf16 with a weight, NVFP4, swizzled scales, at
4096 x 7168 and 16384 x 7168. Targets: >= 1.8x faster than the unfused pair
and >= 85% of the copy ceiling for the bytes the fused op must move.

Device times: nvfp4_cupy._bench.graph_time_us (CUDA-graph replays of 20
launches, inputs rotated over 256 MiB so that they come from HBM, medians of
15); every output preallocated on both sides.

    python benchmarks/bench_rms_norm.py [--json results.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_cupy._bench import _inputs, card_name, copy_ceiling_gbps, graph_time_us, write_report  # noqa: E402

SHAPES = ((4096, 7168), (16384, 7168))
EPS = 1e-6
GLOBAL_SCALE = 12.0


def moved_bytes(m: int, n: int, residual: bool) -> int:
    """What the fused op must move: x read, packed [m, n / 2] and the
    swizzled scales written, the residual read and written back (the weight,
    n values read by every row from cache, is not counted)."""
    scales = -(-m // 128) * 128 * math.ceil(n / 16 / 4) * 4
    return 2 * m * n + m * n // 2 + scales + (4 * m * n if residual else 0)


def bench_shape(m: int, n: int, ceiling: float) -> list[dict]:
    import cupy as cp

    import nvfp4_cupy as nv

    x = _inputs(m, n, "bfloat16")
    residuals = _inputs(m, n, "bfloat16")  # as many, other values
    weight = (1 + 0.1 * cp.random.standard_normal(n, dtype=cp.float32)).astype(x[0].dtype)
    out, out_scale = nv.create_fp4_output_tensors(m, n)
    normed = cp.empty((m, n), dtype=x[0].dtype)
    rows = []
    for residual in (False, True):
        def fused(i):
            nv.rms_norm_quant(x[i], weight, EPS, GLOBAL_SCALE, residual=residuals[i] if residual else None,
                              out=out, out_scale=out_scale)

        def unfused(i):
            nv.rms_norm(x[i], weight, EPS, residuals[i] if residual else None, out=normed)
            nv.scaled_fp4_quant(normed, GLOBAL_SCALE, out=out, out_scale=out_scale)

        fused_us = graph_time_us(fused, len(x))
        unfused_us = graph_time_us(unfused, len(x))
        moved = moved_bytes(m, n, residual)
        gbps = moved / fused_us / 1e3
        rows.append({"op": "rms_norm_quant" + (" + residual" if residual else ""), "m": m, "n": n,
                     "dtype": "bfloat16", "fused_us": fused_us, "unfused_us": unfused_us,
                     "speedup": unfused_us / fused_us, "bytes": moved, "gbps": gbps, "pct_copy": 100 * gbps / ceiling})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    import cupy as cp

    card = card_name()
    ceiling = copy_ceiling_gbps()["copy_kernel_gbps"]
    print(f"{card}: copy ceiling {ceiling:.0f} GB/s (copy kernel, read + write)")
    print(f"{'op':<28}{'m x n':>14}{'fused us':>10}{'unfused us':>12}{'speedup':>9}{'GB/s':>7}{'% copy':>8}")
    results = []
    for m, n in SHAPES:
        for r in bench_shape(m, n, ceiling):
            results.append(r)
            print(f"{r['op']:<28}{r['m']:>7} x {r['n']:<5}{r['fused_us']:>10.1f}{r['unfused_us']:>12.1f}"
                  f"{r['speedup']:>8.2f}x{r['gbps']:>7.0f}{r['pct_copy']:>7.1f}%", flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    write_report(args.json, card, ceiling, eps=EPS, global_scale=GLOBAL_SCALE, rms_norm_quant=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
