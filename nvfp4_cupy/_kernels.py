"""Kernel functions, compiled by NVRTC through CuPy on first use and memoized
per (device, variant). CuPy's on-disk cache (CUPY_CACHE_DIR) serves later
processes; its key hashes the full source text and options."""

from __future__ import annotations

import threading

import cupy as cp
from cupy_backends.cuda.libs import nvrtc

from ._compile import Target, compile_options, kernel_source, target_for

_lock = threading.Lock()
_functions: dict[tuple, tuple] = {}
_targets: dict[int, Target] = {}


def device_target(device_id: int) -> Target:
    target = _targets.get(device_id)
    if target is None:
        compute_capability = int(cp.cuda.Device(device_id).compute_capability)
        target = target_for(compute_capability, tuple(nvrtc.getSupportedArchs()))
        _targets[device_id] = target
    return target


def kernel_functions(device_id: int, variant, target: Target | None = None) -> tuple:
    """The compiled kernels of this variant (one per name in variant.names)
    on this device. Thread-safe: concurrent first calls compile once."""
    target = device_target(device_id) if target is None else target
    key = (device_id, variant, target)
    functions = _functions.get(key)
    if functions is None:
        with _lock:
            functions = _functions.get(key)
            if functions is None:
                with cp.cuda.Device(device_id):
                    module = cp.RawModule(
                        code=kernel_source(variant.source), options=compile_options(target),
                        name_expressions=variant.names,
                    )
                    functions = tuple(module.get_function(name) for name in variant.names)
                _functions[key] = functions
    return functions


def compiled_variants() -> list[tuple]:
    """The (device, variant, target) keys built so far."""
    return sorted(_functions, key=repr)
