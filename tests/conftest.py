"""The one place that knows whether there is a GPU (and CuPy/NVRTC).

Mark GPU tests `@pytest.mark.gpu`; they skip, with the reason, where no CUDA
device can be used. Tests that only need NVRTC (CPU compile checks) use the
`nvrtc` marker. Errors are never turned into skips: only a missing package
or device is."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.lru_cache(maxsize=None)
def nvrtc_unavailable_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no CuPy, or no libnvrtc on this machine
        return f"NVRTC not usable here ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    try:
        import cupy
    except ImportError as exc:
        return f"no GPU tests: CuPy is not installed ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver / no device
        return f"no CUDA GPU on this machine ({type(exc).__name__}: {exc})"
    if count == 0:
        return "no CUDA GPU on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and gpu_unavailable_reason():
            item.add_marker(pytest.mark.skip(reason=gpu_unavailable_reason()))
        elif "nvrtc" in item.keywords and nvrtc_unavailable_reason():
            item.add_marker(pytest.mark.skip(reason=nvrtc_unavailable_reason()))


def pytest_report_header(config):
    reason = gpu_unavailable_reason()
    if reason:
        return f"nvfp4_cupy: {reason}"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    return f"nvfp4_cupy: GPU 0 is {props['name'].decode()} (sm_{props['major']}{props['minor']})"


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)
