"""What a kernel variant is made of: its CUDA source (from cuda_src/), its
template names and its NVRTC options. No device needed here: _kernels.py
compiles these for the GPU in hand, and the tests compile every variant for
every architecture on a CPU-only machine with the same options."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .._format import LAYOUTS, NUMPY_DTYPES, ScaleLayout, block_size_of

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)

# One thread per block of values, THREADS_PER_BLOCK threads a thread block:
# the launch geometry (launch.py) and the kernels' __launch_bounds__ and
# shared arrays (-DNVFP4_THREADS_PER_BLOCK) both read this one constant.
THREADS_PER_BLOCK = 256
# Quantization's wide threads work on this many bytes of a row of x, in
# whole blocks: 4 NVFP4 or 2 MXFP4 blocks of 16-bit input, half that of float32.
QUANTIZE_BYTES_PER_THREAD = 128


@dataclass(frozen=True)
class ElementStructs:
    """The CUDA structs that read (quantize) and write (dequantize) a dtype."""

    input: str
    output: str


ELEMENT_STRUCTS = {
    name: ElementStructs(f"nvfp4::{cuda}Input", f"nvfp4::{cuda}Output")
    for name, cuda in (("float16", "Float16"), ("bfloat16", "BFloat16"), ("float32", "Float32"))
}


def source_dir() -> Path:
    """cuda_src/ inside an installed wheel, else beside the package in a checkout."""
    for candidate in (_PACKAGE_DIR / "cuda_src", _PACKAGE_DIR.parent / "cuda_src"):
        if (candidate / "numerics.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"nvfp4_cupy: cuda_src/ not found beside {_PACKAGE_DIR} (broken install?)"
    )


@lru_cache(maxsize=None)
def kernel_source(filename: str) -> str:
    """The .cu file with its local #include "..." files inlined, once each.

    Inlining makes the source text the disk cache hashes (_disk_cache.py)
    cover every header, so editing a header can never serve a stale cubin."""
    directory = source_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (directory / name).read_text()
        return _INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand(filename)


@dataclass(frozen=True)
class Target:
    """Which conversions run in hardware. Part of every cache key: it changes
    the generated code."""

    hw_e4m3: bool  # cvt.rn.satfinite.e4m3x2.f32, sm_89+
    hw_e2m1: bool  # cvt.rn.satfinite.e2m1x2.f32, arch-specific sm_100a/103a/110a/120a/121a
    arch_specific: str | None = None  # e.g. "sm_100a": needed for the e2m1 instruction

    @property
    def description(self) -> str:
        if self.hw_e2m1:
            return f"hardware E2M1 and E4M3 conversion ({self.arch_specific})"
        if self.hw_e4m3:
            return "hardware E4M3, software E2M1 conversion"
        return "software E2M1 and E4M3 conversion"


SOFTWARE = Target(hw_e4m3=False, hw_e2m1=False)


def target_for(compute_capability: int, nvrtc_archs: tuple[int, ...]) -> Target:
    """The fastest exact conversions a GPU of this compute capability (e.g. 90
    for sm_90) has, among those this NVRTC (supporting `nvrtc_archs`) can emit."""
    if compute_capability // 10 in (10, 11, 12) and compute_capability in nvrtc_archs:
        return Target(hw_e4m3=True, hw_e2m1=True, arch_specific=f"sm_{compute_capability}a")
    return Target(hw_e4m3=compute_capability >= 89, hw_e2m1=False)


def nvrtc_arch(target: Target, compute_capability: int, nvrtc_archs: tuple[int, ...]) -> str:
    """NVRTC's -arch for this GPU: the arch-specific sm_XXXa the hardware E2M1
    conversion needs, else SASS for the GPU itself, else (a GPU newer than this
    NVRTC knows) PTX for the newest architecture it knows, which the driver
    compiles at load time."""
    if target.arch_specific:
        return target.arch_specific
    if compute_capability in nvrtc_archs:
        return f"sm_{compute_capability}"
    return f"compute_{max(arch for arch in nvrtc_archs if arch <= compute_capability)}"


def compile_options(target: Target, arch: str) -> tuple[str, ...]:
    """Every NVRTC option a kernel is built with. No -ftz: the numerics must
    not depend on it either way (docs/format.md), and the CPU suite checks the
    PTX holds no flushing instruction even when -ftz=true is added."""
    return (
        "-std=c++17",
        f"-arch={arch}",
        f"-DNVFP4_THREADS_PER_BLOCK={THREADS_PER_BLOCK}",
        f"-DNVFP4_HW_E4M3={int(target.hw_e4m3)}",
        f"-DNVFP4_HW_E2M1={int(target.hw_e2m1)}",
    )


def _flag(value: bool) -> str:
    return "true" if value else "false"


GLOBAL_SCALES = {"one": "nvfp4::kOneScale", "expert": "nvfp4::kScalePerExpert", "row": "nvfp4::kScalePerRow"}


@dataclass(frozen=True)
class QuantizeVariant:
    """One instantiation of the quantization kernel template."""

    dtype_name: str
    layout: ScaleLayout
    vector_loads: bool  # 16-byte loads: aligned rows and n % 8 == 0
    global_scales: str = "one"  # "one", "expert" ([E, m, n] batch) or "row"
    fmt: str = "nvfp4"  # or "mxfp4" (no global scale)
    blocks_per_thread: int = 1  # 1, or wide_blocks_per_thread(): see ops/quantize.py

    source = "quantize.cu"

    @property
    def names(self) -> tuple[str, ...]:
        types = f"{ELEMENT_STRUCTS[self.dtype_name].input}, {self.layout.cuda_struct}, {_flag(self.vector_loads)}"
        if self.fmt == "mxfp4":
            return (f"nvfp4::quantize_mxfp4<{types}, {self.blocks_per_thread}>",)
        return (f"nvfp4::quantize_nvfp4<{types}, {GLOBAL_SCALES[self.global_scales]}, {self.blocks_per_thread}>",)


def wide_blocks_per_thread(dtype_name: str, fmt: str) -> int:
    """Blocks a wide quantize thread works on: QUANTIZE_BYTES_PER_THREAD of x."""
    return QUANTIZE_BYTES_PER_THREAD // (block_size_of(fmt) * NUMPY_DTYPES[dtype_name].itemsize)


@dataclass(frozen=True)
class DequantizeVariant:
    dtype_name: str  # output dtype
    layout: ScaleLayout
    vector_stores: bool  # 16-byte stores: aligned output and n % 8 == 0
    fmt: str = "nvfp4"
    # The most 16-value blocks a thread takes (the kernel's kMaxSteps; each
    # launch picks its own number up to it, ops/dequantize.py). 8 spills for
    # float32 output with CUDA 13's ptxas on sm_100a/sm_120a, and compiles
    # 1.5x slower, for 1.5 fewer instructions a value.
    max_blocks_per_thread: int = 4

    source = "dequantize.cu"

    @property
    def names(self) -> tuple[str, ...]:
        return (
            f"nvfp4::dequantize_fp4<{ELEMENT_STRUCTS[self.dtype_name].output}, {self.layout.cuda_struct}, "
            f"{_flag(self.vector_stores)}, {_flag(self.fmt == 'mxfp4')}, {self.max_blocks_per_thread}>",
        )


@dataclass(frozen=True)
class GlobalScaleVariant:
    """The global scale of one input dtype: the amax reduction and the amax
    -> scale step in one kernel (whole tensor or per row)."""

    dtype_name: str
    vector_loads: bool

    source = "global_scale.cu"

    @property
    def names(self) -> tuple[str, ...]:
        return (f"nvfp4::global_scale<{ELEMENT_STRUCTS[self.dtype_name].input}, {_flag(self.vector_loads)}>",)


def all_variants() -> list:
    """Every kernel variant a launcher can ask for."""
    flags = (False, True)
    return (
        [
            QuantizeVariant(dtype_name, layout, vector, scales, fmt, per_thread)
            for dtype_name in ELEMENT_STRUCTS
            for layout in LAYOUTS.values()
            for vector in flags
            for fmt, all_scales in (("nvfp4", GLOBAL_SCALES), ("mxfp4", ("one",)))
            for scales in all_scales
            for per_thread in sorted({1, wide_blocks_per_thread(dtype_name, fmt)})
        ]
        + [
            DequantizeVariant(d, layout, vector, fmt)
            for d in ELEMENT_STRUCTS
            for layout in LAYOUTS.values()
            for vector in flags
            for fmt in ("nvfp4", "mxfp4")
        ]
        + [GlobalScaleVariant(d, vector) for d in ELEMENT_STRUCTS for vector in flags]
    )


# ---------------------------------------------------------------------------
# Kernel parameter lists, read from the .cu source: launch.py packs arguments
# by these names and types, so a changed signature is a loud error, never a
# silently misread argument.
# ---------------------------------------------------------------------------
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)")
# C parameter type -> struct format character (native size and alignment,
# which is how the CUDA ABI lays kernel parameters out).
_PARAMETER_FORMATS = (("*", "Q"), ("long long", "q"), ("unsigned", "I"), ("float", "f"), ("int", "i"))


@dataclass(frozen=True)
class KernelParameter:
    name: str
    format: str  # struct format character
    is_pointer: bool


@lru_cache(maxsize=None)
def kernel_parameters(filename: str, function: str) -> tuple[KernelParameter, ...]:
    """The parameters of `__global__ void function(...)` in a cuda_src file."""
    found = {name: params for name, params in _KERNEL.findall(kernel_source(filename))}
    if function not in found:
        raise LookupError(f"{filename} defines no __global__ function {function!r} (it has {sorted(found)})")
    parameters = []
    for declaration in found[function].split(","):
        declaration = " ".join(declaration.split())
        name = re.findall(r"\w+", declaration)[-1]
        fmt = next((f for token, f in _PARAMETER_FORMATS if token in declaration), None)
        if fmt is None:
            raise LookupError(f"{filename}: {function}: parameter type of {declaration!r} is not one the launcher packs")
        parameters.append(KernelParameter(name, fmt, fmt == "Q"))
    return tuple(parameters)


def function_name(template_name: str) -> str:
    """nvfp4::quantize_nvfp4<...> -> quantize_nvfp4."""
    return template_name.split("<", 1)[0].rsplit("::", 1)[-1]
