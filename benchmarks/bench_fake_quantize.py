"""Fake quantization on the GPU (issue 16, item 3), against the card's copy
bandwidth in the same run: fake_quantize (one kernel: x read once, the result
written once) vs the unfused pair scaled_fp4_quant then dequantize_fp4 (linear
scales, x's dtype out), bf16 x at 16384 x 16384, 16384 x 7168 and
4096 x 7168, NVFP4 with a device global scale (and MXFP4 at 16384 x 16384).
Targets: >= 90% of the copy ceiling for the bytes it moves (read x + write
x) at 16384^2, and >= 2x faster than the unfused pair. Then TE's variants
at 16384 x 7168: Four Over Six and the RHT under a global amax given as a
device array, 16x16 tiles under that amax's S_enc; against their own
unfused pair (the GPU quantizer then dequantize_fp4; the RHT has no GPU
inverse transform outside the fused kernel, so only its time) and against
plain NVFP4 fake quantization of the same x.

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
VARIANT_SHAPE = (16384, 7168)
AMAX = 4.0  # the given global amax (_inputs' values are standard normal)
VARIANTS = {
    "4over6 MAE": dict(numerics="te", four_over_six=True),
    "4over6 MSE": dict(numerics="te", four_over_six=True, err_mode="MSE"),
    "4over6 fast": dict(numerics="te", four_over_six=True, err_use_fast_math=True),
    "rht": dict(numerics="te", rht=True),
    "te 16x16": dict(numerics="te", tile="16x16"),  # under S_enc of the same amax, as a global scale
}


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


def bench_variant(name: str, ceiling: float, plain_us: float) -> dict:
    import cupy as cp

    import nvfp4_cupy as nv
    from nvfp4_cupy.reference import te

    m, n = VARIANT_SHAPE
    options = VARIANTS[name]
    x = _inputs(m, n, DTYPE)
    amax = cp.asarray(np.array([AMAX], np.float32))
    s_enc = cp.asarray(te.encode_scale_from_amax_te(np.array([AMAX], np.float32)))
    out = cp.empty_like(x[0])
    unfused_out = cp.empty_like(x[0])
    settings = {k: v for k, v in options.items() if k in ("err_mode", "err_use_fast_math")}

    tiles = options.get("tile") == "16x16"
    scalar = dict(global_scale=s_enc) if tiles else dict(global_amax=amax)
    packed, scales = nv.create_fp4_output_tensors(m, n, layout="linear")

    def fused(i):
        nv.fake_quantize(x[i], **scalar, out=out, **options)

    def unfused(i):
        if tiles:
            got = nv.scaled_fp4_quant(x[i], s_enc, layout="linear", out=packed, out_scale=scales, **options)
        else:
            got = nv.scaled_fp4_quant_4over6(x[i], amax, layout="linear", **settings)
        nv.dequantize_fp4(got[0], got[1], s_enc, n=n, layout="linear", dtype=DTYPE, out=unfused_out)

    rht = options.get("rht")
    fused(0)
    if not rht:  # checked before timing, which leaves other inputs' results in the buffers
        unfused(0)
        exact = bool(cp.array_equal(out.view(cp.uint16), unfused_out.view(cp.uint16)))
    fused_us = graph_time_us(fused, len(x))
    row = {"op": "fake_quantize", "variant": name, "m": m, "n": n, "dtype": DTYPE, "fused_us": fused_us,
           "vs_plain": fused_us / plain_us, "pct_copy": 100 * 2 * x[0].nbytes / fused_us / 1e3 / ceiling}
    if not rht:
        # (the quantizer allocates its outputs from CuPy's pool, as bench_te times it)
        row |= {"fused_equals_unfused": exact, "unfused_us": graph_time_us(unfused, len(x))}
        row["speedup"] = row["unfused_us"] / fused_us
    return row


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
    plain_us = next(row["fused_us"] for row in rows if (row["m"], row["n"], row["fmt"]) == (*VARIANT_SHAPE, "nvfp4"))
    print(f"\n{'variant':<13}{'m x n':>14}{'fused us':>10}{'x plain':>9}{'% copy':>8}{'unfused us':>12}"
          f"{'speedup':>9}{'exact':>7}")
    variants = []
    for name in VARIANTS:
        row = bench_variant(name, ceiling, plain_us)
        variants.append(row)
        unfused = (f"{row['unfused_us']:>12.1f}{row['speedup']:>8.2f}x{'yes' if row['fused_equals_unfused'] else 'NO':>7}"
                   if "unfused_us" in row else f"{'-':>12}{'-':>9}{'-':>7}")
        print(f"{name:<13}{row['m']:>7} x {row['n']:<5}{row['fused_us']:>10.1f}{row['vs_plain']:>8.2f}x"
              f"{row['pct_copy']:>7.1f}%{unfused}")
    write_report(args.json, card, ceiling, fake_quantize=rows, fake_quantize_variants=variants)
    return 0 if all(row.get("fused_equals_unfused", True) for row in rows + variants) else 1


if __name__ == "__main__":
    sys.exit(main())
