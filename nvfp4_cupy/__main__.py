"""`python -m nvfp4_cupy` / `nvfp4-cupy`: see nvfp4_cupy._cli."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
