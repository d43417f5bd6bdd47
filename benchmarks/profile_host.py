"""Where the host time of one scaled_fp4_quant call goes (cProfile), for a
1x4096 input with preallocated outputs. A working tool, not a benchmark."""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nvfp4_cupy as nv  # noqa: E402

x = cp.random.standard_normal((1, 4096), dtype=cp.float32).astype(cp.float16)
out, out_scale = nv.create_fp4_output_tensors(1, 4096)
for _ in range(100):
    nv.scaled_fp4_quant(x, 3.0, out=out, out_scale=out_scale)
cp.cuda.Device().synchronize()
for label, kwargs in (("out=", dict(out=out, out_scale=out_scale)), ("alloc", {})):
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        nv.scaled_fp4_quant(x, 3.0, **kwargs)
    t1 = time.perf_counter()
    cp.cuda.Device().synchronize()
    print(f"{label}: {1e6 * (t1 - t0) / n:.2f} us per call")
profiler = cProfile.Profile()
profiler.enable()
for _ in range(2000):
    nv.scaled_fp4_quant(x, 3.0, out=out, out_scale=out_scale)
profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(18)

# The floor CuPy sets: the same launch with its 12 arguments prebuilt.
from nvfp4_cupy import _kernels  # noqa: E402
from nvfp4_cupy._compile import QuantizeVariant  # noqa: E402
from nvfp4_cupy._format import LAYOUTS  # noqa: E402
import numpy as np  # noqa: E402

(kernel,) = _kernels.kernel_functions(0, QuantizeVariant("float16", LAYOUTS["swizzled"], True))
args = (x, np.int64(4096), np.int64(0), np.int32(1), np.int32(4096), np.int32(4096), np.uint64(0), np.float32(3.0),
        out, out_scale, np.int32(128), np.int32(256))
n = 5000
t0 = time.perf_counter()
for _ in range(n):
    kernel((64, 1), (256, 1), args)
t1 = time.perf_counter()
cp.cuda.Device().synchronize()
print(f"bare RawKernel launch, 12 args: {1e6 * (t1 - t0) / n:.2f} us per call")
