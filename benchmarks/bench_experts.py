"""SiLU-and-mul + quantize and grouped-expert quantization on the GPU
(issue 16, items 2 and 4), against the card's copy bandwidth in the same run:

- silu_and_mul_quant (one pass) vs silu_and_mul then scaled_fp4_quant (two
  launches and a bf16 intermediate), x [m, 2 * 7168] bf16, m = 4096 and
  16384: targets >= 1.8x faster and >= 85% of the copy ceiling for the bytes
  the fused op moves (x read, packed and scales written).
- scaled_fp4_experts_quant: 64 experts, 8192 tokens, n = 7168 bf16, uneven
  counts with some experts empty, a global scale per expert, validate=False
  (no host read), vs the dense scaled_fp4_quant of the same x: target within
  10% of it.

Device times: nvfp4_cupy._bench.graph_time_us (CUDA-graph replays, inputs
rotated over 256 MiB so that they come from HBM, medians).

    python benchmarks/bench_experts.py [--json results.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_cupy._bench import _inputs, card_name, copy_ceiling_gbps, graph_time_us, write_report  # noqa: E402

SILU_SHAPES = ((4096, 7168), (16384, 7168))  # (m, n): x is [m, 2n]
EXPERTS, TOKENS, EXPERT_N = 64, 8192, 7168
EMPTY_EXPERTS = 9


def expert_counts(seed: int = 0) -> np.ndarray:
    """TOKENS split unevenly over EXPERTS (a skewed draw, as routers give),
    EMPTY_EXPERTS of them empty."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, EXPERTS) + 0.05
    weights[rng.choice(EXPERTS, EMPTY_EXPERTS, replace=False)] = 0
    counts = np.floor(weights / weights.sum() * TOKENS).astype(np.int64)
    counts[np.argmax(counts)] += TOKENS - counts.sum()
    return counts


def quantized_bytes(m: int, n: int, layout_rows: int) -> int:
    """packed [m, n / 2] and swizzled scales of layout_rows rows."""
    return m * n // 2 + layout_rows * math.ceil(n / 16 / 4) * 4


def bench_silu(ceiling: float) -> list[dict]:
    import cupy as cp

    import nvfp4_cupy as nv

    rows = []
    gs = cp.asarray(np.array([12.0], np.float32))
    for m, n in SILU_SHAPES:
        x = _inputs(m, 2 * n, "bfloat16")
        fused = graph_time_us(lambda i: nv.silu_and_mul_quant(x[i], gs), len(x))
        unfused = graph_time_us(lambda i: nv.scaled_fp4_quant(nv.silu_and_mul(x[i]), gs), len(x))
        moved = x[0].nbytes + quantized_bytes(m, n, -(-m // 128) * 128)
        gbps = moved / fused / 1e3
        rows.append({"op": "silu_and_mul_quant", "m": m, "n": n, "dtype": "bfloat16", "fused_us": fused,
                     "unfused_us": unfused, "speedup": unfused / fused, "bytes": moved, "gbps": gbps,
                     "pct_copy": 100 * gbps / ceiling})
    return rows


def bench_grouped(ceiling: float) -> list[dict]:
    import cupy as cp

    import nvfp4_cupy as nv

    counts = expert_counts()
    offsets = cp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    x = _inputs(TOKENS, EXPERT_N, "bfloat16")
    gs_experts = cp.asarray(np.linspace(5.0, 50.0, EXPERTS).astype(np.float32))
    gs_one = cp.asarray(np.array([12.0], np.float32))
    grouped = graph_time_us(lambda i: nv.scaled_fp4_experts_quant(x[i], gs_experts, offsets, validate=False), len(x))
    dense = graph_time_us(lambda i: nv.scaled_fp4_quant(x[i], gs_one), len(x))
    scale_rows = int(np.sum(-(-counts // 128) * 128))
    moved = x[0].nbytes + quantized_bytes(TOKENS, EXPERT_N, scale_rows)
    gbps = moved / grouped / 1e3
    row = {"op": "scaled_fp4_experts_quant", "experts": EXPERTS, "empty_experts": EMPTY_EXPERTS, "m": TOKENS,
           "n": EXPERT_N, "dtype": "bfloat16", "counts": counts.tolist(), "grouped_us": grouped, "dense_us": dense,
           "grouped_over_dense": grouped / dense, "bytes": moved, "gbps": gbps, "pct_copy": 100 * gbps / ceiling}
    silu_x = _inputs(TOKENS, 2 * EXPERT_N, "bfloat16")
    silu_grouped = graph_time_us(
        lambda i: nv.silu_and_mul_quant(silu_x[i], gs_experts, expert_offsets=offsets, validate=False), len(silu_x))
    silu_moved = silu_x[0].nbytes + quantized_bytes(TOKENS, EXPERT_N, scale_rows)
    silu_row = {"op": "silu_and_mul_quant (expert_offsets)", "experts": EXPERTS, "m": TOKENS, "n": EXPERT_N,
                "dtype": "bfloat16", "us": silu_grouped, "bytes": silu_moved,
                "pct_copy": 100 * silu_moved / silu_grouped / 1e3 / ceiling}
    return [row, silu_row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    card = card_name()
    ceiling = copy_ceiling_gbps()["copy_kernel_gbps"]
    print(f"{card}: copy ceiling {ceiling:.0f} GB/s")
    silu = bench_silu(ceiling)
    print(f"{'op':<34}{'m x n':>14}{'fused us':>10}{'unfused us':>12}{'speedup':>9}{'% copy':>8}")
    for r in silu:
        print(f"{r['op']:<34}{r['m']:>7} x {r['n']:<5}{r['fused_us']:>10.1f}{r['unfused_us']:>12.1f}"
              f"{r['speedup']:>8.2f}x{r['pct_copy']:>7.1f}%")
    grouped, silu_grouped = bench_grouped(ceiling)
    print(f"scaled_fp4_experts_quant, {EXPERTS} experts ({EMPTY_EXPERTS} empty), {TOKENS} x {EXPERT_N}: "
          f"{grouped['grouped_us']:.1f} us vs dense scaled_fp4_quant {grouped['dense_us']:.1f} us "
          f"({grouped['grouped_over_dense']:.3f}x), {grouped['pct_copy']:.1f}% of copy")
    print(f"silu_and_mul_quant with expert_offsets, same experts, x {TOKENS} x {2 * EXPERT_N}: "
          f"{silu_grouped['us']:.1f} us, {silu_grouped['pct_copy']:.1f}% of copy")
    write_report(args.json, card, ceiling, silu_and_mul_quant=silu, grouped=[grouped, silu_grouped])
    return 0


if __name__ == "__main__":
    sys.exit(main())
