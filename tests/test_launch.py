"""The launcher without a GPU: every kernel's parameter list is read from its
source, packed with the CUDA ABI's offsets (checked against the PTX NVRTC
emits), and every op binds exactly the names its kernels declare."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from conftest import import_cupy  # noqa: E402

import_cupy()  # the launcher needs CuPy (not a GPU): skips only where CuPy is not installed

from nvfp4_cupy._format import LAYOUTS  # noqa: E402
from nvfp4_cupy._runtime import nvrtc  # noqa: E402
from nvfp4_cupy._runtime.arrays import Array  # noqa: E402
from nvfp4_cupy._runtime.compile import (  # noqa: E402
    SOFTWARE,
    all_variants,
    compile_options,
    function_name,
    kernel_parameters,
    kernel_source,
)
from nvfp4_cupy._runtime.launch import BoundKernel  # noqa: E402


def _one_variant_per_function():
    chosen = {}
    for variant in all_variants():
        for index, name in enumerate(variant.names):
            chosen.setdefault((variant.source, function_name(name)), (variant, index))
    return sorted(chosen.values(), key=lambda v: v[0].names[v[1]])


@pytest.mark.parametrize("variant, index", _one_variant_per_function(), ids=lambda v: getattr(v, "source", str(v)))
def test_every_kernel_parameter_list_parses(variant, index):
    parameters = kernel_parameters(variant.source, function_name(variant.names[index]))
    assert parameters and len({p.name for p in parameters}) == len(parameters)
    assert all(p.format in "QqIif" for p in parameters)


_PTX_TYPES = {"u64": 8, "b64": 8, "s64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4}


@pytest.mark.nvrtc
@pytest.mark.parametrize("variant, index", _one_variant_per_function(), ids=lambda v: getattr(v, "source", str(v)))
def test_packed_offsets_match_the_ptx_parameter_list(variant, index):
    """The struct the launcher packs has each argument where the compiled
    kernel reads it: same count, sizes and (aligned) offsets as its .entry."""
    name = variant.names[index]
    program = nvrtc.compile_program(kernel_source(variant.source), variant.source, (name,),
                                    compile_options(SOFTWARE, "compute_80"))
    ptx = program.image.decode()
    entry = re.search(re.escape(program.lowered_names[0]) + r"\s*\(([^)]*)\)", ptx).group(1)
    sizes = [_PTX_TYPES[t] for t in re.findall(r"\.param\s+\.(\w+)", entry)]
    ptx_offsets, offset = [], 0
    for size in sizes:
        offset = -(-offset // size) * size
        ptx_offsets.append(offset)
        offset += size
    parameters = kernel_parameters(variant.source, function_name(name))
    formats = "@" + "".join(p.format for p in parameters)
    our_offsets, position = [], 0
    for p in parameters:
        size = struct.calcsize(p.format)
        position = -(-position // size) * size
        our_offsets.append(position)
        position += size
    assert [struct.calcsize(p.format) for p in parameters] == sizes, (name, entry)
    assert our_offsets == ptx_offsets
    assert struct.calcsize(formats) == offset


def _quantize_variant():
    return next(v for v in all_variants() if v.source == "quantize.cu")


def test_bound_kernel_refuses_names_that_are_not_the_kernels_parameters():
    variant = _quantize_variant()
    names = [p.name for p in kernel_parameters(variant.source, function_name(variant.names[0]))]
    static = {name: 0 for name in names[1:]}
    BoundKernel(variant, (1, 1, 1), (256, 1, 1), static, (names[0],))  # exactly the parameters: fine
    with pytest.raises(TypeError, match="but its parameters are"):
        BoundKernel(variant, (1, 1, 1), (256, 1, 1), static, ())  # one missing
    with pytest.raises(TypeError, match="but its parameters are"):
        BoundKernel(variant, (1, 1, 1), (256, 1, 1), {**static, "stride": 1}, (names[0],))  # one unknown
    with pytest.raises(TypeError, match="but its parameters are"):
        BoundKernel(variant, (1, 1, 1), (256, 1, 1), static, (names[0], names[1]))  # one twice
    late = {name: 0 for name in names if name != names[2]}
    with pytest.raises(TypeError, match="must be its first parameters"):
        BoundKernel(variant, (1, 1, 1), (256, 1, 1), late, (names[2],))  # a per-call argument after fixed ones


def test_a_launch_packs_the_per_call_arguments_over_the_fixed_ones():
    variant = _quantize_variant()
    parameters = kernel_parameters(variant.source, function_name(variant.names[0]))
    names = [p.name for p in parameters]
    static = {name: 7 + i for i, name in enumerate(names[2:])}
    kernel = BoundKernel(variant, (1, 1, 1), (256, 1, 1), static, tuple(names[:2]))
    data = kernel._buffer()[0]
    whole = struct.Struct("@" + "".join(p.format for p in parameters))
    struct.Struct("@" + "".join(p.format for p in parameters[:2])).pack_into(data, 0, 0x1000, 0x2000)
    assert whole.unpack(data.raw) == (0x1000, 0x2000, *static.values())


def _array(shape, dtype, itemsize):
    strides = tuple(int(s) for s in np.empty(shape, dtype=np.dtype(f"V{itemsize}")).strides)
    return Array(None, 4096, tuple(shape), strides, np.dtype(dtype), 0, itemsize)


@pytest.mark.parametrize("fmt, kind", [("nvfp4", "one"), ("nvfp4", "row"), ("nvfp4", "expert"), ("mxfp4", "one")])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_quantize_plans_bind_every_kernel_argument(fmt, kind, layout):
    from nvfp4_cupy._runtime.arrays import CUPY
    from nvfp4_cupy.ops import quantize

    x = _array((3, 5, 64) if kind == "expert" else (5, 64), "float16", 2)
    plan = quantize._make_plan(CUPY, x, None, True, layout, kind, fmt, None)
    assert plan.kernels[0] is not None and plan.kernels[1] is not None
    assert plan.packed_shape[-1] == 32


@pytest.mark.parametrize("kind", ["one", "row", "expert"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_dequantize_and_global_scale_plans_bind_every_kernel_argument(kind, fmt):
    from nvfp4_cupy._format import dequantize_shape
    from nvfp4_cupy._runtime.arrays import CUPY
    from nvfp4_cupy.ops import dequantize, global_scale

    shape = dequantize_shape((3, 5, 32), "uint8", None, "swizzled", fmt)
    plan = dequantize._plan_for(shape, "swizzled", "bfloat16", fmt, kind)
    assert plan.kernels[1] is not None
    scale_plan = global_scale._make_plan(CUPY, _array((5, 64), "float32", 4), kind == "row", 4224)
    assert scale_plan.kernels[1] is not None and scale_plan.scales == (5 if kind == "row" else 1)


def test_importing_the_package_and_its_ops_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, nvfp4_cupy as nv; nv.scaled_fp4_quant, nv.dequantize_fp4, nv.quantize, "
            "nv.compute_global_scale; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


@pytest.mark.parametrize("blocks_per_row", [1, 3, 16, 100, 112, 255, 256, 257, 448, 1000, 1024, 4096])
@pytest.mark.parametrize("dense", [False, True])
def test_launch_geometry_covers_every_block_once_per_thread(blocks_per_row, dense):
    from nvfp4_cupy._runtime.compile import THREADS_PER_BLOCK
    from nvfp4_cupy._runtime.launch import launch_geometry

    rows = 300
    grid, (threads_x, threads_y, threads_z) = launch_geometry(rows, blocks_per_row, columns=1, what="x", dense=dense)
    assert threads_z == 1 and threads_x * threads_y <= THREADS_PER_BLOCK
    assert grid[0] * threads_y >= rows and (grid[0] - 1) * threads_y < rows
    assert grid[1] * threads_x >= blocks_per_row and (grid[1] - 1) * threads_x < blocks_per_row
    if not dense:  # a warp never spans two rows
        assert threads_x & (threads_x - 1) == 0
    elif grid[1] > 1:  # rows split into whole warps, as evenly as whole warps allow
        assert threads_x % 32 == 0 and grid[1] * threads_x - blocks_per_row < 32 * grid[1]
    else:  # the thread block is exactly as wide as the row
        assert threads_x == blocks_per_row


def test_quantize_threads_take_several_blocks_only_when_there_are_many():
    from nvfp4_cupy._runtime.arrays import CUPY
    from nvfp4_cupy._runtime.compile import wide_blocks_per_thread
    from nvfp4_cupy.ops import quantize

    for shape in ((64, 4096), (4096, 4096)):  # 2^20 blocks: still one a thread (measured, ops/quantize.py)
        small = quantize._make_plan(CUPY, _array(shape, "bfloat16", 2), None, True, None, "one", "nvfp4", None)
        assert small.kernels[1].variant.blocks_per_thread == 1, shape
    big = quantize._make_plan(CUPY, _array((8192, 4096), "bfloat16", 2), None, True, None, "one", "nvfp4", None)
    wide = wide_blocks_per_thread("bfloat16", "nvfp4")
    assert wide == 4 and big.kernels[1].variant.blocks_per_thread == wide
    (_, blocks_y, _), (threads_x, _, _) = big.kernels[1].grid, big.kernels[1].block
    assert blocks_y * threads_x * wide >= 4096 // 16


def test_torch_outputs_are_fresh_c_contiguous_tensors(monkeypatch):
    """The torch frontend's allocation, run on the CPU (the device is the
    only thing a GPU would change): shapes, dtypes and strides, twice over
    (the second time from the remembered strides)."""
    torch = pytest.importorskip("torch")
    from nvfp4_cupy._runtime import arrays

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    frontend = arrays.TorchFrontend()
    frontend._devices[0] = torch.device("cpu")
    for _ in range(2):
        packed, scales, scale = frontend.outputs(0, 0, (((3, 8), "uint8"), ((128, 4), "uint8"), ((1,), "float32")))
        assert packed.shape == (3, 8) and scales.shape == (128, 4) and packed.dtype == scales.dtype == torch.uint8
        assert packed.is_contiguous() and scales.is_contiguous() and packed.data_ptr() != scales.data_ptr()
        assert scale.shape == (1,) and scale.dtype == torch.float32
        values = frontend.allocator(0, 0)((2, 5, 7), "bfloat16")
        assert values.shape == (2, 5, 7) and values.dtype == torch.bfloat16 and values.stride() == (35, 7, 1)
