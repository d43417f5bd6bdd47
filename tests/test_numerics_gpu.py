"""The quantizer's arithmetic shortcuts (cuda_src/division.cuh and the
software E2M1 rounding in cuda_src/numerics.cuh) against the operations they
stand for, over every operand of their domains, on the GPU: div.rn.f32 split
into a per-divisor and a per-dividend part, and E2M1 rounding by a magic
addition. The whole-kernel tests hold the quantizer to the golden model;
these prove the shortcuts where random and boundary inputs could miss a case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import import_cupy
from nvfp4_cupy._runtime import kernels
from nvfp4_cupy._runtime.compile import compile_options, kernel_source
from nvfp4_cupy._runtime.nvrtc import compile_program

pytestmark = pytest.mark.gpu
cp = import_cupy()

SOURCE = Path(__file__).with_name("cuda") / "numerics_exhaustive.cu"
CHECKS = {
    # kernel: how many operands its domain holds
    "check_divide_by_six": 1 + (0x7F800000 - 0x0D800000),  # 0, and 2^-100 <= amax < inf
    "check_scale_divisions": (0x5D800000 - 0x21800000 + 1) * 126,  # 2^-60 <= gs <= 2^60, every E4M3 > 0
    "check_reciprocal": 0x62000000 - 0x1D000000 + 1,  # 2^-69 <= q <= 2^69
    "check_e2m1_magnitude": 0x80000000,  # every non-negative float32 bit pattern
}


@pytest.fixture(scope="module")
def module():
    from cupy.cuda import function

    device = cp.cuda.Device()
    target, arch = kernels._device_build(device.id)
    source = kernel_source("numerics.cuh") + SOURCE.read_text()
    program = compile_program(source, SOURCE.name, tuple(CHECKS), compile_options(target, arch))
    loaded = function.Module()
    loaded.load(program.image)
    return loaded


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shortcut_is_exact_over_its_whole_domain(module, name):
    counts = cp.zeros(2, dtype=cp.uint64)
    first = cp.full(1, 0xFFFFFFFF, dtype=cp.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    module.get_function(name)((sms * 8,), (256,), (counts, first))
    mismatches, checked = (int(v) for v in cp.asnumpy(counts))
    assert checked == CHECKS[name], f"{name}: checked {checked} operands, its domain holds {CHECKS[name]}"
    assert mismatches == 0, (
        f"{name}: {mismatches} of {checked} operands differ; first at bits {int(first[0]):#010x} "
        f"({np.uint32(int(first[0])).view(np.float32)!r})"
    )
