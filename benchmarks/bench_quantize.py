"""The quantizer benchmark (same as `nvfp4-cupy bench`): copy ceiling, every
layout and dtype over decode-to-prefill shapes, fused vs quantize-then-pad,
a PyTorch reference, host overhead, graph replay and first-call time.

    python benchmarks/bench_quantize.py [--quick] [--json F] [--png F]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_cupy._bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
