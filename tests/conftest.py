"""The one place that knows whether there is a GPU (and CuPy/NVRTC), and the
helpers the GPU test files share.

Mark GPU tests `@pytest.mark.gpu` and tests that only need NVRTC (CPU compile
checks) `@pytest.mark.nvrtc`. They skip, saying why, only where something is
absent: CuPy not installed, libnvrtc not found, no CUDA device, or no CUDA
driver library at all (a CPU-only machine). Anything else (a driver too old
for CuPy's runtime, a CuPy that does not import, an NVRTC that does not load)
fails them with the error: a broken GPU runner must never look like a green
CPU-only run. With NVFP4_REQUIRE_GPU=1 in the environment (the GPU runner
sets it) an absent GPU, CuPy or NVRTC fails those tests too."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest

REQUIRE_GPU = os.environ.get("NVFP4_REQUIRE_GPU") == "1"

# cudaError_t values CuPy's CUDARuntimeError carries in .status.
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
# What the CUDA runtime loads; where it is missing there is no driver at all,
# and the runtime says cudaErrorInsufficientDriver (CuPy 14, CUDA 12.9).
DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


@dataclass(frozen=True)
class Availability:
    """Usable, or `missing` (a reason to skip), or `error` (a reason to fail)."""

    missing: str | None = None
    error: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def _driver_library_present() -> bool:
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def gpu_availability() -> Availability:
    if not _cupy_installed():
        return Availability(missing="no GPU tests: CuPy is not installed")
    try:
        import cupy
    except Exception as exc:
        return Availability(error=f"CuPy is installed but does not import ({_describe(exc)})")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        if exc.status == CUDA_ERROR_NO_DEVICE:
            return Availability(missing=f"no CUDA GPU on this machine ({_describe(exc)})")
        if exc.status == CUDA_ERROR_INSUFFICIENT_DRIVER and not _driver_library_present():
            return Availability(missing=f"no CUDA driver on this machine ({DRIVER_LIBRARY} not found; {_describe(exc)})")
        return Availability(error=f"CUDA is here but unusable ({_describe(exc)})")
    except Exception as exc:
        return Availability(error=f"CUDA is here but unusable ({_describe(exc)})")
    if count == 0:
        return Availability(missing="no CUDA GPU on this machine (0 devices)")
    return Availability()


def _library_not_found_errors() -> tuple[type, ...]:
    """What CuPy raises where libnvrtc is not found: cuda.pathfinder's error
    (CuPy >= 14), nothing else."""
    try:
        from cuda.pathfinder import DynamicLibNotFoundError
    except ImportError:
        return ()
    return (DynamicLibNotFoundError,)


@functools.lru_cache(maxsize=None)
def nvrtc_availability() -> Availability:
    if not _cupy_installed():
        return Availability(missing="no NVRTC tests: CuPy is not installed")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except _library_not_found_errors() as exc:
        return Availability(missing=f"no NVRTC tests: libnvrtc not found ({_describe(exc)})")
    except Exception as exc:
        return Availability(error=f"NVRTC is installed but unusable ({_describe(exc)})")
    return Availability()


def _failure(availability: Availability) -> str | None:
    if availability.error:
        return availability.error
    if availability.missing and REQUIRE_GPU:
        return f"NVFP4_REQUIRE_GPU=1, but {availability.missing}"
    return None


def gpu_unavailable_reason() -> str | None:
    """Why this machine runs no GPU code (None: it does). Raises where the
    GPU tests fail: a test that takes a no-GPU path must fail there too."""
    availability = gpu_availability()
    failure = _failure(availability)
    if failure:
        raise RuntimeError(failure)
    return availability.missing


def nvrtc_unavailable_reason() -> str | None:
    """Why this machine compiles no kernel (None: it does); raises like
    gpu_unavailable_reason."""
    availability = nvrtc_availability()
    failure = _failure(availability)
    if failure:
        raise RuntimeError(failure)
    return availability.missing


MARKERS = {"gpu": gpu_availability, "nvrtc": nvrtc_availability}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, availability in MARKERS.items():
            if marker in item.keywords and availability().missing and not _failure(availability()):
                item.add_marker(pytest.mark.skip(reason=availability().missing))
                break


def pytest_runtest_setup(item):
    """Before the test's fixtures, after its own skip marks."""
    for marker, availability in MARKERS.items():
        if marker in item.keywords:
            failure = _failure(availability())
            if failure:
                pytest.fail(failure, pytrace=False)


def pytest_report_header(config):
    lines = []
    for marker, availability in MARKERS.items():
        failure = _failure(availability())
        if failure:
            lines.append(f"nvfp4_cupy: {marker} tests FAIL here: {failure}")
        elif availability().missing:
            lines.append(f"nvfp4_cupy: {marker} tests skip here: {availability().missing}")
    if not gpu_availability().missing and not gpu_availability().error:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        lines.append(f"nvfp4_cupy: GPU 0 is {props['name'].decode()} (sm_{props['major']}{props['minor']})")
    return lines


def import_cupy():
    """CuPy, for a GPU test module's `cp`: the module skips only where CuPy is
    not installed (fails with NVFP4_REQUIRE_GPU=1); a CuPy that is installed
    but does not import is a collection error."""
    if not _cupy_installed():
        if REQUIRE_GPU:
            pytest.fail("NVFP4_REQUIRE_GPU=1, but CuPy is not installed", pytrace=False)
        pytest.skip("no GPU tests: CuPy is not installed", allow_module_level=True)
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture
def nv():
    import nvfp4_cupy

    return nvfp4_cupy


@pytest.fixture
def torch_cuda():
    """torch, where it is installed and has a CUDA device; else a skip."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch
