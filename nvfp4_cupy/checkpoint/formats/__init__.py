"""The two on-disk NVFP4 checkpoint formats (docs/checkpoints.md)."""

from __future__ import annotations

from . import compressed_tensors, modelopt

FORMATS = {modelopt.NAME: modelopt, compressed_tensors.NAME: compressed_tensors}
