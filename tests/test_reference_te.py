"""numerics="te" (nvfp4_cupy/reference/te.py, docs/te_numerics.md) held byte
for byte to TransformerEngine's own NVFP4 reference (NVFP4QuantizerRef from
the transformer_engine 2.20.2 wheel, loaded on the CPU by tests/te_oracle.py),
and numerics="ieee" (reference.scaled_fp4_quant) shown to differ from "te"
exactly in the classes of docs/te_numerics.md, section 8. CPU only.

TE's outputs are mapped to ours before comparing: TE's packed data is cut to
[M, N // 2] (ours is [m, padded_n // 2]), its scales are linear
[rows, N_pad / 16] (rows padded to 16 for 16x16 tiles), and a NaN scale byte
of TE's may be 0x7F or 0xFF (torch's CPU minimum; docs/te_numerics.md,
section 9), which we write as 0x7F.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy import reference as ref
from nvfp4_cupy.reference import te
from nvfp4_cupy.reference.nvfp4 import _pack_codes

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
LAYOUT_NAMES = ("swizzled", "linear", "8x4")
M, N = 24, 80  # 5 blocks a row; 16x16 tiles: one whole row of tiles, one of 8 rows
TIE_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # E2M1 rounding ties
NAN_BITS = (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF8077C6)  # quiet, negative, signalling


# ---------------------------------------------------------------------------
# TE's reference, and comparing its bytes with ours
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def te_ref():
    from te_oracle import load_reference_nvfp4

    return load_reference_nvfp4()


def _to_torch(x: np.ndarray):
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype == DTYPES["bfloat16"]:
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _np_bytes(tensor):
    import torch

    return None if tensor is None else tensor.contiguous().view(torch.uint8).numpy()


def te_quantize(te_ref, x, tile="1x16", columnwise=True, row_scaled=False) -> dict:
    """TE's NVFP4QuantizerRef.quantize on x [M, N]: its bytes as NumPy."""
    from transformer_engine.pytorch.custom_recipes import reference_utils

    quantizer = te_ref.NVFP4QuantizerRef(
        dtype=reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=columnwise,
        quant_tile_shape=(te.TILES[tile], 16), row_scaled_nvfp4=row_scaled,
    )
    out = quantizer.quantize(_to_torch(x))
    return {"data": _np_bytes(out.data), "scale": _np_bytes(out.scale), "data_t": _np_bytes(out.data_t),
            "scale_t": _np_bytes(out.scale_t), "amax_row": out.global_amax_row.numpy(),
            "amax_col": out.global_amax_col.numpy()}


def te_blocks(te_ref, values, global_amax, tile="1x16", row_scaled=False):
    """TE's per-block quantization (_quantize_blockwise_reference) of float32
    values [m, K] under any global amax: (packed, scale bytes)."""
    import torch

    packed, scales = te_ref.NVFP4QuantizerRef._quantize_blockwise_reference(
        torch.from_numpy(np.ascontiguousarray(values, np.float32)),
        torch.from_numpy(np.asarray(global_amax, np.float32).reshape(-1)),
        16, te.TILES[tile], pow_2_scales=False, row_scaled_nvfp4=row_scaled, eps=0.0,
    )
    return packed.numpy(), _np_bytes(scales)


def _te_nan_byte(scale_bytes):
    """TE's NaN scale as ours: 0xFF (a negative NaN from torch's vectorized
    minimum) reads 0x7F. docs/te_numerics.md, section 9."""
    scale_bytes = np.asarray(scale_bytes)
    return np.where(scale_bytes == 0xFF, np.uint8(0x7F), scale_bytes)


def assert_same_bytes(ours, theirs, what: str, limit: int = 5) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != TE's {theirs.shape}"
    differ = np.argwhere(ours != theirs)
    if len(differ):
        first = ", ".join(f"{tuple(int(i) for i in idx)}: ours 0x{int(ours[tuple(idx)]):02x} "
                          f"TE 0x{int(theirs[tuple(idx)]):02x}" for idx in differ[:limit])
        rate = 1 - len(differ) / ours.size
        raise AssertionError(f"{what}: {len(differ)} of {ours.size} bytes differ (byte-match rate "
                             f"{rate:.4%}); first {first}")


def assert_matches_te(ours_packed, ours_scales, theirs_packed, theirs_scales, m, n, padded_n, layout, what):
    """Ours (packed [m, padded_n // 2], scales in `layout`) against TE's
    (packed [m, n // 2], linear scales [>= m, >= padded_n / 16])."""
    assert_same_bytes(ours_packed[:, : n // 2], theirs_packed, f"{what}: packed")
    # Past TE's cut: only padding codes, which are 0x0 (docs/te_numerics.md, section 4).
    tail = ref.unpack_codes(ours_packed)[:, n:]
    assert not tail.any(), f"{what}: nonzero codes in the K padding"
    linear = ref.unswizzle_scales(ours_scales, m, padded_n, layout)
    te_cols = min(theirs_scales.shape[1], linear.shape[1])
    assert_same_bytes(linear[:, :te_cols], _te_nan_byte(theirs_scales[:m, :te_cols]), f"{what}: scales")


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------
def _finfo(dtype):
    return ml_dtypes.finfo(dtype) if dtype == DTYPES["bfloat16"] else np.finfo(dtype)


def _e4m3_midpoints() -> np.ndarray:
    values = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return ((values[:-1] + values[1:]) / 2).astype(np.float32)


def _random_bits(rng, shape, dtype) -> np.ndarray:
    """Every bit pattern of dtype, NaN replaced by 1 (NaN has its own items)."""
    if dtype.itemsize == 4:
        x = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
    else:
        x = rng.integers(0, 2**16, shape, dtype=np.uint32).astype(np.uint16).view(dtype)
    x = x.copy()
    x[np.isnan(x.astype(np.float32))] = 1
    return x


def make_input(name: str, dtype, m: int = M, n: int = N) -> np.ndarray:
    """Corpus item `name` as dtype [m, n]."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype.name}/{m}x{n}".encode()))
    info = _finfo(dtype)
    x = rng.standard_normal((m, n)).astype(np.float32)
    if name == "heavy_tailed":
        x = (x * np.exp(3 * rng.standard_normal((m, n)))).astype(np.float32)
        x = np.clip(x, -float(info.max), float(info.max)).astype(np.float32)
    elif name == "zero_blocks":
        x[:, 16:32] = 0  # zero blocks in every row
        x[3, 48:64] = -0.0  # a block of -0.0
        x[:16, :16] = 0  # a whole zero 16x16 tile
        x[16:, 64:] = 0  # a zero tile with pad rows below it
    elif name == "negative_zero":
        x[rng.random((m, n)) < 0.3] = -0.0
    elif name == "subnormal":
        tiny = float(info.smallest_subnormal)
        x = (rng.integers(-64, 65, (m, n)) * tiny).astype(np.float32)
        x[::3] *= 2**8  # some rows of small normals
        x[rng.random((m, n)) < 0.1] = -0.0
    elif name == "huge":
        x = (np.sign(x) * float(info.max) * rng.uniform(0.5, 1.0, (m, n))).astype(np.float32)
        x[::2] = rng.standard_normal((len(x[::2]), n))  # next to ordinary rows
    elif name == "one_huge_outlier":  # S_enc tiny: most blocks get scale 0x00
        x[5, 7] = float(info.max) * 0.9
    elif name == "e2m1_ties":
        # A 2688 pins S_enc = 1; a block (tile) of amax 6 * 2^k then has
        # sf = 2^k and r = 2^-k, so v = tie * 2^k lands on the tie.
        powers = 2.0 ** rng.integers(-6, 8, (-(-m // 16), n // 16))
        scale = np.repeat(np.repeat(powers, 16, axis=0)[:m], 16, axis=1)
        ties = rng.choice(np.array(TIE_POINTS + (6.0, 0.0)), (m, n)) * rng.choice([-1.0, 1.0], (m, n))
        ties[:, ::16] = 6.0
        x = (ties * scale).astype(np.float32)
        x[0, :16] = [2688.0] + [0.0] * 15
    elif name == "e4m3_ties":
        # S_enc = 1; each block's amax 6 * t puts s = RN(amax * RN(1/6)) on (or
        # an ulp off) an E4M3 rounding tie t.
        midpoints = _e4m3_midpoints()
        amax = (6 * rng.choice(midpoints[midpoints > 2**-9], (m, n // 16))).astype(np.float32)
        nudge = rng.integers(-1, 2, amax.shape)
        amax = np.where(nudge > 0, np.nextafter(amax, F32(np.inf)), np.where(nudge < 0, np.nextafter(amax, F32(0)),
                                                                                amax))
        x = np.clip(x, -2, 2) / 2 * np.repeat(amax, 16, axis=1)
        x[:, ::16] = np.where(rng.random((m, n // 16)) < 0.5, -amax, amax)
        x[0, :16] = [2688.0] + [0.0] * 15
    elif name == "infinities":
        x[rng.random((m, n)) < 0.03] = np.inf
        x[rng.random((m, n)) < 0.03] = -np.inf
    elif name == "nan":
        for bits, (i, j) in zip(NAN_BITS, ((1, 2), (7, 40), (20, 79), (12, 17))):
            x[i % m, j % n] = np.array([bits], np.uint32).view(np.float32)[0]
    elif name == "all_zero":
        x = np.where(rng.random((m, n)) < 0.3, F32(-0.0), F32(0.0))
    elif name == "random_bits":
        return _random_bits(rng, (m, n), dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflows to inf, NaN narrows, on purpose
        return x.astype(dtype)


CORPUS = ("gaussian", "heavy_tailed", "zero_blocks", "negative_zero", "subnormal", "huge", "one_huge_outlier",
          "e2m1_ties", "e4m3_ties", "infinities", "nan", "all_zero", "random_bits")
MODES = {  # name -> (tile, row_scaled)
    "1x16": ("1x16", False),
    "16x16": ("16x16", False),
    "row_scaled": ("1x16", True),
}


# ---------------------------------------------------------------------------
# Items 1, 2, 3, 6: the corpus in every mode, rowwise and columnwise
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", CORPUS)
def test_quantize_te_matches_te_byte_for_byte(te_ref, name, mode, dtype):
    tile, row_scaled = MODES[mode]
    x = make_input(name, DTYPES[dtype])
    theirs = te_quantize(te_ref, x, tile, columnwise=True, row_scaled=row_scaled)
    packed, scales, gs, packed_t, scales_t, gs_t = te.quantize_te(x, layout="linear", tile=tile, columnwise=True,
                                                                   row_scaled=row_scaled)
    what = f"{name} {dtype} {mode}"
    assert_matches_te(packed, scales, theirs["data"], theirs["scale"], M, N, 80, "linear", f"{what} rowwise")
    assert_matches_te(packed_t, scales_t, theirs["data_t"], theirs["scale_t"], N, M, 32, "linear",
                      f"{what} columnwise")
    # The global scales are TE's S_enc of TE's own amax (row and column).
    assert np.array_equal(gs, te.encode_scale_from_amax_te(theirs["amax_row"]), equal_nan=True), what
    assert np.array_equal(gs_t, te.encode_scale_from_amax_te(theirs["amax_col"]), equal_nan=True), what


@pytest.mark.parametrize("mode", list(MODES))
def test_columnwise_false_gives_the_same_rowwise_bytes(te_ref, mode):
    tile, row_scaled = MODES[mode]
    x = make_input("heavy_tailed", DTYPES["bfloat16"])
    theirs = te_quantize(te_ref, x, tile, columnwise=False, row_scaled=row_scaled)
    assert theirs["data_t"] is None
    packed, scales, gs = te.quantize_te(x, layout="linear", tile=tile, row_scaled=row_scaled)
    assert_matches_te(packed, scales, theirs["data"], theirs["scale"], M, N, N, "linear", mode)
    both = te.quantize_te(x, layout="linear", tile=tile, columnwise=True, row_scaled=row_scaled)
    assert np.array_equal(both[0], packed) and np.array_equal(both[1], scales)


@pytest.mark.parametrize("tile", list(te.TILES))
def test_columnwise_global_scale_defaults_to_the_rowwise_one(te_ref, tile):
    x = make_input("infinities", DTYPES["float16"])
    theirs = te_quantize(te_ref, x, tile)
    gs = te.compute_global_scale_te(x)
    packed, scales, packed_t, scales_t = te.scaled_fp4_quant_te(x, gs, layout="linear", tile=tile, columnwise=True)
    assert_matches_te(packed_t, scales_t, theirs["data_t"], theirs["scale_t"], N, M, 32, "linear", "columnwise")
    explicit = te.scaled_fp4_quant_te(x, gs, layout="linear", tile=tile, columnwise=True, global_scale_t=gs)
    assert all(np.array_equal(a, b) for a, b in zip(explicit, (packed, scales, packed_t, scales_t)))


def test_2d_tiles_share_one_scale_and_te_repeats_it_on_pad_rows(te_ref):
    x = make_input("gaussian", DTYPES["float32"])
    theirs = te_quantize(te_ref, x, "16x16")
    _, scales, *_ = te.quantize_te(x, layout="linear", tile="16x16", columnwise=True)
    tiles = scales.reshape(-1)[: 16 * 5].reshape(16, 5)
    assert (tiles == tiles[0]).all(), "rows of one 16x16 tile must hold the same scale bytes"
    assert (scales[16:] == scales[16]).all()
    # TE's scales have rows up to round_up(M, 16), the tile's byte repeated;
    # ours stop at M (layout padding, docs/te_numerics.md, section 4).
    assert theirs["scale"].shape == (32, 5) and (theirs["scale"][M:] == theirs["scale"][M - 1]).all()


def test_2d_columnwise_is_the_transpose_of_the_rowwise_codes():
    x = make_input("heavy_tailed", DTYPES["float16"], 32, 48)
    packed, scales, gs, packed_t, scales_t, gs_t = te.quantize_te(x, layout="linear", tile="16x16", columnwise=True)
    assert np.array_equal(ref.unpack_codes(packed).T, ref.unpack_codes(packed_t))
    tile_scales = scales[::16]  # [2, 3]
    assert np.array_equal(scales_t[::16], tile_scales.T)


# ---------------------------------------------------------------------------
# Every input: random bit patterns and any global amax, per block
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_every_bit_pattern_under_any_global_amax(te_ref, mode):
    tile, row_scaled = MODES[mode]
    rng = np.random.default_rng(zlib.crc32(mode.encode()))
    specials = np.array([0.0, np.inf, np.nan, 1e-45, 1e-38, FLT_MAX, 2688.0, 1.0], np.float32)
    for trial in range(60):
        m, n = 16 * int(rng.integers(1, 3)), 16 * int(rng.integers(1, 4))
        x = _random_bits(rng, (m, n), DTYPES["float32"])
        x[rng.random((m, n)) < 0.01] = np.nan
        if trial % 3 == 0:
            x = (x.view(np.uint32) & np.uint32(0x8FFFFFFF)).view(np.float32)  # small magnitudes
        amax = np.abs(_random_bits(rng, (m if row_scaled else 1,), DTYPES["float32"]))
        pick = rng.random(amax.shape) < 0.3
        amax[pick] = rng.choice(specials, int(pick.sum()))
        theirs_packed, theirs_scales = te_blocks(te_ref, x, amax, tile, row_scaled)
        codes, scale_bytes = te.quantize_blocks_te(x, te.encode_scale_from_amax_te(amax), tile)
        what = f"{mode} trial {trial}"
        assert_same_bytes(_pack_codes(codes), theirs_packed, f"{what}: packed")
        assert_same_bytes(scale_bytes, _te_nan_byte(theirs_scales), f"{what}: scales")


def test_every_e4m3_value_and_tie_as_a_block_scale(te_ref):
    # S_enc = 1 (global amax 2688): a block of amax 6 * t has s = t (or an ulp off).
    points = np.concatenate([ref.e4m3_values(np.arange(0x7F, dtype=np.uint8)), _e4m3_midpoints()])
    amax = (6 * points.astype(np.float64)).astype(np.float32)
    amax = np.concatenate([amax, np.nextafter(amax, F32(np.inf)), np.nextafter(amax, F32(0))])
    x = np.zeros((len(amax), 16), np.float32)
    x[:, 0] = amax
    x[:, 1] = amax / 3
    theirs_packed, theirs_scales = te_blocks(te_ref, x, [2688.0])
    codes, scale_bytes = te.quantize_blocks_te(x, te.encode_scale_from_amax_te([2688.0]))
    assert_same_bytes(_pack_codes(codes), theirs_packed, "packed")
    assert_same_bytes(scale_bytes, theirs_scales, "scales")


def test_every_e2m1_boundary_and_its_neighbours(te_ref):
    # S_enc = 1 and a 6 in the block: sf = 1, r = 1, y = v.
    ties = np.array(TIE_POINTS + (6.0, 0.0), np.float32)
    values = np.concatenate([ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(0))])
    values = np.concatenate([values, -values, [np.inf, -np.inf, 7.0, -7.0, 1e-30, -1e-30]]).astype(np.float32)
    x = np.zeros((len(values), 16), np.float32)
    x[:, 0] = 6.0
    x[:, 1] = values
    theirs_packed, theirs_scales = te_blocks(te_ref, x, [2688.0])
    codes, scale_bytes = te.quantize_blocks_te(x, F32(1.0))
    assert_same_bytes(_pack_codes(codes), theirs_packed, "packed")
    assert_same_bytes(scale_bytes, theirs_scales, "scales")


# ---------------------------------------------------------------------------
# Layouts, K padding, expert batches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("mode", list(MODES))
def test_every_layout_holds_te_scales(te_ref, layout, mode):
    tile, row_scaled = MODES[mode]
    x = make_input("heavy_tailed", DTYPES["float32"], 136, 48)  # two 128-row tiles of the swizzle
    theirs = te_quantize(te_ref, x, tile, row_scaled=row_scaled)
    packed, scales, _, packed_t, scales_t, _ = te.quantize_te(x, layout=layout, tile=tile, columnwise=True,
                                                              row_scaled=row_scaled)
    assert scales.shape == ref.LAYOUTS[layout].scale_shape(136, 48)
    assert scales_t.shape == ref.LAYOUTS[layout].scale_shape(48, 144)
    assert_matches_te(packed, scales, theirs["data"], theirs["scale"], 136, 48, 48, layout, f"{layout} rowwise")
    assert_matches_te(packed_t, scales_t, theirs["data_t"], theirs["scale_t"], 48, 136, 144, layout,
                      f"{layout} columnwise")
    if layout == "swizzled":  # TE's own un-swizzle reads our swizzled bytes as its linear scales
        import torch

        pairs = ((scales, theirs["scale"], 136, 48), (scales_t, theirs["scale_t"], 48, 144))
        for ours, theirs_scales, rows, k in pairs:
            linear = te_ref.NVFP4QuantizerRef._recover_swizzled_scales(True, torch.from_numpy(ours.reshape(-1)),
                                                                       rows, k, 16).numpy()
            assert_same_bytes(linear, _te_nan_byte(theirs_scales[:rows]), "TE's _recover_swizzled_scales")


@pytest.mark.parametrize("shape, padded_n", [((20, 40), None), ((17, 33), None), ((24, 32), 96), ((5, 7), 64)])
@pytest.mark.parametrize("mode", list(MODES))
def test_k_padding_reads_as_zeros_as_in_te(te_ref, shape, padded_n, mode):
    """TE pads x with zeros to whole tiles (and cuts its packed output to
    [M, N // 2]); with x padded by hand, TE's full output is ours."""
    tile, row_scaled = MODES[mode]
    m, n = shape
    x = make_input("heavy_tailed", DTYPES["bfloat16"], m, n)
    k = padded_n or -(-n // 16) * 16
    padded_m = -(-m // 16) * 16
    x_padded = np.zeros((padded_m, k), x.dtype)
    x_padded[:m, :n] = x
    gs = te.compute_global_scale_te(x, per_row=row_scaled)
    gs_t = te.compute_global_scale_te(x, per_row=row_scaled, columnwise=True)
    packed, scales, packed_t, scales_t = te.scaled_fp4_quant_te(
        x, gs, padded_n=padded_n, layout="linear", tile=tile, columnwise=True, row_scaled=row_scaled,
        global_scale_t=gs_t)
    assert packed.shape == (m, k // 2) and packed_t.shape == (n, padded_m // 2)
    # TE on x itself: the prefix TE keeps.
    theirs = te_quantize(te_ref, x, tile, row_scaled=row_scaled)
    assert_matches_te(packed, scales, theirs["data"], theirs["scale"], m, n, k, "linear", "unpadded rowwise")
    assert_matches_te(packed_t, scales_t, theirs["data_t"], theirs["scale_t"], n, m, padded_m, "linear",
                      "unpadded columnwise")
    # TE on x padded by hand with zeros: every byte.
    if row_scaled:  # the pad rows' own scales do not matter (dropped); x's rows and columns keep theirs
        theirs = te_quantize(te_ref, x_padded, tile, row_scaled=True)
    else:
        theirs = te_quantize(te_ref, x_padded, tile)
    assert_same_bytes(packed, theirs["data"][:m], "padded rowwise packed")
    assert_same_bytes(scales, _te_nan_byte(theirs["scale"][:m]), "padded rowwise scales")
    assert_same_bytes(packed_t, theirs["data_t"][:n], "padded columnwise packed")
    assert_same_bytes(scales_t, _te_nan_byte(theirs["scale_t"][:n]), "padded columnwise scales")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["swizzled", "8x4"])
def test_expert_batches_quantize_each_expert_as_its_own_tensor(te_ref, mode, layout):
    tile, row_scaled = MODES[mode]
    experts, m, n = 3, 20, 48
    x = np.stack([make_input(name, DTYPES["float16"], m, n) for name in ("gaussian", "nan", "heavy_tailed")])
    gs = te.compute_global_scale_te(x, per_row=row_scaled, per_expert=True)
    gs_t = te.compute_global_scale_te(x, per_row=row_scaled, columnwise=True, per_expert=True)
    assert gs.shape == ((experts, m) if row_scaled else (experts,))
    assert gs_t.shape == ((experts, n) if row_scaled else (experts,))
    packed, scales, packed_t, scales_t = te.scaled_fp4_quant_te(x, gs, layout=layout, tile=tile, columnwise=True,
                                                                row_scaled=row_scaled, global_scale_t=gs_t)
    assert packed.shape == (experts, m, n // 2) and packed_t.shape == (experts, n, 16)
    assert scales.shape == (experts, *ref.LAYOUTS[layout].scale_shape(m, n))
    assert scales_t.shape == (experts, *ref.LAYOUTS[layout].scale_shape(n, 32))
    for e in range(experts):
        theirs = te_quantize(te_ref, x[e], tile, row_scaled=row_scaled)
        assert_matches_te(packed[e], scales[e], theirs["data"], theirs["scale"], m, n, n, layout, f"expert {e}")
        assert_matches_te(packed_t[e], scales_t[e], theirs["data_t"], theirs["scale_t"], n, m, 32, layout,
                          f"expert {e} columnwise")


def test_a_3d_tensor_with_one_scale_flattens_into_rows(te_ref):
    x = make_input("heavy_tailed", DTYPES["float32"], 24, 32).reshape(2, 12, 32)
    packed, scales, gs, packed_t, scales_t, gs_t = te.quantize_te(x, layout="linear", columnwise=True)
    theirs = te_quantize(te_ref, x.reshape(24, 32))  # TE views >2-D input as [-1, N]
    assert packed.shape == (24, 16) and packed_t.shape == (32, 16)
    assert_matches_te(packed, scales, theirs["data"], theirs["scale"], 24, 32, 32, "linear", "rowwise")
    assert_matches_te(packed_t, scales_t, theirs["data_t"], theirs["scale_t"], 32, 24, 32, "linear", "columnwise")


def test_empty_inputs_give_empty_outputs():
    x = np.zeros((0, 40), np.float32)
    packed, scales, gs, packed_t, scales_t, gs_t = te.quantize_te(x, columnwise=True)
    assert packed.shape == (0, 24) and scales.shape == (0, 4)
    assert packed_t.shape == (40, 0) and scales_t.shape == (128, 0)
    assert gs.tolist() == [FLT_MAX]
    experts = np.zeros((0, 4, 32), np.float16)
    out = te.scaled_fp4_quant_te(experts, np.zeros(0, np.float32), layout="linear", columnwise=True)
    assert [a.shape for a in out] == [(0, 4, 16), (0, 4, 2), (0, 32, 8), (0, 32, 1)]


# ---------------------------------------------------------------------------
# compute_global_scale_te (docs/te_numerics.md, section 3)
# ---------------------------------------------------------------------------
def test_global_scale_special_values():
    cases = {0.0: FLT_MAX, np.inf: 1.0, 1e-40: FLT_MAX, 2688.0: 1.0, 1.0: 2688.0, FLT_MAX: F32(2688) / FLT_MAX,
             3.0: F32(2688) / F32(3)}
    for amax, want in cases.items():
        x = np.array([[amax, -amax / 2]], np.float32)
        got = te.compute_global_scale_te(x)
        assert got.dtype == np.float32 and got.tolist() == [F32(want)], f"amax {amax}: {got}"
    assert np.isnan(te.compute_global_scale_te(np.array([[1.0, np.nan]], np.float32))).all()
    assert te.compute_global_scale_te(np.array([[-np.inf, 1.0]], np.float16)).tolist() == [1.0]
    # ieee's compute_global_scale differs exactly at amax 0 (1.0) and inf (0.0).
    assert ref.compute_global_scale(np.zeros((1, 16), np.float32)).tolist() == [1.0]
    assert ref.compute_global_scale(np.full((1, 16), np.inf, np.float32)).tolist() == [0.0]


def test_global_scale_shapes_per_row_per_column_per_expert():
    x = make_input("heavy_tailed", DTYPES["float32"], 6, 32)
    x[2] = 0
    x[:, 5] = 0
    x[4, 9] = np.nan
    rows = te.compute_global_scale_te(x, per_row=True)
    cols = te.compute_global_scale_te(x, per_row=True, columnwise=True)
    assert rows.shape == (6,) and cols.shape == (32,)
    amax_rows, amax_cols = np.max(np.abs(x), axis=1), np.max(np.abs(x), axis=0)
    assert np.array_equal(rows, te.encode_scale_from_amax_te(amax_rows), equal_nan=True)
    assert np.array_equal(cols, te.encode_scale_from_amax_te(amax_cols), equal_nan=True)
    assert rows[2] == FLT_MAX and cols[5] == FLT_MAX and np.isnan(rows[4]) and np.isnan(cols[9])
    assert np.array_equal(te.compute_global_scale_te(x, columnwise=True), te.compute_global_scale_te(x),
                          equal_nan=True)
    batch = x.reshape(2, 3, 32)
    assert np.array_equal(te.compute_global_scale_te(batch, per_row=True, per_expert=True), rows.reshape(2, 3),
                          equal_nan=True)
    per_expert = te.compute_global_scale_te(batch, per_expert=True)
    assert per_expert.shape == (2,) and per_expert[0] == te.compute_global_scale_te(batch[0])[0]
    assert np.isnan(per_expert[1])
    assert te.compute_global_scale_te(np.zeros((3, 0), np.float32), per_row=True).tolist() == [FLT_MAX] * 3


def test_invalid_global_scale_arrays_nan_scale_their_blocks():
    x = make_input("gaussian", DTYPES["float32"], 4, 32)
    for bad in (np.nan, np.inf, 0.0, -1.0):
        packed, scales = te.scaled_fp4_quant_te(x, np.array([bad], np.float32), layout="swizzled")
        linear = ref.unswizzle_scales(scales, 4, 32)
        assert (linear == 0x7F).all() and not packed.any(), bad
        used = ref.scale_offsets("swizzled", *np.indices((4, 2)).reshape(2, -1), scales.shape[1])
        assert (np.delete(scales.reshape(-1), used) == 0).all(), "layout padding stays 0x00"
    gs = te.compute_global_scale_te(x, per_row=True)
    gs[1] = np.nan
    packed, scales = te.scaled_fp4_quant_te(x, gs, layout="linear", row_scaled=True)
    assert (scales[1] == 0x7F).all() and not packed[1].any() and (scales[[0, 2, 3]] != 0x7F).all()


# ---------------------------------------------------------------------------
# "ieee" against "te": they differ exactly in docs/te_numerics.md, section 8
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_ieee_and_te_on_gaussian_data(dtype):
    """float32 Gaussian data: the same bytes. float16 and bfloat16: block
    amaxes have short mantissas, so s and r land on roundings where the two
    orders of operations differ (about 0.04% and 0.4% of blocks): classes 1
    and 2 only."""
    totals = dict.fromkeys(CLASSES, 0)
    for seed in range(4):
        x = np.random.default_rng(seed).standard_normal((64, 256)).astype(DTYPES[dtype])
        gs = ref.compute_global_scale(x)
        assert np.array_equal(gs, te.compute_global_scale_te(x))
        for key, count in classify(x.astype(np.float32), gs[0]).items():
            totals[key] += count
    if dtype == "float32":
        assert not any(totals.values()), totals
    else:
        assert totals["zero scale"] == totals["negative zero"] == totals["inf times zero"] == 0, totals
        assert totals["scale rounding"] + totals["encode factor"] > 0, totals


CLASSES = ("scale rounding", "encode factor", "zero scale", "negative zero", "inf times zero")


def _explain(values, gs):
    """Per block of float32 values [rows, 16k] under valid gs: both sets of
    bytes and the intermediates of docs/te_numerics.md, section 8."""
    blocks = values.reshape(values.shape[0], -1, 16)
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)
        s_ieee = gs * (amax / F32(6))
        s_te = amax * (gs * (F32(1) / F32(6)))
        codes_i, sf_i = ref.quantize_blocks(values, gs)
        codes_t, sf_t = te.quantize_blocks_te(values, gs)
        sf_value = ref.e4m3_values(sf_t)
        r_ieee = np.minimum(F32(1) / (sf_value / gs), FLT_MAX)
        r_te = np.minimum(F32(1) / (sf_value * (F32(1) / gs)), FLT_MAX)
        y_te = blocks * r_te[..., None]
    return dict(amax=amax, s_ieee=s_ieee, s_te=s_te, codes_i=codes_i.reshape(blocks.shape), sf_i=sf_i,
                codes_t=codes_t.reshape(blocks.shape), sf_t=sf_t, r_ieee=r_ieee, r_te=r_te, y_te=y_te)


def classify(values, gs) -> dict:
    """Count the blocks whose bytes differ by class; an unexplained
    difference fails."""
    e = _explain(values, F32(gs))
    counts = dict.fromkeys(CLASSES, 0)
    scale_differs = e["sf_i"] != e["sf_t"]
    assert (e["s_ieee"][scale_differs] != e["s_te"][scale_differs]).all(), "a scale byte differs with equal s"
    counts["scale rounding"] = int(scale_differs.sum())
    codes_differ = (e["codes_i"] != e["codes_t"]) & ~scale_differs[..., None]
    zero_scale = (e["sf_t"] == 0)[..., None] & codes_differ
    counts["zero scale"] = int(zero_scale.any(axis=-1).sum())
    negative_zero = codes_differ & (e["codes_i"] == 8) & (e["codes_t"] == 0) & (e["y_te"] == 0)
    counts["negative zero"] = int(negative_zero.any(axis=-1).sum())
    inf_zero = codes_differ & (e["codes_i"] == 7) & (e["codes_t"] == 0) & np.isnan(e["y_te"])
    counts["inf times zero"] = int(inf_zero.any(axis=-1).sum())
    r_differs = (e["r_ieee"] != e["r_te"])[..., None] & codes_differ & ~zero_scale
    counts["encode factor"] = int(r_differs.any(axis=-1).sum())
    unexplained = codes_differ & ~(zero_scale | negative_zero | inf_zero | r_differs)
    where = np.argwhere(unexplained)
    assert not len(where), f"{len(where)} codes differ outside the documented classes; first {where[:5].tolist()}"
    return counts


@pytest.mark.parametrize("name", CORPUS)
def test_ieee_and_te_differ_only_in_the_documented_classes(name):
    for dtype in DTYPES.values():
        x = make_input(name, dtype).astype(np.float32)
        gs = te.compute_global_scale_te(x)[0]
        if not (np.isfinite(gs) and gs > 0):
            continue  # NaN-scaled alike (the invalid-scale rule); checked below
        classify(x, gs)
        gs_ieee = ref.compute_global_scale(x)[0]
        if np.isfinite(gs_ieee) and gs_ieee > 0:
            classify(x, gs_ieee)


def test_every_documented_difference_occurs():
    f = F32
    # 1. scale rounding: s = 5.7499995 (ieee) and 5.75 (te) straddle the E4M3 tie 5.75.
    block = np.zeros((1, 16), np.float32)
    block[0, 0] = f(0.25222927)
    counts = classify(block, f(136.7803))
    assert counts["scale rounding"] == 1
    # 2. encode factor: sf = 288 under gs 646.34863: r 2.244266 (ieee), 2.2442663 (te).
    block[0, :2] = [f(2.6484683), f(0.55697495)]  # y = 1.25 (a tie, down) or 1.2500001 (up)
    counts = classify(block, f(646.34863))
    assert counts["encode factor"] == 1 and counts["scale rounding"] == 0
    codes_i, _ = ref.quantize_blocks(block, f(646.34863))
    codes_t, _ = te.quantize_blocks_te(block, f(646.34863))
    assert (codes_i[0, 1], codes_t[0, 1]) == (2, 3)
    # 3. zero-scale block: s <= 2^-10 gives sf 0x00; ieee r = 0, te r = FLT_MAX.
    block = np.zeros((1, 16), np.float32)
    block[0, :3] = [1e-4, -1e-4, 1e-44]
    codes_i, sf_i = ref.quantize_blocks(block, f(1.0))
    codes_t, sf_t = te.quantize_blocks_te(block, f(1.0))
    assert sf_i[0, 0] == sf_t[0, 0] == 0
    assert codes_i[0, :3].tolist() == [0, 8, 0] and codes_t[0, :3].tolist() == [7, 15, 0]
    assert classify(block, f(1.0))["zero scale"] == 1
    # 4. -0.0: code 8 (ieee), 0 (te), in a block with a scale and in a zero block.
    block = np.zeros((2, 16), np.float32)
    block[0, :2] = [3.0, -0.0]
    block[1, 5] = -0.0
    codes_i, _ = ref.quantize_blocks(block, f(1.0))
    codes_t, _ = te.quantize_blocks_te(block, f(1.0))
    assert (codes_i[0, 1], codes_t[0, 1], codes_i[1, 5], codes_t[1, 5]) == (8, 0, 8, 0)
    assert classify(block, f(1.0))["negative zero"] == 2
    # 5. inf * 0: a host scale below 448 / FLT_MAX makes r = 0, inf * 0 = NaN.
    block = np.zeros((1, 16), np.float32)
    block[0, :2] = [np.inf, 1.0]
    codes_i, sf_i = ref.quantize_blocks(block, f(1e-37))
    codes_t, sf_t = te.quantize_blocks_te(block, f(1e-37))
    assert sf_i[0, 0] == sf_t[0, 0] == 0x7E
    assert codes_i[0, :2].tolist() == [7, 0] and codes_t[0, :2].tolist() == [0, 0]
    assert classify(block, f(1e-37))["inf times zero"] == 1
    # 6, 7. the global scale at amax 0 and amax inf (test_global_scale_special_values).
    zeros = np.zeros((1, 16), np.float32)
    assert ref.compute_global_scale(zeros)[0] == 1 and te.compute_global_scale_te(zeros)[0] == FLT_MAX
    inf = np.array([[np.inf] + [1.0] * 15], np.float32)
    ieee_bytes = ref.scaled_fp4_quant(inf, ref.compute_global_scale(inf), layout="linear")
    te_bytes = te.quantize_te(inf, layout="linear")
    assert ieee_bytes[1].tolist() == [[0x7F]] and not ieee_bytes[0].any()  # gs = 0: NaN-scaled
    assert te_bytes[1].tolist() == [[0x7E]] and ref.unpack_codes(te_bytes[0])[0, :2].tolist() == [7, 0]


def test_documented_differences_are_te_bytes(te_ref):
    """The hand-picked blocks above, under the global amax that gives their
    S_enc, in TE's own code."""
    cases = [([0.25222927], 136.7803), ([2.6484683, 0.55697495], 646.34863), ([1e-4, -1e-4, 1e-44], 1.0),
             ([3.0, -0.0], 1.0)]
    for values, gs in cases:
        amax = F32(2688) / F32(gs)
        while te.encode_scale_from_amax_te(amax) != F32(gs):  # an amax whose S_enc is gs exactly
            amax = np.nextafter(amax, F32(np.inf) if te.encode_scale_from_amax_te(amax) > F32(gs) else F32(0))
        block = np.zeros((1, 16), np.float32)
        block[0, : len(values)] = values
        theirs_packed, theirs_scales = te_blocks(te_ref, block, [amax])
        codes, scale_bytes = te.quantize_blocks_te(block, F32(gs))
        assert_same_bytes(_pack_codes(codes), theirs_packed, f"{values}: packed")
        assert_same_bytes(scale_bytes, theirs_scales, f"{values}: scales")


# ---------------------------------------------------------------------------
# Arguments (docs/te_numerics.md, section 7)
# ---------------------------------------------------------------------------
X = np.ones((4, 32), np.float32)
ROW = np.ones(4, np.float32)
COL = np.ones(32, np.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tile="32x32"), ValueError, "tile must be one of"),
    (dict(tile=16), ValueError, "tile must be one of"),
    (dict(tile="16x16", row_scaled=True, global_scale=ROW), ValueError, "row_scaled=True supports tile='1x16'"),
    (dict(columnwise=1), TypeError, "columnwise must be a bool"),
    (dict(row_scaled="yes"), TypeError, "row_scaled must be a bool"),
    (dict(global_scale=ROW), ValueError, "pass row_scaled=True"),
    (dict(row_scaled=True), ValueError, "needs one global scale per row"),
    (dict(row_scaled=True, global_scale=np.ones(3, np.float32)), ValueError, r"must have shape \[m\]"),
    (dict(row_scaled=True, global_scale=ROW.astype(np.float64)), TypeError, "must be float32"),
    (dict(global_scale_t=1.0), ValueError, "needs columnwise=True"),
    (dict(row_scaled=True, global_scale=ROW, columnwise=True), ValueError, "needs global_scale_t"),
    (dict(row_scaled=True, global_scale=ROW, columnwise=True, global_scale_t=ROW), ValueError,
     r"must have shape \[32\]"),
    (dict(row_scaled=True, global_scale=ROW, columnwise=True, global_scale_t=2.0), ValueError,
     "must be a float32 array"),
    (dict(columnwise=True, global_scale_t=COL), ValueError, "global_scale_t as an array must hold one element"),
    (dict(global_scale=np.ones(5, np.float32)), ValueError, "global_scale as an array must hold one element"),
    (dict(global_scale=np.ones(1, np.float16)), TypeError, "must be float32"),
    (dict(global_scale=0.0), ValueError, "finite and > 0"),
    (dict(global_scale=True), TypeError, "global_scale must be a float"),
    (dict(padded_n=40), ValueError, "multiple of 16"),
    (dict(padded_n=16), ValueError, "padded_n must be >= n"),
    (dict(layout="col"), ValueError, "layout must be one of"),
    (dict(is_sf_swizzled_layout=None), TypeError, "is_sf_swizzled_layout must be a bool"),
    (dict(x=np.ones((4, 32), np.int32)), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(x=np.ones((4, 0), np.float32)), ValueError, "n must be positive"),
])
def test_argument_errors(kwargs, error, match):
    args = dict(x=X, global_scale=1.0)
    args.update(kwargs)
    x, global_scale = args.pop("x"), args.pop("global_scale")
    with pytest.raises(error, match=match):
        te.scaled_fp4_quant_te(x, global_scale, **args)


def test_expert_and_row_scaled_forms_of_the_global_scale():
    x = np.ones((2, 4, 32), np.float32)
    te.scaled_fp4_quant_te(x, np.ones(2, np.float32), columnwise=True, global_scale_t=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="form of global_scale"):
        te.scaled_fp4_quant_te(x, np.ones(2, np.float32), columnwise=True, global_scale_t=1.0)
    # [E, m] is an expert batch with per-row scales; [E * m] flattens the rows.
    expert_rows = te.scaled_fp4_quant_te(x, np.ones((2, 4), np.float32), layout="linear", row_scaled=True)
    flat_rows = te.scaled_fp4_quant_te(x, np.ones(8, np.float32), layout="linear", row_scaled=True)
    assert expert_rows[0].shape == (2, 4, 16) and flat_rows[0].shape == (8, 16)
    with pytest.raises(ValueError, match=r"\[E, m\]"):
        te.scaled_fp4_quant_te(x, np.ones((2, 3), np.float32), row_scaled=True)
    with pytest.raises(ValueError, match=r"shape \[2, 32\]"):
        te.scaled_fp4_quant_te(x, np.ones((2, 4), np.float32), row_scaled=True, columnwise=True,
                               global_scale_t=np.ones(32, np.float32))
    with pytest.raises(ValueError, match="per_expert needs x of shape"):
        te.compute_global_scale_te(np.ones((4, 32), np.float32), per_expert=True)
    with pytest.raises(TypeError, match="per_row must be a bool"):
        te.compute_global_scale_te(x, per_row=1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(numerics="fast"), ValueError, "numerics must be one of"),
    (dict(numerics="te", fmt="mxfp4"), ValueError, "NVFP4 only"),
    (dict(numerics="ieee", tile="16x16"), ValueError, "needs numerics='te'"),
    (dict(numerics="ieee", columnwise=True), ValueError, "needs numerics='te'"),
    (dict(numerics="ieee", row_scaled=True), ValueError, "needs numerics='te'"),
    (dict(numerics="te", tile="2x16"), ValueError, "tile must be one of"),
    (dict(numerics="te", columnwise="no"), TypeError, "columnwise must be a bool"),
])
def test_check_numerics_refuses_mixed_options(kwargs, error, match):
    numerics = kwargs.pop("numerics")
    with pytest.raises(error, match=match):
        te.check_numerics(numerics, **kwargs)


def test_check_numerics_accepts_the_defined_combinations():
    assert te.check_numerics("ieee") == "ieee" and te.check_numerics("ieee", fmt="mxfp4") == "ieee"
    assert te.check_numerics("te", tile="16x16", columnwise=True) == "te"
    assert te.check_numerics("te", row_scaled=True, columnwise=True) == "te"


def test_quantize_blocks_te_checks_its_inputs():
    with pytest.raises(ValueError, match="multiple of 16"):
        te.quantize_blocks_te(np.ones((8, 16), np.float32), F32(1), "16x16")
    with pytest.raises(ValueError, match="float32"):
        te.quantize_blocks_te(np.ones((1, 16), np.float16), F32(1))
    with pytest.raises(ValueError, match="one per row for tile='1x16'"):
        te.quantize_blocks_te(np.ones((16, 16), np.float32), np.ones(16, np.float32), "16x16")


def test_te_golden_model_imports_without_torch_or_cupy():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['cupy'] = None\n"
            "import numpy as np\nfrom nvfp4_cupy.reference import te\n"
            "print(te.quantize_te(np.ones((2, 16), np.float32))[1].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(128, 4)"
