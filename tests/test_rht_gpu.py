"""TransformerEngine's random Hadamard transform + NVFP4 on the GPU
(scaled_fp4_quant_rht: cuda_src/rht.cu) against the golden model,
reference.te_rht.scaled_fp4_quant_rht, which
tests/test_reference_te_rht_4over6.py holds to TE's own code: packed codes,
scales and the post-transform amax byte for byte, in every dtype, layout,
transform dtype and form of the amax (computed per tensor or per row, a host
number, a device array of one or one per row), with K padding, TE's corpus
of special values, strided and unaligned rows, and every output allocation
poisoned. Spec: docs/te_rht_and_4over6.md, part A and E."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, assert_refused_before_allocating, poisoned_allocations
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, make_input
from test_reference_te import CORPUS
from test_reference_te import make_input as te_corpus_input
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy._runtime.compile import RhtVariant, kernel_source
from nvfp4_cupy.reference import te_rht

cp = import_cupy()

LAYOUT_NAMES = sorted(LAYOUTS)
DTYPE_NAMES = sorted(HOST_DTYPES)
# how the amax arrives: computed on the device (per tensor or per row), a
# host number, a device array of one element or one per row
AMAX_FORMS = ("computed", "computed per row", "host", "device one", "device per row")
SHAPES = [(1, 16), (3, 32), (129, 272), (300, 1024), (64, 7168)]


def amax_form(x_host: np.ndarray, form: str, transform_dtype: str):
    """(GPU global_amax, golden global_amax, per_row) of one form; the given
    amaxes are the golden model's own post-transform amax, scaled a little
    (so that they are not what the kernel would compute)."""
    if form.startswith("computed"):
        return None, None, form.endswith("row")
    per_row = form.endswith("row")
    amax = te_rht.rht_global_amax(x_host, per_row=per_row, transform_dtype=transform_dtype)
    amax = (amax * np.float32(1.25)).astype(np.float32)
    if form == "host":
        value = float(amax[0]) if np.isfinite(amax[0]) else 3.0
        return value, value, False
    return cp.asarray(amax), amax, False


def rht_poisoned(x, *args, **kwargs):
    """scaled_fp4_quant_rht's outputs on the host, run under each of POISONS
    (an unwritten byte cannot agree under both)."""
    import nvfp4_cupy as nv

    runs = []
    for poison in POISONS:
        with poisoned_allocations(poison):
            outputs = nv.scaled_fp4_quant_rht(x, *args, **kwargs)
        assert len(outputs) == 3
        runs.append([cp.asnumpy(o) if isinstance(o, cp.ndarray) else o for o in outputs])
    for name, a, b in zip(("packed", "scales"), *runs):
        assert_bytes_equal(a, b, f"{name} under two poisons (unwritten bytes)")
    return runs[0]


def assert_amax_equal(got, want, what: str) -> None:
    """float32 bits, any NaN counting as the canonical one on both sides."""
    def canonical(values):
        values = np.atleast_1d(np.asarray(values, np.float32))
        return np.where(np.isnan(values), np.uint32(0x7FC00000), values.view(np.uint32))

    assert_bytes_equal(canonical(got), canonical(want), what)


def assert_rht_matches_golden(x_host, form, layout, padded_n, transform_dtype, what, x=None):
    gpu_amax, golden_amax, per_row = amax_form(x_host, form, transform_dtype)
    want = te_rht.scaled_fp4_quant_rht(x_host, golden_amax, padded_n=padded_n, layout=layout, per_row=per_row,
                                       transform_dtype=transform_dtype)
    got = rht_poisoned(cp.asarray(x_host) if x is None else x, gpu_amax, padded_n=padded_n, layout=layout,
                       per_row=per_row, transform_dtype=transform_dtype)
    label = f"{what} amax={form} {layout} padded_n={padded_n} transform={transform_dtype}"
    assert_bytes_equal(got[0], want[0], f"{label}: packed")
    assert_bytes_equal(got[1], want[1], f"{label}: scales")
    assert_amax_equal(got[2], want[2], f"{label}: global_amax")


@pytest.mark.gpu
@pytest.mark.parametrize("transform_dtype", te_rht.TRANSFORM_DTYPES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rht_matches_golden(shape, dtype, transform_dtype):
    """Every form of the amax, each with another layout and K padding."""
    m, k = shape
    x_host = make_input("outliers", m, k, seed=m + k).astype(HOST_DTYPES[dtype])
    for i, form in enumerate(AMAX_FORMS):
        assert_rht_matches_golden(x_host, form, LAYOUT_NAMES[i % 3], None if i % 2 else k + 32, transform_dtype,
                                  f"{dtype} [{m}, {k}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_rht_corpus(dtype, name):
    """TE's corpus (NaN, inf, -0.0, subnormals, huge values...), 150 x 256."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    for i, form in enumerate(("computed", "computed per row", "device per row")):
        assert_rht_matches_golden(x_host, form, LAYOUT_NAMES[(i + CORPUS.index(name)) % 3], None,
                                  te_rht.TRANSFORM_DTYPES[i % 2], f"{dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_rht_strided_unaligned_and_3d(dtype):
    """A column slice (16-byte loads), an unaligned base (element loads) and
    a 3-D x (rows flattened)."""
    wide = make_input("specials", 40, 400, seed=7).astype(HOST_DTYPES[dtype])
    wide_gpu = cp.asarray(wide)
    assert_rht_matches_golden(np.ascontiguousarray(wide[:, :256]), "computed per row", "swizzled", None, "input",
                              "strided", x=wide_gpu[:, :256])
    assert_rht_matches_golden(np.ascontiguousarray(wide[:, 1:209]), "computed", "8x4", 256, "float32", "unaligned",
                              x=wide_gpu[:, 1:209])
    x3 = make_input("zero_rows", 2 * 20, 64, seed=5).astype(HOST_DTYPES[dtype]).reshape(2, 20, 64)
    assert_rht_matches_golden(x3, "host", "linear", None, "input", "3-D")


@pytest.mark.gpu
def test_rht_empty_and_invalid_amaxes():
    """m = 0: empty outputs and an amax of 0; a NaN, negative or infinite
    device amax gives the golden model's bytes (invalid S_enc: 0x7F)."""
    import nvfp4_cupy as nv

    packed, scales, amax = nv.scaled_fp4_quant_rht(cp.empty((0, 32), cp.float16))
    want = te_rht.scaled_fp4_quant_rht(np.empty((0, 32), np.float16))
    assert packed.shape == want[0].shape and scales.shape == want[1].shape
    assert_amax_equal(cp.asnumpy(amax), want[2], "amax of nothing")
    x_host = make_input("outliers", 8, 64, seed=2).astype(np.float16)
    for bad in (np.nan, -2.0, np.inf, 0.0):
        amax = np.full(8, bad, np.float32)
        amax[1] = 5.0
        want = te_rht.scaled_fp4_quant_rht(x_host, amax)
        got = rht_poisoned(cp.asarray(x_host), cp.asarray(amax))
        assert_bytes_equal(got[0], want[0], f"amax {bad}: packed")
        assert_bytes_equal(got[1], want[1], f"amax {bad}: scales")


def _bad_calls():
    import nvfp4_cupy as nv

    x, odd = cp.ones((4, 32), cp.float16), cp.ones((4, 40), cp.float16)
    half_amax, rows, three = cp.ones(1, cp.float16), cp.ones(4, cp.float32), cp.ones(3, cp.float32)
    return [
        ("K not a multiple of 16", lambda: nv.scaled_fp4_quant_rht(odd), ValueError, "multiple of 16"),
        ("per_row with a given amax", lambda: nv.scaled_fp4_quant_rht(x, rows, per_row=True), ValueError,
         "per_row=True asks"),
        ("amax dtype", lambda: nv.scaled_fp4_quant_rht(x, half_amax), TypeError, "float32"),
        ("host amax NaN", lambda: nv.scaled_fp4_quant_rht(x, float("nan")), ValueError, "finite and >= 0"),
        ("host amax negative", lambda: nv.scaled_fp4_quant_rht(x, -1.0), ValueError, "finite and >= 0"),
        ("amax shape", lambda: nv.scaled_fp4_quant_rht(x, three), ValueError, "global_amax"),
        ("mxfp4", lambda: nv.scaled_fp4_quant_rht(x, fmt="mxfp4"), ValueError, "Hadamard"),
        ("transform dtype", lambda: nv.scaled_fp4_quant_rht(x, transform_dtype="bfloat16"), ValueError,
         "transform_dtype"),
        ("per_row not a bool", lambda: nv.scaled_fp4_quant_rht(x, per_row=1), TypeError, "per_row"),
    ]


@pytest.mark.gpu
def test_bad_input_is_refused_before_anything_is_allocated():
    assert_refused_before_allocating(_bad_calls())


def test_kernel_signs_are_te_signs():
    """rht.cu's kRhtNegativeSigns has bit i set exactly where TE's sign
    vector (te_rht.RHT_SIGNS) is -1; no GPU needed."""
    found = re.search(r"kRhtNegativeSigns = 0x([0-9A-Fa-f]+)u;", kernel_source(RhtVariant.source))
    assert found, "rht.cu defines no kRhtNegativeSigns"
    bits = int(found.group(1), 16)
    assert [-1.0 if bits >> i & 1 else 1.0 for i in range(16)] == te_rht.RHT_SIGNS.tolist()


@pytest.mark.gpu
def test_rht_torch_eager_and_compiled(torch_cuda):
    """nvfp4_cupy.torch.scaled_fp4_quant_rht eager and under torch.compile
    (torch.ops.nvfp4.scaled_fp4_quant_rht, no graph break): the golden bytes,
    with the amax computed per tensor and given as a device tensor per row."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = te_corpus_input("heavy_tailed", HOST_DTYPES["bfloat16"], 129, 96)
    x = torch.from_numpy(x_host.view(np.int16).copy()).cuda().view(torch.bfloat16)
    rows = te_rht.rht_global_amax(x_host, per_row=True)

    def quantize(x, amax):
        return nvt.scaled_fp4_quant_rht(x, amax, layout="8x4", transform_dtype="float32")

    for label, run in (("eager", quantize), ("compiled", torch.compile(quantize, fullgraph=True))):
        for amax, golden in ((None, None), (torch.from_numpy(rows).cuda(), rows)):
            got = run(x, amax)
            want = te_rht.scaled_fp4_quant_rht(x_host, golden, layout="8x4", transform_dtype="float32")
            for name, g, w in zip(("packed", "scales"), got, want):
                assert g.device.type == "cuda" and g.dtype == torch.uint8
                assert_bytes_equal(g.cpu().numpy(), w, f"torch {label} amax given={amax is not None}: {name}")
            assert_amax_equal(got[2].cpu().numpy(), want[2], f"torch {label}: amax")
