"""A/B timing of scaled_fp4_quant between source trees (and blocks-a-thread
choices) in one process, interleaved: each tree is loaded as its own
package, every shape is timed for each configuration in turn, three rounds,
and the median kept (nvfp4_cupy._bench.bench_quantizer: CUDA graphs, inputs
rotated out of L2). Drift between processes (clocks, the card warming up)
is larger than the differences a kernel change makes at mid sizes; this
harness keeps both sides under the same conditions.

    python benchmarks/bench_ab.py OUT.json LABEL=TREE[:BLOCKS_PER_THREAD] ...

TREE is a directory holding nvfp4_cupy/ and cuda_src/ (e.g. a `git archive`
of another commit); BLOCKS_PER_THREAD forces ops.quantize.blocks_per_thread.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import sys
from pathlib import Path


def load(alias: str, tree: str):
    init = Path(tree) / "nvfp4_cupy" / "__init__.py"
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in arg for arg in argv[1:]):
        print(__doc__)
        return 2
    configs = []
    for arg in argv[1:]:
        label, rest = arg.split("=", 1)
        tree, _, per = rest.partition(":")
        load(f"nv_{label}", tree)
        bench = importlib.import_module(f"nv_{label}._bench")
        if per:
            quantize = importlib.import_module(f"nv_{label}.ops.quantize")
            quantize.blocks_per_thread = lambda blocks, dtype, fmt, per=int(per): per
        configs.append((label, bench))
    card, ceiling = configs[0][1].card_and_copy_ceiling()
    print(f"{card}, copy ceiling {ceiling:.0f} GB/s")
    cases = [(m, n, n, "bfloat16") for m, n in configs[0][1].CEILING_SHAPES] + [
        (1, 4096, 4096, "bfloat16"), (128, 7168, 7168, "bfloat16"), (16384, 16384, 16384, "float16")]
    print(f"{'m':>6} {'n':>6} {'dtype':>9} " + " ".join(f"{label:>9}" for label, _ in configs))
    rows = []
    for m, n, padded_n, dtype in cases:
        times = {label: [] for label, _ in configs}
        inputs = configs[0][1]._inputs(m, n, dtype)
        for _ in range(3):
            for label, bench in configs:
                times[label].append(bench.bench_quantizer(m, n, padded_n, dtype, "swizzled", ceiling, inputs=inputs)["us"])
        medians = {label: statistics.median(t) for label, t in times.items()}
        rows.append({"m": m, "n": n, "padded_n": padded_n, "dtype": dtype, "us": medians, "all": times})
        print(f"{m:>6} {n:>6} {dtype:>9} " + " ".join(f"{medians[label]:>9.2f}" for label, _ in configs), flush=True)
    Path(argv[0]).write_text(json.dumps({"card": card, "copy_gbps": ceiling, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
