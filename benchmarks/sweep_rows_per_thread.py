"""Experiment: bandwidth against bytes loaded per thread before any
arithmetic (nvfp4_cupy._compile.LOAD_BYTES_PER_THREAD), to choose it."""

import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nvfp4_cupy as nv  # noqa: E402
from _timing import card_name, copy_ceiling_gbps, graph_time_us, rotation_count  # noqa: E402
from nvfp4_cupy import _compile  # noqa: E402

SHAPES = [(16384, 16384, 16384), (8192, 7152, 7168), (2048, 4096, 4096), (32, 16384, 16384), (1, 4096, 4096)]

ceiling = copy_ceiling_gbps()
print(f"{card_name()}: copy ceiling {ceiling:.0f} GB/s")
for dtype in (cp.float16, cp.float32):
    for m, n, padded_n in SHAPES:
        count = rotation_count(m * n * cp.dtype(dtype).itemsize)
        inputs = [cp.random.standard_normal((m, n), dtype=cp.float32).astype(dtype) for _ in range(count)]
        out, out_scale = nv.create_fp4_output_tensors(m, n, padded_n=padded_n)
        moved = inputs[0].nbytes + out.nbytes + out_scale.nbytes
        cells = []
        for load_bytes in (16, 32, 64, 128):
            _compile.LOAD_BYTES_PER_THREAD = load_bytes
            us = graph_time_us(
                lambda i: nv.scaled_fp4_quant(inputs[i], 10.0, padded_n=padded_n, out=out, out_scale=out_scale), count
            )
            cells.append(f"{load_bytes:>3}B {us:8.1f}us {100 * moved / us / 1e3 / ceiling:5.1f}%")
        print(f"{cp.dtype(dtype).name:>8} {m:>6}x{n:<6}->{padded_n:<6} " + " | ".join(cells))
_compile.LOAD_BYTES_PER_THREAD = 64
