"""Rowwise and columnwise NVFP4 in one pass on the GPU
(scaled_fp4_quant(..., numerics="te", columnwise=True): cuda_src/columnwise.cu)
against the golden model, reference.te.scaled_fp4_quant_te(...,
columnwise=True), which tests/test_reference_te.py holds to TE's own code:
all four outputs byte for byte, in every dtype, layout and scale form, with
K padding, boundary shapes (one tile, many tiles, partial tiles in both
directions), TE's corpus of special values, strided and unaligned rows,
and every output allocation poisoned. Spec: docs/te_numerics.md sections 5
and 12."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, assert_refused_before_allocating, poisoned_allocations
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, boundary_cases, make_input
from test_reference_te import CORPUS
from test_reference_te import make_input as te_corpus_input
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy.reference import te

cp = import_cupy()

LAYOUT_NAMES = sorted(LAYOUTS)
DTYPE_NAMES = sorted(HOST_DTYPES)
OUTPUTS = ("packed", "scales", "packed_t", "scales_t")
# host: S as a float, S_t = S; device: S a one-element array, S_t = S;
# both: S and a different S_t, given as arrays; row: row_scaled, S per row
# of x and S_t per column of x (TE's per-row and per-column amax).
SCALE_FORMS = ("host", "device", "both", "row")


def scale_forms(x_host: np.ndarray, form: str):
    """((GPU global_scale, GPU global_scale_t), (golden ones), row_scaled).
    A NaN S (a NaN in x) cannot be a host float: it goes as an array."""
    flat = x_host.reshape(-1, x_host.shape[-1])
    if form == "row":
        gs = te.compute_global_scale_te(flat, per_row=True)
        gs_t = te.compute_global_scale_te(flat, per_row=True, columnwise=True)
        return (cp.asarray(gs), cp.asarray(gs_t)), (gs, gs_t), True
    gs = te.compute_global_scale_te(flat)
    if form == "both":
        gs_t = (gs * np.float32(0.75)).astype(np.float32)
        return (cp.asarray(gs), cp.asarray(gs_t)), (gs, gs_t), False
    if form == "host" and np.isfinite(gs[0]):
        return (float(gs[0]), None), (float(gs[0]), None), False
    return (cp.asarray(gs), None), (gs, None), False


def columnwise_poisoned(x, gs, gs_t, row_scaled, **kwargs):
    """The four outputs on the host, run once into allocations filled with
    each of POISONS: both runs must agree (an unwritten byte cannot)."""
    import nvfp4_cupy as nv

    runs = []
    for poison in POISONS:
        with poisoned_allocations(poison):
            outputs = nv.scaled_fp4_quant(x, gs, numerics="te", columnwise=True, global_scale_t=gs_t,
                                          row_scaled=row_scaled, **kwargs)
        assert len(outputs) == 4 and all(isinstance(o, cp.ndarray) and o.dtype == cp.uint8 for o in outputs)
        runs.append([cp.asnumpy(o) for o in outputs])
    for name, a, b in zip(OUTPUTS, *runs):
        assert_bytes_equal(a, b, f"{name} under two poisons (unwritten bytes)")
    return runs[0]


def assert_columnwise_matches_golden(x_host, form, layout, padded_n, what, x=None, tile="1x16"):
    (gs, gs_t), (want_gs, want_gs_t), row_scaled = scale_forms(x_host, form)
    want = te.scaled_fp4_quant_te(x_host, want_gs, padded_n=padded_n, layout=layout, columnwise=True,
                                  row_scaled=row_scaled, global_scale_t=want_gs_t, tile=tile)
    got = columnwise_poisoned(cp.asarray(x_host) if x is None else x, gs, gs_t, row_scaled, padded_n=padded_n,
                              layout=layout, tile=tile)
    for name, g, w in zip(OUTPUTS, got, want):
        assert_bytes_equal(g, w, f"{what} {form} {layout} padded_n={padded_n} tile={tile}: {name}")


CASES = boundary_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"m{c[0]}-n{c[1]}-p{c[2]}-{c[3]}" for c in CASES])
def test_columnwise_bit_exact_at_the_boundaries(dtype, case):
    """Each boundary shape with one scale form and one layout (cycling over
    the cases and dtypes)."""
    m, n, padded_n, kind = CASES[case]
    x_host = make_input(kind, m, n, seed=m * 7919 + n).astype(HOST_DTYPES[dtype])
    turn = case + DTYPE_NAMES.index(dtype)
    assert_columnwise_matches_golden(x_host, SCALE_FORMS[turn % 4], LAYOUT_NAMES[(turn // 4) % 3], padded_n,
                                     f"{dtype} [{m}, {n}] {kind}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_columnwise_corpus_in_every_scale_form(dtype, name):
    """TE's corpus (random bit patterns, NaN, inf, -0.0, subnormals, ties,
    huge values...), 150 x 256, in every scale form, each in another layout
    and K padding."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    for i, form in enumerate(SCALE_FORMS):
        layout = LAYOUT_NAMES[(i + CORPUS.index(name)) % 3]
        assert_columnwise_matches_golden(x_host, form, layout, 256 + 32 * (i % 3), f"{dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", [(64, 256), (1, 16), (300, 1000), (129, 4100), (1000, 48)])
def test_columnwise_tiles_in_both_directions(dtype, shape):
    """Whole tiles, one row, and many partial tiles in both directions, in
    every layout (the layouts' padding rows and columns on both outputs)."""
    m, n = shape
    x_host = make_input("outliers", m, n, seed=m + n).astype(HOST_DTYPES[dtype])
    for i, layout in enumerate(LAYOUT_NAMES):
        form = SCALE_FORMS[(i + m) % 4]
        assert_columnwise_matches_golden(x_host, form, layout, None, f"{dtype} [{m}, {n}]")


# TE's 16x16 tiles have one global scale (no row-scaled form).
SQUARE_TILE_FORMS = ("host", "device", "both")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", [(64, 256), (16, 16), (1, 16), (300, 1000), (129, 4100), (1000, 48), (70, 33)])
def test_square_tiles_in_both_directions(dtype, shape):
    """tile="16x16" (TE's weight recipe): one scale a 16x16 tile in x and in
    x^T, from the tile's amax, with whole tiles, one row, and partial tiles
    in both directions (rows past m and columns past n are zeros in their
    tile), in every layout and scale form and with K padding."""
    m, n = shape
    x_host = make_input("outliers", m, n, seed=3 * m + n).astype(HOST_DTYPES[dtype])
    for i, layout in enumerate(LAYOUT_NAMES):
        form = SQUARE_TILE_FORMS[(i + m) % 3]
        padded_n = None if i != 1 else -(-n // 16) * 16 + 32
        assert_columnwise_matches_golden(x_host, form, layout, padded_n, f"{dtype} [{m}, {n}]", tile="16x16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_square_tiles_corpus(dtype, name):
    """TE's corpus (NaN and inf make their whole tile NaN-scaled or
    saturated, -0.0, subnormals, ties...) with 16x16 tiles, in each scale
    form, and an unaligned x (element loads)."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    for i, form in enumerate(SQUARE_TILE_FORMS):
        layout = LAYOUT_NAMES[(i + CORPUS.index(name)) % 3]
        assert_columnwise_matches_golden(x_host, form, layout, 256 + 32 * i, f"{dtype} {name}", tile="16x16")
    wide = cp.asarray(te_corpus_input(name, HOST_DTYPES[dtype], 40, 320))
    assert_columnwise_matches_golden(cp.asnumpy(wide[:, 1:201]), "device", "swizzled", None, f"{dtype} {name} unaligned",
                                     x=wide[:, 1:201], tile="16x16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_columnwise_strided_unaligned_and_3d_inputs(dtype):
    """Rows with a stride (a column slice: 16-byte loads), an unaligned base
    (element loads), and a 3-D x, which flattens into rows as TE views it."""
    wide = make_input("specials", 96, 400, seed=3).astype(HOST_DTYPES[dtype])
    wide_gpu = cp.asarray(wide)
    assert_columnwise_matches_golden(np.ascontiguousarray(wide[:, :256]), "row", "swizzled", None, "strided",
                                     x=wide_gpu[:, :256])
    assert_columnwise_matches_golden(np.ascontiguousarray(wide[:, 1:201]), "device", "8x4", 224, "unaligned",
                                     x=wide_gpu[:, 1:201])
    x3 = make_input("zero_rows", 2 * 70, 48, seed=5).astype(HOST_DTYPES[dtype]).reshape(2, 70, 48)
    assert_columnwise_matches_golden(x3, "host", "linear", None, "3-D")


@pytest.mark.gpu
def test_columnwise_empty_and_invalid_scales():
    """m = 0 gives empty outputs of the golden shapes; a NaN S and S_t, and
    an infinite S_t, give the golden model's bytes (0x7F scale bytes)."""
    import nvfp4_cupy as nv

    empty = nv.scaled_fp4_quant(cp.empty((0, 48), cp.float16), 1.0, numerics="te", columnwise=True)
    want = te.scaled_fp4_quant_te(np.empty((0, 48), np.float16), 1.0, columnwise=True)
    assert [o.shape for o in empty] == [w.shape for w in want]
    x_host = make_input("outliers", 40, 64, seed=9).astype(np.float16)
    for gs, gs_t in ((np.float32([np.nan]), np.float32([2.0])), (np.float32([3.0]), np.float32([np.inf]))):
        want = te.scaled_fp4_quant_te(x_host, gs, columnwise=True, global_scale_t=gs_t)
        got = columnwise_poisoned(cp.asarray(x_host), cp.asarray(gs), cp.asarray(gs_t), False)
        for name, g, w in zip(OUTPUTS, got, want):
            assert_bytes_equal(g, w, f"S={gs[0]} S_t={gs_t[0]}: {name}")


def _bad_calls():
    import nvfp4_cupy as nv

    # every array made here, before the calls: a call must allocate nothing before it refuses
    x, x3 = cp.ones((32, 64), cp.float16), cp.ones((2, 16, 64), cp.float16)
    rows, cols, two = cp.ones(32, cp.float32), cp.ones(64, cp.float32), cp.ones(2, cp.float32)
    half_scale, out, out_scale = cp.ones(1, cp.float16), cp.empty((32, 32), cp.uint8), cp.empty((128, 4), cp.uint8)
    return [
        ("ieee numerics", lambda: nv.scaled_fp4_quant(x, 1.0, columnwise=True), ValueError, "needs numerics='te'"),
        ("16x16 tiles, row-scaled", lambda: nv.scaled_fp4_quant(x, rows, numerics="te", columnwise=True, tile="16x16",
                                                                 row_scaled=True, global_scale_t=cols),
         ValueError, "tile='1x16' only"),
        ("given outputs", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", columnwise=True, out=out,
                                                      out_scale=out_scale), ValueError, "not supported with columnwise"),
        ("row_scaled without S_t", lambda: nv.scaled_fp4_quant(x, rows, numerics="te", columnwise=True,
                                                               row_scaled=True), ValueError, "needs global_scale_t"),
        ("S_t of the wrong length", lambda: nv.scaled_fp4_quant(x, rows, numerics="te", columnwise=True,
                                                                row_scaled=True, global_scale_t=rows),
         ValueError, "one per column"),
        ("S_t without columnwise", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", global_scale_t=cols),
         ValueError, "needs columnwise=True"),
        ("S_t dtype", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", columnwise=True,
                                                  global_scale_t=half_scale), TypeError, "float32"),
        ("host S_t NaN", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", columnwise=True,
                                                     global_scale_t=float("nan")), ValueError, "finite"),
        ("per-expert scales", lambda: nv.scaled_fp4_quant(x3, two, numerics="te", columnwise=True), ValueError,
         "no expert batch"),
        ("columnwise not a bool", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", columnwise="yes"), TypeError,
         "columnwise"),
        ("mx rule", lambda: nv.scaled_fp4_quant(x, 1.0, numerics="te", columnwise=True, mx_scale_rule="rceil"),
         ValueError, "mx_scale_rule"),
    ]


@pytest.mark.gpu
def test_bad_input_is_refused_before_anything_is_allocated():
    """Each bad call raises its error before any output is allocated (so
    before any launch)."""
    assert_refused_before_allocating(_bad_calls())


@pytest.mark.gpu
def test_torch_eager_and_compiled(torch_cuda):
    """nvfp4_cupy.torch.scaled_fp4_quant(..., columnwise=True) eager and
    under torch.compile (torch.ops.nvfp4.scaled_fp4_quant_columnwise, no
    graph break): the golden bytes, a host S and per-row scales."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = te_corpus_input("heavy_tailed", HOST_DTYPES["bfloat16"], 129, 96)
    x = torch.from_numpy(x_host.view(np.int16).copy()).cuda().view(torch.bfloat16)
    gs = te.compute_global_scale_te(x_host)
    rows = te.compute_global_scale_te(x_host, per_row=True)
    cols = te.compute_global_scale_te(x_host, per_row=True, columnwise=True)

    def both(x, gs, gs_t, row_scaled):
        return nvt.scaled_fp4_quant(x, gs, layout="8x4", numerics="te", columnwise=True, global_scale_t=gs_t,
                                    row_scaled=row_scaled)

    for label, run in (("eager", both), ("compiled", torch.compile(both, fullgraph=True))):
        for gs_args, golden, row_scaled in (((float(gs[0]), None), (float(gs[0]), None), False),
                                            ((torch.from_numpy(rows).cuda(), torch.from_numpy(cols).cuda()),
                                             (rows, cols), True)):
            got = run(x, *gs_args, row_scaled)
            want = te.scaled_fp4_quant_te(x_host, golden[0], layout="8x4", columnwise=True, row_scaled=row_scaled,
                                          global_scale_t=golden[1])
            for name, g, w in zip(OUTPUTS, got, want):
                assert g.device.type == "cuda" and g.dtype == torch.uint8
                assert_bytes_equal(g.cpu().numpy(), w, f"torch {label} row_scaled={row_scaled}: {name}")


@pytest.mark.parametrize("shape, padded_n, layout", [((129, 96), None, "swizzled"), ((2, 70, 48), 64, "8x4"),
                                                     ((1, 16), None, "linear")])
def test_torch_fake_shapes_are_the_golden_shapes(shape, padded_n, layout):
    """The registered fake of torch.ops.nvfp4.scaled_fp4_quant_columnwise
    (what torch.compile traces with) gives the golden model's four shapes;
    no GPU needed."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    import nvfp4_cupy.torch  # noqa: F401  (registers torch.ops.nvfp4)
    from torch._subclasses.fake_tensor import FakeTensorMode

    want = te.scaled_fp4_quant_te(np.zeros(shape, np.float32), 1.0, padded_n=padded_n, layout=layout,
                                  columnwise=True)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(shape, dtype=torch.bfloat16))
        fake = torch.ops.nvfp4.scaled_fp4_quant_columnwise(x, None, 1.0, None, 1.0, padded_n, layout, "te", False,
                                                           "1x16", True)
    assert [tuple(t.shape) for t in fake] == [w.shape for w in want]
    assert all(t.dtype == torch.uint8 for t in fake)
