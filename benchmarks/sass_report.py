"""SASS of one kernel variant, without a GPU: NVRTC's PTX assembled by a
local ptxas, disassembled by cuobjdump (which needs nvdisasm on PATH or in
NVDISASM_PATH; both ship as the PyPI wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm). cuobjdump does not read NVRTC's own cubins, hence
ptxas. Prints the instruction count of the kernel body and an opcode
histogram.

    python benchmarks/sass_report.py [float16|bfloat16|float32] [cc] [--software] [--dequantize]

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
)
from nvfp4_cupy._runtime.nvrtc import compile_program, supported_archs  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dtype = args[0] if args else "float16"
    cc = int(args[1]) if len(args) > 1 else 90
    archs = supported_archs()
    target = SOFTWARE if "--software" in sys.argv else target_for(cc, archs)
    kind = DequantizeVariant if "--dequantize" in sys.argv else QuantizeVariant
    variant = kind(dtype, LAYOUTS["swizzled"], True)
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
    print(f"{body_end} SASS instructions in the body (+{len(lines) - body_end} out of line) for 16 values")
    print(", ".join(f"{op} {count}" for op, count in histogram.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
