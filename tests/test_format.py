"""Scale layouts: shapes, docs/format.md offsets against an independent inverse
mapping, and the shared argument checks. CPU only."""

from __future__ import annotations

import numpy as np
import pytest

from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import LAYOUTS, host_global_scale, resolve_layout, resolve_padded_n, round_up


def inverse_swizzled(offset: int, scale_cols: int) -> tuple[int, int]:
    """Byte offset -> (row, k) for the 128x4 layout, decoded digit by digit
    from the tile structure rather than from the forward formula."""
    tile, inside = divmod(offset, 512)
    row_tile, col_tile = divmod(tile, scale_cols // 4)
    row_in_32, rest = divmod(inside, 16)
    row_group, k_in_4 = divmod(rest, 4)
    return row_tile * 128 + row_group * 32 + row_in_32, col_tile * 4 + k_in_4


def inverse_8x4(offset: int, scale_cols: int) -> tuple[int, int]:
    tile, inside = divmod(offset, 32)
    row_tile, col_tile = divmod(tile, scale_cols // 4)
    row_in_8, k_in_4 = divmod(inside, 4)
    return row_tile * 8 + row_in_8, col_tile * 4 + k_in_4


INVERSES = {"swizzled": inverse_swizzled, "8x4": inverse_8x4, "linear": lambda o, c: divmod(o, c)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("m, padded_n", [(1, 16), (129, 80), (300, 7168), (8, 64)])
def test_offsets_are_a_bijection_matching_the_inverse(layout, m, padded_n):
    rows, cols = LAYOUTS[layout].scale_shape(m, padded_n)
    grid_rows, grid_ks = np.indices((rows, cols))
    offsets = ref.scale_offsets(layout, grid_rows, grid_ks, cols).ravel()
    assert np.array_equal(np.sort(offsets), np.arange(rows * cols))
    inverse = INVERSES[layout]
    for offset, row, k in zip(offsets[::97], grid_rows.ravel()[::97], grid_ks.ravel()[::97]):
        assert inverse(int(offset), cols) == (row, k)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unswizzle_undoes_the_layout(layout, rng):
    m, padded_n = 150, 7168
    blocks = rng.integers(1, 255, size=(m, padded_n // 16), dtype=np.uint8)
    rows, cols = LAYOUTS[layout].scale_shape(m, padded_n)
    laid_out = np.zeros(rows * cols, np.uint8)
    grid_rows, grid_ks = np.indices(blocks.shape)
    laid_out[ref.scale_offsets(layout, grid_rows, grid_ks, cols)] = blocks
    assert np.array_equal(ref.unswizzle_scales(laid_out.reshape(rows, cols), m, padded_n, layout), blocks)


def test_known_swizzled_offsets():
    # Spot values worked by hand from docs/format.md (scale_cols = 8: two column tiles).
    cases = {(0, 0): 0, (0, 3): 3, (1, 0): 16, (32, 0): 4, (96, 2): 14, (31, 4): 512 + 496, (128, 0): 1024}
    for (row, k), offset in cases.items():
        assert int(ref.scale_offsets("swizzled", row, k, 8)) == offset, (row, k)


@pytest.mark.parametrize(
    "layout, m, padded_n, shape",
    [
        ("swizzled", 150, 7168, (256, 448)),
        ("swizzled", 1, 16, (128, 4)),
        ("linear", 150, 7168, (150, 448)),
        ("linear", 3, 80, (3, 5)),
        ("8x4", 9, 80, (16, 8)),
        ("8x4", 0, 16, (0, 4)),
    ],
)
def test_scale_shapes(layout, m, padded_n, shape):
    assert LAYOUTS[layout].scale_shape(m, padded_n) == shape


def test_layout_resolution():
    assert resolve_layout(True).name == "swizzled"
    assert resolve_layout(False).name == "linear"
    assert resolve_layout(True, "8x4").name == "8x4"
    with pytest.raises(ValueError, match=r"layout must be one of \['8x4', 'linear', 'swizzled'\], got 'tiled'"):
        resolve_layout(layout="tiled")


def test_padded_n_resolution():
    assert resolve_padded_n(7152, None) == 7152
    assert resolve_padded_n(7152, 7168) == 7168
    assert resolve_padded_n(100, None) == round_up(100, 16) == 112
    with pytest.raises(ValueError, match="padded_n=7160"):
        resolve_padded_n(7152, 7160)
    with pytest.raises(TypeError, match="padded_n must be an int, got bool"):
        resolve_padded_n(16, True)


def test_host_global_scale_checks():
    assert host_global_scale(2) == np.float32(2.0)
    assert host_global_scale(np.float64(0.5)) == np.float32(0.5)
    with pytest.raises(ValueError, match=r"got 1e\+39 \(inf in float32\)"):
        host_global_scale(1e39)
    with pytest.raises(TypeError, match="got bool"):
        host_global_scale(True)
