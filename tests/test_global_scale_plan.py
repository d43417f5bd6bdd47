"""How compute_global_scale cuts its work, without a GPU: split_work's
invariants, and a model of the kernel's index arithmetic (a transcription
of cuda_src/global_scale.cu's loops, lane by lane) that checks, for plans
made by the launcher, that every value of x is read exactly once and
nothing else is, and that the finishing protocol (per-row pieces meeting in
the workspace, the last thread block converting) gives the golden model's
scales and leaves the workspace zero."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import import_cupy

import_cupy()  # the launcher needs CuPy (not a GPU)

from nvfp4_cupy import reference as ref  # noqa: E402
from nvfp4_cupy._runtime.arrays import CUPY, Array  # noqa: E402
from nvfp4_cupy._runtime.launch import MAX_INDEX  # noqa: E402
from nvfp4_cupy.ops import global_scale as gsm  # noqa: E402

WARPS = (8, 64, 1056, 4224)  # a tiny GPU ... an H200 (132 SMs)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("per_row", [False, True])
def test_split_work_invariants(itemsize, per_row):
    lane_values = gsm.LOADS_PER_STEP * 16 // itemsize
    for warps in WARPS:
        for rows in (1, 2, 7, warps - 1, warps, warps + 1, 100_000, MAX_INDEX):
            for n in (0, 1, 15, 16, 64, 65, 2047, 2048, 2049, 7152, 70_003, 2**20, 2**33 // rows + 1):
                work = gsm.split_work(rows, n, itemsize, per_row, warps)
                lanes, segment, segments = work.lanes_per_item, work.segment, work.segments
                where = f"rows={rows} n={n} warps={warps}: {work}"
                assert lanes in (1, 2, 4, 8, 16, 32), where
                assert rows * segments <= MAX_INDEX, where
                assert segments >= 1 and (segments - 1) * segment < max(n, 1) <= segments * segment, where
                if lanes < 32:
                    assert segments == 1 and n <= lanes * lane_values, where
                if segments > 1:
                    assert segment % (32 * lane_values) == 0, where  # pieces start on a warp step
                    if per_row:
                        assert rows < warps, where  # workspace pairs: one per split row
                assert 1 <= work.blocks <= warps // gsm.WARPS_PER_BLOCK, where
    assert gsm.workspace_words(4224) == 2 + 2 * 4224


def _array(host: np.ndarray, view, pointer_offset: int = 0):
    """(Array over a fake address, x as NumPy, offset of x's first value in host)."""
    x = host[view]
    first = (x.__array_interface__["data"][0] - host.__array_interface__["data"][0]) // host.itemsize
    address = 1 << 20
    return Array(None, address + first * host.itemsize + pointer_offset, x.shape, x.strides, x.dtype, 0,
                 host.itemsize), x, first


def _abs_bits(values: np.ndarray) -> int:
    """max over float32 bits of |v|: NaN above inf, the kernel's order."""
    if not values.size:
        return 0
    return int((values.astype(np.float32).view(np.uint32) & 0x7FFFFFFF).max())


def _scale(amax: int) -> np.float32:
    if amax == 0:
        return np.float32(1)
    if amax > 0x7F800000:
        return np.uint32(0x7FC00000).view(np.float32)
    with np.errstate(over="ignore", divide="ignore"):
        gs = np.float32(2688) / np.uint32(amax).view(np.float32)
    return min(gs, np.float32(np.finfo(np.float32).max))


def _lane_reads(begin, end, rank, width, per_vector, vectors):
    """Value indices (in the row) one lane reads for one item."""
    reads = []

    def elements(start):
        base = start + rank
        while base < end:
            reads.extend(base + width * j for j in range(16) if width * j < end - base)
            base += width * 16

    if not vectors:
        elements(begin)
        return reads
    last = end // per_vector
    stride = width * gsm.LOADS_PER_STEP
    first = begin // per_vector + rank
    while first + stride - width < last:  # unguarded steps
        reads.extend(v * per_vector + k for u in range(gsm.LOADS_PER_STEP)
                     for v in [first + width * u] for k in range(per_vector))
        first += stride
    if first < last:  # the guarded step
        reads.extend(v * per_vector + k for u in range(gsm.LOADS_PER_STEP)
                     for v in [first + width * u] if v < last for k in range(per_vector))
    if last * per_vector < end:
        elements(last * per_vector)
    return reads


def _run_kernel(plan, array, flat: np.ndarray, first: int, warps: int):
    """The kernel on `flat` (the allocation as NumPy): (result, read counts, workspace)."""
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % 16 == 0]
    p = kernel.static
    lanes, segments, segment = p["lanes_per_item"], p["segments"], p["segment"]
    per_vector = 16 // array.itemsize
    blocks = kernel.grid[0]
    items = p["rows"] * segments
    per_warp = 32 // lanes
    stride = blocks * gsm.WARPS_PER_BLOCK * per_warp
    reads = np.zeros(flat.size, np.int64)
    workspace = [0] * gsm.workspace_words(warps)
    result = np.full(plan.scales, np.nan, np.float32)
    block_amax = []
    for block in range(blocks):
        amax = 0
        for warp in range(gsm.WARPS_PER_BLOCK):
            for base in range((block * gsm.WARPS_PER_BLOCK + warp) * per_warp, items, stride):
                for group in range(per_warp):
                    item = base + group
                    if item >= items:
                        continue
                    row, piece = divmod(item, segments)
                    begin = piece * segment
                    end = min(begin + segment, p["n"])
                    start = first + row * p["row_stride"]
                    if kernel.variant.vector_loads:
                        assert (array.pointer + (start - first) * array.itemsize) % 16 == 0
                        assert begin % per_vector == 0
                    index = [start + c for rank in range(lanes)
                             for c in _lane_reads(begin, end, rank, lanes, per_vector, kernel.variant.vector_loads)]
                    assert all(0 <= c - start < p["n"] for c in index)
                    np.add.at(reads, index, 1)
                    item_amax = _abs_bits(flat[index])
                    if not p["per_row"]:
                        amax = max(amax, item_amax)
                    elif segments == 1:
                        result[row] = _scale(item_amax)
                    else:
                        pair = 2 + 2 * row
                        workspace[pair] = max(workspace[pair], item_amax)
                        workspace[pair + 1] += 1
                        if workspace[pair + 1] == segments:
                            result[row] = _scale(workspace[pair])
                            workspace[pair] = workspace[pair + 1] = 0
        block_amax.append(amax)
    if not p["per_row"]:
        if blocks == 1:
            result[0] = _scale(block_amax[0])
        else:
            for amax in block_amax:
                workspace[0] = max(workspace[0], amax)
                workspace[1] += 1
                if workspace[1] == blocks:
                    result[0] = _scale(workspace[0])
                    workspace[0] = workspace[1] = 0
    return result, reads, workspace


def _views(rng):
    cases = []
    for dtype in (np.float16, np.float32):
        for m, n in ((0, 16), (3, 0), (1, 1), (1, 17), (2, 64), (5, 65), (7, 130), (3, 2048), (3, 2049),
                     (2, 5000), (40, 700), (1, 40_000), (9, 4100), (130, 33)):
            host = rng.standard_normal((m, n)).astype(dtype)
            if host.size:
                host.reshape(-1)[rng.integers(host.size)] = rng.choice([np.nan, np.inf, 1e-40, 0.0])
            label = f"{dtype.__name__} [{m}, {n}]"
            cases.append((label, host, (slice(None),) * 2, 0))
            cases.append((f"{label} misaligned", host, (slice(None),) * 2, 2))
            if m > 1 and n > 3:
                cases.append((f"{label}[:, 1:-1]", host, (slice(None), slice(1, n - 1)), 0))
                cases.append((f"{label}[::2, :-2]", host, (slice(None, None, 2), slice(0, n - 2)), 0))
    return cases


@pytest.mark.parametrize("per_row", [False, True])
def test_the_kernel_reads_every_value_once_and_finishes_right(per_row):
    rng = np.random.default_rng(1)
    for label, host, view, offset in _views(rng):
        array, x, first = _array(host, view, offset)
        for warps in (8, 64, 1000):
            plan = gsm._make_plan(CUPY, array, per_row, warps)
            if not plan.scales:
                assert per_row and x.shape[0] == 0
                continue
            flat = host.reshape(-1)
            for call in range(2):  # the workspace is zero at rest: a second call finishes the same way
                result, reads, workspace = _run_kernel(plan, array, flat, first, warps)
                where = f"{label} per_row={per_row} warps={warps} call {call}"
                assert not any(workspace), where
                want = ref.compute_global_scale(x, per_row=per_row)
                assert np.array_equal(result.view(np.uint32), want.view(np.uint32)), (where, result, want)
            expected = np.zeros(flat.size, np.int64)
            if x.size:
                np.add.at(expected, np.arange(flat.size).reshape(host.shape)[view].reshape(-1), 1)
            assert np.array_equal(reads, expected), where
