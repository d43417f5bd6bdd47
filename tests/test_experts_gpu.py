"""Expert quantization on the GPU (cuda_src/experts.cu, ops/experts.py)
against the golden model (reference.fused), byte for byte, every output
allocated poisoned (twice, with different bytes): tokens sorted by expert
(scaled_fp4_experts_quant: uneven counts, empty experts, E = 1, all tokens on
one expert, rows of no expert, no experts, no tokens), the masked batch
(scaled_fp4_masked_quant), their SiLU-and-mul forms, validate=False's
sanitized offsets and counts; the grouped bytes against a per-expert loop of
our own GPU scaled_fp4_quant placed at blockscale_offsets; every refusal,
raised before anything is allocated; the torch entry points, eager, as
torch.ops and under torch.compile."""

from __future__ import annotations

import contextlib
from functools import partial

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, poisoned_allocations
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES
from nvfp4_cupy._format import LAYOUTS, round_up
from nvfp4_cupy.reference import fused as golden

pytestmark = pytest.mark.gpu
cp = import_cupy()

import nvfp4_cupy as nv  # noqa: E402  (after the CuPy skip)


# ---------------------------------------------------------------------------
# Poisoned outputs (shared with test_silu_and_mul_gpu.py)
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def counted_allocations():
    """[count] of CuPy allocations made in the block."""
    pool = cp.get_default_memory_pool()
    count = [0]

    def malloc(size):
        count[0] += 1
        return pool.malloc(size)

    cp.cuda.set_allocator(malloc)
    try:
        yield count
    finally:
        cp.cuda.set_allocator(pool.malloc)


def run_poisoned(call) -> tuple:
    """call() -> CuPy outputs, run under each of POISONS; the runs must agree
    byte for byte (an unwritten byte cannot). Returns host copies."""
    runs = []
    for poison in POISONS:
        with poisoned_allocations(poison):
            outputs = call()
        runs.append(tuple(cp.asnumpy(o) for o in outputs))
    for i, (a, b) in enumerate(zip(*runs)):
        assert_bytes_equal(a.view(np.uint8), b.view(np.uint8), f"output {i} under two poisons (unwritten bytes)")
    return runs[0]


def assert_outputs_equal(got: tuple, want: tuple, label: str) -> None:
    names = ("packed", "scales", "blockscale_offsets")
    assert len(got) == len(want), f"{label}: {len(got)} outputs, want {len(want)}"
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype, f"{label} {name}: dtype {a.dtype} != {b.dtype}"
        assert_bytes_equal(a.view(np.uint8), np.asarray(b).view(np.uint8), f"{label} {name}")


# ---------------------------------------------------------------------------
# Inputs as data
# ---------------------------------------------------------------------------
# (name, counts per expert, rows after the last expert)
OFFSET_CASES = [
    ("uneven-with-empty", [3, 0, 130, 1, 0, 0, 17, 128], 5),
    ("one-expert", [150], 0),
    ("all-on-one", [0, 0, 200, 0, 0, 0], 0),
    ("all-empty", [0, 0, 0], 10),
    ("no-experts", [], 7),
    ("no-tokens", [0, 0], 0),
    # Many more scale rows than token rows: grouped_row_map zeroes the padding
    # rows, several a warp (ops/experts.py grouped_map_blocks).
    ("scale-rows-past-the-grid", [400, 0, 3, 600, 0, 90, 1, 0, 2, 50], 4),
]
WIDTHS = [(64, None), (40, 64), (13, None)]  # (n, padded_n): 16-byte loads, K padding, element loads


def offsets_of(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def make_tokens(m: int, n: int, dtype: str, seed: int) -> np.ndarray:
    """[m, n]: experts of different magnitudes, a few specials."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n)).astype(np.float32) * np.float32(2.0) ** rng.integers(-6, 8, size=(m, 1))
    if x.size > 40:
        flat = x.reshape(-1)
        picks = rng.choice(flat.size, size=8, replace=False)
        flat[picks] = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-40, 2688.0, -1e-30, 60000.0], np.float32)
    return x.astype(HOST_DTYPES[dtype])


def expert_scales(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """float32 [E]: 448 * 6 / the finite amax of each expert's rows (1 when
    empty), and one invalid scale (0) on the second expert with rows."""
    scales = []
    for e in range(offsets.size - 1):
        rows = np.abs(x[offsets[e]:offsets[e + 1]].astype(np.float32))
        finite = rows[np.isfinite(rows)]
        amax = float(finite.max()) if finite.size else 0.0
        scales.append(448 * 6 / amax if amax > 0 else 1.0)
    scales = np.array(scales, np.float32)
    with_rows = np.flatnonzero(np.diff(offsets) > 0)
    if with_rows.size > 1:
        scales[with_rows[1]] = 0.0
    return scales


def device_scale(form: str, gs: np.ndarray):
    """The global scale argument of each form, and its golden twin."""
    if form == "host":
        return 3.5, 3.5
    if form == "device-one":
        return cp.asarray(np.array([3.5], np.float32)), np.array([3.5], np.float32)
    return cp.asarray(gs), gs


# ---------------------------------------------------------------------------
# Tokens sorted by expert
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_grouped_matches_golden(dtype, layout, fmt):
    for case, (name, counts, trailing) in enumerate(OFFSET_CASES):
        n, padded_n = WIDTHS[case % len(WIDTHS)]
        offsets = offsets_of(counts)
        m = int(offsets[-1]) + trailing
        x_host = make_tokens(m, n, dtype, seed=case)
        forms = ["host", "device-one", "device-per-expert"] if fmt == "nvfp4" else [None]
        for form in forms:
            if fmt == "nvfp4":
                gs, gs_host = device_scale(form, expert_scales(x_host, offsets))
            else:
                gs = gs_host = None
            label = f"{dtype} {layout} {fmt} {name} n={n} padded_n={padded_n} gs={form}"
            want = golden.scaled_fp4_experts_quant(x_host, gs_host, offsets, padded_n=padded_n, layout=layout, fmt=fmt)
            x, device_offsets = cp.asarray(x_host), cp.asarray(offsets)
            got = run_poisoned(lambda: nv.scaled_fp4_experts_quant(x, gs, device_offsets, padded_n=padded_n,
                                                                   layout=layout, fmt=fmt))
            assert_outputs_equal(got, want, label)
            assert got[2].dtype == np.int32 and got[2].shape == (offsets.size,)
            assert_bytes_equal(got[2].view(np.uint8), golden.blockscale_offsets(offsets, layout).view(np.uint8),
                               f"{label}: blockscale_offsets")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grouped_equals_per_expert_gpu_quantize(layout, fmt):
    """Each expert's bytes are our own GPU scaled_fp4_quant of its rows: its
    packed rows in place, its complete scale tensor at scale row b[e]."""
    counts = [0, 37, 128, 0, 129, 1, 300]
    offsets = offsets_of(counts)
    m, n = int(offsets[-1]), 7152
    x_host = make_tokens(m, n, "bfloat16", seed=11)
    gs_host = expert_scales(x_host, offsets) if fmt == "nvfp4" else None
    x = cp.asarray(x_host)
    packed, scales, starts = nv.scaled_fp4_experts_quant(
        x, None if gs_host is None else cp.asarray(gs_host), cp.asarray(offsets), padded_n=7168, layout=layout, fmt=fmt)
    packed, scales, starts = cp.asnumpy(packed), cp.asnumpy(scales).reshape(-1), cp.asnumpy(starts)
    cols = LAYOUTS[layout].scale_shape(0, 7168, 16 if fmt == "nvfp4" else 32)[1]
    tile = LAYOUTS[layout].row_multiple
    for e, count in enumerate(counts):
        if not count:
            continue
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        gs = None if gs_host is None else cp.asarray(gs_host[e:e + 1])
        want_packed, want_scales = nv.scaled_fp4_quant(x[rows], gs, padded_n=7168, layout=layout, fmt=fmt)
        label = f"{layout} {fmt} expert {e} ({count} rows)"
        assert_bytes_equal(packed[rows], cp.asnumpy(want_packed), f"{label}: packed")
        first = int(starts[e]) * cols
        assert_bytes_equal(scales[first:first + round_up(count, tile) * cols], cp.asnumpy(want_scales).reshape(-1),
                           f"{label}: scales at blockscale_offsets[{e}]={int(starts[e])}")


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_grouped_silu_and_mul_matches_golden_and_unfused_gpu(dtype):
    counts = [5, 0, 140, 0, 9]
    offsets = offsets_of(counts)
    m, n = int(offsets[-1]) + 3, 48
    rng = np.random.default_rng(5)
    x_host = (rng.standard_normal((m, 2 * n)) * 4).astype(HOST_DTYPES[dtype])
    x_host[2, 7] = np.nan
    x_host[9, n + 3] = np.inf
    gs_host = np.array([40.0, 1.0, 300.0, 2.0, np.inf], np.float32)
    x, device_offsets, gs = cp.asarray(x_host), cp.asarray(offsets), cp.asarray(gs_host)
    for layout in sorted(LAYOUTS):
        label = f"{dtype} {layout} silu grouped"
        want = golden.silu_and_mul_quant(x_host, gs_host, layout=layout, expert_offsets=offsets)
        got = run_poisoned(lambda: nv.silu_and_mul_quant(x, gs, layout=layout, expert_offsets=device_offsets))
        assert_outputs_equal(got, want, label)
        unfused = nv.scaled_fp4_experts_quant(nv.silu_and_mul(x), gs, device_offsets, layout=layout)
        assert_outputs_equal(got, tuple(cp.asnumpy(a) for a in unfused), f"{label} vs unfused GPU ops")


@pytest.mark.parametrize("silu", [False, True])
def test_unchecked_offsets_are_sanitized_on_the_device(silu):
    """validate=False: no host read; offsets out of range, decreasing, not
    starting at 0 give the golden model's sanitized bytes (section 5.4)."""
    m, n = 300, 32
    x_host = make_tokens(m, 2 * n if silu else n, "bfloat16", seed=3)
    for raw in ([5, 40, 20, 400, -3, 260], [-10, 0, 0], [0, 2**31 - 1], [300, 100, 50]):
        offsets = np.array(raw, np.int32)
        x, device_offsets = cp.asarray(x_host), cp.asarray(offsets)
        for layout in sorted(LAYOUTS):
            label = f"silu={silu} {layout} offsets {raw}"
            if silu:
                want = golden.silu_and_mul_quant(x_host, 2.0, layout=layout, expert_offsets=offsets, validate=False)
                call = lambda: nv.silu_and_mul_quant(x, 2.0, layout=layout, expert_offsets=device_offsets,  # noqa: E731
                                                     validate=False)
            else:
                want = golden.scaled_fp4_experts_quant(x_host, 2.0, offsets, layout=layout, validate=False)
                call = lambda: nv.scaled_fp4_experts_quant(x, 2.0, device_offsets, layout=layout,  # noqa: E731
                                                           validate=False)
            assert_outputs_equal(run_poisoned(call), want, label)


# Rows of at least a warp of threads (n = 2304: 36 threads of 4 or 2
# blocks a row) take quantize_grouped's per-warp search (grouped_row) instead
# of the shared-memory staging of the narrow rows above; 70 experts are three
# chunks of 32 offsets, and the garbage offsets need the running maximum in
# the second and third chunks.
WIDE_N = 2304
WIDE_COUNTS = [0, 1, 130, 0, 0, 17, 128, 3] * 8 + [0, 60, 2, 0, 0, 1]  # 70 experts, a count of 1, empty ones


def _garbage_offsets(m: int) -> np.ndarray:
    rng = np.random.default_rng(17)
    raw = np.sort(rng.integers(0, m, 70)).astype(np.int64)
    raw[40], raw[41], raw[66] = raw[45] + 3, -5, m + 100  # decreasing, negative, past m
    return np.concatenate([[0], raw]).astype(np.int32)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_grouped_wide_rows_per_warp_search(dtype, fmt, silu):
    """The per-warp search against the golden model: uneven counts over 70
    experts with trailing rows, and validate=False's sanitized garbage
    offsets, in every layout, with every output poisoned."""
    offsets = offsets_of(WIDE_COUNTS)
    m = int(offsets[-1]) + 6
    x_host = make_tokens(m, 2 * WIDE_N if silu else WIDE_N, dtype, seed=23)
    x = cp.asarray(x_host)
    for label, offsets, validate in (("uneven", offsets, True), ("garbage", _garbage_offsets(m), False)):
        gs_host = None if fmt == "mxfp4" else expert_scales(x_host[:, :WIDE_N], np.maximum.accumulate(
            np.clip(offsets, 0, m)))
        gs = None if gs_host is None else cp.asarray(gs_host)
        device_offsets = cp.asarray(offsets)
        for layout in sorted(LAYOUTS):
            what = f"{dtype} {fmt} silu={silu} {label} {layout}"
            if silu:
                want = golden.silu_and_mul_quant(x_host, gs_host, layout=layout, fmt=fmt, expert_offsets=offsets,
                                                 validate=validate)
                got = run_poisoned(lambda: nv.silu_and_mul_quant(x, gs, layout=layout, fmt=fmt,
                                                                 expert_offsets=device_offsets, validate=validate))
            else:
                want = golden.scaled_fp4_experts_quant(x_host, gs_host, offsets, layout=layout, fmt=fmt,
                                                       validate=validate)
                got = run_poisoned(lambda: nv.scaled_fp4_experts_quant(x, gs, device_offsets, layout=layout, fmt=fmt,
                                                                       validate=validate))
            assert_outputs_equal(got, want, what)


# ---------------------------------------------------------------------------
# The masked batch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("silu", [False, True])
def test_masked_matches_golden(silu, dtype, fmt):
    experts, max_m, n = 5, 133, 40
    counts = np.array([0, 133, 1, 70, 128], np.int32)
    width = 2 * n if silu else n
    x_host = make_tokens(experts * max_m, width, dtype, seed=9).reshape(experts, max_m, width)
    x_host[0] = np.nan  # masked rows are never read: they cannot make a NaN block
    x_host[3, 70:] = np.inf
    gs_host = np.array([1.0, 7.0, 0.25, 300.0, 12.0], np.float32) if fmt == "nvfp4" else None
    x, device_counts = cp.asarray(x_host), cp.asarray(counts)
    gs = None if gs_host is None else cp.asarray(gs_host)
    for layout in sorted(LAYOUTS):
        label = f"silu={silu} {dtype} {fmt} {layout} masked"
        if silu:
            want = golden.silu_and_mul_quant(x_host, gs_host, padded_n=64, layout=layout, fmt=fmt, expert_counts=counts)
            call = lambda: nv.silu_and_mul_quant(x, gs, padded_n=64, layout=layout, fmt=fmt,  # noqa: E731
                                                 expert_counts=device_counts)
        else:
            want = golden.scaled_fp4_masked_quant(x_host, gs_host, counts, padded_n=64, layout=layout, fmt=fmt)
            call = lambda: nv.scaled_fp4_masked_quant(x, gs, device_counts, padded_n=64, layout=layout,  # noqa: E731
                                                      fmt=fmt)
        assert_outputs_equal(run_poisoned(call), want, label)


def test_masked_unchecked_counts_are_clamped_and_one_scale_for_all():
    experts, max_m, n = 4, 20, 16
    x_host = make_tokens(experts * max_m, n, "float16", seed=4).reshape(experts, max_m, n)
    counts = np.array([-5, 21, 2**31 - 1, 7], np.int32)
    x, device_counts = cp.asarray(x_host), cp.asarray(counts)
    for gs, gs_host in ((6.0, 6.0), (cp.asarray(np.array([6.0], np.float32)), np.array([6.0], np.float32))):
        want = golden.scaled_fp4_masked_quant(x_host, gs_host, counts, validate=False)
        got = run_poisoned(lambda: nv.scaled_fp4_masked_quant(x, gs, device_counts, validate=False))
        assert_outputs_equal(got, want, "unchecked counts")


def test_empty_batches_launch_nothing():
    x = cp.zeros((0, 7, 32), cp.float32)
    packed, scales = nv.scaled_fp4_masked_quant(x, 1.0, cp.zeros(0, cp.int32))
    assert packed.shape == (0, 7, 16) and scales.shape == (0, 128, 4)
    x = cp.zeros((3, 0, 64), cp.float16)
    packed, scales = nv.silu_and_mul_quant(x, 1.0, expert_counts=cp.zeros(3, cp.int32))
    assert packed.shape == (3, 0, 16) and scales.shape == (3, 0, 4)


# ---------------------------------------------------------------------------
# Refusals: raised before anything is allocated
# ---------------------------------------------------------------------------
def _x(m=10, n=32, dtype=cp.float32):
    return cp.ones((m, n), dtype)


def _i32(values):
    return cp.asarray(np.array(values, np.int32))


# (name, build: makes the inputs and returns the call, error, words of its message)
REFUSALS = [
    ("offsets decrease", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, _i32([0, 5, 3])), ValueError,
     "non-decreasing"),
    ("offsets past m", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, _i32([0, 5, 11])), ValueError,
     "out of range"),
    ("offsets[0] != 0", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, _i32([1, 5])), ValueError,
     "expert_offsets[0]"),
    ("int64 offsets", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(2, cp.int64)), TypeError,
     "int32"),
    ("host offsets", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, np.array([0, 5], np.int32)), TypeError,
     "host"),
    ("2-D offsets", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros((2, 2), cp.int32)), ValueError,
     "1-D"),
    ("empty offsets", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(0, cp.int32)), ValueError,
     "E + 1"),
    ("too many experts", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(1026, cp.int32)),
     ValueError, "at most 1024"),
    ("3-D x with offsets", lambda: partial(nv.scaled_fp4_experts_quant, cp.ones((2, 3, 32), cp.float32), 1.0,
                                           cp.zeros(2, cp.int32)), ValueError, "[m, n]"),
    ("gs of the wrong length", lambda: partial(nv.scaled_fp4_experts_quant, _x(), cp.ones(3, cp.float32),
                                               cp.zeros(3, cp.int32)), ValueError, "per expert"),
    ("float64 gs", lambda: partial(nv.scaled_fp4_experts_quant, _x(), cp.ones(2, cp.float64), cp.zeros(3, cp.int32)),
     TypeError, "float32"),
    ("negative host gs", lambda: partial(nv.scaled_fp4_experts_quant, _x(), -1.0, cp.zeros(3, cp.int32)), ValueError,
     "finite and > 0"),
    ("gs with mxfp4", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(3, cp.int32), fmt="mxfp4"),
     ValueError, "mxfp4"),
    ("validate not a bool", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(3, cp.int32),
                                            validate=1), TypeError, "validate"),
    ("count above max_m", lambda: partial(nv.scaled_fp4_masked_quant, cp.ones((2, 4, 32), cp.float32), 1.0,
                                          _i32([1, 5])), ValueError, "expert_counts[1]=5"),
    ("negative count", lambda: partial(nv.scaled_fp4_masked_quant, cp.ones((2, 4, 32), cp.float32), 1.0,
                                       _i32([-1, 2])), ValueError, "expert_counts[0]=-1"),
    ("counts of the wrong length", lambda: partial(nv.scaled_fp4_masked_quant, cp.ones((2, 4, 32), cp.float32), 1.0,
                                                   cp.zeros(3, cp.int32)), ValueError, "(2,)"),
    ("2-D x with counts", lambda: partial(nv.scaled_fp4_masked_quant, _x(), 1.0, cp.zeros(3, cp.int32)), ValueError,
     "[E, max_m"),
    ("odd last dimension", lambda: partial(nv.silu_and_mul_quant, cp.ones((4, 33), cp.float32), 1.0,
                                           expert_offsets=cp.zeros(2, cp.int32)), ValueError, "even"),
    ("offsets and counts", lambda: partial(nv.silu_and_mul_quant, cp.ones((4, 32), cp.float32), 1.0,
                                           expert_offsets=cp.zeros(2, cp.int32), expert_counts=cp.zeros(1, cp.int32)),
     ValueError, "not both"),
    ("float64 x", lambda: partial(nv.scaled_fp4_experts_quant, _x(dtype=cp.float64), 1.0, cp.zeros(2, cp.int32)),
     TypeError, "float16, bfloat16 or float32"),
    ("host x", lambda: partial(nv.scaled_fp4_experts_quant, np.ones((4, 32), np.float32), 1.0, cp.zeros(2, cp.int32)),
     TypeError, "host"),
    ("bad padded_n", lambda: partial(nv.scaled_fp4_experts_quant, _x(), 1.0, cp.zeros(2, cp.int32), padded_n=40),
     ValueError, "padded_n"),
]


@pytest.mark.parametrize("name, build, error, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_input_is_refused_before_anything_is_allocated(name, build, error, words):
    call = build()
    with counted_allocations() as count:
        with pytest.raises(error) as raised:
            call()
    assert words in str(raised.value), f"{name}: {raised.value}"
    assert count[0] == 0, f"{name}: {count[0]} device allocations before the error"


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------
def _to_torch(torch, host: np.ndarray):
    bits = host.view({2: np.int16, 4: np.int32}[host.dtype.itemsize])
    dtype = {np.dtype(HOST_DTYPES[name]): name for name in HOST_DTYPES}[host.dtype]
    return torch.from_numpy(bits.copy()).cuda().view(getattr(torch, dtype))


@pytest.mark.parametrize("entry", ["eager", "torch.ops", "compiled"])
def test_torch_experts(torch_cuda, entry):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    counts = [3, 0, 130, 17]
    offsets = offsets_of(counts)
    m, n = int(offsets[-1]) + 2, 48
    rng = np.random.default_rng(2)
    gated = (rng.standard_normal((m, 2 * n)) * 3).astype(HOST_DTYPES["bfloat16"])
    masked = (rng.standard_normal((4, 20, n)) * 3).astype(HOST_DTYPES["bfloat16"])
    counts_host = np.array([0, 20, 3, 19], np.int32)
    gs_host = np.array([2.0, 3.0, 400.0, 1.0], np.float32)
    x, xm = _to_torch(torch, gated), _to_torch(torch, masked)
    o, c, gs = (torch.from_numpy(a).cuda() for a in (offsets, counts_host, gs_host))

    def calls():
        if entry == "torch.ops":
            return (torch.ops.nvfp4.scaled_fp4_experts_quant(x, gs, 0.0, o, None, "swizzled", "nvfp4", True, True),
                    torch.ops.nvfp4.scaled_fp4_masked_quant(xm, gs, 0.0, c, None, "8x4", "nvfp4", False, False),
                    torch.ops.nvfp4.silu_and_mul_quant(x, None, 5.0, 64, "linear", "nvfp4"))
        return (nvt.silu_and_mul_quant(x, gs, expert_offsets=o),
                nvt.scaled_fp4_masked_quant(xm, gs, c, layout="8x4", validate=False),
                nvt.silu_and_mul_quant(x, 5.0, padded_n=64, layout="linear"))

    if entry == "compiled":
        torch._dynamo.reset()
        calls = torch.compile(calls, fullgraph=True)
    grouped, masked_out, dense = calls()
    assert_outputs_equal(tuple(t.cpu().numpy() for t in grouped),
                         golden.silu_and_mul_quant(gated, gs_host, expert_offsets=offsets), f"{entry} grouped")
    assert_outputs_equal(tuple(t.cpu().numpy() for t in masked_out),
                         golden.scaled_fp4_masked_quant(masked, gs_host, counts_host, layout="8x4"), f"{entry} masked")
    assert_outputs_equal(tuple(t.cpu().numpy() for t in dense),
                         golden.silu_and_mul_quant(gated, 5.0, padded_n=64, layout="linear"), f"{entry} dense")
