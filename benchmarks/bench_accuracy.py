"""Accuracy of the NVFP4 variants (issue 15): SQNR and MSE of quantizing then
dequantizing bfloat16 matrices of three kinds (Gaussian, heavy-tailed
activations, weight-like) with our default numerics, TE's, Four Over Six, the
RHT and stochastic rounding (one draw, and the mean of 50). The golden model
computes it on the CPU; the GPU kernels give the same bytes (their tests), so
no GPU is needed. Method and discussion: docs/te_rht_and_4over6.md, part D.

    python benchmarks/bench_accuracy.py [--m 256] [--n 1024] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_cupy.reference import te_4over6  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="write {kind: {method: [SQNR dB, MSE]}} here")
    args = parser.parse_args(argv)
    table = te_4over6.accuracy_table(args.m, args.n)
    print(f"SQNR in dB (MSE), bfloat16 [{args.m}, {args.n}]\n" + te_4over6.format_accuracy_table(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
