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


def kernel_constant(filename: str, name: str) -> int:
    """An integer constant of a cuda_src file (`constexpr int kX = N;` or an
    enumerator `kX = N`): the launchers read the kernels' own numbers, so
    that the kernel is the one source."""
    found = re.search(rf"\b{name} = (\d+)[;,\s}}]", kernel_source(filename))
    if found is None:
        raise LookupError(f"{filename} defines no integer constant {name}")
    return int(found.group(1))


@dataclass(frozen=True)
class Target:
    """Which conversions run in hardware. Part of every cache key: it changes
    the generated code."""

    hw_e4m3: bool  # cvt.rn.satfinite.e4m3x2.f32, sm_89+
    hw_e2m1: bool  # cvt.rn.satfinite.e2m1x2.f32, arch-specific sm_100a/103a/110a/120a/121a
    arch_specific: str | None = None  # e.g. "sm_100a": needed for the e2m1 instruction
    packed_e2m1: bool = False  # software E2M1 two values a time (min.u16x2/max.u16x2, sm_90+)

    @property
    def description(self) -> str:
        if self.hw_e2m1:
            return f"hardware E2M1 and E4M3 conversion ({self.arch_specific})"
        if self.hw_e4m3:
            packed = " (16-bit lanes)" if self.packed_e2m1 else ""
            return f"hardware E4M3, software E2M1 conversion{packed}"
        return "software E2M1 and E4M3 conversion"


SOFTWARE = Target(hw_e4m3=False, hw_e2m1=False)


def target_for(compute_capability: int, nvrtc_archs: tuple[int, ...]) -> Target:
    """The fastest exact conversions a GPU of this compute capability (e.g. 90
    for sm_90) has, among those this NVRTC (supporting `nvrtc_archs`) can emit."""
    if compute_capability // 10 in (10, 11, 12) and compute_capability in nvrtc_archs:
        return Target(hw_e4m3=True, hw_e2m1=True, arch_specific=f"sm_{compute_capability}a")
    # The packed software E2M1 rounding needs PTX for sm_90 or newer.
    packed = compute_capability >= 90 and any(90 <= arch <= compute_capability for arch in nvrtc_archs)
    return Target(hw_e4m3=compute_capability >= 89, hw_e2m1=False, packed_e2m1=packed)


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
        f"-DNVFP4_PACKED_E2M1={int(target.packed_e2m1)}",
    )


# Scale layouts as a kernel's run-time argument (layouts.cuh's ScaleLayoutId),
# for the fused ops, which store only a few scale bytes a row.
RUNTIME_LAYOUT_IDS = {"swizzled": 0, "linear": 1, "8x4": 2}


def _flag(value: bool) -> str:
    return "true" if value else "false"


GLOBAL_SCALES = {"one": "nvfp4::kOneScale", "expert": "nvfp4::kScalePerExpert", "row": "nvfp4::kScalePerRow"}
# The quantize kernels' last template argument (quantize.cu's Blocks), after
# a comma; the default ("ieee", "floor") is the kernel's default argument.
NUMERICS_BLOCKS = {"ieee": "", "te": ", nvfp4::Nvfp4TeBlocks"}
MX_SCALE_RULE_BLOCKS = {"floor": "", "rceil": ", nvfp4::Mxfp4RceilBlocks", "te_pow2": ", nvfp4::Mxfp4TePow2Blocks"}
# The global scales numerics="te" has (TE defines no expert batch).
TE_GLOBAL_SCALES = ("one", "row")


@dataclass(frozen=True)
class QuantizeVariant:
    """One instantiation of the quantization kernel template."""

    dtype_name: str
    layout: ScaleLayout
    vector_loads: bool  # 16-byte loads: aligned rows and n % 8 == 0
    # "one", "expert" ([E, m, n] batch), "row", or "own": computed by the
    # kernel itself from x's amax (quantize() of a small x, one launch)
    global_scales: str = "one"
    fmt: str = "nvfp4"  # or "mxfp4" (no global scale)
    blocks_per_thread: int = 1  # 1, or wide_blocks_per_thread(): see ops/quantize.py
    numerics: str = "ieee"  # NVFP4: or "te" (TransformerEngine's arithmetic, docs/te_numerics.md)
    mx_scale_rule: str = "floor"  # MXFP4: or "rceil", "te_pow2" (docs/stochastic_rounding_and_mx_rules.md)
    # NVFP4 "ieee": "rn" (round to nearest), or "sr" (stochastic rounding of
    # the codes, quantize_nvfp4_sr: docs/stochastic_rounding_and_mx_rules.md)
    rounding: str = "rn"
    # NVFP4 "te": "1x16" blocks, or "16x16" tiles (quantize_nvfp4_te_tiles: one
    # global scale, a thread block a row_tiles.cuh tile)
    tile: str = "1x16"

    source = "quantize.cu"

    @property
    def names(self) -> tuple[str, ...]:
        types = f"{ELEMENT_STRUCTS[self.dtype_name].input}, {self.layout.cuda_struct}, {_flag(self.vector_loads)}"
        if self.fmt == "mxfp4":
            rule = MX_SCALE_RULE_BLOCKS[self.mx_scale_rule]
            return (f"nvfp4::quantize_mxfp4<{types}, {self.blocks_per_thread}{rule}>",)
        if self.global_scales == "own":
            return (f"nvfp4::quantize_nvfp4_own_scale<{types}, {self.blocks_per_thread}>",)
        if self.tile == "16x16":
            return (f"nvfp4::quantize_nvfp4_te_tiles<{types}>",)
        if self.rounding == "sr":
            return (f"nvfp4::quantize_nvfp4_sr<{types}, {GLOBAL_SCALES[self.global_scales]}, "
                    f"{self.blocks_per_thread}>",)
        return (f"nvfp4::quantize_nvfp4<{types}, {GLOBAL_SCALES[self.global_scales]}, {self.blocks_per_thread}"
                f"{NUMERICS_BLOCKS[self.numerics]}>",)


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
    -> scale step in one kernel (whole tensor or per row), the step of
    numerics "ieee" or "te", or "amax": the amax itself (Four Over Six's A)."""

    dtype_name: str
    vector_loads: bool
    numerics: str = "ieee"

    source = "global_scale.cu"

    @property
    def names(self) -> tuple[str, ...]:
        step = {"ieee": "", "te": ", nvfp4::TeScaleFromAmax", "amax": ", nvfp4::AmaxItself"}[self.numerics]
        return (f"nvfp4::global_scale<{ELEMENT_STRUCTS[self.dtype_name].input}, {_flag(self.vector_loads)}{step}>",)


# --- RMSNorm, alone and fused with quantization (cuda_src/rms_norm.cu; issue 16, item 1) ---
RMS_NORM_OPS = ("norm", "nvfp4", "mxfp4")  # rms_norm (T output), rms_norm_quant in each format


@dataclass(frozen=True)
class RmsNormVariant:
    """One kernel of rms_norm.cu: `op` "norm" (rms_norm) or a format
    (rms_norm_quant). Layout, weight, residual and the global scale's kind
    are run-time arguments there."""

    dtype_name: str
    vector_loads: bool  # 16-byte accesses: aligned rows and n % 8 == 0
    op: str = "norm"

    source = "rms_norm.cu"

    @property
    def names(self) -> tuple[str, ...]:
        types = f"{ELEMENT_STRUCTS[self.dtype_name].input}, {_flag(self.vector_loads)}"
        if self.op == "norm":
            return (f"nvfp4::rms_norm<{types}>",)
        return (f"nvfp4::rms_norm_quant<{types}, {_flag(self.op == 'mxfp4')}>",)


# --- SiLU-and-mul and expert quantization (cuda_src/experts.cu; issue 16, items 2 and 4) ---
# The kernels of ExpertsVariant.names, by what a launcher asks for.
EXPERT_KERNELS = ("batch", "batch_silu", "grouped", "grouped_silu", "grouped_row_map")


def experts_blocks_per_thread(dtype_name: str, fmt: str, silu: bool) -> int:
    """Blocks an experts.cu thread quantizes: the wide quantizer's count, half
    of it when each block reads gate and up (the same bytes of x a thread)."""
    wide = wide_blocks_per_thread(dtype_name, fmt)
    return max(1, wide // 2) if silu else wide


@dataclass(frozen=True)
class ExpertsVariant:
    """The quantizing kernels of experts.cu for one input dtype and format:
    the dense and masked batch, the grouped experts, each plain or with
    SiLU-and-mul, and the grouped experts' row map (EXPERT_KERNELS order).
    Layout and 16-byte loads are run-time arguments there."""

    dtype_name: str
    fmt: str = "nvfp4"

    source = "experts.cu"

    @property
    def names(self) -> tuple[str, ...]:
        element = ELEMENT_STRUCTS[self.dtype_name].input
        mx = _flag(self.fmt == "mxfp4")
        names = []
        for kernel in EXPERT_KERNELS:
            if kernel == "grouped_row_map":  # the grouped experts' bookkeeping: no dtype or format
                names.append("nvfp4::grouped_row_map")
                continue
            silu = kernel.endswith("_silu")
            per_thread = experts_blocks_per_thread(self.dtype_name, self.fmt, silu)
            function = "quantize_grouped" if kernel.startswith("grouped") else "quantize_batch"
            names.append(f"nvfp4::{function}<{element}, {mx}, {_flag(silu)}, {per_thread}>")
        return tuple(names)


@dataclass(frozen=True)
class SiluAndMulVariant:
    """silu_and_mul of one dtype (experts.cu), T output."""

    dtype_name: str

    source = "experts.cu"

    @property
    def names(self) -> tuple[str, ...]:
        return (f"nvfp4::silu_and_mul<{ELEMENT_STRUCTS[self.dtype_name].input}>",)


# --- Fake quantization (cuda_src/fake_quantize.cu; issue 16, item 3) ---
@dataclass(frozen=True)
class FakeQuantizer:
    """A quantizer struct of fake_quantize.cu and the format it writes."""

    cuda_struct: str
    fmt: str
    # The most blocks a thread takes: None for the wide quantizer's 128 bytes
    # of x; 1 for the quantizers whose block work dwarfs a thread's set-up
    # (their unrolled steps would only multiply the code and the registers).
    max_steps: int | None = None
    has_mask: bool = True  # section 6.3 defines its saturation mask
    tiles: bool = False  # 16x16 tiles: the kernels fake_quantize_te_tiles / saturation_mask_te_tiles


# Which quantizer runs, by name (ops/fake_quantize.py picks one from the
# options of docs/fused_ops.md, section 6.1).
FAKE_QUANTIZERS = {
    "nvfp4_ieee": FakeQuantizer("nvfp4::IeeeNvfp4Quantizer", "nvfp4"),
    "nvfp4_te": FakeQuantizer("nvfp4::TeNvfp4Quantizer", "nvfp4"),
    "nvfp4_te_tiles": FakeQuantizer("nvfp4::TeNvfp4Quantizer", "nvfp4", tiles=True),
    "nvfp4_sr": FakeQuantizer("nvfp4::SrNvfp4Quantizer", "nvfp4"),
    "mxfp4_floor": FakeQuantizer("nvfp4::FloorMxfp4Quantizer", "mxfp4"),
    "mxfp4_rceil": FakeQuantizer("nvfp4::RceilMxfp4Quantizer", "mxfp4"),
    "mxfp4_te_pow2": FakeQuantizer("nvfp4::TePow2Mxfp4Quantizer", "mxfp4"),
    "nvfp4_4over6_mae": FakeQuantizer("nvfp4::FourOverSixQuantizer<false>", "nvfp4", max_steps=1),
    "nvfp4_4over6_mse": FakeQuantizer("nvfp4::FourOverSixQuantizer<true>", "nvfp4", max_steps=1),
    "nvfp4_rht": FakeQuantizer("nvfp4::RhtQuantizer<true>", "nvfp4", max_steps=1, has_mask=False),
    "nvfp4_rht_float32": FakeQuantizer("nvfp4::RhtQuantizer<false>", "nvfp4", max_steps=1, has_mask=False),
}


@dataclass(frozen=True)
class FakeQuantizeVariant:
    """fake_quantize (x's dtype out) or, with `mask`, saturation_mask (one
    byte a value) of fake_quantize.cu, for one input dtype and quantizer.
    The global scale's kind and the blocks a thread are run-time arguments."""

    dtype_name: str
    quantizer: str  # a key of FAKE_QUANTIZERS
    vector: bool  # 16-byte loads and stores: aligned rows and n % 8 == 0
    mask: bool = False

    source = "fake_quantize.cu"

    @property
    def max_blocks_per_thread(self) -> int:
        """The kernel's kMaxSteps: the quantizer's max_steps, or the wide
        quantizer's 128 bytes of x a thread."""
        quantizer = FAKE_QUANTIZERS[self.quantizer]
        return quantizer.max_steps or wide_blocks_per_thread(self.dtype_name, quantizer.fmt)

    @property
    def names(self) -> tuple[str, ...]:
        structs = ELEMENT_STRUCTS[self.dtype_name]
        if FAKE_QUANTIZERS[self.quantizer].tiles:
            if self.mask:
                return (f"nvfp4::saturation_mask_te_tiles<{structs.input}, {_flag(self.vector)}>",)
            return (f"nvfp4::fake_quantize_te_tiles<{structs.input}, {structs.output}, {_flag(self.vector)}>",)
        tail = f"{FAKE_QUANTIZERS[self.quantizer].cuda_struct}, {_flag(self.vector)}, {self.max_blocks_per_thread}"
        if self.mask:
            return (f"nvfp4::saturation_mask<{structs.input}, {tail}>",)
        return (f"nvfp4::fake_quantize<{structs.input}, {structs.output}, {tail}>",)


@dataclass(frozen=True)
class ColumnwiseVariant:
    """quantize_nvfp4_te_columnwise (columnwise.cu): numerics="te" with 1x16
    blocks or 16x16 tiles, x and x^T quantized in one pass; one global scale
    (and one for x^T), or (1x16 only) one per row of x and one per column:
    row-scaled NVFP4."""

    dtype_name: str
    layout: ScaleLayout
    vector_loads: bool  # 16-byte loads: aligned rows and n % 8 == 0
    global_scales: str = "one"  # or "row"
    square_tiles: bool = False  # tile="16x16"

    source = "columnwise.cu"

    @property
    def names(self) -> tuple[str, ...]:
        return (f"nvfp4::quantize_nvfp4_te_columnwise<{ELEMENT_STRUCTS[self.dtype_name].input}, "
                f"{self.layout.cuda_struct}, {_flag(self.vector_loads)}, {GLOBAL_SCALES[self.global_scales]}, "
                f"{_flag(self.square_tiles)}>",)


@dataclass(frozen=True)
class RhtVariant:
    """rht.cu's two kernels for one input dtype, layout and form: the
    post-transform amax and the RHT + numerics="te" quantizer
    (docs/te_rht_and_4over6.md, part A)."""

    dtype_name: str
    layout: ScaleLayout
    vector_loads: bool  # 16-byte loads: aligned rows and n % 8 == 0
    to_input: bool = True  # the transform rounded to x's dtype (transform_dtype="input")
    # (one amax for the tensor or one a row: a run-time argument of both kernels)

    source = "rht.cu"

    @property
    def names(self) -> tuple[str, ...]:
        element, vector, to_input = (ELEMENT_STRUCTS[self.dtype_name].input, _flag(self.vector_loads),
                                     _flag(self.to_input))
        return (f"nvfp4::rht_amax<{element}, {vector}, {to_input}>",
                f"nvfp4::quantize_nvfp4_rht<{element}, {self.layout.cuda_struct}, {vector}, {to_input}>")


@dataclass(frozen=True)
class FourOverSixVariant:
    """four_over_six.cu's quantizer for one input dtype, layout and
    error mode (docs/te_rht_and_4over6.md, part B); TE's err_use_fast_math
    and e4m3_max, and whether the amax is one a row, are run-time arguments."""

    dtype_name: str
    layout: ScaleLayout
    vector_loads: bool  # 16-byte loads: aligned rows and n % 8 == 0
    mse: bool = False  # err_mode "MSE" (else "MAE")

    source = "four_over_six.cu"

    @property
    def names(self) -> tuple[str, ...]:
        return (f"nvfp4::quantize_nvfp4_4over6<{ELEMENT_STRUCTS[self.dtype_name].input}, {self.layout.cuda_struct}, "
                f"{_flag(self.vector_loads)}, {_flag(self.mse)}>",)


def numerics_variants() -> list:
    """The quantize kernels of numerics="te" (one scale or one per row), of
    the MXFP4 scale rules "rceil" and "te_pow2" and of stochastic rounding
    (every kind of global scale): the default kernels' shapes, with other
    Blocks; and numerics="te"'s 16x16 tiles (one scale, a thread block a
    tile of row_tiles.cuh)."""
    options = (("nvfp4", TE_GLOBAL_SCALES, {"numerics": "te"}), ("mxfp4", ("one",), {"mx_scale_rule": "rceil"}),
               ("mxfp4", ("one",), {"mx_scale_rule": "te_pow2"}), ("nvfp4", tuple(GLOBAL_SCALES), {"rounding": "sr"}))
    return [
        QuantizeVariant(dtype_name, layout, vector, scales, fmt, per_thread, **option)
        for dtype_name in ELEMENT_STRUCTS
        for layout in LAYOUTS.values()
        for vector in (False, True)
        for fmt, all_scales, option in options
        for scales in all_scales
        for per_thread in sorted({1, wide_blocks_per_thread(dtype_name, fmt)})
    ] + [
        QuantizeVariant(dtype_name, layout, vector, "one", "nvfp4", 1, "te", tile="16x16")
        for dtype_name in ELEMENT_STRUCTS
        for layout in LAYOUTS.values()
        for vector in (False, True)
    ]


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
        # quantize()'s one-launch kernel: small inputs only, one block a thread
        + [QuantizeVariant(d, layout, vector, "own") for d in ELEMENT_STRUCTS for layout in LAYOUTS.values()
           for vector in flags]
        + numerics_variants()
        + [
            DequantizeVariant(d, layout, vector, fmt)
            for d in ELEMENT_STRUCTS
            for layout in LAYOUTS.values()
            for vector in flags
            for fmt in ("nvfp4", "mxfp4")
        ]
        + [GlobalScaleVariant(d, vector, numerics) for d in ELEMENT_STRUCTS for vector in flags
           for numerics in ("ieee", "te", "amax")]
        + [RmsNormVariant(d, vector, op) for d in ELEMENT_STRUCTS for vector in flags for op in RMS_NORM_OPS]
        + [ExpertsVariant(d, fmt) for d in ELEMENT_STRUCTS for fmt in ("nvfp4", "mxfp4")]
        + [SiluAndMulVariant(d) for d in ELEMENT_STRUCTS]
        # (stochastic rounding has round to nearest's scale bytes, so its mask is nvfp4_ieee's)
        + [FakeQuantizeVariant(d, q, vector, mask) for d in ELEMENT_STRUCTS for q in FAKE_QUANTIZERS
           for vector in flags for mask in flags
           if not mask or (FAKE_QUANTIZERS[q].has_mask and q != "nvfp4_sr")]  # (SR's mask is ieee's)
        + [ColumnwiseVariant(d, layout, vector, scales, square) for d in ELEMENT_STRUCTS for layout in LAYOUTS.values()
           for vector in flags for scales in TE_GLOBAL_SCALES for square in flags
           if not (square and scales == "row")]  # (TE's 16x16 tiles have no row-scaled form)
        + [RhtVariant(d, layout, vector, to_input) for d in ELEMENT_STRUCTS for layout in LAYOUTS.values()
           for vector in flags for to_input in flags]
        + [FourOverSixVariant(d, layout, vector, mse) for d in ELEMENT_STRUCTS
           for layout in LAYOUTS.values() for vector in flags for mse in flags]
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
