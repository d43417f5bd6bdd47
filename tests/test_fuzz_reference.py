"""Hypothesis fuzzing of the golden model against tests/scalar_model.py, a
naive per-value implementation of docs/format.md that shares no code with it:
random shapes, dtypes, global scales and special values. A fixed seed and
budget in the normal suite; NVFP4_FUZZ_EXAMPLES=N for a longer run."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from scalar_model import quantize_row

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed: pip install -e '.[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nvfp4_cupy import reference as ref  # noqa: E402
from nvfp4_cupy._format import NUMPY_DTYPES  # noqa: E402

EXAMPLES = int(os.environ.get("NVFP4_FUZZ_EXAMPLES", "300"))
DTYPES = NUMPY_DTYPES

# float32 bit patterns: anything, weighted towards the places rounding is decided.
interesting = st.sampled_from(
    [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 1e-40, 6.0, 448.0 * 6, 0.25, 0.75, 5.0, 65504.0]
)
any_float32 = st.integers(0, 2**32 - 1).map(lambda bits: struct.unpack("<f", struct.pack("<I", bits))[0])
values = st.one_of(any_float32, interesting, st.floats(-1e4, 1e4, width=32))
global_scales = st.one_of(
    st.floats(2.0**-126, 2.0**127, width=32),
    st.sampled_from([1.0, 448.0 * 6, 2.0**-126, 3.4e38, float("nan"), float("inf"), 0.0, -1.0]),
)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    dtype=st.sampled_from(sorted(DTYPES)),
    data=st.data(),
    gs=global_scales,
)
def test_golden_model_matches_the_scalar_model(rows, blocks, dtype, data, gs):
    flat = data.draw(st.lists(values, min_size=rows * blocks * 16, max_size=rows * blocks * 16))
    with np.errstate(over="ignore"):  # narrowing to fp16 overflows to inf on purpose
        x = np.array(flat, np.float32).astype(DTYPES[dtype]).reshape(rows, blocks * 16)
    gs32 = np.array([gs], np.float32)  # an array: invalid values allowed, as on the device
    codes, scale_bytes = ref.quantize_blocks(x.astype(np.float32), gs32[0])
    for r in range(rows):
        want_codes, want_scales = quantize_row([float(v) for v in x[r].astype(np.float32)], float(gs32[0]))
        assert codes[r].tolist() == want_codes, f"row {r}: codes"
        assert scale_bytes[r].tolist() == want_scales, f"row {r}: scales"
    # The packed layout agrees with the blocks it was built from.
    packed, scales = ref.scaled_fp4_quant(x, gs32, layout="linear")
    assert np.array_equal(ref.unpack_codes(packed), codes) and np.array_equal(scales, scale_bytes)
