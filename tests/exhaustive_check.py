"""GPU kernels that check a numerics shortcut against its exact definition
over the shortcut's whole domain (tests/cuda/*_exhaustive.cu): building them
against numerics.cuh as the launcher builds the library, and reading their
(mismatches, operands checked) counters."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_checks(cp, source: Path, names: tuple[str, ...]):
    """The check kernels of `source` (compiled after numerics.cuh, for this
    GPU, with the library's own options) as a loaded CuPy module."""
    from cupy.cuda import function

    from nvfp4_cupy._runtime import kernels
    from nvfp4_cupy._runtime.compile import compile_options, kernel_source
    from nvfp4_cupy._runtime.nvrtc import compile_program

    target, arch = kernels._device_build(cp.cuda.Device().id)
    program = compile_program(kernel_source("numerics.cuh") + source.read_text(), source.name, names,
                              compile_options(target, arch))
    loaded = function.Module()
    loaded.load(program.image)
    return loaded


def assert_exact_over_domain(cp, module, name: str, domain_size: int) -> None:
    """Runs check kernel `name`: every operand of its domain is checked
    (the count must be the domain's size) and none differs."""
    counts = cp.zeros(2, dtype=cp.uint64)
    first = cp.full(1, 0xFFFFFFFF, dtype=cp.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    module.get_function(name)((sms * 8,), (256,), (counts, first))
    mismatches, checked = (int(v) for v in cp.asnumpy(counts))
    assert checked == domain_size, f"{name}: checked {checked} operands, its domain holds {domain_size}"
    assert mismatches == 0, (
        f"{name}: {mismatches} of {checked} operands differ; first at bits {int(first[0]):#010x} "
        f"({np.uint32(int(first[0])).view(np.float32)!r})"
    )
