"""The benchmark: the quantizer against the card's own copy bandwidth, in one
run on one card (`nvfp4-cupy bench`, or benchmarks/bench_quantize.py).

Device times come from CUDA events around CUDA-graph replays of 20 launches
(warm-up first, medians of 15 replays), with inputs rotated over 256 MiB so
they come from HBM, not L2. Bytes moved = input read once + packed and scales
written once. Host overhead is measured separately, with the GPU waiting on
the host. `--ceilings` adds each kernel's own ceiling: a kernel with no
arithmetic that moves the same bytes the same way (cuda_src/bench_ceilings.cu),
timed the same way.

CuPy is imported inside the functions that measure, so that `nvfp4-cupy
bench` without a GPU (or without CuPy) is one error line, and the PyTorch
baseline (torch_quantize) runs on a CPU for its test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._cli import UserError, gpu_unavailable_reason
from ._format import BLOCK_SIZE, NUMPY_DTYPES, SUPPORTED_DTYPES, block_size_of, quantized_shapes, round_up

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
        for i in range(max(3, buffers)):  # compile, load, first touch of every input (launches prepared on first use)
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


def card_name() -> str:
    """The current CUDA device's name, as benchmark reports print it."""
    import cupy as cp

    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()


def card_and_copy_ceiling() -> tuple[str, float]:
    """(card_name(), the copy kernel's GB/s): the head of a benchmark's report."""
    return card_name(), copy_ceiling_gbps()["copy_kernel_gbps"]


def write_report(path, card: str, ceiling_gbps: float, **results) -> None:
    """A benchmark's --json file, when asked for: the card, the copy
    ceiling of the same run and the benchmark's own results."""
    if path:
        path.write_text(json.dumps({"card": card, "copy_ceiling_gbps": ceiling_gbps, **results}, indent=1))


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


def fp4_bytes(m: int, n: int, padded_n: int, dtype: str, layout: str = "swizzled", fmt: str = "nvfp4") -> int:
    """x [m, n] in `dtype` plus its FP4 form (packed values and the layout's
    scale tensor, shaped as the launcher shapes them): the bytes a
    quantization moves (x read, the rest written) and a dequantization too
    (the other way round)."""
    packed_shape, scale_shape = quantized_shapes((m, n), padded_n, True, layout, "one", fmt)
    return m * n * NUMPY_DTYPES[dtype].itemsize + math.prod(packed_shape) + math.prod(scale_shape)


def _row(kind, m, n, padded_n, dtype, us, moved, ceiling, layout="swizzled") -> dict:
    gbps = moved / us / 1e3
    return {"kind": kind, "m": m, "n": n, "padded_n": padded_n, "dtype": dtype, "layout": layout,
            "us": us, "bytes": moved, "gbps": gbps, "pct_ceiling": 100 * gbps / ceiling}


def _inputs(m: int, n: int, dtype: str) -> list:
    import cupy as cp

    one = m * n * np.dtype(cp.float32).itemsize
    count = max(2, min(16, -(-L2_ROTATION_BYTES // max(one, 1))))
    base = cp.random.standard_normal((m, n), dtype=cp.float32)
    return [(base * (1 + 0.01 * i)).astype(NUMPY_DTYPES[dtype]) for i in range(count)]


def bench_quantizer(m, n, padded_n, dtype, layout, ceiling, inputs=None) -> dict:
    """`inputs`: the rotated inputs (default _inputs(m, n, dtype))."""
    import cupy as cp

    from . import create_fp4_output_tensors, scaled_fp4_quant

    inputs = _inputs(m, n, dtype) if inputs is None else inputs
    out, out_scale = create_fp4_output_tensors(m, n, padded_n=padded_n, layout=layout)
    us = graph_time_us(
        lambda i: scaled_fp4_quant(inputs[i], 10.0, padded_n=padded_n, layout=layout, out=out, out_scale=out_scale),
        len(inputs),
    )
    row = _row("fused", m, n, padded_n, dtype, us, fp4_bytes(m, n, padded_n, dtype, layout), ceiling, layout)
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
         fp4_bytes(m, n, padded_n, "bfloat16"), 1),
        ("global scale", lambda i: compute_global_scale(x[i]), x[0].nbytes, len(x)),
        ("mxfp4 quantize", lambda i: scaled_fp4_quant(x[i], None, padded_n=padded_n, out=mx_out, out_scale=mx_scale,
                                                       fmt="mxfp4"), fp4_bytes(m, n, padded_n, "bfloat16", fmt="mxfp4"),
         len(x)),
    )
    return [_row(kind, m, n, padded_n, "bfloat16", graph_time_us(launch, buffers), moved, ceiling)
            for kind, launch, moved, buffers in cases]


# --ceilings: each kernel against a kernel with no arithmetic that moves the
# same bytes the same way (cuda_src/bench_ceilings.cu), timed like it.
# (m, n): the shapes, then bf16 inputs of 64, 32, 16 and 8 MB.
CEILING_SHAPES = ((16384, 16384), (16384, 7168), (8192, 8192), (4096, 7168),
                  (8192, 4096), (4096, 4096), (4096, 2048), (2048, 2048))
CEILINGS_SOURCE = "bench_ceilings.cu"
PATTERN_THREADS = (128, 256, 512)  # thread block sizes swept (quantize and dequantize patterns)
PATTERN_BLOCKS_PER_THREAD = (1, 2, 4)  # scale blocks a thread takes
REDUCE_THREADS = 256
REDUCE_VALUES_PER_THREAD = (16, 32, 64, 128)
REDUCE_CTAS_PER_SM = (None, 4, 8)  # None: one tile per thread block, no grid-stride loop
GUARD_BYTES = 4096  # after each output a pattern writes: it must stay untouched
# The quantize patterns: (name, input dtype, format); kernel rows name their pattern.
QUANTIZE_PATTERNS = (("quantize 16-bit", "bfloat16", "nvfp4"), ("quantize fp32", "float32", "nvfp4"),
                     ("mxfp4 quantize 16-bit", "bfloat16", "mxfp4"))
DEQUANTIZE_PATTERNS = (("dequantize to 16-bit", 2), ("dequantize to fp32", 4))
REDUCE_PATTERN = "reduce 16-bit"
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def quantize_pattern_name(input_bytes: int, block_values: int, blocks_per_thread: int) -> str:
    return f"bench::quantize_pattern<{input_bytes}, {block_values}, {blocks_per_thread}>"


def reduce_pattern_name(values_per_thread: int, interleaved: bool) -> str:
    return f"bench::reduce_pattern<{REDUCE_THREADS}, {values_per_thread}, {'true' if interleaved else 'false'}>"


def dequantize_pattern_name(output_bytes: int, blocks_per_thread: int, coalesced: bool = False) -> str:
    kernel = "dequantize_pattern_coalesced" if coalesced else "dequantize_pattern"
    return f"bench::{kernel}<{output_bytes}, {blocks_per_thread}>"


def ceiling_kernel_names() -> tuple[str, ...]:
    """Every kernel of bench_ceilings.cu the benchmark launches."""
    return (
        tuple(quantize_pattern_name(NUMPY_DTYPES[dtype].itemsize, block_size_of(fmt), per_thread)
              for _, dtype, fmt in QUANTIZE_PATTERNS for per_thread in PATTERN_BLOCKS_PER_THREAD)
        + tuple(reduce_pattern_name(values, interleaved)
                for values in REDUCE_VALUES_PER_THREAD for interleaved in (False, True))
        + tuple(dequantize_pattern_name(output_bytes, per_thread, coalesced)
                for _, output_bytes in DEQUANTIZE_PATTERNS for per_thread in PATTERN_BLOCKS_PER_THREAD
                for coalesced in (False, True))
    )


def compile_ceilings(compute_capability: int, extra_options: tuple[str, ...] = ()):
    """bench_ceilings.cu for a GPU of this compute capability, through the
    library's NVRTC path and options (no GPU needed: the CPU tests use it)."""
    from ._runtime.compile import SOFTWARE, compile_options, kernel_source, nvrtc_arch
    from ._runtime.nvrtc import compile_program, supported_archs

    arch = nvrtc_arch(SOFTWARE, compute_capability, supported_archs())
    return compile_program(kernel_source(CEILINGS_SOURCE), CEILINGS_SOURCE, ceiling_kernel_names(),
                           (*compile_options(SOFTWARE, arch), *extra_options))


def pattern_geometry(rows: int, groups: int, threads: int) -> tuple[tuple, tuple]:
    """launch_geometry's mapping with `threads` threads a thread block: x
    over a row's groups of blocks (a power of two), y over rows."""
    threads_x = min(threads, 1 << max(groups - 1, 0).bit_length())
    threads_y = threads // threads_x
    return (-(-rows // threads_y), -(-groups // threads_x), 1), (threads_x, threads_y, 1)


def pattern_fits(m: int, n: int) -> bool:
    """The patterns write no layout padding and take up to 4 blocks of 32
    values a thread: whole 128-row tiles, n a multiple of 128."""
    return m % 128 == 0 and n % 128 == 0


def pattern_pct(row: dict, pattern: dict) -> float:
    """A kernel row's GB/s as a percentage of its pattern ceiling's, both for
    the same bytes."""
    if row["bytes"] != pattern["bytes"]:
        raise ValueError(f"{row['kind']} moves {row['bytes']} bytes, its pattern {pattern['bytes']}")
    return 100 * pattern["best"]["us"] / row["us"]


def _guarded(nbytes: int):
    import cupy as cp

    return cp.empty(nbytes + GUARD_BYTES, dtype=cp.uint8)


def _guard_intact(buffer, nbytes: int, fill: int) -> bool:
    return bool((buffer[nbytes:] == fill).all())


def _sweep(what: str, configs: list, moved: int, buffers: int, check) -> dict:
    """Each (config, launch) checked by check(launch) (None or what is wrong:
    such a config is reported, not timed), then timed; the fastest kept."""
    sweep = []
    for config, launch in configs:
        problem = check(launch)
        if problem:
            print(f"  {what}, {config['label']}: FAILED its check ({problem}), not timed", flush=True)
            sweep.append({**config, "error": problem})
            continue
        us = graph_time_us(launch, buffers)
        sweep.append({**config, "us": us, "gbps": moved / us / 1e3})
    timed = [entry for entry in sweep if "us" in entry]
    return {"bytes": moved, "best": min(timed, key=lambda entry: entry["us"]) if timed else None, "sweep": sweep}


def _group_configs(m: int, n: int, block_values: int, kernel_for, arguments, store_mappings=(False,)) -> list:
    """(config, launch(i)) for the quantize and dequantize patterns: every
    blocks per thread, store mapping (coalesced or not; kernel_for(blocks
    per thread, coalesced) is its kernel) and thread count; arguments(i,
    groups) are the kernel's for input i. A coalesced kernel needs a row's
    groups in whole warps."""
    configs = []
    for per_thread in PATTERN_BLOCKS_PER_THREAD:
        groups = n // (block_values * per_thread)
        for coalesced in store_mappings:
            if coalesced and groups % 32:
                continue
            kernel = kernel_for(per_thread, coalesced)
            for threads in PATTERN_THREADS:
                grid, cta = pattern_geometry(m, groups, threads)
                label = (f"{per_thread} block{'s' * (per_thread > 1)}/thread, {threads} threads"
                         + ", coalesced stores" * coalesced)
                configs.append(({"blocks_per_thread": per_thread, "threads": threads, "coalesced": coalesced,
                                 "label": label},
                                lambda i, kernel=kernel, groups=groups, grid=grid, cta=cta: kernel(
                                    grid, cta, arguments(i, groups))))
    return configs


def _quantize_ceiling(kernels, x: list, m: int, n: int, fmt: str) -> dict:
    import cupy as cp

    from .reference import unswizzle_scales

    dtype = np.dtype(x[0].dtype).name
    itemsize, block = x[0].itemsize, block_size_of(fmt)
    packed_shape, scale_shape = quantized_shapes((m, n), n, True, "swizzled", "one", fmt)
    packed_bytes, scale_bytes = math.prod(packed_shape), math.prod(scale_shape)
    packed, scales = _guarded(packed_bytes), _guarded(scale_bytes)
    # What the kernels write (see quantize_pattern): packed word p is the xor
    # of the input words of its 8 values, a block's scale byte the low byte
    # of its first packed word.
    words = x[0].view(cp.uint32).ravel()
    fold = 2 * itemsize
    want_packed = words[0::fold].copy()
    for f in range(1, fold):
        want_packed ^= words[f::fold]
    want_scales = cp.asnumpy(want_packed[:: block // 8] & 0xFF).astype(np.uint8).reshape(m, n // block)
    want_packed = want_packed.view(cp.uint8)

    def check(launch):
        packed.fill(0xA5)
        scales.fill(0xA5)
        launch(0)
        if not bool((packed[:packed_bytes] == want_packed).all()):
            return "packed bytes differ"
        got = unswizzle_scales(cp.asnumpy(scales[:scale_bytes]), m, n, "swizzled", fmt)
        if not np.array_equal(got, want_scales):
            return "scale bytes differ"
        if not (_guard_intact(packed, packed_bytes, 0xA5) and _guard_intact(scales, scale_bytes, 0xA5)):
            return "wrote past its outputs"
        return None

    configs = _group_configs(
        m, n, block, lambda per_thread, _: kernels[quantize_pattern_name(itemsize, block, per_thread)],
        lambda i, groups: (x[i], np.int32(m), np.int32(groups), np.int32(scale_shape[1]), packed, scales))
    return _sweep(f"{fmt} quantize pattern, {dtype}, {m} x {n}", configs, fp4_bytes(m, n, n, dtype, "swizzled", fmt),
                  len(x), check)


def _reduce_ceiling(kernels, x: list, sm_count: int) -> dict:
    import cupy as cp

    vectors = x[0].nbytes // 16
    result = cp.zeros(1, dtype=cp.uint32)
    xor = cp.ReductionKernel("uint32 x", "uint32 y", "x", "a ^ b", "y = a", "0", "bench_xor_words")
    want = int(xor(x[0].view(cp.uint32).ravel()))

    def check(launch):
        result.fill(0)
        launch(0)
        return None if int(result[0]) == want else "the xor of the words read is not the xor of x"

    configs = []
    for values in REDUCE_VALUES_PER_THREAD:
        tile_vectors = REDUCE_THREADS * values // 8
        if vectors % tile_vectors:
            continue
        tiles = vectors // tile_vectors
        for interleaved in (False, True):
            kernel = kernels[reduce_pattern_name(values, interleaved)]
            grids = set()
            for per_sm in REDUCE_CTAS_PER_SM:
                grid = tiles if per_sm is None else min(tiles, per_sm * sm_count)
                if grid in grids:  # few tiles: grid-stride is one tile per thread block
                    continue
                grids.add(grid)
                label = (f"{values} values/thread, {'interleaved' if interleaved else 'consecutive'}, "
                         + ("one tile per thread block" if per_sm is None else f"grid-stride {per_sm} per SM")
                         + f", {REDUCE_THREADS} threads")
                configs.append(({"values_per_thread": values, "interleaved": interleaved, "ctas_per_sm": per_sm,
                                 "grid": grid, "threads": REDUCE_THREADS, "label": label},
                                lambda i, kernel=kernel, grid=grid, tiles=tiles: kernel(
                                    (grid,), (REDUCE_THREADS,), (x[i], np.int64(tiles), result))))
    return _sweep(f"reduce pattern, {x[0].shape[0]} x {x[0].shape[1]}", configs, x[0].nbytes, len(x), check)


def _dequantize_ceiling(kernels, packs: list, m: int, n: int, dtype: str) -> dict:
    """packs: (packed, scales) of NVFP4 tensors [m, n], swizzled."""

    output_bytes = NUMPY_DTYPES[dtype].itemsize
    out_bytes = m * n * output_bytes
    out = _guarded(out_bytes)
    scale_cols = packs[0][1].shape[1]

    def check(launch):
        # Every byte written, and written the same way twice, whatever the
        # buffer held before; nothing past the output.
        out.fill(0)
        launch(0)
        first = out.copy()
        out.fill(0xFF)
        launch(0)
        if not bool((out[:out_bytes] == first[:out_bytes]).all()):
            return "left output bytes unwritten"
        if not (_guard_intact(first, out_bytes, 0) and _guard_intact(out, out_bytes, 0xFF)):
            return "wrote past its output"
        return None

    configs = _group_configs(
        m, n, BLOCK_SIZE,
        lambda per_thread, coalesced: kernels[dequantize_pattern_name(output_bytes, per_thread, coalesced)],
        lambda i, groups: (packs[i][0], packs[i][1], np.int32(m), np.int32(groups), np.int32(scale_cols), out),
        store_mappings=(False, True))
    return _sweep(f"dequantize pattern, {dtype}, {m} x {n}", configs, fp4_bytes(m, n, n, dtype), len(packs), check)


def _ceiling_kernels():
    """bench_ceilings.cu loaded on the current device: (module, name -> function)."""
    import cupy as cp
    from cupy.cuda import function

    program = compile_ceilings(int(cp.cuda.Device().compute_capability))
    module = function.Module()
    module.load(program.image)
    return module, {name: module.get_function(lowered)
                    for name, lowered in zip(ceiling_kernel_names(), program.lowered_names)}


def ceilings_at(m: int, n: int, kernels, sm_count: int, ceiling: float) -> dict:
    """At x [m, n]: every pattern ceiling, and the library's kernels it bounds
    (each row with its pattern, the pattern's GB/s and % of it), on the same
    rotated inputs."""
    import cupy as cp

    from . import create_fp4_output_tensors, dequantize_fp4, scaled_fp4_quant
    from .ops.global_scale import prepare_global_scale

    if not pattern_fits(m, n):
        raise ValueError(f"the pattern ceilings need m % 128 == 0 and n % 128 == 0, got {m} x {n}")
    x16, x32 = _inputs(m, n, "bfloat16"), _inputs(m, n, "float32")
    patterns = {}
    for name, dtype, fmt in QUANTIZE_PATTERNS:
        patterns[name] = _quantize_ceiling(kernels, x16 if dtype == "bfloat16" else x32, m, n, fmt)
    patterns[REDUCE_PATTERN] = _reduce_ceiling(kernels, x16, sm_count)
    packs = [scaled_fp4_quant(xi, 10.0) for xi in x16]
    for name, output_bytes in DEQUANTIZE_PATTERNS:
        patterns[name] = _dequantize_ceiling(kernels, packs, m, n, "bfloat16" if output_bytes == 2 else "float32")

    rows = []

    def add(kind, pattern, row):
        row = {**row, "kind": kind, "pattern": pattern}
        best = patterns[pattern]["best"]
        if best is not None:
            row["pattern_gbps"] = best["gbps"]
            row["pct_pattern"] = pattern_pct(row, patterns[pattern])
        rows.append(row)

    add("quantize bf16", "quantize 16-bit", bench_quantizer(m, n, n, "bfloat16", "swizzled", ceiling, inputs=x16))
    add("quantize fp32", "quantize fp32", bench_quantizer(m, n, n, "float32", "swizzled", ceiling, inputs=x32))
    del x32
    mx_out, mx_scale = create_fp4_output_tensors(m, n, fmt="mxfp4")
    us = graph_time_us(lambda i: scaled_fp4_quant(x16[i], None, out=mx_out, out_scale=mx_scale, fmt="mxfp4"), len(x16))
    add("mxfp4 quantize bf16", "mxfp4 quantize 16-bit",
        _row("mxfp4 quantize", m, n, n, "bfloat16", us, fp4_bytes(m, n, n, "bfloat16", fmt="mxfp4"), ceiling))

    def global_scale(prepared: dict):
        # compute_global_scale's launch, prepared once per input on the
        # timing stream (graph_time_us warms every input up before capture).
        def launch(i):
            if i not in prepared:
                prepared[i] = prepare_global_scale(x16[i], False, None, None)  # (launch, result): both kept
            prepared[i][0]()
        return launch

    us = graph_time_us(global_scale({}), len(x16))
    add("global scale bf16", REDUCE_PATTERN, _row("global scale", m, n, n, "bfloat16", us, x16[0].nbytes, ceiling))
    gs = cp.asarray([10.0], dtype=cp.float32)
    for dtype, pattern in (("bfloat16", "dequantize to 16-bit"), ("float16", "dequantize to 16-bit"),
                           ("float32", "dequantize to fp32")):
        out = cp.empty((m, n), dtype=NUMPY_DTYPES[dtype])
        us = graph_time_us(lambda i: dequantize_fp4(packs[i][0], packs[i][1], gs, n=n, dtype=out.dtype, out=out),
                           len(packs))
        add(f"dequantize to {_SHORT[dtype]}", pattern, _row("dequantize", m, n, n, dtype, us, fp4_bytes(m, n, n, dtype),
                                                           ceiling))
    for pattern in patterns.values():
        if pattern["best"] is not None:
            pattern["best"]["pct_copy"] = 100 * pattern["best"]["gbps"] / ceiling
    return {"m": m, "n": n, "patterns": patterns, "kernels": rows}


def bench_ceilings(ceiling: float, shapes=CEILING_SHAPES) -> dict:
    """The --ceilings section: printed as it goes, returned for the JSON."""
    import cupy as cp

    started = time.perf_counter()
    module, kernels = _ceiling_kernels()  # the module stays loaded while its kernels run
    sm_count = cp.cuda.Device().attributes["MultiProcessorCount"]
    print(f"\nceilings: each kernel against a kernel with no arithmetic that moves the same bytes the same way "
          f"(best of a sweep; config shown); copy ceiling {ceiling:.0f} GB/s")
    print(f"{'kernel':<20} {'us':>8} {'GB/s':>6} {'%copy':>6} | {'pattern ceiling':<22} {'us':>8} {'GB/s':>6} "
          f"{'%copy':>6} | {'%ceil':>6}  ceiling config")
    shapes_out = []
    for m, n in shapes:
        at = ceilings_at(m, n, kernels, sm_count, ceiling)
        shapes_out.append(at)
        print(f"{m} x {n} (bf16 x {m * n * 2 / 2**20:.0f} MiB), copy ceiling {ceiling:.0f} GB/s:")
        for r in at["kernels"]:
            best = at["patterns"][r["pattern"]]["best"]
            if best is None:
                ceiling_part, pct = f"{r['pattern']:<22} {'(every config failed its check)':>22}", "     -"
            else:
                ceiling_part = f"{r['pattern']:<22} {best['us']:>8.1f} {best['gbps']:>6.0f} {best['pct_copy']:>6.1f}"
                pct = f"{r['pct_pattern']:>6.1f}  {best['label']}"
            kernel_part = f"{r['kind']:<20} {r['us']:>8.1f} {r['gbps']:>6.0f} {r['pct_ceiling']:>6.1f}"
            print(f"{kernel_part} | {ceiling_part} | {pct}", flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    print(f"ceilings took {time.perf_counter() - started:.0f} s")
    del module
    return {"copy_gbps": ceiling, "launches_per_graph": LAUNCHES_PER_GRAPH, "sm_count": sm_count, "shapes": shapes_out}


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
    moved = fp4_bytes(m, n, padded_n, "bfloat16")
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
        rows.append({**_row(label, m, n, padded_n, "bfloat16", statistics.median(times), moved, ceiling),
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
    parser.add_argument("--ceilings", action="store_true",
                        help="each kernel against its pattern ceiling, a kernel with no arithmetic that moves the same "
                             "bytes the same way, at eight shapes; alone: only that (and the copy ceiling), with "
                             "--quick: after the quick run")
    args = parser.parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason:
        raise UserError(f"the benchmark needs a CUDA GPU and CuPy ({reason})")
    for path in (args.json, args.png):  # found out now, not after minutes of measuring
        if not path.parent.is_dir():
            raise UserError(f"cannot write {path}: {path.parent} is not a directory")
    import cupy as cp

    device = cp.cuda.Device()
    card = card_name()
    copies = copy_ceiling_gbps()
    ceiling = max(copies.values())
    print(f"card {card} (sm_{device.compute_capability}), CuPy {cp.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"copy ceiling {ceiling:.0f} GB/s, read + write (copy kernel {copies['copy_kernel_gbps']:.0f}, "
          f"cudaMemcpyAsync {copies['memcpy_gbps']:.0f})")
    report = {"card": card, "cupy": cp.__version__, "date": time.strftime("%Y-%m-%d"), "ceiling_gbps": ceiling,
              "copies": copies}
    results = []
    if args.quick or not args.ceilings:
        results, host, first = _kernels_host_first_call(args, ceiling)
        report.update(results=results, host=host, first_call=first)
    if args.ceilings:
        report["ceilings"] = bench_ceilings(ceiling)
    args.json.write_text(json.dumps(report, indent=1))
    plotted = bool(results) and plot(results, ceiling, card, args.png)
    print(f"wrote {args.json}" + (f" and {args.png}" if plotted else " (no matplotlib: no plot)" if results else ""))
    return 0


def _kernels_host_first_call(args, ceiling: float) -> tuple[list, dict, dict]:
    """The benchmark without --ceilings: the quantizer over SHAPES (or
    QUICK_SHAPES), its neighbours, the torch baseline, host overhead and the
    first call."""
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
    return results, host, first


def main(argv=None) -> int:
    """benchmarks/bench_quantize.py: the same as `nvfp4-cupy bench`."""
    from ._cli import main as cli

    return cli(["bench", *(sys.argv[1:] if argv is None else argv)])
