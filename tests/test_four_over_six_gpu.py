"""TransformerEngine's Four Over Six NVFP4 quantization on the GPU
(scaled_fp4_quant_4over6: cuda_src/four_over_six.cu) against the golden
model, reference.te_4over6.scaled_fp4_quant_4over6, which
tests/test_reference_te_rht_4over6.py holds to TE's own code: packed codes,
scales and the global amax byte for byte, in every dtype, error mode, E4M3
bound, with and without fast math, every layout and form of the amax
(computed per tensor or per row, a host number, a device array of one or one
per row), with K padding, TE's corpus of special values, strided and
unaligned rows, and every output allocation poisoned. Spec:
docs/te_rht_and_4over6.md, parts B and E.3."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, assert_refused_before_allocating, poisoned_allocations
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, make_input
from test_reference_te import CORPUS
from test_reference_te import make_input as te_corpus_input
from test_reference_te_rht_4over6 import KINDS, SPECIAL_CASES, _map6_scale_bytes, _special, make
from test_rht_gpu import assert_amax_equal
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy.reference import te_4over6

cp = import_cupy()

LAYOUT_NAMES = sorted(LAYOUTS)
DTYPE_NAMES = sorted(HOST_DTYPES)
AMAX_FORMS = ("computed", "computed per row", "host", "device one", "device per row")
# (err_mode, e4m3_max, err_use_fast_math): TE's settings
SETTINGS = [(mode, bound, fast) for mode in ("MAE", "MSE") for bound in (448, 256) for fast in (False, True)]
SHAPES = [(1, 16), (3, 40), (129, 272), (64, 7168)]


def setting_id(setting) -> str:
    mode, bound, fast = setting
    return f"{mode}-{bound}" + ("-fast" if fast else "")


def amax_form(x_host: np.ndarray, form: str):
    """(GPU global_amax, golden global_amax, per_row) of one form; the given
    amaxes are the golden model's own, scaled a little (so that they are
    not what the kernel would compute)."""
    if form.startswith("computed"):
        return None, None, form.endswith("row")
    per_row = form.endswith("row")
    amax = te_4over6.scaled_fp4_quant_4over6(x_host, per_row=per_row, layout="linear")[2]
    with np.errstate(over="ignore"):  # huge data: an inf amax, given as it is
        amax = (amax * np.float32(1.25)).astype(np.float32)
    if form == "host":
        value = float(amax[0]) if np.isfinite(amax[0]) else 3.0
        return value, value, False
    return cp.asarray(amax), amax, False


def four_over_six_poisoned(x, *args, **kwargs):
    """scaled_fp4_quant_4over6's outputs on the host, run under each of
    POISONS (an unwritten byte cannot agree under both)."""
    import nvfp4_cupy as nv

    runs = []
    for poison in POISONS:
        with poisoned_allocations(poison):
            outputs = nv.scaled_fp4_quant_4over6(x, *args, **kwargs)
        assert len(outputs) == 3
        runs.append([cp.asnumpy(o) if isinstance(o, cp.ndarray) else o for o in outputs])
    for name, a, b in zip(("packed", "scales"), *runs):
        assert_bytes_equal(a, b, f"{name} under two poisons (unwritten bytes)")
    return runs[0]


def assert_matches_golden(x_host, form, layout, padded_n, setting, what, x=None):
    mode, bound, fast = setting
    options = dict(padded_n=padded_n, layout=layout, err_mode=mode, e4m3_max=bound, err_use_fast_math=fast)
    gpu_amax, golden_amax, per_row = amax_form(x_host, form)
    want = te_4over6.scaled_fp4_quant_4over6(x_host, golden_amax, per_row=per_row, **options)
    got = four_over_six_poisoned(cp.asarray(x_host) if x is None else x, gpu_amax, per_row=per_row, **options)
    label = f"{what} amax={form} {layout} padded_n={padded_n} {setting_id(setting)}"
    assert_bytes_equal(got[0], want[0], f"{label}: packed")
    assert_bytes_equal(got[1], want[1], f"{label}: scales")
    assert_amax_equal(got[2], want[2], f"{label}: global_amax")


@pytest.mark.gpu
@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_4over6_matches_golden(shape, dtype, setting):
    """Every form of the amax, each with another layout and K padding."""
    m, n = shape
    x_host = make_input("outliers", m, n, seed=m + n).astype(HOST_DTYPES[dtype])
    for i, form in enumerate(AMAX_FORMS):
        assert_matches_golden(x_host, form, LAYOUT_NAMES[i % 3], None if i % 2 else -(-n // 16) * 16 + 32, setting,
                              f"{dtype} [{m}, {n}]")


@pytest.mark.gpu
@pytest.mark.parametrize("e4m3_max", [448, 256])
def test_4over6_picks_both_candidates(e4m3_max):
    """TE's data kinds exercise both choices on the GPU: map to 4 wins in
    some blocks and map to 6 in others (scale bytes against the map-to-6
    candidate's, computed straight from section B.2)."""
    import nvfp4_cupy as nv

    x_host = np.concatenate([make(kind, (16, 200), np.float32, seed) for seed, kind in enumerate(KINDS)])
    packed, scales, _ = nv.scaled_fp4_quant_4over6(cp.asarray(x_host), layout="linear", e4m3_max=e4m3_max)
    want = te_4over6.scaled_fp4_quant_4over6(x_host, layout="linear", e4m3_max=e4m3_max)
    assert_bytes_equal(cp.asnumpy(packed), want[0], "packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "scales")
    map4 = cp.asnumpy(scales) != _map6_scale_bytes(x_host, e4m3_max)
    assert 0 < map4.mean() < 1, f"map-to-4 chosen in {map4.mean():.1%} of the blocks"


@pytest.mark.gpu
@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_4over6_special_values(case):
    """The special cases TE's own reference is checked on (NaN, inf, zeros,
    tiny, blocks whose scale is 0, huge, exact E2M1 ties), every setting."""
    x_host = _special(case)
    for i, setting in enumerate(SETTINGS):
        assert_matches_golden(x_host, AMAX_FORMS[i % 2], LAYOUT_NAMES[i % 3], None, setting, case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_4over6_corpus(dtype, name):
    """TE's corpus (NaN, inf, -0.0, subnormals, huge values...), 150 x 256."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    for i, form in enumerate(("computed", "computed per row", "device per row")):
        setting = SETTINGS[(i + 3 * CORPUS.index(name)) % len(SETTINGS)]
        assert_matches_golden(x_host, form, LAYOUT_NAMES[(i + CORPUS.index(name)) % 3], None, setting,
                              f"{dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_4over6_strided_unaligned_and_3d(dtype):
    """A column slice (16-byte loads), an unaligned base (element loads) and
    a 3-D x (rows flattened)."""
    wide = make_input("specials", 40, 400, seed=7).astype(HOST_DTYPES[dtype])
    wide_gpu = cp.asarray(wide)
    assert_matches_golden(np.ascontiguousarray(wide[:, :256]), "computed per row", "swizzled", None, SETTINGS[0],
                          "strided", x=wide_gpu[:, :256])
    assert_matches_golden(np.ascontiguousarray(wide[:, 1:210]), "computed", "8x4", 256, SETTINGS[5], "unaligned",
                          x=wide_gpu[:, 1:210])
    x3 = make_input("zero_rows", 2 * 20, 64, seed=5).astype(HOST_DTYPES[dtype]).reshape(2, 20, 64)
    assert_matches_golden(x3, "host", "linear", None, SETTINGS[6], "3-D")


@pytest.mark.gpu
def test_4over6_empty_and_invalid_amax():
    """m = 0: empty outputs and an amax of 0; a NaN, negative, infinite or
    zero device amax gives the golden model's bytes."""
    import nvfp4_cupy as nv

    packed, scales, amax = nv.scaled_fp4_quant_4over6(cp.empty((0, 32), cp.float16))
    want = te_4over6.scaled_fp4_quant_4over6(np.empty((0, 32), np.float16))
    assert packed.shape == want[0].shape and scales.shape == want[1].shape
    assert_amax_equal(cp.asnumpy(amax), want[2], "amax of nothing")
    x_host = make_input("outliers", 8, 64, seed=2).astype(np.float16)
    for bad in (np.nan, -2.0, np.inf, 0.0, 1e-30, 1e35):
        amax = np.full(8, bad, np.float32)
        amax[1] = 5.0
        for setting in SETTINGS[::3]:
            mode, bound, fast = setting
            options = dict(err_mode=mode, e4m3_max=bound, err_use_fast_math=fast)
            want = te_4over6.scaled_fp4_quant_4over6(x_host, amax, **options)
            got = four_over_six_poisoned(cp.asarray(x_host), cp.asarray(amax), **options)
            assert_bytes_equal(got[0], want[0], f"amax {bad} {setting_id(setting)}: packed")
            assert_bytes_equal(got[1], want[1], f"amax {bad} {setting_id(setting)}: scales")


def _bad_calls():
    import nvfp4_cupy as nv

    x, ints = cp.ones((4, 32), cp.float16), cp.ones((4, 32), cp.int32)
    half_amax, rows, three = cp.ones(1, cp.float16), cp.ones(4, cp.float32), cp.ones(3, cp.float32)
    return [
        ("per_row with a given amax", lambda: nv.scaled_fp4_quant_4over6(x, rows, per_row=True), ValueError,
         "per_row=True asks"),
        ("amax dtype", lambda: nv.scaled_fp4_quant_4over6(x, half_amax), TypeError, "float32"),
        ("host amax NaN", lambda: nv.scaled_fp4_quant_4over6(x, float("nan")), ValueError, "finite and >= 0"),
        ("amax shape", lambda: nv.scaled_fp4_quant_4over6(x, three), ValueError, "global_amax"),
        ("mxfp4", lambda: nv.scaled_fp4_quant_4over6(x, fmt="mxfp4"), ValueError, "Four Over Six"),
        ("with the RHT", lambda: nv.scaled_fp4_quant_4over6(x, rht=True), ValueError, "RHT"),
        ("e4m3_max", lambda: nv.scaled_fp4_quant_4over6(x, e4m3_max=300), ValueError, "448 or 256"),
        ("e4m3_max a bool", lambda: nv.scaled_fp4_quant_4over6(x, e4m3_max=True), TypeError, "e4m3_max"),
        ("err_mode", lambda: nv.scaled_fp4_quant_4over6(x, err_mode="MSLE"), ValueError, "MAE"),
        ("err_mode not a str", lambda: nv.scaled_fp4_quant_4over6(x, err_mode=1), TypeError, "err_mode"),
        ("fast math not a bool", lambda: nv.scaled_fp4_quant_4over6(x, err_use_fast_math=1), TypeError,
         "err_use_fast_math"),
        ("padded_n", lambda: nv.scaled_fp4_quant_4over6(x, padded_n=24), ValueError, "padded_n"),
        ("dtype", lambda: nv.scaled_fp4_quant_4over6(ints), TypeError, "int32"),
    ]


@pytest.mark.gpu
def test_4over6_bad_input_is_refused_before_anything_is_allocated():
    assert_refused_before_allocating(_bad_calls())


@pytest.mark.gpu
def test_4over6_torch_eager_and_compiled(torch_cuda):
    """nvfp4_cupy.torch.scaled_fp4_quant_4over6 eager and under torch.compile
    (torch.ops.nvfp4.scaled_fp4_quant_4over6, no graph break): the golden
    bytes, with the amax computed per row and given as a host number."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = te_corpus_input("heavy_tailed", HOST_DTYPES["bfloat16"], 129, 96)
    x = torch.from_numpy(x_host.view(np.int16).copy()).cuda().view(torch.bfloat16)

    def quantize(x, amax, per_row):
        return nvt.scaled_fp4_quant_4over6(x, amax, layout="8x4", err_mode="MSE", e4m3_max=256, per_row=per_row)

    for label, run in (("eager", quantize), ("compiled", torch.compile(quantize, fullgraph=True))):
        for amax, per_row in ((None, True), (7.5, False)):
            got = run(x, amax, per_row)
            want = te_4over6.scaled_fp4_quant_4over6(x_host, amax, layout="8x4", err_mode="MSE", e4m3_max=256,
                                                     per_row=per_row)
            for name, g, w in zip(("packed", "scales"), got, want):
                assert g.device.type == "cuda" and g.dtype == torch.uint8
                assert_bytes_equal(g.cpu().numpy(), w, f"torch {label} amax={amax}: {name}")
            if amax is None:
                assert_amax_equal(got[2].cpu().numpy(), want[2], f"torch {label}: amax")
            else:
                assert got[2] == amax


@pytest.mark.parametrize("per_row, amax", [(False, None), (True, None), (False, 3.0)])
def test_te_ops_fake_shapes_are_the_golden_shapes(per_row, amax):
    """The registered fakes of torch.ops.nvfp4.scaled_fp4_quant_4over6 and
    scaled_fp4_quant_rht give the golden model's packed and scale shapes, and
    the amax's ([1] or [m] computed, empty where given); no GPU needed."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    import nvfp4_cupy.torch  # noqa: F401  (registers torch.ops.nvfp4)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nvfp4_cupy.reference import te_rht

    shape, padded_n, layout = (2, 70, 48), 64, "swizzled"
    want = te_4over6.scaled_fp4_quant_4over6(np.zeros(shape, np.float32), amax, padded_n=padded_n, layout=layout,
                                             per_row=per_row)
    want_rht = te_rht.scaled_fp4_quant_rht(np.zeros(shape, np.float32), amax, padded_n=padded_n, layout=layout,
                                           per_row=per_row)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(shape, dtype=torch.bfloat16))
        fakes = (torch.ops.nvfp4.scaled_fp4_quant_4over6(x, None, amax, padded_n, layout, "MAE", 448, False, per_row),
                 torch.ops.nvfp4.scaled_fp4_quant_rht(x, None, amax, padded_n, layout, per_row, "input"))
    for fake, golden in zip(fakes, (want, want_rht)):
        assert [tuple(t.shape) for t in fake[:2]] == [w.shape for w in golden[:2]]
        assert tuple(fake[2].shape) == (golden[2].shape if amax is None else (0,))
        assert [t.dtype for t in fake] == [torch.uint8, torch.uint8, torch.float32]
