"""The benchmark's PyTorch baseline (_bench.torch_quantize) writes the golden
model's bytes, so that "N x faster than torch.compile" compares like with
like. CPU, eager PyTorch; finite inputs only (the baseline has no NaN/inf
handling, as its docstring says). On a GPU the benchmark itself checks the
eager and compiled baseline against our kernel's bytes before any ratio."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy import reference
from nvfp4_cupy._bench import torch_quantize
from nvfp4_cupy._format import round_up

from gpu_inputs import global_scale_for, make_input, numerics_probe

torch = pytest.importorskip("torch", reason="the PyTorch baseline needs torch (in the test extra)")


def assert_golden(x: np.ndarray, gs: float, padded_n: int) -> None:
    packed, scales = torch_quantize(torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
                                    if x.dtype == ml_dtypes.bfloat16 else torch.from_numpy(x), gs, padded_n)
    want_packed, want_scales = reference.scaled_fp4_quant(x, gs, padded_n=padded_n)
    assert np.array_equal(packed.numpy(), want_packed), f"packed differs in {np.count_nonzero(packed.numpy() != want_packed)} bytes"
    assert np.array_equal(scales.numpy(), want_scales), f"scales differ in {np.count_nonzero(scales.numpy() != want_scales)} bytes"


def finite_bf16(kind: str, m: int, n: int, seed: int) -> np.ndarray:
    x = make_input(kind, m, n, seed)
    return np.where(np.isfinite(x), x, 0).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("m, n, padded_n", [(1, 16, 16), (3, 40, 64), (130, 7152, 7168), (33, 100, 256), (128, 4096, 4096)])
@pytest.mark.parametrize("kind", ["normal", "outliers", "zero_rows", "specials"])
def test_bf16_shapes_and_kinds(m, n, padded_n, kind):
    """K padding, outlier channels, zero rows, and tiny/huge/-0 values
    (gpu_inputs' "specials" with NaN and inf replaced by 0)."""
    x = finite_bf16(kind, m, n, seed=m * n)
    assert_golden(x, float(np.float32(global_scale_for(x.astype(np.float32)))), padded_n)


@pytest.mark.parametrize("gs", [1.0, 0.1, 3e-5, 7e4])
def test_global_scales_that_push_blocks_to_the_edges(gs):
    """Scales that saturate E4M3 (448), land in its subnormals, or round it to 0."""
    x = finite_bf16("outliers", 64, 256, seed=7)
    assert_golden(x, gs, 256)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_rounding_ties(dtype):
    """Blocks whose scale lands on every E4M3 tie and whose values land on
    every E2M1 tie, one ulp either side (float32), as bf16 rounds them."""
    x = numerics_probe().astype(dtype)
    assert_golden(x, 1.0, 16)
    assert_golden(x[:, :13], 1.0, 32)  # with K padding


def test_tiny_values():
    """bf16 subnormals and values whose scaled block rounds to a zero scale."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((8, 64)) * np.float32(2.0) ** rng.integers(-140, -100, (8, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :16] = -0.0
    assert_golden(x.astype(ml_dtypes.bfloat16), 1.0, 64)
    assert_golden(x.astype(ml_dtypes.bfloat16), 448 * 6 / float(np.abs(x[2:]).max()), round_up(64, 128))
