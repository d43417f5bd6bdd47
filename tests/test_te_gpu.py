"""numerics="te" (TransformerEngine's NVFP4 arithmetic with 1x16 blocks, and
row-scaled NVFP4) and the MXFP4 scale rules "rceil" and "te_pow2" on the GPU,
byte for byte against their golden models (reference.te, reference.mx_rules),
with every output poisoned: the kernels' scalar shortcuts over their whole
domains, the boundary shapes and TE's test corpus in every dtype, layout, K
padding and kind of global scale, the sm_80 software path, the torch entry
points, and the argument checks, made before any launch. Specs:
docs/te_numerics.md, docs/stochastic_rounding_and_mx_rules.md section 3.
(The golden models are held to TE's and torchao's own code on the CPU:
tests/test_reference_te.py, tests/test_reference_sr_mx.py.)"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, poisoned_allocations, quantize_poisoned
from conftest import import_cupy
from exhaustive_check import assert_exact_over_domain, load_checks
from gpu_inputs import HOST_DTYPES, boundary_cases, make_input
from test_reference_sr_mx import _mx_edge_input, _random_mx_input
from test_reference_te import CORPUS
from test_reference_te import make_input as te_corpus_input
from nvfp4_cupy import reference as ref
from nvfp4_cupy.reference import mx_rules, te
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy._runtime.compile import SOFTWARE

pytestmark = pytest.mark.gpu
cp = import_cupy()

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
LAYOUT_NAMES = sorted(LAYOUTS)
DTYPE_NAMES = sorted(HOST_DTYPES)
SCALE_FORMS = ("host", "device", "row")  # a host float, a one-element device array, one per row (row_scaled)


# ---------------------------------------------------------------------------
# Running the GPU quantizer into poisoned buffers
# ---------------------------------------------------------------------------
def assert_scales_equal(got, want, what: str) -> None:
    """float32 global scales bit for bit, except that a NaN of the golden
    model (whose bits follow the input's NaN) must be the kernels' 0x7FC00000."""
    got_bits = np.asarray(got, np.float32).view(np.uint32)
    want = np.asarray(want, np.float32)
    want_bits = np.where(np.isnan(want), np.uint32(0x7FC00000), want.view(np.uint32))
    assert_bytes_equal(got_bits, want_bits, what)


def te_scale_forms(x_host: np.ndarray, form: str):
    """(GPU global scale, golden global scale, row_scaled) of TE's global
    scale in one form. A host float must be valid: where TE's scale is NaN (a
    NaN in x) the host form is the one-element device array."""
    if form == "row":
        gs = te.compute_global_scale_te(x_host, per_row=True)
        return cp.asarray(gs), gs, True
    gs = te.compute_global_scale_te(x_host)
    if form == "host" and np.isfinite(gs[0]):
        return float(gs[0]), float(gs[0]), False
    return cp.asarray(gs), gs, False


def assert_te_matches_golden(x_host, form, layout, padded_n, what, target=None):
    gpu_scale, golden_scale, row_scaled = te_scale_forms(x_host, form)
    want = te.scaled_fp4_quant_te(x_host, golden_scale, padded_n=padded_n, layout=layout, row_scaled=row_scaled)
    got = quantize_poisoned(cp.asarray(x_host), gpu_scale, numerics="te", row_scaled=row_scaled, padded_n=padded_n,
                            layout=layout, target=target)
    assert_bytes_equal(got[0], want[0], f"{what} {form} {layout}: packed")
    assert_bytes_equal(got[1], want[1], f"{what} {form} {layout}: scales")


# ---------------------------------------------------------------------------
# The scalar shortcuts, over their whole domains (tests/cuda/te_numerics_exhaustive.cu)
# ---------------------------------------------------------------------------
SOURCE = Path(__file__).with_name("cuda") / "te_numerics_exhaustive.cu"
TE_SCALE_COUNT = 15  # kTeScaleBits in the .cu
CHECKS = {
    # kernel: how many operands its domain holds
    "check_te_global_scale": 2**32,  # every float32 S
    "check_te_block_scale": 2**31 * TE_SCALE_COUNT,  # every amax bit pattern under each S
    "check_positive_zeros_f16": 2**32,  # every word of two float16 values
    "check_positive_zeros_bf16": 2**32,
    "check_positive_zeros_f32": 2**32,
    "check_nonzero_products_f16": 63488,  # every nonzero, non-NaN float16
    "check_nonzero_products_bf16": 65280,
    "check_nonzero_products_f32": 2**32 - 2 - 2 * (2**23 - 1),
    "check_mx_ceil_rules": 2**31,  # every amax bit pattern
}


@pytest.fixture(scope="module")
def scalar_module():
    return load_checks(cp, SOURCE, (*CHECKS, "te_scalars"))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shortcut_is_exact_over_its_whole_domain(scalar_module, name):
    assert_exact_over_domain(cp, scalar_module, name, CHECKS[name])


def _sample_amaxes() -> np.ndarray:
    """float32 bit patterns: every 4099th one up to inf, NaN, and the amax
    values that put s on each E4M3 tie (S = 1) and one ulp either side."""
    stride = np.arange(0, 0x7F800001, 4099, dtype=np.uint32)
    e4m3 = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ties = (6 * (e4m3[:-1] + e4m3[1:]) / 2).astype(np.float32)
    near = np.concatenate([ties, np.nextafter(ties, F32(0)), np.nextafter(ties, F32(np.inf))]).view(np.uint32)
    special = np.array([0, 1, 0x7F800000, 0x7FC00000, 0x7F7FFFFF, 0x00400000], np.uint32)
    return np.unique(np.concatenate([stride, near, special]))


def test_scalar_functions_equal_the_golden_model(scalar_module):
    """te_block_scale (byte and r), global_scale_from_amax_te and the MX
    rules' bytes against reference.te and reference.mx_rules, on sampled
    amax values under every valid global scale of the exhaustive check."""
    amax_bits = _sample_amaxes()
    amax = amax_bits.view(np.float32)
    scales = np.array([1.0, 136.7803, 646.34863, 2.0**60, np.nextafter(F32(2.0**60), F32(np.inf)), 2.0**-60,
                       np.nextafter(F32(2.0**-60), F32(0)), FLT_MAX, 7.899323e-36, 1e-37, 2.0**-149, 1e-40],
                      np.float32)
    count, scale_count = len(amax), len(scales)
    te_bytes = cp.zeros(count * scale_count, cp.uint8)
    te_r = cp.zeros(count * scale_count, cp.float32)
    te_gs = cp.zeros(count, cp.float32)
    mx_bytes = cp.zeros(count, cp.uint8)
    rceil_r, pow2_r = cp.zeros(count, cp.float32), cp.zeros(count, cp.float32)
    scalar_module.get_function("te_scalars")(
        (1024,), (256,), (cp.asarray(amax_bits), np.int32(count), cp.asarray(scales), np.int32(scale_count), te_bytes,
                          te_r, te_gs, mx_bytes, rceil_r, pow2_r))
    want_bytes, sf = te.te_block_scales(amax[:, None], scales[None, :])
    want_r = te.te_reciprocals(sf, scales[None, :])
    assert_bytes_equal(cp.asnumpy(te_bytes).reshape(count, scale_count), want_bytes, "te scale bytes")
    got_r = cp.asnumpy(te_r).reshape(count, scale_count)
    # A NaN r (a NaN block, or sf = 0 with RN(1 / S) = inf) is the kernel's
    # zero-code block: its r is not used, and the whole-kernel tests check its codes.
    defined = ~np.isnan(want_r)
    assert_bytes_equal(got_r[defined].view(np.uint32), want_r[defined].view(np.uint32), "te encode factors r")
    assert_scales_equal(cp.asnumpy(te_gs), te.encode_scale_from_amax_te(amax), "te global scales")
    # The MX rules' scale bytes: one 32-value block [amax, 0, ...] per sampled amax (every 16th).
    picked = slice(None, None, 16)
    blocks = np.zeros((len(amax[picked]), 32), np.float32)
    blocks[:, 0] = amax[picked]
    for rule in ("rceil", "te_pow2"):
        _, want_mx = mx_rules.quantize_mx_blocks_rule(blocks, rule)
        assert_bytes_equal(cp.asnumpy(mx_bytes)[picked], want_mx[:, 0], f"{rule} scale bytes")


# ---------------------------------------------------------------------------
# numerics="te": whole kernels against reference.te.scaled_fp4_quant_te
# ---------------------------------------------------------------------------
CASES = boundary_cases()


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"m{c[0]}-n{c[1]}-p{c[2]}-{c[3]}" for c in CASES])
def test_te_bit_exact_at_the_boundaries(dtype, case):
    """Each boundary shape with one of the three scale forms and one of the
    three layouts (both cycling over the cases and dtypes)."""
    m, n, padded_n, kind = CASES[case]
    x_host = make_input(kind, m, n, seed=m * 7919 + n).astype(HOST_DTYPES[dtype])
    turn = case + DTYPE_NAMES.index(dtype)
    assert_te_matches_golden(x_host, SCALE_FORMS[turn % 3], LAYOUT_NAMES[(turn // 3) % 3], padded_n,
                             f"{dtype} [{m}, {n}] padded {padded_n} {kind}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_te_corpus_in_every_scale_form(dtype, name):
    """The corpus that tests/test_reference_te.py holds the golden model to
    TE's code with (random bit patterns, NaN, inf, -0.0, subnormals, ties,
    huge values...), 150 x 256, in every scale form and layout, with and
    without K padding, and the sm_80 software path."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    for i, form in enumerate(SCALE_FORMS):
        layout = LAYOUT_NAMES[(i + CORPUS.index(name)) % 3]
        assert_te_matches_golden(x_host, form, layout, 256 + 32 * i, f"{dtype} {name}")
    assert_te_matches_golden(x_host, "row", "linear", None, f"{dtype} {name} software", target=SOFTWARE)


def underflow_probe(dtype_name: str) -> tuple[np.ndarray, float]:
    """(x, host global scale) whose blocks have r below the dtype's
    kNonzeroProductsFrom (numerics.cuh), so that the kernel tests each
    product for zero: negative values whose products underflow to -0.0 (code
    0x0) beside ones that round to a negative nonzero below 0.25 (0x8), -0.0,
    tiny blocks (sf 0x00, r = FLT_MAX) and zero blocks."""
    dtype = HOST_DTYPES[dtype_name]
    info = ml_dtypes.finfo(dtype) if dtype_name == "bfloat16" else np.finfo(dtype)
    tiny, big = float(info.smallest_subnormal), float(info.max) / 4
    rows = np.zeros((8, 64), np.float32)
    rows[:, 0] = big
    rows[:, 1:8] = [-tiny, tiny, -0.0, -2 * tiny, -(2.0**-100), -(2.0**-120), -1.0]
    rows[:, 16:20] = [1e-30, -1e-30, -0.0, 0.0]  # a block whose sf can be 0x00
    rows[:, 32:48] = -0.0  # a block of -0.0
    rows[1::2, 48:52] = [-tiny * 1024, 3.0, -7.0, -tiny]
    scale = {"float32": 1.0, "bfloat16": 2.0**-20, "float16": 1.0}[dtype_name]
    with np.errstate(over="ignore", under="ignore"):
        return rows.astype(dtype), scale


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("target", ["device", "software"])
def test_te_special_blocks_and_global_scales(dtype, target):
    """Underflowing products, -0.0, NaN, inf and tiny blocks under host
    scales from the ordinary to the extreme: S below 2^-128 (RN(1 / S) is
    inf), 1e-37 (RN(448 * d) overflows: r = 0 beside an inf), FLT_MAX."""
    x_probe, probe_scale = underflow_probe(dtype)
    x = np.ones((5, 64), np.float32)
    x[0, 3] = np.nan
    x[1, 16:32], x[1, 32:48] = 0.0, -0.0
    x[2, 5], x[2, 40] = np.inf, -np.inf
    x[3] = np.linspace(-2688, 2688, 64)
    x[4] = np.float32(1e-39) if dtype == "float32" else 1e-7
    with np.errstate(over="ignore"):
        x_host = x.astype(HOST_DTYPES[dtype])
    chosen = None if target == "device" else SOFTWARE
    for values, scales in ((x_probe, (probe_scale, 1.0, 3e-39)), (x_host, (1.0, 3.4e38, 1e-30, 1e-37, 1e-40, 2.0))):
        for gs in scales:
            want = te.scaled_fp4_quant_te(values, gs, padded_n=96, layout="linear")
            got = quantize_poisoned(cp.asarray(values), gs, numerics="te", padded_n=96, layout="linear",
                                    target=chosen)
            assert_bytes_equal(got[0], want[0], f"{dtype} gs={gs} ({target}): packed")
            assert_bytes_equal(got[1], want[1], f"{dtype} gs={gs} ({target}): scales")


def test_te_invalid_device_scales_nan_scale_their_blocks_or_rows():
    x_host = make_input("normal", 129, 80, seed=3).astype(np.float16)
    for bad in (np.inf, -np.inf, np.nan, 0.0, -1.0):
        gs = np.array([bad], np.float32)
        want = te.scaled_fp4_quant_te(x_host, gs, padded_n=128)
        got = quantize_poisoned(cp.asarray(x_host), cp.asarray(gs), numerics="te", padded_n=128)
        assert_bytes_equal(got[0], want[0], f"gs={bad}: packed")
        assert_bytes_equal(got[1], want[1], f"gs={bad}: scales")
    rows = te.compute_global_scale_te(x_host, per_row=True)
    rows[[0, 5, 64, 128]] = [np.nan, np.inf, 0.0, -3.0]  # only these rows are NaN-scaled
    want = te.scaled_fp4_quant_te(x_host, rows, padded_n=128, row_scaled=True)
    got = quantize_poisoned(cp.asarray(x_host), cp.asarray(rows), numerics="te", row_scaled=True, padded_n=128)
    assert_bytes_equal(got[0], want[0], "invalid rows: packed")
    assert_bytes_equal(got[1], want[1], "invalid rows: scales")


def test_te_3d_input_flattens_and_row_scaled_reads_one_scale_per_row():
    """A 3-D x with one scale flattens into rows; x [E, 1, n] with E scales
    and row_scaled=True is one scale per row (not per expert)."""
    import nvfp4_cupy as nv

    host = make_input("outliers", 24, 256, seed=6).astype(np.float16)
    gs = te.compute_global_scale_te(host)
    packed, scales = nv.scaled_fp4_quant(cp.asarray(host.reshape(2, 12, 256)), cp.asarray(gs), numerics="te")
    want = te.scaled_fp4_quant_te(host, gs)
    assert_bytes_equal(cp.asnumpy(packed), want[0], "3-D packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "3-D scales")
    rows = te.compute_global_scale_te(host, per_row=True)
    packed, scales = nv.scaled_fp4_quant(cp.asarray(host.reshape(24, 1, 256)), cp.asarray(rows), numerics="te",
                                         row_scaled=True, layout="8x4")
    want = te.scaled_fp4_quant_te(host.reshape(24, 1, 256), rows, layout="8x4", row_scaled=True)
    assert packed.shape == want[0].shape and scales.shape == want[1].shape
    assert_bytes_equal(cp.asnumpy(packed), want[0], "[E, 1, n] row-scaled packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "[E, 1, n] row-scaled scales")


# ---------------------------------------------------------------------------
# compute_global_scale and quantize with numerics="te"
# ---------------------------------------------------------------------------
def _global_scale_inputs():
    rng = np.random.default_rng(15)
    with_inf = rng.standard_normal((4096, 4096)).astype(ml_dtypes.bfloat16)
    with_inf[4000, 17] = np.inf
    long_rows = rng.standard_normal((3, 400_000)).astype(np.float32)
    long_rows[1, 399_999] = np.nan
    long_rows[2] = 0.0
    return {
        "zeros": np.zeros((7, 100), np.float16),
        "inf": np.array([[1.0, -np.inf, 3.0]], np.float32),
        "nan": np.array([[1.0, np.nan], [2.0, -0.0]], np.float32),
        "tiny": np.full((2, 16), 1e-40, np.float32),
        "empty rows": np.zeros((0, 16), np.float32),
        "empty columns": np.zeros((3, 0), np.float16),
        "4096^2 bf16 with an inf (many thread blocks)": with_inf,
        "3 rows of 400000 (rows split across warps)": long_rows,
    }


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("name", list(_global_scale_inputs()))
def test_te_compute_global_scale(per_row, name):
    import nvfp4_cupy as nv

    x_host = _global_scale_inputs()[name]
    want = te.compute_global_scale_te(x_host, per_row=per_row)
    for poison in POISONS:
        with poisoned_allocations(poison):
            got = nv.compute_global_scale(cp.asarray(x_host), per_row=per_row, numerics="te")
        assert got.dtype == cp.float32 and got.shape == want.shape
        assert_scales_equal(cp.asnumpy(got), want, f"{name} per_row={per_row} poison {poison:#x}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("shape, padded_n", [((1, 16), None), ((7, 100), 128), ((2, 3, 64), None),
                                             ((1000, 7168), None), ((0, 64), None)])
def test_te_quantize_is_quantize_te(dtype, per_row, shape, padded_n):
    """quantize(numerics="te") == reference.quantize_te, and with per_row
    quantize_te(row_scaled=True): global scale, packed and scales."""
    import nvfp4_cupy as nv

    m, n = math.prod(shape[:-1]), shape[-1]
    x_host = (make_input("specials", m, n, seed=m + n) if m else np.zeros((m, n), np.float32)).reshape(shape)
    x_host = x_host.astype(HOST_DTYPES[dtype])
    packed_want, scales_want, gs_want = te.quantize_te(x_host, padded_n=padded_n, row_scaled=per_row)
    for poison in POISONS:
        with poisoned_allocations(poison):
            packed, scales, gs = nv.quantize(cp.asarray(x_host), padded_n=padded_n, per_row=per_row, numerics="te")
        assert_scales_equal(cp.asnumpy(gs), gs_want, f"{shape} global scale")
        assert_bytes_equal(cp.asnumpy(packed), packed_want, f"{shape} packed")
        assert_bytes_equal(cp.asnumpy(scales), scales_want, f"{shape} scales")


# ---------------------------------------------------------------------------
# numerics="te" with 16x16 tiles (TE's weight recipe, docs/te_numerics.md section 4)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"m{c[0]}-n{c[1]}-p{c[2]}-{c[3]}" for c in CASES])
def test_te_16x16_tiles_at_the_boundaries(dtype, case):
    """Each boundary shape (m not a multiple of 16 included: the last tile's
    missing rows are zeros) in a host or device scale form and one of the
    three layouts, with K padding where the case has it."""
    m, n, padded_n, kind = CASES[case]
    x_host = make_input(kind, m, n, seed=m * 7919 + n + 1).astype(HOST_DTYPES[dtype])
    turn = case + DTYPE_NAMES.index(dtype)
    form, layout = SCALE_FORMS[turn % 2], LAYOUT_NAMES[(turn // 2) % 3]
    gpu_scale, golden_scale, _ = te_scale_forms(x_host, form)
    want = te.scaled_fp4_quant_te(x_host, golden_scale, padded_n=padded_n, layout=layout, tile="16x16")
    got = quantize_poisoned(cp.asarray(x_host), gpu_scale, numerics="te", tile="16x16", padded_n=padded_n,
                            layout=layout)
    assert_bytes_equal(got[0], want[0], f"{dtype} [{m}, {n}] {form} {layout}: tiles packed")
    assert_bytes_equal(got[1], want[1], f"{dtype} [{m}, {n}] {form} {layout}: tiles scales")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", CORPUS)
def test_te_16x16_tiles_on_the_corpus(dtype, name):
    """TE's test corpus (NaN, inf, -0.0, subnormals, ties, huge values) in
    tiles, every layout, with and without K padding, 16-byte and element
    loads (an odd row stride), and the sm_80 software path."""
    x_host = te_corpus_input(name, HOST_DTYPES[dtype], 150, 256)
    gs = te.compute_global_scale_te(x_host)
    for i, layout in enumerate(LAYOUT_NAMES):
        want = te.scaled_fp4_quant_te(x_host, gs, padded_n=256 + 32 * i, layout=layout, tile="16x16")
        got = quantize_poisoned(cp.asarray(x_host), cp.asarray(gs), numerics="te", tile="16x16",
                                padded_n=256 + 32 * i, layout=layout, target=SOFTWARE if i == 2 else None)
        assert_bytes_equal(got[0], want[0], f"{dtype} {name} {layout}: packed")
        assert_bytes_equal(got[1], want[1], f"{dtype} {name} {layout}: scales")
    wide = cp.zeros((150, 259), x_host.dtype)
    wide[:, :256] = cp.asarray(x_host)
    got = quantize_poisoned(wide[:, :256], cp.asarray(gs), numerics="te", tile="16x16", layout="linear")
    want = te.scaled_fp4_quant_te(x_host, gs, layout="linear", tile="16x16")
    assert_bytes_equal(got[0], want[0], f"{dtype} {name} strided rows: packed")
    assert_bytes_equal(got[1], want[1], f"{dtype} {name} strided rows: scales")


@pytest.mark.parametrize("shape, padded_n", [((16, 16), None), ((33, 100), 128), ((2, 24, 64), None),
                                             ((1000, 7168), None), ((0, 64), None)])
def test_te_quantize_with_tiles_is_quantize_te(shape, padded_n):
    """quantize(numerics="te", tile="16x16") == reference.quantize_te(tile="16x16")."""
    import nvfp4_cupy as nv

    m, n = math.prod(shape[:-1]), shape[-1]
    x_host = (make_input("outliers", m, n, seed=m + n) if m else np.zeros((m, n), np.float32)).reshape(shape)
    x_host = x_host.astype(HOST_DTYPES["bfloat16"])
    packed_want, scales_want, gs_want = te.quantize_te(x_host, padded_n=padded_n, tile="16x16")
    for poison in POISONS:
        with poisoned_allocations(poison):
            packed, scales, gs = nv.quantize(cp.asarray(x_host), padded_n=padded_n, numerics="te", tile="16x16")
        assert_scales_equal(cp.asnumpy(gs), gs_want, f"{shape} global scale")
        assert_bytes_equal(cp.asnumpy(packed), packed_want, f"{shape} packed")
        assert_bytes_equal(cp.asnumpy(scales), scales_want, f"{shape} scales")


# ---------------------------------------------------------------------------
# MXFP4 scale rules against reference.mx_rules.scaled_mxfp4_quant
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", mx_rules.MX_SCALE_RULES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_mx_rules_match_golden(rule, dtype):
    """The edge set of tests/test_reference_sr_mx.py (every exponent edge,
    subnormals, NaN, -NaN, inf, -0.0) and random data over 60 binades, in
    every layout, with K padding, on the device path and the software path."""
    host = HOST_DTYPES[dtype]
    inputs = [(_mx_edge_input(host), None), (_random_mx_input(host, rows=129, cols=7152), 7232)]
    for i, (x_host, padded_n) in enumerate(inputs):
        for j, layout in enumerate(LAYOUT_NAMES):
            target = SOFTWARE if (i + j) % 2 else None
            want = mx_rules.scaled_mxfp4_quant(x_host, rule, padded_n=padded_n, layout=layout)
            got = quantize_poisoned(cp.asarray(x_host), None, fmt="mxfp4", mx_scale_rule=rule, padded_n=padded_n,
                                    layout=layout, target=target)
            what = f"{rule} {dtype} input {i} {layout}{' software' if target else ''}"
            assert_bytes_equal(got[0], want[0], f"{what}: packed")
            assert_bytes_equal(got[1], want[1], f"{what}: scales")


def test_mx_rule_floor_is_the_default():
    import nvfp4_cupy as nv

    x = cp.asarray(_mx_edge_input(np.float32))
    default = nv.scaled_fp4_quant(x, None, fmt="mxfp4")
    floor = nv.scaled_fp4_quant(x, None, fmt="mxfp4", mx_scale_rule="floor")
    for got, want, what in zip(floor, default, ("packed", "scales")):
        assert_bytes_equal(cp.asnumpy(got), cp.asnumpy(want), f"floor vs default {what}")


# ---------------------------------------------------------------------------
# The call path: repeats keep their numerics apart; bad input before launch
# ---------------------------------------------------------------------------
def test_repeated_calls_keep_each_numerics_and_rule_apart():
    """One signature called with each numerics and rule in turn, twice (the
    second time through the cached hot path): every call its own bytes."""
    import nvfp4_cupy as nv

    x_host = te_corpus_input("negative_zero", np.dtype(np.float32), 64, 256)
    x_host[3, 48:64] = [1e-4, -1e-4, 1e-44] + [0.0] * 13  # a tiny block: ieee and te differ
    x = cp.asarray(x_host)
    calls = {
        "ieee": (lambda: nv.scaled_fp4_quant(x, 2.0), lambda: ref.scaled_fp4_quant(x_host, 2.0)),
        "te": (lambda: nv.scaled_fp4_quant(x, 2.0, numerics="te"), lambda: te.scaled_fp4_quant_te(x_host, 2.0)),
        "floor": (lambda: nv.scaled_fp4_quant(x, None, fmt="mxfp4"),
                  lambda: mx_rules.scaled_mxfp4_quant(x_host, "floor")),
        "rceil": (lambda: nv.scaled_fp4_quant(x, None, fmt="mxfp4", mx_scale_rule="rceil"),
                  lambda: mx_rules.scaled_mxfp4_quant(x_host, "rceil")),
        "te_pow2": (lambda: nv.scaled_fp4_quant(x, None, fmt="mxfp4", mx_scale_rule="te_pow2"),
                    lambda: mx_rules.scaled_mxfp4_quant(x_host, "te_pow2")),
    }
    wants = {name: golden() for name, (_, golden) in calls.items()}
    assert not np.array_equal(wants["ieee"][0], wants["te"][0]), "the input must tell ieee and te apart"
    assert not np.array_equal(wants["floor"][1], wants["rceil"][1]), "the input must tell floor and rceil apart"
    for round_ in range(2):
        for name, (call, _) in calls.items():
            packed, scales = call()
            assert_bytes_equal(cp.asnumpy(packed), wants[name][0], f"{name} round {round_}: packed")
            assert_bytes_equal(cp.asnumpy(scales), wants[name][1], f"{name} round {round_}: scales")


def _bad_calls():
    """(case, call(nv, **outputs), error, match): the arrays are made when a
    call runs (collection needs no GPU)."""

    def x(*shape):
        return cp.ones(shape or (4, 64), cp.float16)

    def scales(count):
        return cp.ones(count, cp.float32)

    return [
        ("te with mxfp4", lambda nv, **o: nv.scaled_fp4_quant(x(), None, fmt="mxfp4", numerics="te", **o),
         ValueError, "numerics='te' is NVFP4 only"),
        ("unknown numerics", lambda nv, **o: nv.scaled_fp4_quant(x(), 1.0, numerics="fp8", **o), ValueError,
         r"numerics must be one of \['ieee', 'te'\], got 'fp8'"),
        ("mx rule with nvfp4", lambda nv, **o: nv.scaled_fp4_quant(x(), 1.0, mx_scale_rule="rceil", **o), ValueError,
         "mx_scale_rule is the scale rule of fmt='mxfp4'"),
        ("unknown mx rule", lambda nv, **o: nv.scaled_fp4_quant(x(), None, fmt="mxfp4", mx_scale_rule="ceil", **o),
         ValueError, r"mx_scale_rule must be one of \['floor', 'rceil', 'te_pow2'\], got 'ceil'"),
        ("row_scaled with ieee", lambda nv, **o: nv.scaled_fp4_quant(x(), scales(4), row_scaled=True, **o),
         ValueError, "row_scaled=True is TransformerEngine's NVFP4 recipe"),
        ("row_scaled not a bool",
         lambda nv, **o: nv.scaled_fp4_quant(x(), scales(4), numerics="te", row_scaled=1, **o), TypeError,
         "row_scaled must be a bool"),
        ("te per-row scale without row_scaled", lambda nv, **o: nv.scaled_fp4_quant(x(), scales(4), numerics="te", **o),
         ValueError, "pass row_scaled=True"),
        ("te row_scaled with a host scale",
         lambda nv, **o: nv.scaled_fp4_quant(x(), 1.0, numerics="te", row_scaled=True, **o), ValueError,
         "row_scaled=True needs one global scale per row"),
        ("te per-expert scales", lambda nv, **o: nv.scaled_fp4_quant(x(2, 4, 64), scales(2), numerics="te", **o),
         ValueError, "numerics='te' on the GPU takes one global scale"),
        ("tiles with ieee", lambda nv, **o: nv.scaled_fp4_quant(x(), 1.0, tile="16x16", **o), ValueError, "tile"),
        ("unknown tile", lambda nv, **o: nv.scaled_fp4_quant(x(), 1.0, numerics="te", tile="32x32", **o), ValueError,
         "tile must be one of"),
        ("tiles with row_scaled",
         lambda nv, **o: nv.scaled_fp4_quant(x(), scales(4), numerics="te", row_scaled=True, tile="16x16", **o),
         ValueError, "row_scaled=True supports tile='1x16' only"),
    ]


@pytest.mark.parametrize("case, call, error, match", _bad_calls(), ids=lambda c: c if isinstance(c, str) else "")
def test_bad_input_is_refused_before_launch(case, call, error, match):
    """The error names the argument and value, and the poisoned outputs the
    call was given are untouched: nothing was launched."""
    import nvfp4_cupy as nv

    fmt = "mxfp4" if "mxfp4" in case or "mx rule" in case else "nvfp4"
    out, out_scale = nv.create_fp4_output_tensors(8 if "expert" in case else 4, 64, fmt=fmt)
    out.fill(POISONS[0])
    out_scale.fill(POISONS[0])
    with pytest.raises(error, match=match):
        call(nv, out=out, out_scale=out_scale)
    cp.cuda.Device().synchronize()
    assert (cp.asnumpy(out) == POISONS[0]).all() and (cp.asnumpy(out_scale) == POISONS[0]).all()


def test_bad_numerics_of_global_scale_and_quantize():
    import nvfp4_cupy as nv

    x = cp.ones((4, 64), cp.float16)
    with pytest.raises(ValueError, match="numerics must be one of"):
        nv.compute_global_scale(x, numerics="TE")
    with pytest.raises(ValueError, match="numerics must be one of"):
        nv.quantize(x, numerics=None)


# ---------------------------------------------------------------------------
# torch: the eager functions and torch.ops.nvfp4
# ---------------------------------------------------------------------------
def _to_torch(torch, host: np.ndarray):
    dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(ml_dtypes.bfloat16): torch.bfloat16}[host.dtype]
    bits = host.view({2: np.int16, 4: np.int32}[host.dtype.itemsize])
    return torch.from_numpy(bits.copy()).cuda().view(dtype)


@pytest.mark.parametrize("entry", ["eager", "torch.ops"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_torch_entries(torch_cuda, entry, dtype):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = te_corpus_input("heavy_tailed", HOST_DTYPES[dtype], 129, 96)
    x = _to_torch(torch, x_host)
    ops = torch.ops.nvfp4
    eager = entry == "eager"
    # compute_global_scale and quantize
    for per_row in (False, True):
        gs = nvt.compute_global_scale(x, per_row, numerics="te") if eager else \
            ops.compute_global_scale(x, per_row, "te")
        assert_scales_equal(gs.cpu().numpy(), te.compute_global_scale_te(x_host, per_row=per_row), "global scale")
        packed, scales, gs = nvt.quantize(x, padded_n=128, per_row=per_row, numerics="te") if eager else \
            ops.quantize(x, 128, "swizzled", per_row, "te")
        want = te.quantize_te(x_host, padded_n=128, row_scaled=per_row)
        assert_bytes_equal(packed.cpu().numpy(), want[0], f"quantize per_row={per_row}: packed")
        assert_bytes_equal(scales.cpu().numpy(), want[1], f"quantize per_row={per_row}: scales")
    # scaled_fp4_quant: a host scale, a device scale, one scale per row
    gs_one = te.compute_global_scale_te(x_host)
    gs_rows = te.compute_global_scale_te(x_host, per_row=True)
    for gs_host, row_scaled in ((float(gs_one[0]), False), (gs_one, False), (gs_rows, True)):
        gs = gs_host if isinstance(gs_host, float) else torch.from_numpy(gs_host).cuda()
        if eager:
            packed, scales = nvt.scaled_fp4_quant(x, gs, layout="8x4", numerics="te", row_scaled=row_scaled)
        else:
            tensor, value = (None, gs) if isinstance(gs, float) else (gs, 0.0)
            packed, scales = ops.scaled_fp4_quant(x, tensor, value, None, "8x4", "nvfp4", "te", None, row_scaled)
        want = te.scaled_fp4_quant_te(x_host, gs_host, layout="8x4", row_scaled=row_scaled)
        assert_bytes_equal(packed.cpu().numpy(), want[0], f"row_scaled={row_scaled}: packed")
        assert_bytes_equal(scales.cpu().numpy(), want[1], f"row_scaled={row_scaled}: scales")
    # 16x16 tiles
    gs = torch.from_numpy(gs_one).cuda()
    packed, scales = nvt.scaled_fp4_quant(x, gs, layout="linear", numerics="te", tile="16x16") if eager else \
        ops.scaled_fp4_quant(x, gs, 0.0, None, "linear", "nvfp4", "te", None, False, "16x16")
    want = te.scaled_fp4_quant_te(x_host, gs_one, layout="linear", tile="16x16")
    assert_bytes_equal(packed.cpu().numpy(), want[0], "tiles: packed")
    assert_bytes_equal(scales.cpu().numpy(), want[1], "tiles: scales")
    packed, scales, gs = nvt.quantize(x, numerics="te", tile="16x16") if eager else \
        ops.quantize(x, None, "swizzled", False, "te", "16x16")
    want = te.quantize_te(x_host, tile="16x16")
    assert_bytes_equal(packed.cpu().numpy(), want[0], "quantize tiles: packed")
    assert_bytes_equal(scales.cpu().numpy(), want[1], "quantize tiles: scales")
    # an MX rule
    packed, scales = nvt.scaled_fp4_quant(x, None, fmt="mxfp4", mx_scale_rule="rceil", padded_n=128) if eager else \
        ops.scaled_fp4_quant(x, None, 0.0, 128, "swizzled", "mxfp4", "ieee", "rceil", False)
    want = mx_rules.scaled_mxfp4_quant(x_host, "rceil", padded_n=128)
    assert_bytes_equal(packed.cpu().numpy(), want[0], "rceil packed")
    assert_bytes_equal(scales.cpu().numpy(), want[1], "rceil scales")


def test_torch_fake_shapes_of_row_scaled_and_te(torch_cuda):
    """The registered fakes give the shapes the kernels return (torch.compile
    traces with them), row_scaled [E, 1, n] included."""
    torch = torch_cuda
    importlib.import_module("nvfp4_cupy.torch")  # registers torch.ops.nvfp4
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.ones(6, 1, 64, dtype=torch.bfloat16, device="cuda")
    rows = torch.ones(6, dtype=torch.float32, device="cuda")
    real = torch.ops.nvfp4.scaled_fp4_quant(x, rows, 0.0, None, "swizzled", "nvfp4", "te", None, True)
    with FakeTensorMode() as mode:
        fake = torch.ops.nvfp4.scaled_fp4_quant(mode.from_tensor(x), mode.from_tensor(rows), 0.0, None, "swizzled",
                                                "nvfp4", "te", None, True)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
