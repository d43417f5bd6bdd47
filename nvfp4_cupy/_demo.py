"""The main job: quantize a built-in LLM-like activation on the GPU, check it
byte for byte against the golden model, and report what NVFP4 did to it."""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np

from . import reference as ref
from ._cli import gpu_unavailable_reason

SAMPLE_TOKENS = 256
SAMPLE_HIDDEN = 7152  # not a multiple of 128: CUTLASS wants K padded
SAMPLE_PADDED = 7168


def sample_activation(seed: int = 0) -> np.ndarray:
    """bfloat16 [tokens, hidden]: Gaussian with a few outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLE_TOKENS, SAMPLE_HIDDEN)).astype(np.float32)
    outliers = rng.choice(SAMPLE_HIDDEN, size=SAMPLE_HIDDEN // 100, replace=False)
    x[:, outliers] *= 40.0
    return x.astype(ml_dtypes.bfloat16)


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(10 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2)))


def run(layout: str = "swizzled") -> int:
    x = sample_activation()
    m, n = x.shape
    gs = np.float32(448 * 6 / float(np.abs(x.astype(np.float32)).max()))
    print(f"input     : bfloat16 [{m}, {n}] (outlier channels), K padded to {SAMPLE_PADDED}, layout {layout}")
    print(f"global    : scale {gs:.6g} = 448 * 6 / amax")
    started = time.perf_counter()
    want_packed, want_scales = ref.scaled_fp4_quant(x, gs, padded_n=SAMPLE_PADDED, layout=layout)
    print(f"golden    : NumPy + ml_dtypes in {1e3 * (time.perf_counter() - started):.0f} ms")

    reason = gpu_unavailable_reason()
    matched = None
    if reason:
        print(f"gpu       : none ({reason}); ran the golden model alone")
        packed, scales = want_packed, want_scales
    else:
        import cupy as cp

        from . import scaled_fp4_quant

        device = cp.cuda.Device()
        name = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
        started = time.perf_counter()
        packed_d, scales_d = scaled_fp4_quant(cp.asarray(x), float(gs), padded_n=SAMPLE_PADDED, layout=layout)
        cp.cuda.get_current_stream().synchronize()
        first_call = time.perf_counter() - started
        packed, scales = cp.asnumpy(packed_d), cp.asnumpy(scales_d)
        matched = np.array_equal(packed, want_packed) and np.array_equal(scales, want_scales)
        print(f"gpu       : {name} (sm_{device.compute_capability}), first call {1e3 * first_call:.0f} ms incl. compile/load")

    print(f"packed    : uint8 {list(packed.shape)}; scales uint8 {list(scales.shape)} ({layout})")
    stored = packed.nbytes + scales.nbytes
    print(f"bytes     : {x.nbytes} -> {stored} ({x.nbytes / stored:.2f}x smaller, {100 * (1 - stored / x.nbytes):.1f}% saved)")
    y = ref.dequantize(packed, scales, gs, n=n, layout=layout)
    print(f"SQNR      : {sqnr_db(x.astype(np.float32), y):.2f} dB after dequantization")
    if matched is None:
        return 0
    differing = int(np.count_nonzero(packed != want_packed) + np.count_nonzero(scales != want_scales))
    verdict = "every byte matched" if matched else f"{differing} bytes DIFFER"
    print(f"bit-exact : {verdict} ({stored} bytes vs the golden model)")
    return 0 if matched else 1
