"""SASS of one kernel variant (needs cuobjdump, run where the CUDA toolkit
is): instruction count and opcode histogram. A working tool.

    python benchmarks/sass_stats.py [float16|bfloat16|float32] [cc] [software]
"""

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cupy_backends.cuda.libs import nvrtc  # noqa: E402

from nvfp4_cupy._compile import SOFTWARE, QuantizeVariant, compile_options, kernel_source, target_for  # noqa: E402
from nvfp4_cupy._format import LAYOUTS  # noqa: E402

dtype = sys.argv[1] if len(sys.argv) > 1 else "float16"
cc = int(sys.argv[2]) if len(sys.argv) > 2 else 90
target = SOFTWARE if "software" in sys.argv else target_for(cc, tuple(nvrtc.getSupportedArchs()))
variant = QuantizeVariant(dtype, LAYOUTS["swizzled"], True)
program = nvrtc.createProgram(kernel_source(), "k.cu", [], [])
nvrtc.addNameExpression(program, variant.name)
nvrtc.compileProgram(program, [*compile_options(target), "-ftz=true", f"-arch=sm_{cc}"])
with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
    cubin.write(nvrtc.getCUBIN(program))
    cubin.flush()
    sass = subprocess.run(["cuobjdump", "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
histogram = collections.Counter(op.split(".")[0] for op in ops)
print(f"{variant.name} sm_{cc} {target.description}: {len(ops)} SASS instructions")
print(", ".join(f"{op} {count}" for op, count in histogram.most_common(20)))
