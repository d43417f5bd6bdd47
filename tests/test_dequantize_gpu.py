"""The dequantize kernel's mapping against the golden model, byte for byte:
every layout, output dtype and format; 1, 2 and 4 blocks a thread; rows
narrower than a warp's blocks, padded tails, n not a multiple of 64,
experts, every kind of global scale (the shared per-thread-block tables and
the per-block ones), misaligned outputs, and blocks on either side of the
shortcut's range. Outputs are poisoned twice (tests/bytes_check.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES
from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import LAYOUTS

pytestmark = pytest.mark.gpu
cp = import_cupy()

BITS = {2: np.uint16, 4: np.uint32}
# (m, n, padded_n, experts): one block a row; a padded tail of a block and a
# half with n not a multiple of 64; several warps a row; element stores (n %
# 8 != 0); rows of a whole thread block; an expert batch.
SHAPES = ((3, 16, 32, None), (37, 1000, 1024, None), (5, 4000, 4096, None), (130, 510, 512, None),
          (2, 16384, 16384, None), (3, 2040, 2048, 4))


@pytest.fixture(params=[1, 2, 4], ids=lambda steps: f"{steps}-blocks-a-thread")
def steps(request, monkeypatch):
    """Every launch of the test takes this many blocks a thread."""
    from nvfp4_cupy.ops import dequantize

    monkeypatch.setattr(dequantize, "_plans", {})
    monkeypatch.setattr(dequantize, "blocks_per_thread", lambda rows, blocks, most: min(request.param, most))
    return request.param


def random_fp4(rng, m, padded_n, layout, fmt, experts=None):
    """Any packed bytes and any scale bytes (NaN and zero scales included)."""
    block = 32 if fmt == "mxfp4" else 16
    lead = (experts,) if experts else ()
    packed = rng.integers(0, 256, lead + (m, padded_n // 2), dtype=np.uint8)
    scales = rng.integers(0, 256, lead + LAYOUTS[layout].scale_shape(m, padded_n, block), dtype=np.uint8)
    if fmt == "nvfp4":
        # Mostly scale bytes near the middle of E4M3's range, as real ones are.
        scales = np.where(rng.random(scales.shape) < 0.8, rng.integers(0x30, 0x58, scales.shape), scales)
        scales = (scales | (rng.random(scales.shape) < 0.1) * 0x80).astype(np.uint8)
    return packed, scales


def check(nv, packed, scales, gs, n, layout, dtype, fmt, what, offset=0):
    """Dequantize into poisoned outputs (starting `offset` elements into their
    buffer) and compare every byte with the golden model."""
    want = ref.dequantize(packed, scales, gs, n=n, layout=layout, dtype=dtype, fmt=fmt)
    device_gs = cp.asarray(gs) if isinstance(gs, np.ndarray) else gs
    for poison in POISONS:
        buffer = cp.empty(want.size + offset, dtype=want.dtype)
        buffer.view(cp.uint8).fill(poison)
        out = buffer[offset:].reshape(want.shape)
        got = nv.dequantize_fp4(cp.asarray(packed), cp.asarray(scales), device_gs, n=n, layout=layout, dtype=dtype,
                                out=out, fmt=fmt)
        assert got is out
        bits = BITS[want.dtype.itemsize]
        assert_bytes_equal(cp.asnumpy(got).view(bits), want.view(bits), what)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_shape_and_mapping_matches_golden(nv, steps, layout, out_dtype, fmt):
    rng = np.random.default_rng(steps * 1000 + len(layout))
    dtype = HOST_DTYPES[out_dtype]
    for m, n, padded_n, experts in SHAPES:
        packed, scales = random_fp4(rng, m, padded_n, layout, fmt, experts)
        kinds = [None] if fmt == "mxfp4" else ["host", "device", "row"] + (["expert"] if experts else [])
        for kind in kinds:
            count = {"expert": experts, "row": m * (experts or 1)}.get(kind, 1)
            gs = {None: None, "host": 1.37, "device": np.array([0.0213], np.float32)}.get(
                kind, rng.uniform(1e-3, 1e3, count).astype(np.float32))
            check(nv, packed, scales, gs, n, layout, dtype, fmt,
                  f"{out_dtype} {layout} {fmt} m={m} n={n} padded_n={padded_n} experts={experts} gs={kind} "
                  f"steps={steps}")


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("n", [1000, 16384])  # several rows a thread block (tables per block) and one
def test_special_global_scales_per_row(nv, steps, out_dtype, n):
    """Rows whose global scale is 0, inf, NaN, negative, subnormal, or beyond
    the quotient's fast range (2^+-100) next to ordinary ones."""
    rng = np.random.default_rng(n + steps)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -2.5, 1e-45, 2.0**-126, 2.0**-101, 2.0**-100,
                         2.0**100, 2.0**101, 3.0e38, 1e-30, 1e30, 1.0], np.float32)
    m = 2 * len(specials)
    gs = np.concatenate([specials, rng.uniform(0.01, 100, m - len(specials)).astype(np.float32)])
    packed, scales = random_fp4(rng, m, -(-n // 64) * 64, "swizzled", "nvfp4")
    check(nv, packed, scales, gs, n, "swizzled", HOST_DTYPES[out_dtype], "nvfp4", f"{out_dtype} n={n} steps={steps}")


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_scale_byte_with_every_code(nv, out_dtype, layout):
    """Each row a run of every scale byte, each block every code (both signs),
    under global scales on both sides of the shortcut's bounds; zero and NaN
    scale bytes included."""
    codes = np.tile(np.arange(16, dtype=np.uint8), 256)
    row = codes[0::2] | (codes[1::2] << 4)  # 256 blocks: block b has scale byte b
    m, padded_n = 8, 4096
    packed = np.tile(row, (m, 1))
    scale_rows = np.tile(np.arange(256, dtype=np.uint8), (m, 1))
    scales = np.zeros(LAYOUTS[layout].scale_shape(m, padded_n), np.uint8)
    rows, ks = np.meshgrid(np.arange(m), np.arange(256), indexing="ij")
    scales.reshape(-1)[ref.scale_offsets(layout, rows, ks, scales.shape[1])] = scale_rows
    gs = np.array([1.0, 1e-30, 3.4e38, 2.0**-115, 2.0**-116, 2.0**116, 2.0**117, -0.37], np.float32)
    check(nv, packed, scales, gs, padded_n, layout, HOST_DTYPES[out_dtype], "nvfp4", f"{out_dtype} {layout}")
    for value in gs[:4]:
        check(nv, packed, scales, float(value), padded_n, layout, HOST_DTYPES[out_dtype], "nvfp4",
              f"{out_dtype} {layout} gs={value}")


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
def test_misaligned_output_takes_element_stores(nv, out_dtype):
    rng = np.random.default_rng(5)
    packed, scales = random_fp4(rng, 20, 2048, "swizzled", "nvfp4")
    check(nv, packed, scales, 0.75, 2048, "swizzled", HOST_DTYPES[out_dtype], "nvfp4", f"{out_dtype} misaligned",
          offset=1)


def test_zero_blocks_keep_their_signs(nv):
    """Scale bytes +0 and -0 under positive and negative global scales: every
    value a zero whose sign is code sign ^ scale sign ^ global scale sign."""
    packed = np.tile(np.arange(256, dtype=np.uint8), (4, 4))  # every code pair
    scales = np.zeros(LAYOUTS["linear"].scale_shape(4, 2048), np.uint8)
    scales[1::2] = 0x80
    for gs in (1.5, np.array([-1.5], np.float32)):
        for out_dtype in sorted(HOST_DTYPES):
            check(nv, packed, scales, gs, 2048, "linear", HOST_DTYPES[out_dtype], "nvfp4", f"{out_dtype} gs={gs}")
