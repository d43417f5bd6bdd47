"""Kernel functions for a device: compiled by NVRTC on first use, memoized per
(device, variant, target) in this process and kept on disk for the next one
(_disk_cache.py). Thread-safe: threads racing on a first call compile once."""

from __future__ import annotations

import collections
import threading

import cupy as cp
from cupy.cuda import function

from . import disk_cache as _disk_cache
from . import nvrtc as _nvrtc
from .compile import Target, all_variants, compile_options, kernel_source, nvrtc_arch, target_for

_lock = threading.Lock()
_functions: dict[tuple, tuple] = {}
_targets: dict[int, tuple[Target, str]] = {}
# How each program was obtained in this process, by disk-cache entry name:
# "nvrtc" (compiled) or "disk" (loaded). Lets tests prove "compiled once".
builds: collections.Counter = collections.Counter()


def device_target(device_id: int) -> Target:
    return _device_build(device_id)[0]


def _device_build(device_id: int) -> tuple[Target, str]:
    """The conversion target and NVRTC -arch for this device."""
    build = _targets.get(device_id)
    if build is None:
        compute_capability = int(cp.cuda.Device(device_id).compute_capability)
        archs = _nvrtc.supported_archs()
        target = target_for(compute_capability, archs)
        build = _targets[device_id] = (target, nvrtc_arch(target, compute_capability, archs))
    return build


def kernel_functions(device_id: int, variant, target: Target | None = None) -> tuple:
    """The compiled kernels of this variant (one per name in variant.names)
    on this device; `target` overrides the device's conversion target (tests
    run the software path on any GPU with it)."""
    key = (device_id, variant, target)
    functions = _functions.get(key)
    if functions is None:
        with _lock:
            functions = _functions.get(key)
            if functions is None:
                default_target, arch = _device_build(device_id)
                program = compiled_program(variant, target or default_target, arch)
                with cp.cuda.Device(device_id):
                    module = function.Module()
                    module.load(program.image)
                    functions = tuple(module.get_function(name) for name in program.lowered_names)
                _functions[key] = functions
    return functions


def memo() -> dict:
    """The current (device, variant, target) -> functions memo. Replaced,
    never cleared in place, by forget(): launchers keep a CUfunction only
    while the memo holding its module is the current one."""
    return _functions


def forget() -> None:
    """Drop every loaded kernel from this process's memo (tests simulate a
    fresh process this way); the next launch loads them again."""
    global _functions
    _functions = {}


def function_pointer(device_id: int, variant, target: Target | None, index: int) -> int:
    """The CUfunction of variant.names[index] on this device. Looked up on
    every launch (a dict hit), never held by callers, so dropping the memo
    (tests simulate a new process that way) can never leave a launcher
    holding the handle of an unloaded module."""
    functions = _functions.get((device_id, variant, target))
    if functions is None:
        functions = kernel_functions(device_id, variant, target)
    return functions[index].ptr


def compiled_program(variant, target: Target, arch: str) -> _nvrtc.CompiledProgram:
    """From the disk cache if there, else compiled by NVRTC and stored."""
    source = kernel_source(variant.source)
    options = compile_options(target, arch)
    name = _disk_cache.entry_name(_nvrtc.version(), source, *options, *variant.names)
    cached = _disk_cache.load(name)
    if cached is not None and len(cached[0]) == len(variant.names):
        builds[name, "disk"] += 1
        return _nvrtc.CompiledProgram(image=cached[1], lowered_names=cached[0], log="")
    program = _nvrtc.compile_program(source, variant.source, variant.names, options)
    builds[name, "nvrtc"] += 1
    _disk_cache.store(name, program.lowered_names, program.image)
    return program


def precompile(compute_capability: int, variants=None, progress=None) -> int:
    """Compile `variants` (default: every one) for a GPU of this compute
    capability into the disk cache; no GPU needed. Returns how many programs
    NVRTC compiled: those already cached are skipped."""
    archs = _nvrtc.supported_archs()
    target = target_for(compute_capability, archs)
    arch = nvrtc_arch(target, compute_capability, archs)
    before = sum(count for (_, origin), count in builds.items() if origin == "nvrtc")
    variants = all_variants() if variants is None else variants
    for done, variant in enumerate(variants, 1):
        compiled_program(variant, target, arch)
        if progress is not None:
            progress(done, len(variants))
    return sum(count for (_, origin), count in builds.items() if origin == "nvrtc") - before


def compiled_variants() -> list[tuple]:
    """The (device, variant, target) keys built so far in this process."""
    return sorted(_functions, key=repr)
