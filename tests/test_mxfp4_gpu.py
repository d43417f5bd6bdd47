"""MXFP4 (fmt="mxfp4") on the GPU against the golden model, byte for byte,
with poisoned outputs: every E8M0 exponent boundary, special blocks, every
layout and dtype, the software path, and the way back."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import assert_bytes_equal, quantize_poisoned
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, make_input
from nvfp4_cupy import reference as ref
from nvfp4_cupy._runtime.compile import SOFTWARE
from nvfp4_cupy._format import LAYOUTS

pytestmark = pytest.mark.gpu
cp = import_cupy()


def exponent_probe() -> np.ndarray:
    """float32 [rows, 32]: amax at every power of two 2^-149..2^127 and one
    ulp below it, with values at E2M1 ties relative to the resulting scale."""
    rows = []
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], np.float32)
    for e in range(-149, 128):
        p = np.float32(2.0) ** e
        for amax in (p, np.nextafter(p, np.float32(0))):
            row = np.zeros(32, np.float32)
            row[0] = amax
            scale = np.float32(2.0) ** max(e - 2, -127)
            row[1:9] = ties * scale
            row[9:17] = -ties * scale
            rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("target", ["device", "software"])
def test_every_exponent_boundary(target):
    x_host = exponent_probe()
    got = quantize_poisoned(
        cp.asarray(x_host), None, fmt="mxfp4", target=SOFTWARE if target == "software" else None, layout="linear"
    )
    want = ref.scaled_fp4_quant(x_host, None, layout="linear", fmt="mxfp4")
    assert_bytes_equal(got[0], want[0], f"packed ({target})")
    assert_bytes_equal(got[1], want[1], f"scales ({target})")


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("m, n, padded_n", [(1, 32, 32), (129, 7152, 7168), (33, 100, 256)])
def test_mxfp4_matches_golden(dtype, layout, m, n, padded_n):
    x_host = make_input("specials", m, n, seed=m + n).astype(HOST_DTYPES[dtype])
    got = quantize_poisoned(cp.asarray(x_host), None, fmt="mxfp4", layout=layout, padded_n=padded_n)
    want = ref.scaled_fp4_quant(x_host, None, padded_n=padded_n, layout=layout, fmt="mxfp4")
    assert_bytes_equal(got[0], want[0], f"{dtype} {layout} packed")
    assert_bytes_equal(got[1], want[1], f"{dtype} {layout} scales")


@pytest.mark.parametrize("out_dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mxfp4_dequantize_matches_golden(out_dtype, layout):
    import nvfp4_cupy as nv

    x_host = make_input("outliers", 130, 7152, seed=7).astype(np.float32)
    x_host[5, 40] = np.nan
    packed, scales = nv.scaled_fp4_quant(cp.asarray(x_host), None, padded_n=7168, layout=layout, fmt="mxfp4")
    dtype = HOST_DTYPES[out_dtype]
    want = ref.dequantize(cp.asnumpy(packed), cp.asnumpy(scales), None, n=7152, layout=layout, dtype=dtype,
                          fmt="mxfp4")
    got = nv.dequantize_fp4(packed, scales, None, n=7152, layout=layout, dtype=dtype, fmt="mxfp4")
    bits = np.uint32 if want.dtype.itemsize == 4 else np.uint16
    assert_bytes_equal(cp.asnumpy(got).view(bits), want.view(bits), f"{out_dtype} {layout}")


def test_mxfp4_argument_checks():
    import nvfp4_cupy as nv

    x = cp.ones((4, 64), cp.float16)
    with pytest.raises(ValueError, match="global_scale must be None for fmt='mxfp4'"):
        nv.scaled_fp4_quant(x, 1.0, fmt="mxfp4")
    with pytest.raises(ValueError, match="padded_n must be a multiple of 32, got padded_n=80"):
        nv.scaled_fp4_quant(x, None, padded_n=80, fmt="mxfp4")
    with pytest.raises(ValueError, match="fmt must be one of"):
        nv.scaled_fp4_quant(x, 1.0, fmt="mxfp8")
