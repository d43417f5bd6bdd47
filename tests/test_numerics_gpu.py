"""The quantizer's arithmetic shortcuts (cuda_src/division.cuh and the
software E2M1 rounding in cuda_src/numerics.cuh) against the operations they
stand for, over every operand of their domains, on the GPU: div.rn.f32 split
into a per-divisor and a per-dividend part, and E2M1 rounding by a magic
addition. The whole-kernel tests hold the quantizer to the golden model;
these prove the shortcuts where random and boundary inputs could miss a case."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import import_cupy
from exhaustive_check import assert_exact_over_domain, load_checks

pytestmark = pytest.mark.gpu
cp = import_cupy()

SOURCE = Path(__file__).with_name("cuda") / "numerics_exhaustive.cu"
CHECKS = {
    # kernel: how many operands its domain holds
    "check_divide_by_six": 1 + (0x7F800000 - 0x0D800000),  # 0, and 2^-100 <= amax < inf
    "check_scale_divisions": (0x5D800000 - 0x21800000 + 1) * 126,  # 2^-60 <= gs <= 2^60, every E4M3 > 0
    "check_reciprocal": 0x62000000 - 0x1D000000 + 1,  # 2^-69 <= q <= 2^69
    "check_e2m1_magnitude": 0x80000000,  # every non-negative float32 bit pattern
    "check_tiny_amax_blocks": 4 * (0x0D800000 - 1),  # 0 < amax < 2^-100, under 4 global scales
    # 2 divisors x (+0, and 2^-100 <= |y| <= 2^112 of either sign)
    "check_divide_by_4over6_denominators": 2 * (1 + 2 * (0x77800000 - 0x0D800000 + 1)),
}
# sm_90 and newer without the hardware conversion: the E2M1 rounding two
# values a time in 16-bit lanes, every non-negative float32 in each lane.
PACKED_CHECKS = {"check_e2m1_magnitude_pairs": 0x80000000}


def _device_packs_e2m1() -> bool:
    from nvfp4_cupy._runtime import kernels

    target, _ = kernels._device_build(cp.cuda.Device().id)
    return target.packed_e2m1


@pytest.fixture(scope="module")
def module():
    return load_checks(cp, SOURCE, tuple(CHECKS) + (tuple(PACKED_CHECKS) if _device_packs_e2m1() else ()))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shortcut_is_exact_over_its_whole_domain(module, name):
    assert_exact_over_domain(cp, module, name, CHECKS[name])


@pytest.mark.parametrize("name", sorted(PACKED_CHECKS))
def test_packed_e2m1_rounding_is_exact_in_both_lanes(module, name):
    if not _device_packs_e2m1():
        pytest.skip("this GPU's kernels round E2M1 in hardware or one value at a time (no packed path)")
    assert_exact_over_domain(cp, module, name, PACKED_CHECKS[name])
