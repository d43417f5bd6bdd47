"""Bit-exact comparison with a failure message that says where, and the GPU
quantizer run into poisoned outputs."""

from __future__ import annotations

import contextlib
import math

import numpy as np

# Outputs are filled with each of these in turn before a launch: a byte the
# kernel forgot to write cannot equal the expected byte under both.
POISONS = (0xA5, 0x5A)


def assert_bytes_equal(actual, expected, what: str, limit: int = 5) -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    if np.array_equal(actual, expected):
        return
    where = np.argwhere(actual != expected)
    first = ", ".join(
        f"{tuple(int(i) for i in idx)}: got 0x{int(actual[tuple(idx)]):02x} want 0x{int(expected[tuple(idx)]):02x}"
        for idx in where[:limit]
    )
    raise AssertionError(f"{what}: {len(where)} of {actual.size} bytes differ; first {first}")


def quantize_poisoned(x, global_scale, *, target=None, fmt="nvfp4", num_experts=None, numerics="ieee",
                      mx_scale_rule=None, row_scaled=False, tile="1x16", stochastic=None, **kwargs):
    """Quantize the CuPy array x on the GPU (the launcher's _quantize, so
    `target` can force the conversion path) into output buffers filled with
    each of POISONS in turn; both runs must agree (an unwritten byte cannot).
    kwargs: padded_n, layout, is_sf_swizzled_layout, stream. With
    num_experts, x is [E, m, n]. numerics, mx_scale_rule, row_scaled, tile:
    as scaled_fp4_quant's; stochastic: (seed, offset) of scaled_fp4_quant_sr.
    Returns host (packed, scales)."""
    import cupy as cp

    from nvfp4_cupy import create_fp4_output_tensors
    from nvfp4_cupy.ops.quantize import _quantize

    unknown = set(kwargs) - {"padded_n", "layout", "is_sf_swizzled_layout", "stream"}
    assert not unknown, f"quantize_poisoned: unknown arguments {sorted(unknown)}"
    rows = x.shape[1:-1] if num_experts is not None else x.shape[:-1]
    m, n = math.prod(rows), x.shape[-1]
    layout_args = {key: kwargs[key] for key in ("padded_n", "layout", "is_sf_swizzled_layout") if key in kwargs}
    results = []
    for poison in POISONS:
        out, out_scale = create_fp4_output_tensors(m, n, num_experts=num_experts, fmt=fmt, **layout_args)
        out.fill(poison)
        out_scale.fill(poison)
        packed, scales = _quantize(
            x,
            global_scale,
            kwargs.get("is_sf_swizzled_layout", True),
            kwargs.get("padded_n"),
            kwargs.get("layout"),
            out,
            out_scale,
            kwargs.get("stream"),
            target=target,
            fmt=fmt,
            options=(numerics, mx_scale_rule, row_scaled, tile),
            stochastic=stochastic,
        )
        assert packed is out and scales is out_scale
        results.append((cp.asnumpy(packed), cp.asnumpy(scales)))
    (packed_a, scales_a), (packed_b, scales_b) = results
    assert_bytes_equal(packed_a, packed_b, "packed under two poisons (unwritten bytes)")
    assert_bytes_equal(scales_a, scales_b, "scales under two poisons (unwritten bytes)")
    return packed_a, scales_a


@contextlib.contextmanager
def poisoned_allocations(poison: int):
    """Every CuPy allocation in the block is filled with `poison` (on the
    stream it is made for) before anything can write it: how ops that
    allocate their own outputs get poisoned. Yields the list of their
    pointers."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    pointers = []

    def malloc(nbytes):
        memory = pool.malloc(nbytes)
        if nbytes:
            memory.memset_async(poison, nbytes)
        pointers.append(memory.ptr)
        return memory

    with cp.cuda.using_allocator(malloc):
        yield pointers


def assert_refused_before_allocating(bad_calls) -> None:
    """Each (what, call, error type, message pattern) of bad_calls raises
    that error before any CuPy allocation (so before any launch). The calls'
    inputs must be made beforehand: an allocation inside `call` counts."""
    import pytest

    for what, call, error, match in bad_calls:
        with poisoned_allocations(POISONS[0]) as pointers:
            with pytest.raises(error, match=match):
                call()
        assert not pointers, f"{what}: allocated before refusing"

