"""The pure parts of `nvfp4-cupy bench --ceilings` on the CPU: the bytes
every benchmark row counts (against the golden model's outputs), the shapes
the ceilings run at, the pattern kernels' launch geometry, and the pattern
kernels themselves compiled by NVRTC through the library's compile path. The
kernels run (and check every byte they write) only in the benchmark, on a
GPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy import reference
from nvfp4_cupy._bench import (
    CEILING_SHAPES,
    PATTERN_BLOCKS_PER_THREAD,
    PATTERN_THREADS,
    _group_configs,
    REDUCE_THREADS,
    REDUCE_VALUES_PER_THREAD,
    ceiling_kernel_names,
    compile_ceilings,
    fp4_bytes,
    pattern_fits,
    pattern_geometry,
    pattern_pct,
)
from nvfp4_cupy._format import NUMPY_DTYPES


@pytest.mark.parametrize("m, n, padded_n", [(1, 16, 32), (3, 40, 64), (130, 7152, 7168), (256, 256, 384)])
@pytest.mark.parametrize("layout", ["swizzled", "linear", "8x4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_bytes_are_the_golden_models_bytes(m, n, padded_n, layout, dtype, fmt):
    x = np.linspace(-3, 3, m * n, dtype=np.float32).reshape(m, n).astype(NUMPY_DTYPES[dtype])
    packed, scales = reference.scaled_fp4_quant(x, None if fmt == "mxfp4" else 1.0, padded_n=padded_n, layout=layout,
                                                fmt=fmt)
    assert fp4_bytes(m, n, padded_n, dtype, layout, fmt) == x.nbytes + packed.nbytes + scales.nbytes


def test_ceiling_shapes():
    """The issue's four shapes, then bf16 inputs of 64, 32, 16 and 8 MiB;
    every one whole tiles for the patterns and the reduce sweep."""
    assert CEILING_SHAPES[:4] == ((16384, 16384), (16384, 7168), (8192, 8192), (4096, 7168))
    assert [m * n * ml_dtypes.bfloat16(0).itemsize // 2**20 for m, n in CEILING_SHAPES[4:]] == [64, 32, 16, 8]
    for m, n in CEILING_SHAPES:
        assert pattern_fits(m, n)
        for values in REDUCE_VALUES_PER_THREAD:
            assert (m * n) % (REDUCE_THREADS * values) == 0


@pytest.mark.parametrize("rows, groups", [(1, 1), (128, 7), (4096, 448), (16384, 256), (2048, 16)])
@pytest.mark.parametrize("threads", [128, 256, 512])
def test_pattern_geometry_covers_every_group_once(rows, groups, threads):
    grid, block = pattern_geometry(rows, groups, threads)
    assert block[0] * block[1] == threads and block[0] & (block[0] - 1) == 0 and grid[2] == block[2] == 1
    assert grid[0] * block[1] >= rows > (grid[0] - 1) * block[1]
    assert grid[1] * block[0] >= groups > (grid[1] - 1) * block[0]


def test_pattern_geometry_is_the_launchers_at_its_thread_count():
    pytest.importorskip("cupy")
    from nvfp4_cupy._runtime.compile import THREADS_PER_BLOCK
    from nvfp4_cupy._runtime.launch import launch_geometry

    for rows, groups in [(1, 1), (128, 7), (4096, 448), (16384, 1024)]:
        grid, block = launch_geometry(rows, groups, columns=16 * groups, what="x")
        assert (tuple(grid), tuple(block)) == pattern_geometry(rows, groups, THREADS_PER_BLOCK)


def test_coalesced_patterns_run_only_where_a_row_holds_whole_warps():
    """dequantize_pattern_coalesced takes a warp's 32 groups as one run of a
    row: a row of 64 blocks has whole warps of groups at 1 and 2 blocks a
    thread (64, 32 groups), not at 4 (16 groups)."""
    configs = _group_configs(128, 16 * 64, 16, lambda per_thread, coalesced: (per_thread, coalesced),
                             lambda i, groups: (), store_mappings=(False, True))
    mappings = [(config["blocks_per_thread"], config["coalesced"]) for config, _ in configs]
    assert len(configs) == len(set(c["label"] for c, _ in configs))
    expected = [(per, coalesced) for per in PATTERN_BLOCKS_PER_THREAD for coalesced in (False, True)
                if not (coalesced and (64 // per) % 32)]
    assert mappings == [m for m in expected for _ in PATTERN_THREADS]
    assert (4, True) not in mappings and (2, True) in mappings


def test_pattern_pct_needs_the_same_bytes():
    pattern = {"bytes": 100, "best": {"us": 2.0}}
    assert pattern_pct({"kind": "k", "bytes": 100, "us": 4.0}, pattern) == 50.0
    with pytest.raises(ValueError, match="moves 99 bytes"):
        pattern_pct({"kind": "k", "bytes": 99, "us": 4.0}, pattern)


@pytest.mark.nvrtc
@pytest.mark.parametrize("compute_capability", [80, 90])
def test_ceiling_kernels_compile_without_spills(compute_capability):
    from nvfp4_cupy._runtime.nvrtc import supported_archs
    from test_compile import ptxas_reports

    if compute_capability not in supported_archs():
        pytest.skip(f"this NVRTC cannot compile for sm_{compute_capability}")
    program = compile_ceilings(compute_capability, ("-Xptxas=-v",))
    names = ceiling_kernel_names()
    assert len(program.lowered_names) == len(names) == len(set(program.lowered_names))
    assert all(lowered.encode() in program.image for lowered in program.lowered_names)
    # ptxas's per-function report (NVRTC 13.0 may leave it out: then nothing to check).
    spilling = {name: line for name, (nonzero, line) in ptxas_reports(program.log).items() if nonzero}
    assert not spilling, spilling
