"""TE's random Hadamard transform and Four Over Six golden models
(nvfp4_cupy/reference/te_rht.py and te_4over6.py) against TransformerEngine's
own Python reference (tests/te_oracle.py), on the CPU:
docs/te_rht_and_4over6.md.

Four Over Six (and TE's basic numerics, which both build on) must be
byte-identical to TE's reference. The RHT sums in its own float32 order, so
it is compared by match rate, and every byte that differs must fall in a
class of section A.6: a transform value that differs (TE's summation order),
the block amax or the global amax it moves. Run with -s to see the rates.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bytes_check import assert_bytes_equal
from nvfp4_cupy.reference import LAYOUTS, e2m1_values, te_4over6, te_rht, unpack_codes, unswizzle_scales
from nvfp4_cupy.reference.te_rht import _quantize_te_rows, _te_quantize_blocks
from te_oracle import load_reference_nvfp4

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
KINDS = ("gaussian", "heavy-tailed", "weight-like")
LINEAR = LAYOUTS["linear"]


@pytest.fixture(scope="module")
def te():
    return load_reference_nvfp4()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def make(kind: str, shape, dtype, seed: int = 0) -> np.ndarray:
    """Data of a kind (as accuracy_table draws it), in dtype; heavy-tailed
    data is clipped to +-6e4 so that float16 stays finite."""
    rng = np.random.default_rng(seed)
    values = te_4over6._data(kind, (int(np.prod(shape[:-1])), shape[-1]), rng).reshape(shape)
    return np.clip(values, -6e4, 6e4).astype(np.float32).astype(dtype)


def to_torch(x: np.ndarray):
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def te_quantize(te, x: np.ndarray, *, rowwise=True, columnwise=False, **options):
    quantizer = te.NVFP4QuantizerRef(dtype=te.reference_utils.Fp4Formats.E2M1, rowwise=rowwise,
                                     columnwise=columnwise, **options)
    return quantizer, quantizer.quantize(to_torch(x))


def te_bytes(data, scale):
    """TE's packed data and float8 scales -> (codes, scale bytes) as NumPy.
    TE's reference writes a NaN scale as 0x7F or 0xFF, by the sign its
    torch.minimum leaves on the NaN (section A.6); we always write 0x7F."""
    import torch

    scale_bytes = scale.contiguous().view(torch.uint8).numpy()
    return unpack_codes(data.numpy()), np.where(scale_bytes == 0xFF, np.uint8(0x7F), scale_bytes)


def assert_same_as_te(ours_packed, ours_scales, te_codes, te_scales, what: str) -> None:
    """Our packed/linear scales against TE's codes/scale bytes (TE crops its
    packed rows to n // 2 bytes)."""
    codes = unpack_codes(ours_packed)[:, : te_codes.shape[1]]
    assert_bytes_equal(codes, te_codes, f"{what}: codes")
    assert_bytes_equal(ours_scales, te_scales, f"{what}: scale bytes")


def te_basic(values: np.ndarray, global_amax=None, per_row=False):
    """Our private duplicate of TE's basic numerics on float32 rows."""
    m, n = values.shape
    return _quantize_te_rows(values.astype(np.float32), -(-n // 16) * 16, LINEAR, global_amax, per_row,
                             lambda v, amax, s_enc: _te_quantize_blocks(v, s_enc))


def same_floats(a, b) -> bool:
    """Equal bits, or both NaN (of any sign)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))).all())


def floats(bits):
    return np.array(bits, np.uint32).view(np.float32)


# ---------------------------------------------------------------------------
# TE's basic numerics (the private duplicate in te_rht.py): TE's rowwise
# output, which gets no RHT.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("per_row", [False, True])
def test_te_basic_numerics_match_te(te, dtype, per_row):
    x = np.concatenate([make(kind, (16, 200), DTYPES[dtype], seed) for seed, kind in enumerate(KINDS)])
    _, out = te_quantize(te, x, row_scaled_nvfp4=per_row)
    packed, scales, amax = te_basic(x.astype(np.float32), per_row=per_row)
    assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale), f"te basic {dtype} per_row={per_row}")
    assert same_floats(amax, out.global_amax_row.numpy().reshape(-1))


# ---------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------
def test_sign_vector_and_matrix_are_tes(te):
    import torch

    assert np.array_equal(te_rht.RHT_SIGNS, te.get_wgrad_sign_vector().numpy())
    theirs = te.NVFP4QuantizerRef._build_hadamard_matrix(16, "cpu", torch.float32, True) * 0.25
    assert np.array_equal(te_rht.hadamard_matrix(), theirs.numpy())
    unsigned = te.NVFP4QuantizerRef._build_hadamard_matrix(16, "cpu", torch.float32, False) * 0.25
    assert np.array_equal(te_rht.hadamard_matrix(signed=False), unsigned.numpy())
    m = te_rht.hadamard_matrix()
    assert np.array_equal(m @ m.T, np.eye(16, dtype=np.float32))  # orthogonal, exactly


def _pairwise(terms):
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return np.float32(_pairwise(terms[:half]) + _pairwise(terms[half:]))


def test_rht_sums_in_the_documented_order():
    """Each output is the balanced pairwise sum, in index order, of
    RN(x_i * M[i, j]) (section A.2), computed here one scalar at a time."""
    x = make("heavy-tailed", (8, 64), np.float32, seed=3)
    x[0, :16] = floats([0x00000001, 0x00400000, 0x00800000, 0x00800001] * 4)  # subnormal products round
    got = te_rht.rht(x, "float32")
    m = te_rht.hadamard_matrix()
    sequential_differs = 0
    for chunk in range(x.size // 16):
        row, col = divmod(chunk * 16, x.shape[1])
        values = x[row, col : col + 16]
        for j in range(16):
            terms = [np.float32(values[i] * m[i, j]) for i in range(16)]
            want = _pairwise(terms)
            assert got[row, col + j].view(np.uint32) == np.float32(want).view(np.uint32), (row, col + j)
            sequential = np.float32(0)
            for t in terms:
                sequential = np.float32(sequential + t)
            sequential_differs += sequential != want
    assert sequential_differs > 0, "the data never tells the pairwise order from a sequential one"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_rht_rounds_to_the_input_dtype(dtype):
    x = make("gaussian", (4, 64), DTYPES[dtype])
    sums = te_rht.rht(x, "float32")
    assert np.array_equal(te_rht.rht(x), sums.astype(DTYPES[dtype]).astype(np.float32))
    # NaN and inf propagate through every output of their chunk
    x[0, 3] = np.nan
    x[1, 17] = np.inf
    y = te_rht.rht(x)
    assert np.isnan(y[0, :16]).all() and np.isfinite(y[0, 16:]).all()
    assert np.isinf(y[1, 16:32]).all() and np.isfinite(y[1, :16]).all()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_rht_values_against_tes_matmul(te, dtype):
    """TE's transform (a matmul in the input dtype) against ours, value by
    value: equal for 16-bit inputs except where the two float32 sums round
    to different sides of a 16-bit rounding boundary (one unit in the last
    place apart); for float32, within the summation-order error bound."""
    x = np.concatenate([make(kind, (64, 256), DTYPES[dtype], seed) for seed, kind in enumerate(KINDS)])
    quantizer = te.NVFP4QuantizerRef(dtype=te.reference_utils.Fp4Formats.E2M1, with_rht=True)
    theirs = quantizer._apply_rht(to_torch(x)).float().numpy()
    ours = te_rht.rht(x)
    differ = ours != theirs
    if dtype == "float32":
        magnitude = np.abs(x.astype(np.float64)).reshape(-1, 16).sum(axis=1).repeat(16).reshape(x.shape) * 0.25
        bound = 19 * 2.0**-24 * magnitude  # 15 ulps for a sequential sum, 4 for ours
        assert (np.abs(ours.astype(np.float64) - theirs) <= bound).all()
    else:
        assert differ.mean() < 1e-3, f"{differ.sum()} of {differ.size} values differ"
        bits_apart = np.abs(ours.astype(DTYPES[dtype]).view(np.int16).astype(np.int32)
                            - theirs.astype(DTYPES[dtype]).view(np.int16).astype(np.int32))
        assert (bits_apart[differ] == 1).all()
    print(f"\nRHT values vs TE's {dtype} matmul: {differ.sum()} of {differ.size} differ")


# ---------------------------------------------------------------------------
# RHT bytes against TE's reference: the match rate and its explanation.
# ---------------------------------------------------------------------------
def explain_rht(te_values, our_values, te_codes, te_scales, te_amax, packed, scales, amax):
    """Counts of mismatching bytes per class (section A.6); raises on any
    byte no class explains."""
    rows, k = our_values.shape
    codes = unpack_codes(packed)[:, :k]
    block = lambda v: np.max(np.abs(v.reshape(rows, k // 16, 16)), axis=-1)  # noqa: E731
    with np.errstate(invalid="ignore"):
        block_differs = ~((block(our_values) == block(te_values)) | (np.isnan(block(our_values))
                                                                      & np.isnan(block(te_values))))
    global_differs = not same_floats(amax, te_amax)
    value_differs = ~((our_values == te_values) | (np.isnan(our_values) & np.isnan(te_values)))
    classes = {"block amax": 0, "global amax": 0, "scale of the block": 0, "transform value": 0}
    unexplained = []
    scale_differs = scales != te_scales
    for r, b in np.argwhere(scale_differs):
        if block_differs[r, b]:
            classes["block amax"] += 1
        elif global_differs:
            classes["global amax"] += 1
        else:
            unexplained.append(("scale", int(r), int(b)))
    for r, c in np.argwhere(codes != te_codes):
        if scale_differs[r, c // 16]:
            classes["scale of the block"] += 1
        elif value_differs[r, c]:
            classes["transform value"] += 1
        elif global_differs:
            classes["global amax"] += 1
        else:
            unexplained.append(("code", int(r), int(c)))
    assert not unexplained, f"{len(unexplained)} mismatches no class explains; first {unexplained[:5]}"
    return classes, int(scale_differs.sum()), int((codes != te_codes).sum())


def rht_against_te(te, x, transform_dtype="input", per_row=False):
    """(match rates, classes) of our columnwise RHT bytes of x against TE's."""
    _, out = te_quantize(te, x, rowwise=per_row, columnwise=True, with_rht=True, row_scaled_nvfp4=per_row)
    te_codes, te_scales = te_bytes(out.data_t, out.scale_t)
    te_amax = out.global_amax_col.numpy().reshape(-1)
    quantizer = te.NVFP4QuantizerRef(dtype=te.reference_utils.Fp4Formats.E2M1, with_rht=True)
    te_values = quantizer._apply_rht(to_torch(np.ascontiguousarray(x.T))).float().numpy()
    # Our arithmetic after the transform, fed TE's transform values, is TE's to the byte:
    # every difference below comes from the transform's values.
    hybrid_packed, hybrid_scales, hybrid_amax = te_basic(te_values, per_row=per_row)
    assert_same_as_te(hybrid_packed, hybrid_scales, te_codes, te_scales, "our quantizer on TE's transform")
    assert same_floats(hybrid_amax, te_amax)
    packed, scales, amax = te_rht.scaled_fp4_quant_rht_columnwise(x, layout="linear", per_row=per_row,
                                                                  transform_dtype=transform_dtype)
    our_values = te_rht.rht(np.ascontiguousarray(x.T), transform_dtype)
    if per_row:  # per-row amaxes: a differing amax is a "global amax" for its own row only
        classes = {}
        scale_mismatches = code_mismatches = 0
        for r in range(x.shape[1]):
            c, s, k = explain_rht(te_values[r : r + 1], our_values[r : r + 1], te_codes[r : r + 1],
                                  te_scales[r : r + 1], te_amax[r : r + 1], packed[r : r + 1], scales[r : r + 1],
                                  amax[r : r + 1])
            classes = {name: classes.get(name, 0) + count for name, count in c.items()}
            scale_mismatches += s
            code_mismatches += k
    else:
        classes, scale_mismatches, code_mismatches = explain_rht(te_values, our_values, te_codes, te_scales,
                                                                 te_amax, packed, scales, amax)
    return 1 - code_mismatches / te_codes.size, 1 - scale_mismatches / te_scales.size, classes


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("transform_dtype", ["input", "float32"])
def test_rht_bytes_against_te(te, dtype, transform_dtype):
    lines = []
    for seed, kind in enumerate(KINDS):
        x = make(kind, (512, 128), DTYPES[dtype], seed)
        code_rate, scale_rate, classes = rht_against_te(te, x, transform_dtype)
        lines.append(f"{dtype:8s} {kind:12s} transform {transform_dtype:7s}: codes {code_rate:.4%}, "
                     f"scales {scale_rate:.4%}; mismatches by class {classes}")
        floor = 0.999 if transform_dtype == "input" else 0.97
        assert code_rate >= floor and scale_rate >= floor, lines[-1]
        if transform_dtype == "input" and dtype != "float32":
            assert code_rate == scale_rate == 1, lines[-1]  # the 16-bit transforms agree exactly here
    print("\nRHT bytes vs TE's reference\n" + "\n".join(lines))


def test_rht_per_row_against_te(te):
    x = make("heavy-tailed", (256, 64), ml_dtypes.bfloat16, seed=4)
    code_rate, scale_rate, _ = rht_against_te(te, x, per_row=True)
    assert code_rate == scale_rate == 1


@pytest.mark.parametrize("case", ["nan", "inf", "two-inf", "zeros", "tiny", "fp16-overflow"])
def test_rht_special_values_against_te(te, case):
    dtype = np.float16 if case == "fp16-overflow" else np.float32
    x = make("gaussian", (64, 32), np.float32, seed=5)
    if case == "nan":
        x[5, 3] = np.nan
    elif case == "inf":
        x[17, 4] = np.inf
    elif case == "two-inf":
        x[16, 4], x[17, 4] = np.inf, -np.inf  # one chunk: inf - inf gives NaNs
    elif case == "zeros":
        x[:] = 0
        x[3, 3] = -0.0
    elif case == "tiny":
        x[:32] *= np.float32(1e-41)  # subnormal: the products x * 0.25 round
        x[32:] *= np.float32(1e-30)
    else:
        x[:16, :8] = 30000 * te_rht.RHT_SIGNS[:, None]  # output 0 of the chunk: 16 * 30000 / 4 = 120000 > 65504
    x = x.astype(dtype)
    code_rate, scale_rate, classes = rht_against_te(te, x)
    assert (code_rate, scale_rate) == (1, 1) or case == "tiny", classes
    packed, scales, amax = te_rht.scaled_fp4_quant_rht_columnwise(x, layout="linear")
    if case in ("nan", "two-inf"):
        assert np.isnan(amax[0]) and (scales == 0x7F).all() and (packed == 0).all()
    if case == "fp16-overflow":
        assert np.isinf(amax[0])
        _, _, finite_amax = te_rht.scaled_fp4_quant_rht_columnwise(x, transform_dtype="float32")
        assert np.isfinite(finite_amax[0]) and finite_amax[0] == 120000


def test_rht_refuses_k_not_a_multiple_of_16_as_te_does(te):
    x = make("gaussian", (40, 32), np.float32)
    with pytest.raises(ValueError, match="divisible by hadamard dimension"):
        te_quantize(te, x, rowwise=False, columnwise=True, with_rht=True)
    with pytest.raises(ValueError, match=r"must be a positive multiple of 16, got 40"):
        te_rht.scaled_fp4_quant_rht_columnwise(x)
    with pytest.raises(ValueError, match=r"x's last dimension K must be a positive multiple of 16, got 40"):
        te_rht.scaled_fp4_quant_rht(np.ascontiguousarray(x.T))
    with pytest.raises(ValueError, match="multiple of 16"):
        te_rht.rht(x.T)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        te_rht.scaled_fp4_quant_rht_columnwise(np.ones(32, np.float32))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rht_padding_layouts_and_shapes(layout):
    x = make("weight-like", (2, 48, 20), ml_dtypes.bfloat16)  # columnwise: M = 96, N = 20
    packed, scales, amax = te_rht.scaled_fp4_quant_rht_columnwise(x, layout="linear")
    flat = te_rht.scaled_fp4_quant_rht_columnwise(x.reshape(96, 20), layout="linear")
    assert all(np.array_equal(a, b) for a, b in zip((packed, scales, amax), flat))
    assert packed.shape == (20, 48) and scales.shape == (20, 6)
    # Explicit K padding appends whole zero blocks: scale 0x00, codes 0x0.
    padded, padded_scales, padded_amax = te_rht.scaled_fp4_quant_rht_columnwise(x, padded_n=128, layout=layout)
    assert padded.shape == (20, 64) and np.array_equal(padded[:, :48], packed) and not padded[:, 48:].any()
    rows = unswizzle_scales(padded_scales, 20, 128, layout)
    assert np.array_equal(rows[:, :6], scales) and not rows[:, 6:].any()
    assert np.array_equal(padded_amax, amax)
    # The K-last form is the columnwise one of the transpose.
    operand = np.ascontiguousarray(x.reshape(96, 20).T)
    assert all(np.array_equal(a, b) for a, b in zip(te_rht.scaled_fp4_quant_rht(operand, layout="linear"), flat))
    # No rows: empty outputs.
    p, s, a = te_rht.scaled_fp4_quant_rht(np.zeros((0, 32), np.float16), layout=layout)
    assert p.shape == (0, 16) and s.shape[0] == 0 and a.tolist() == [0.0]


def test_rht_global_amax_given():
    x = make("gaussian", (32, 64), np.float32)
    packed, scales, amax = te_rht.scaled_fp4_quant_rht(x)
    assert np.array_equal(amax, te_rht.rht_global_amax(x))
    again = te_rht.scaled_fp4_quant_rht(x, amax)
    as_host = te_rht.scaled_fp4_quant_rht(x, float(amax[0]))
    assert all(np.array_equal(a, b) for a, b in zip(again, (packed, scales, amax)))
    assert all(np.array_equal(a, b) for a, b in zip(as_host, (packed, scales, amax)))
    per_row = te_rht.scaled_fp4_quant_rht(x, per_row=True)
    given_rows = te_rht.scaled_fp4_quant_rht(x, te_rht.rht_global_amax(x, per_row=True))
    assert all(np.array_equal(a, b) for a, b in zip(per_row, given_rows))
    # An amax that makes S_enc invalid (negative, -0.0) NaN-scales its row only.
    bad = te_rht.rht_global_amax(x, per_row=True)
    bad[[3, 7]] = [-1.0, -0.0]
    p, s, _ = te_rht.scaled_fp4_quant_rht(x, bad, layout="linear")
    assert (s[[3, 7]] == 0x7F).all() and not p[[3, 7]].any()
    good = te_rht.scaled_fp4_quant_rht(x, per_row=True, layout="linear")[1]
    assert np.array_equal(np.delete(s, [3, 7], 0), np.delete(good, [3, 7], 0))
    zero = te_rht.scaled_fp4_quant_rht(x, -0.0, layout="linear")
    assert np.array_equal(zero[1], te_rht.scaled_fp4_quant_rht(x, 0.0, layout="linear")[1])
    with pytest.raises(ValueError, match=r"global_amax as an array must hold one element.*shape \(3,\)"):
        te_rht.scaled_fp4_quant_rht(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="global_amax as an array must be float32"):
        te_rht.scaled_fp4_quant_rht(x, np.ones(1, np.float64))
    with pytest.raises(TypeError, match="global_amax must be None, a float or a float32 array"):
        te_rht.scaled_fp4_quant_rht(x, True)
    with pytest.raises(ValueError, match="finite and >= 0"):
        te_rht.scaled_fp4_quant_rht(x, -1.0)
    with pytest.raises(ValueError, match="per_row=True asks for a computed amax"):
        te_rht.scaled_fp4_quant_rht(x, amax, per_row=True)
    with pytest.raises(ValueError, match="transform_dtype must be 'input'"):
        te_rht.scaled_fp4_quant_rht(x, transform_dtype="bfloat16")


# ---------------------------------------------------------------------------
# Four Over Six: byte-identical to TE's reference.
# ---------------------------------------------------------------------------
def _map6_scale_bytes(x32: np.ndarray, e4m3_max: int) -> np.ndarray:
    """The map-to-6 candidate's scale byte, straight from section B.2."""
    amax = np.float32(np.max(np.abs(x32)))
    s_enc = np.minimum(np.float32(6 * e4m3_max) / amax, np.float32(3.4028235e38))
    blocks = np.pad(x32, ((0, 0), (0, -x32.shape[1] % 16))).reshape(x32.shape[0], -1, 16)
    base = (np.max(np.abs(blocks), axis=-1) / np.float32(6)) * s_enc
    return np.minimum(base, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("err_mode", ["MAE", "MSE"])
@pytest.mark.parametrize("e4m3_max", [448, 256])
@pytest.mark.parametrize("fast", [False, True])
def test_4over6_matches_te(te, dtype, err_mode, e4m3_max, fast):
    x = np.concatenate([make(kind, (16, 200), DTYPES[dtype], seed) for seed, kind in enumerate(KINDS)])
    for per_row in (False, True):
        _, out = te_quantize(te, x, nvfp4_use_4over6=True, nvfp4_e4m3_max=e4m3_max, nvfp4_4over6_err_mode=err_mode,
                             nvfp4_4over6_err_use_fast_math=fast, row_scaled_nvfp4=per_row)
        packed, scales, amax = te_4over6.scaled_fp4_quant_4over6(
            x, layout="linear", err_mode=err_mode, e4m3_max=e4m3_max, err_use_fast_math=fast, per_row=per_row)
        assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale),
                          f"4/6 {dtype} {err_mode} {e4m3_max} fast={fast} per_row={per_row}")
        assert same_floats(amax, out.global_amax_row.numpy().reshape(-1))
    # Both candidates are chosen somewhere in this data.
    map4 = scales != _map6_scale_bytes(x.astype(np.float32), e4m3_max)
    assert 0 < map4.mean() < 1, f"map-to-4 chosen in {map4.mean():.1%} of the blocks"


def test_4over6_columnwise_operand_matches_te(te):
    """TE applies Four Over Six to both operands; the columnwise one is x.T."""
    x = make("weight-like", (48, 64), ml_dtypes.bfloat16, seed=6)
    _, out = te_quantize(te, x, rowwise=False, columnwise=True, nvfp4_use_4over6=True, nvfp4_e4m3_max=256)
    packed, scales, _ = te_4over6.scaled_fp4_quant_4over6(np.ascontiguousarray(x.T), layout="linear", e4m3_max=256)
    assert_same_as_te(packed, scales, *te_bytes(out.data_t, out.scale_t), "4/6 columnwise")


SPECIAL_CASES = ["nan", "inf", "zeros", "tiny", "mixed-tiny", "huge", "exact"]


def _special(case: str) -> np.ndarray:
    x = make("gaussian", (4, 64), np.float32, seed=7)
    if case == "nan":
        x[1, 5] = np.nan
    elif case == "inf":
        x[2, 40] = -np.inf
        x[3, 0] = np.inf
    elif case == "zeros":
        x[:] = 0
        x[0, 1] = -0.0
    elif case == "tiny":
        x *= np.float32(1e-40)
    elif case == "mixed-tiny":
        x[:, :32] *= np.float32(1e-30)  # blocks whose scale rounds to 0: r = FLT_MAX
        x[0, 16:32] = -0.0
    elif case == "huge":
        x *= np.float32(1e37)
    else:
        e2m1 = np.array([6, 4, 3, 2, 1.5, 1, 0.5, 0, -6, -4, -3, -2, -1.5, -1, -0.5, -0.0], np.float32)
        x[:] = np.tile(e2m1, (4, 4)) * np.float32(0.75)  # every block: E2M1 values, ties for map-to-4
    return x


@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_4over6_and_basic_special_values_match_te(te, case):
    x = _special(case)
    for fast in (False, True):
        for err_mode in ("MAE", "MSE"):
            _, out = te_quantize(te, x, nvfp4_use_4over6=True, nvfp4_4over6_err_mode=err_mode,
                                 nvfp4_4over6_err_use_fast_math=fast)
            packed, scales, _ = te_4over6.scaled_fp4_quant_4over6(x, layout="linear", err_mode=err_mode,
                                                                  err_use_fast_math=fast)
            assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale), f"4/6 {case} {err_mode} fast={fast}")
    _, out = te_quantize(te, x)
    packed, scales, _ = te_basic(x)
    assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale), f"te basic {case}")


def test_4over6_tie_keeps_map_to_6():
    """A block both candidates represent exactly: equal errors, map-to-6 wins."""
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = [6, 3]  # global amax 2688 (below) gives S_enc = 1: sf 1.0 (map 6) or 1.5 (map 4)
    x[0, 16] = 2688
    packed, scales, _ = te_4over6.scaled_fp4_quant_4over6(x, layout="linear")
    assert scales[0, 0] == 0x38  # 1.0: map to 6 (map to 4 would be 0x3C, 1.5)
    assert unpack_codes(packed)[0, :2].tolist() == [7, 5]


def test_fp16_candidate_matches_tes_decoder(te):
    import torch

    codes, scale_bytes = np.meshgrid(np.arange(16, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    q = torch.from_numpy(e2m1_values(codes))
    scale = torch.from_numpy(scale_bytes.copy()).view(torch.float8_e4m3fn)
    theirs = te.NVFP4QuantizerRef._ref_nvfp4_4over6_fp16_candidate(q, scale).numpy()
    ours = te_4over6.fp16_candidate(codes, scale_bytes)
    assert_bytes_equal(ours.view(np.uint32), theirs.view(np.uint32), "fp16 candidate bits")
    assert (ours[(scale_bytes & 0x7F) == 0x7F] == 98304).all()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_4over6_padding_and_layouts(layout):
    x = make("gaussian", (3, 5, 40), np.float16)  # 15 rows, n = 40: a part block
    packed, scales, amax = te_4over6.scaled_fp4_quant_4over6(x, layout="linear", err_mode="mse")
    assert packed.shape == (15, 24) and scales.shape == (15, 3)
    padded, padded_scales, _ = te_4over6.scaled_fp4_quant_4over6(x, padded_n=64, layout=layout, err_mode="MSE")
    assert np.array_equal(padded[:, :24], packed) and not padded[:, 24:].any()
    rows = unswizzle_scales(padded_scales, 15, 64, layout)
    assert np.array_equal(rows[:, :3], scales) and not rows[:, 3:].any()
    # padding columns inside the last block are codes 0x0: the byte holding columns 40, 41 is 0
    assert not (unpack_codes(packed)[:, 40:] != 0).any()


# ---------------------------------------------------------------------------
# Options TE does not define, and argument errors.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, rht=True), ValueError, "TE refuses it"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, fmt="mxfp4"), ValueError, "fmt='nvfp4' only"),
        (lambda x: te_rht.scaled_fp4_quant_rht(x, fmt="mxfp4"), ValueError, "fmt='nvfp4' only"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, fmt="nvfp8"), ValueError, "fmt must be one of"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, e4m3_max=300), ValueError, "448 or 256"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, e4m3_max=256.0), TypeError, "e4m3_max must be an int"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, err_mode="L1"), ValueError, "'MAE' or 'MSE'"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, err_mode=1), TypeError, "'MAE' or 'MSE'"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, err_use_fast_math=1), TypeError, "must be a bool"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, per_row="yes"), TypeError, "per_row must be a bool"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, padded_n=40), ValueError, "multiple of 16"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x, layout="tiled"), ValueError, "layout must be one of"),
        (lambda x: te_4over6.scaled_fp4_quant_4over6(x.astype(np.int32)), TypeError, "float16, bfloat16 or float32"),
        (lambda x: te_rht.check_te_options(e4m3_max=256), ValueError, "apply to Four Over Six only"),
        (lambda x: te_rht.check_te_options(err_mode="MSE", err_use_fast_math=True), ValueError, "Four Over Six only"),
        (lambda x: te_rht.check_te_options(rht=True, four_over_six=True), ValueError, "does not support RHT"),
    ],
)
def test_options_te_does_not_define_and_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(np.ones((2, 32), np.float32))


def test_check_te_options_defaults():
    assert te_rht.check_te_options(four_over_six=True) == (448, "MAE", False)
    assert te_rht.check_te_options(four_over_six=True, e4m3_max=256, err_mode="mse") == (256, "MSE", False)
    assert te_rht.check_te_options(rht=True) == (448, "MAE", False)


# ---------------------------------------------------------------------------
# Random bit patterns against TE (special values anywhere).
# ---------------------------------------------------------------------------
def test_random_bit_patterns_match_te(te):
    rng = np.random.default_rng(11)
    special = floats([0x7FC00000, 0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x7F7FFFFF, 0x00800000])
    for trial in range(40):
        x = rng.standard_normal((2, 32)).astype(np.float32) * np.float32(10.0 ** rng.integers(-40, 38))
        picks = rng.random(x.shape) < 0.05
        x[picks] = rng.choice(special, picks.sum())
        if trial % 2:
            x.view(np.uint32)[rng.random(x.shape) < 0.1] = rng.integers(0, 2**32, dtype=np.uint32)
        err_mode, e4m3_max, fast = ("MAE", "MSE")[trial % 2], (448, 256)[trial // 2 % 2], bool(trial // 4 % 2)
        _, out = te_quantize(te, x, nvfp4_use_4over6=True, nvfp4_4over6_err_mode=err_mode, nvfp4_e4m3_max=e4m3_max,
                             nvfp4_4over6_err_use_fast_math=fast)
        packed, scales, _ = te_4over6.scaled_fp4_quant_4over6(x, layout="linear", err_mode=err_mode,
                                                              e4m3_max=e4m3_max, err_use_fast_math=fast)
        bits = ", ".join(f"0x{b:08x}" for b in x.view(np.uint32).ravel()[:8])
        assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale), f"4/6 trial {trial} (x starts {bits})")
        _, out = te_quantize(te, x)
        packed, scales, _ = te_basic(x)
        assert_same_as_te(packed, scales, *te_bytes(out.data, out.scale), f"te basic trial {trial}")


# ---------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------
def test_accuracy_table():
    table = te_4over6.accuracy_table(128, 512)
    print("\nSQNR in dB (MSE), bfloat16 [128, 512]\n" + te_4over6.format_accuracy_table(table))
    for kind, row in table.items():
        assert all(np.isfinite(sqnr) and sqnr > 15 for sqnr, _ in row.values()), (kind, row)
        assert abs(row["ieee"][0] - row["te"][0]) < 0.05, (kind, row)
        for mode in ("MAE", "MSE"):
            assert row[f"4/6 {mode} 448"][0] > row["te"][0], (kind, row)
        # One SR draw is noisier than round-to-nearest; the mean of many is closer to x (unbiased).
        assert row["SR, mean of 50 seeds"][0] > row["ieee"][0] > row["SR, one seed"][0], (kind, row)
