"""SASS of one kernel variant, without a GPU: NVRTC's PTX assembled by a
local ptxas, disassembled by cuobjdump (which needs nvdisasm on PATH or in
NVDISASM_PATH; both ship as the PyPI wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm). cuobjdump does not read NVRTC's own cubins, hence
ptxas. Prints the instruction count of the kernel body and an opcode
histogram.

    python benchmarks/sass_report.py [float16|bfloat16|float32] [cc] [--software] [--dequantize] [--sr]

(--dequantize: the dequantize kernel with that output dtype.)
"""

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nvfp4_cupy._format import LAYOUTS  # noqa: E402
from nvfp4_cupy._runtime.compile import (  # noqa: E402
    SOFTWARE,
    DequantizeVariant,
    QuantizeVariant,
    compile_options,
    kernel_source,
    nvrtc_arch,
    target_for,
    wide_blocks_per_thread,
)
from nvfp4_cupy._runtime.nvrtc import compile_program, supported_archs  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dtype = args[0] if args else "float16"
    cc = int(args[1]) if len(args) > 1 else 90
    archs = supported_archs()
    target = SOFTWARE if "--software" in sys.argv else target_for(cc, archs)
    kind = DequantizeVariant if "--dequantize" in sys.argv else QuantizeVariant
    # Quantize: the wide kernel that large inputs get (ops/quantize.py).
    blocks = wide_blocks_per_thread(dtype, "nvfp4") if kind is QuantizeVariant else 1
    # --sr: the stochastic-rounding kernel (scaled_fp4_quant_sr) instead.
    rounding = {"rounding": "sr"} if "--sr" in sys.argv and kind is QuantizeVariant else {}
    variant = QuantizeVariant(dtype, LAYOUTS["swizzled"], True, blocks_per_thread=blocks, **rounding) if blocks > 1 \
        else kind(dtype, LAYOUTS["swizzled"], True, **rounding)
    if kind is DequantizeVariant:
        blocks = variant.max_blocks_per_thread  # what large tensors get (ops/dequantize.py)
    # The library's build (-arch=sm_XX or sm_XXa), stopped at PTX
    # (compute_XX or compute_XXa: compile_program returns the PTX text), for
    # the local ptxas to assemble for that sm.
    arch = nvrtc_arch(target, cc, archs)
    ptx_arch = arch.replace("sm_", "compute_")
    sass_arch = arch if arch.startswith("sm_") else f"sm_{cc}"
    program = compile_program(
        kernel_source(variant.source), variant.source, variant.names, compile_options(target, ptx_arch)
    )
    ptxas = os.environ.get("PTXAS", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_bytes(program.image.rstrip(b"\0"))
        subprocess.run([ptxas, f"-arch={sass_arch}", str(ptx), "-o", str(cubin)], check=True)
        sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    lines = re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
    # The kernel body ends at its last EXIT; after it come out-of-line slow paths (IEEE division).
    body_end = max(i for i, (_, op) in enumerate(lines) if op == "EXIT") + 1
    histogram = collections.Counter(op.split(".")[0] for _, op in lines[:body_end])
    print(f"{variant.names[0]} on {arch}, {target.description}")
    print(f"{body_end} SASS instructions in the body for {16 * blocks} values a thread: {body_end / blocks:.0f} per "
          f"16 values (every path of the body counted once; +{len(lines) - body_end} out of line)")
    print(", ".join(f"{op} {count}" for op, count in histogram.most_common(16)))
    if kind is DequantizeVariant:
        fast, per_thread = dequantize_fast_path(sass)
        print(f"fast path (every block in the shortcut's range, {blocks} blocks a thread): {fast} instructions, "
              f"{fast / blocks:.1f} per 16 values; {per_thread} of them before the first block")
    return 0


def dequantize_fast_path(sass: str) -> tuple[int, int]:
    """(instructions a thread executes, those before its first block) when
    every block takes the shortcut and the thread block shares its scale
    tables: the kernel's first function walked from its start, every forward
    branch decided this way: around a CALL (the out-of-line exact paths, the
    per-value formula and div.rn's slow path) where one side holds one, else
    the shorter side of an if/else (the shared tables' lookup, against making
    a block's table), else straight on (more blocks to do)."""
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass.split("Function :")[1])
    body = [(int(address, 16), bool(predicate), op, rest) for address, predicate, op, rest in found]
    at = {address: i for i, (address, *_) in enumerate(body)}

    def branch(i):  # (target index, conditional) of a forward BRA, else None
        address, predicated, op, rest = body[i]
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or at.get(int(target.group(1), 16), -1) <= i:
            return None
        return at[int(target.group(1), 16)], predicated or bool(re.match(r"\s*!?U?P\d", rest))

    def calls(lo, hi):
        return any(body[k][2].startswith("CALL") for k in range(lo, hi))

    taken, i = [], 0
    while i < len(body):
        taken.append(body[i])
        if body[i][2] == "EXIT" and not body[i][1]:
            break
        jump = branch(i)
        if jump is None:
            i += 1
            continue
        target, conditional = jump
        if not conditional:
            i = target
            continue
        join = branch(target - 1)  # the fall-through side ends in BRA join: an if/else
        if join is not None and not join[1] and join[0] >= target:
            here, there = calls(i + 1, target), calls(target, join[0])
            take = here and not there or (here == there and join[0] - target < target - i - 1)
        else:
            take = calls(i + 1, target)
        i = target if take else i + 1
    first_exit = next(k for k, x in enumerate(taken) if x[2] == "EXIT")
    return len(taken), first_exit + 1


if __name__ == "__main__":
    sys.exit(main())
