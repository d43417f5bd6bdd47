"""Kernel functions, compiled by NVRTC through CuPy on first use and memoized
per (device, variant). CuPy's on-disk cache (CUPY_CACHE_DIR) serves later
processes; its key hashes the full source text and options."""

from __future__ import annotations

import threading

import cupy as cp
from cupy_backends.cuda.libs import nvrtc

from ._compile import QuantizeVariant, Target, compile_options, kernel_source, target_for

_lock = threading.Lock()
_functions: dict[tuple, cp.RawKernel] = {}
_targets: dict[int, Target] = {}


def device_target(device_id: int) -> Target:
    target = _targets.get(device_id)
    if target is None:
        compute_capability = int(cp.cuda.Device(device_id).compute_capability)
        target = target_for(compute_capability, tuple(nvrtc.getSupportedArchs()))
        _targets[device_id] = target
    return target


def quantize_function(device_id: int, variant: QuantizeVariant, target: Target | None = None):
    """The quantization kernel for this variant on this device. Thread-safe:
    concurrent first calls compile each variant once."""
    target = device_target(device_id) if target is None else target
    key = (device_id, variant, target)
    function = _functions.get(key)
    if function is None:
        with _lock:
            function = _functions.get(key)
            if function is None:
                with cp.cuda.Device(device_id):
                    module = cp.RawModule(
                        code=kernel_source(), options=compile_options(target), name_expressions=(variant.name,)
                    )
                    function = module.get_function(variant.name)
                _functions[key] = function
    return function


def compiled_variants() -> list[tuple]:
    """The (device, variant, target) keys built so far."""
    return sorted(_functions, key=repr)
