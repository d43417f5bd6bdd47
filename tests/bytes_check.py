"""Bit-exact comparison with a failure message that says where."""

from __future__ import annotations

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
