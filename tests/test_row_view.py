"""How x's strides become the kernel's rows, checked on NumPy strides (the
same rules the GPU path applies to CuPy arrays). CPU only."""

from __future__ import annotations

import numpy as np
import pytest

from nvfp4_cupy._format import RowView, row_view


def view_of(array: np.ndarray, per_expert: bool = False) -> RowView:
    return row_view(array.shape, array.strides, array.itemsize, per_expert)


def test_contiguous_and_column_slices_need_no_copy():
    h = np.zeros((6, 384), np.float16)
    assert view_of(h) == RowView(1, 6, 384, 384, 0)
    assert view_of(h[:, :256]) == RowView(1, 6, 256, 384, 0)
    assert view_of(h[1:, 100:]) == RowView(1, 5, 284, 384, 0)
    assert view_of(np.zeros((2, 3, 4, 32), np.float32)) == RowView(1, 24, 32, 32, 0)
    assert view_of(np.zeros((1, 1, 32), np.float32)[:, :, :16]) == RowView(1, 1, 16, 16, 0)


def test_expert_batches_keep_their_own_stride():
    x = np.zeros((4, 10, 512), np.float16)[:, 2:, :300]
    assert view_of(x, per_expert=True) == RowView(4, 8, 300, 512, 5120)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: np.zeros((4, 64), np.float16)[:, ::2], "last dimension must be contiguous"),
        (lambda: np.zeros((4, 6, 32), np.float16)[:, ::2].transpose(1, 0, 2), "do not flatten into evenly strided rows"),
        (lambda: np.zeros((4, 64), np.float16).T.copy().T, "last dimension must be contiguous"),
    ],
)
def test_views_that_need_a_copy_are_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        view_of(make())


def test_per_expert_needs_three_dimensions():
    with pytest.raises(ValueError, match=r"x of shape \[E, m, n\]"):
        view_of(np.zeros((4, 64), np.float16), per_expert=True)


def test_empty_arrays_report_any_strides():
    assert view_of(np.zeros((0, 64), np.float16)[:, ::2]) == RowView(1, 0, 32, 32, 0)
    assert row_view((0, 64), (0, 0), 2, False) == RowView(1, 0, 64, 64, 0)
    assert row_view((0, 5, 32), (0, 0, 0), 4, True) == RowView(0, 5, 32, 32, 0)
