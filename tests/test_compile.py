"""Every kernel variant compiled by NVRTC for sm_80, sm_89, sm_90, sm_100a and
sm_120a on the CPU, with the options the library uses on a GPU: no spills and
no stack frame in any kernel, the hardware FP4 conversion exactly where it
exists, and no flush-to-zero instruction even with -ftz=true added (CuPy's own
default). Each distinct (source, kernels, options) is compiled once per
session, all kernels of a source in one NVRTC program, and every check reads
that build. A failing compile shows NVRTC's log."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pytest

from nvfp4_cupy._runtime.compile import (
    SOFTWARE,
    QuantizeVariant,
    Target,
    all_variants,
    compile_options,
    kernel_source,
    nvrtc_arch,
    target_for,
)

pytestmark = pytest.mark.nvrtc

SOURCES = sorted({variant.source for variant in all_variants()})
QUANTIZE = QuantizeVariant.source  # where the FP4 and E4M3 conversions are
COMPUTE_CAPABILITIES = (80, 89, 90, 100, 120)
# Added to the library's options: CuPy's default -ftz=true (the numerics must
# not depend on it), and ptxas's per-function report of stack and spills.
CHECK_OPTIONS = ("-ftz=true", "-Xptxas=-v")
# NVRTC 12.9+ reuses programs from the driver's compile cache where a CUDA
# driver is present ("Successfully retrieved cached ptx from driver cache,
# skip compilation", in libnvrtc), and then ptxas does not run: its report,
# which these checks read, is missing. That failed these tests on GPU
# machines whenever an xdist worker or an earlier run had built the same
# program; a CPU-only machine has no driver cache. --no-cache (NVRTC 12.9+)
# builds every program from scratch.
NO_CACHE_FROM = (12, 9)

# ptxas -v, per function:
#   ptxas info    : Function properties for _ZN5nvfp4...
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
FUNCTION_REPORT = re.compile(
    r"Function properties for (\S+)[ \t]*\r?\n"
    r"([^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads[^\n]*)"
)


@dataclass(frozen=True)
class Build:
    options: tuple[str, ...]
    ptx: str
    lowered_names: dict[str, str]  # template name -> mangled (PTX .entry) name
    reports: dict[str, tuple[int, str]]  # function -> (stack + spill bytes, ptxas's line)
    log: str


def kernel_names(source: str) -> tuple[str, ...]:
    """Every template name a launcher can ask of one source file, once each."""
    return tuple(dict.fromkeys(name for v in all_variants() if v.source == source for name in v.names))


def build_for(compute_capability: int, source: str, software: bool = False) -> tuple[Target, Build]:
    """All kernels of `source` as kernels.py would build them on a GPU of
    this compute capability (or on the software path), plus CHECK_OPTIONS."""
    from nvfp4_cupy._runtime.nvrtc import supported_archs, version

    archs = supported_archs()
    if compute_capability not in archs:
        pytest.skip(f"this NVRTC ({version()}) cannot compile for sm_{compute_capability}")
    target = SOFTWARE if software else target_for(compute_capability, archs)
    no_cache = ("--no-cache",) if tuple(map(int, version().split("."))) >= NO_CACHE_FROM else ()
    options = (*compile_options(target, nvrtc_arch(target, compute_capability, archs)), *CHECK_OPTIONS, *no_cache)
    return target, compiled(source, kernel_names(source), options)


@functools.lru_cache(maxsize=None)
def compiled(source: str, names: tuple[str, ...], options: tuple[str, ...]) -> Build:
    """One NVRTC program per distinct argument tuple in the session: these are
    all that change the output (the source text is fixed for the session)."""
    ptx, lowered, log = nvrtc_build(source, names, options)
    reports = ptxas_reports(log)
    if not set(lowered) <= set(reports):
        # NVRTC 13.0 returned an empty log for a multi-kernel program on an
        # H100 machine (global_scale.cu), before --no-cache was added (likely
        # the driver cache above); one kernel at a time it reported.
        log = "".join(nvrtc_build(source, (name,), options)[2] for name in names)
        reports = ptxas_reports(log)
    return Build(options, ptx, dict(zip(names, lowered)), reports, log)


def nvrtc_build(source: str, names: tuple[str, ...], options: tuple[str, ...]) -> tuple[str, tuple[str, ...], str]:
    """(PTX, lowered names, log) of one NVRTC program compiled for a real
    sm_XX. The NVRTC calls of nvfp4_cupy._runtime.nvrtc.compile_program,
    which keeps only the cubin: these checks read the PTX the cubin is
    assembled from, and compiling again for it would double the time."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(kernel_source(source), source, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            raise AssertionError(
                f"NVRTC failed on {source} ({exc}); options {' '.join(options)}:\n{_log(nvrtc, program)}"
            ) from None
        assert nvrtc.getCUBIN(program), f"{source}: no cubin ({' '.join(options)})"
        lowered = tuple(nvrtc.getLoweredName(program, name) for name in names)
        return nvrtc.getPTX(program).decode(), lowered, _log(nvrtc, program)
    finally:
        nvrtc.destroyProgram(program)


def _log(nvrtc, program) -> str:
    log = nvrtc.getProgramLog(program)
    return log.decode(errors="replace") if isinstance(log, bytes) else log


def ptxas_reports(log: str) -> dict[str, tuple[int, str]]:
    return {
        function: (int(stack) + int(stores) + int(loads), line.strip())
        for function, line, stack, stores, loads in FUNCTION_REPORT.findall(log)
    }


def assert_every_kernel_built(build: Build) -> None:
    entries = set(re.findall(r"\.entry (\S+)\(", build.ptx))
    missing = [name for name, lowered in build.lowered_names.items() if lowered not in entries]
    assert not missing, f"{len(missing)} kernels have no .entry in the PTX ({' '.join(build.options)}): {missing[:5]}"
    extra = sorted(entries - set(build.lowered_names.values()))
    assert not extra, f"{len(extra)} PTX entries nobody asked for ({' '.join(build.options)}): {extra[:5]}"


def assert_no_spills(build: Build) -> None:
    """0 bytes stack frame, spill stores and spill loads in ptxas's report of
    every kernel, and of every other function it reports."""
    unreported = [name for name, lowered in build.lowered_names.items() if lowered not in build.reports]
    assert not unreported, (
        f"ptxas reported nothing for {len(unreported)} kernels ({' '.join(build.options)}): {unreported[:5]}\n"
        f"log:\n{build.log}"
    )
    template = {lowered: name for name, lowered in build.lowered_names.items()}
    spilling = [
        f"{template.get(function, function)} ({function}): {line}"
        for function, (nonzero, line) in build.reports.items()
        if nonzero
    ]
    assert not spilling, (
        f"{len(spilling)} of {len(build.reports)} functions use stack or spill ({' '.join(build.options)}):\n"
        + "\n".join(spilling)
    )


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_every_variant_compiles_without_spills(compute_capability, source):
    _, build = build_for(compute_capability, source)
    assert_every_kernel_built(build)
    assert_no_spills(build)
    # A warning is a bug, and on NVRTC 13 it also hides ptxas's report.
    warnings = [line for line in build.log.splitlines() if "warning" in line.lower()]
    assert not warnings, warnings[:3]


@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_hardware_conversions_exactly_where_they_exist(compute_capability):
    target, build = build_for(compute_capability, QUANTIZE)
    e2m1 = "cvt.rn.satfinite.e2m1x2.f32" in build.ptx
    e4m3 = "cvt.rn.satfinite.e4m3x2.f32" in build.ptx
    assert e2m1 == (compute_capability >= 100) == target.hw_e2m1
    assert e4m3 == (compute_capability >= 89) == target.hw_e4m3
    if compute_capability >= 100:
        assert f".target sm_{compute_capability}a" in build.ptx


@pytest.mark.parametrize("compute_capability", [90, 100])
def test_software_path_compiles_anywhere(compute_capability):
    _, build = build_for(compute_capability, QUANTIZE, software=True)
    assert "e2m1x2" not in build.ptx and "e4m3x2" not in build.ptx
    assert_every_kernel_built(build)
    assert_no_spills(build)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("compute_capability", COMPUTE_CAPABILITIES)
def test_no_flush_to_zero_even_with_ftz_option(compute_capability, source):
    _, build = build_for(compute_capability, source)
    # The one .ftz the sources write themselves: division.cuh's reciprocal
    # estimate, div.rn's own MUFU.RCP, only ever given normal operands (its
    # callers' range checks), so that it cannot flush anything.
    flushing = [line for line in ptx_instructions(build.ptx) if ".ftz" in line and not line.startswith(OWN_FTZ)]
    assert not flushing, f"-ftz=true leaked into {len(flushing)} instructions: {flushing[:5]}"


OWN_FTZ = "rcp.approx.ftz.f32 "


def ptx_instructions(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if line.strip() and not line.strip().startswith("//")]


@pytest.mark.parametrize("source", SOURCES)
def test_source_inlines_every_local_header(source):
    text = kernel_source(source)
    assert '#include "' not in text
    if source == QUANTIZE:
        assert "struct SwizzledScales" in text and "block_scale" in text
