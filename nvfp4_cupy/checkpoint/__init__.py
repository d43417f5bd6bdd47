"""NVFP4 checkpoints in the formats serving engines load: NVIDIA ModelOpt's
and compressed-tensors' nvfp4-pack-quantized (docs/checkpoints.md).

Uses the public ops only (nvfp4_cupy.scaled_fp4_quant / compute_global_scale
on the GPU, nvfp4_cupy.reference with cpu=True), never _runtime. Needs the
`checkpoint` extra for the progress bar (tqdm); reading and writing
safetensors is done here with NumPy."""

from __future__ import annotations

from .convert import DEFAULT_EXCLUDE, CheckpointError, convert
from .dequantize import dequantize_checkpoint
from .inspect import inspect_checkpoint

__all__ = ["convert", "dequantize_checkpoint", "inspect_checkpoint", "CheckpointError", "DEFAULT_EXCLUDE"]
