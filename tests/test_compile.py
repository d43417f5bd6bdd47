"""Every kernel variant compiled by NVRTC for sm_80, sm_89, sm_90, sm_100a and
sm_120a on the CPU, with the options the library uses on a GPU: no spills, the
hardware FP4 conversion exactly where it exists, and no flush-to-zero
instruction even with -ftz=true added (CuPy's own default). A failing compile
shows NVRTC's log."""

from __future__ import annotations

import functools
import re

import pytest

from nvfp4_cupy._compile import SOFTWARE, all_variants, compile_options, kernel_source, nvrtc_arch, target_for

pytestmark = pytest.mark.nvrtc

SOURCES = sorted({variant.source for variant in all_variants()})
ALL_KERNELS = {  # unique names per source
    source: tuple(dict.fromkeys(name for v in all_variants() if v.source == source for name in v.names))
    for source in SOURCES
}
COMPUTE_CAPABILITIES = (80, 89, 90, 100, 120)


QUANTIZE = "nvfp4_quantize.cu"


@functools.lru_cache(maxsize=None)
def nvrtc_compile(compute_capability: int, source: str = QUANTIZE, software: bool = False):
    """Compile all variants of one source as _kernels.py would on a GPU of
    this compute capability, plus -ftz=true. Returns (target, PTX, ptxas
    log with one report per kernel)."""
    from cupy_backends.cuda.libs import nvrtc

    archs = tuple(nvrtc.getSupportedArchs())
    if compute_capability not in archs:
        pytest.skip(f"this NVRTC ({nvrtc.getVersion()}) cannot compile for sm_{compute_capability}")
    target = SOFTWARE if software else target_for(compute_capability, archs)
    options = [*compile_options(target, nvrtc_arch(target, compute_capability, archs)), "-ftz=true", "-Xptxas=-v"]
    names = ALL_KERNELS[source]
    ptx, log = _compile(source, names, options)
    if len(re.findall(PTXAS_REPORT, log)) != len(names):
        # NVRTC 13.0 sometimes returns an empty log for a multi-kernel
        # program (seen for global_scale.cu on an H100 machine); one kernel
        # at a time it reports.
        log = "".join(_compile(source, (name,), options)[1] for name in names)
    return target, ptx, log


PTXAS_REPORT = r"(\d+) bytes spill stores"


def _compile(source: str, names: tuple[str, ...], options: list[str]) -> tuple[str, str]:
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(kernel_source(source), source, [], [])
    for name in names:
        nvrtc.addNameExpression(program, name)
    try:
        nvrtc.compileProgram(program, options)
    except nvrtc.NVRTCError as exc:
        raise AssertionError(f"NVRTC failed ({' '.join(options)}):\n{nvrtc.getProgramLog(program)}") from exc
    assert nvrtc.getCUBIN(program), "no cubin produced"
    return nvrtc.getPTX(program).decode(), nvrtc.getProgramLog(program)


def ptx_instructions(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if line.strip() and not line.strip().startswith("//")]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_every_variant_compiles_without_spills(compute_capability, source):
    _, ptx, log = nvrtc_compile(compute_capability, source)
    entries = re.findall(r"\.entry (\S+)\(", ptx, re.MULTILINE)
    assert len(entries) == len(ALL_KERNELS[source]), entries
    spills = re.findall(PTXAS_REPORT, log)
    assert len(spills) == len(ALL_KERNELS[source]), log
    assert all(count == "0" for count in spills), log
    stacks = re.findall(r"(\d+) bytes stack frame", log)
    assert all(size == "0" for size in stacks), log


@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_hardware_conversions_exactly_where_they_exist(compute_capability):
    target, ptx, _ = nvrtc_compile(compute_capability)
    e2m1 = "cvt.rn.satfinite.e2m1x2.f32" in ptx
    e4m3 = "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert e2m1 == (compute_capability >= 100) == target.hw_e2m1
    assert e4m3 == (compute_capability >= 89) == target.hw_e4m3
    if compute_capability >= 100:
        assert f".target sm_{compute_capability}a" in ptx


@pytest.mark.parametrize("compute_capability", [90, 100])
def test_software_path_compiles_anywhere(compute_capability):
    _, ptx, log = nvrtc_compile(compute_capability, QUANTIZE, software=True)
    assert "e2m1x2" not in ptx and "e4m3x2" not in ptx
    assert "bytes spill stores" in log


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_no_flush_to_zero_even_with_ftz_option(compute_capability, source):
    _, ptx, _ = nvrtc_compile(compute_capability, source)
    flushing = [line for line in ptx_instructions(ptx) if ".ftz" in line]
    assert not flushing, f"-ftz=true leaked into: {flushing[:5]}"


def test_source_inlines_every_local_header():
    source = kernel_source()
    assert '#include "' not in source
    assert "struct SwizzledScales" in source and "block_scale" in source
