"""Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
easy as 1, 2, 3", SC 2011; the Random123 library), in NumPy uint64 arithmetic,
vectorised over any broadcastable counters and keys. It is the counter-based
generator of stochastic rounding (docs/stochastic_rounding_and_mx_rules.md,
section 1): the random bits of an element are a pure function of (seed,
offset, element group), so the golden model and any GPU kernel reproduce them
bit for bit, in any order and with no state.

Checked (tests/test_reference_sr_mx.py) against Random123's known-answer
vectors (tests/kat_vectors, the "philox4x32 10" and "philox4x32 7" lines) and
against PyTorch's own engine, at::Philox4_32 (ATen/core/PhiloxRNGEngine.h, the
CPU/GPU engine behind torch's CUDA generator and curand's
curandStatePhilox4_32_10_t), whose (seed, subsequence, offset) map exactly
onto our (key, counter) layout. numpy.random.Philox is Philox4x64-10 (64-bit
words, other multipliers and Weyl constants), a different function: it cannot
check this one.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PHILOX_M4X32",
    "PHILOX_W32",
    "philox4x32",
    "philox4x32_10",
    "split_u64",
    "sr_counters",
    "sr_key",
    "sr_words",
]

PHILOX_M4X32 = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W32 = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments: golden ratio, sqrt(3) - 1
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _u32(value) -> np.ndarray:
    """Any integer array-like as uint64 holding a value < 2^32 (checked)."""
    array = np.asarray(value)
    if array.dtype.kind not in "ui":
        raise TypeError(f"Philox words must be integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 0xFFFFFFFF):
        raise ValueError("Philox words must lie in [0, 2^32)")
    return array.astype(np.uint64)


def philox4x32(counter, key, rounds: int = 10) -> np.ndarray:
    """Philox4x32-R of `counter` (uint32 [..., 4]) under `key` (uint32
    [..., 2]), broadcast against each other: uint32 [..., 4].

    One round, with M0, M1 = PHILOX_M4X32 and 64-bit products split into
    hi/lo 32-bit halves:
        hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2
        (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    and between rounds the key is bumped: k0 += W0, k1 += W1 (mod 2^32).
    Round 1 uses the key as given: R rounds, R - 1 bumps."""
    counter, key = _u32(counter), _u32(key)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"counter must be [..., 4] and key [..., 2], got shapes {counter.shape} and {key.shape}")
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    m0, m1 = np.uint64(PHILOX_M4X32[0]), np.uint64(PHILOX_M4X32[1])
    w0, w1 = np.uint64(PHILOX_W32[0]), np.uint64(PHILOX_W32[1])
    for round_index in range(rounds):
        if round_index:
            k0, k1 = (k0 + w0) & _MASK32, (k1 + w1) & _MASK32
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32)
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32 with its standard 10 rounds."""
    return philox4x32(counter, key, 10)


def split_u64(value) -> tuple[np.ndarray, np.ndarray]:
    """(low 32 bits, high 32 bits) of unsigned 64-bit integers, as uint64."""
    value = np.asarray(value, dtype=np.uint64)
    return value & _MASK32, value >> _SHIFT32


def sr_key(seed: int) -> np.ndarray:
    """The Philox key of a 64-bit seed: (k0, k1) = (low 32 bits, high 32 bits)."""
    lo, hi = split_u64(np.uint64(seed))
    return np.stack([lo, hi]).astype(np.uint32)


def sr_counters(offset: int, groups) -> np.ndarray:
    """uint32 [..., 4] counters (c0, c1, c2, c3) = (low, high 32 bits of
    `offset`; low, high 32 bits of each element group index in `groups`),
    the layout of curand_init(seed, subsequence=group, offset=4 * offset) and
    at::Philox4_32(seed, group, offset)."""
    off_lo, off_hi = split_u64(np.uint64(offset))
    g_lo, g_hi = split_u64(np.asarray(groups, dtype=np.uint64))
    return np.stack(np.broadcast_arrays(off_lo, off_hi, g_lo, g_hi), axis=-1).astype(np.uint32)


def sr_words(seed: int, offset: int, groups) -> np.ndarray:
    """The four random words (uint32 [..., 4]) of each element group:
    Philox4x32-10(counter = sr_counters(offset, groups), key = sr_key(seed))."""
    return philox4x32_10(sr_counters(offset, groups), sr_key(seed))
