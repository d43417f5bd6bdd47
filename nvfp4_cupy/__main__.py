"""`python -m nvfp4_cupy` / `nvfp4-cupy`: the demo (main job) and the benchmark."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from ._bench import main as bench

        return bench(argv[1:])
    parser = argparse.ArgumentParser(
        prog="nvfp4-cupy",
        description="Quantize a built-in LLM-like activation to NVFP4 on the GPU (golden model alone "
        "without one), check every byte against the golden model, and report sizes and error. "
        "`nvfp4-cupy bench --help` for the benchmark.",
    )
    parser.add_argument("command", nargs="?", default="demo", choices=["demo", "bench"], help="what to run (default: demo)")
    parser.add_argument("--layout", default="swizzled", choices=["swizzled", "linear", "8x4"], help="scale layout")
    args = parser.parse_args(argv)
    from ._demo import run

    return run(layout=args.layout)


if __name__ == "__main__":
    sys.exit(main())
