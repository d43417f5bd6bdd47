"""What every launcher shares: taking arrays (CuPy, or any DLPack producer
zero-copy), checking output buffers and global scales, picking the stream
(torch's current stream for torch input), the launch geometry, and handing
results back as torch tensors when asked."""

from __future__ import annotations

import math
import numbers

import cupy as cp
import numpy as np

from ._format import host_global_scale

THREADS_PER_BLOCK = 256
VECTOR_BYTES = 16
VECTOR_PIECE = 8  # n % 8 == 0: every 16-byte access lies wholly inside or outside a row
MAX_GRID_Y = 65535
MAX_INDEX = 2**31 - 1  # rows and columns are 32-bit in the kernels
NULL = np.uint64(0)  # no device global scale
UINT8 = np.dtype(np.uint8)


def device_array(obj, name: str) -> cp.ndarray:
    """A CuPy array, or any DLPack producer (a torch CUDA tensor) zero-copy."""
    if isinstance(obj, cp.ndarray):
        return obj
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a NumPy (host) array; pass a CuPy array or a CUDA tensor")
    if hasattr(obj, "__dlpack__"):
        try:
            return cp.from_dlpack(obj)
        except Exception as exc:  # the producer's own error says why (CPU tensor, dtype, ...)
            raise TypeError(f"{name}: cannot use {type(obj).__name__} as a CUDA array: {exc}") from None
    raise TypeError(f"{name} must be a CuPy array or a CUDA tensor, got {type(obj).__name__}")


def check_output(buffer, name: str, shape: tuple, device_id: int, dtype=UINT8, source: str = "x") -> cp.ndarray:
    buffer = device_array(buffer, name)
    if buffer.dtype is not dtype and buffer.dtype != dtype:  # identity first: the common case
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {buffer.dtype}")
    if buffer.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {buffer.shape}")
    if not buffer.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {buffer.strides}")
    if buffer.data.device_id != device_id:
        raise ValueError(f"{name} is on device {buffer.data.device_id} but {source} is on device {device_id}")
    return buffer


def byte_range(array: cp.ndarray) -> tuple[int, int]:
    """[first, last) device addresses of a C-contiguous array."""
    return array.data.ptr, array.data.ptr + array.nbytes


def check_disjoint(reads: list, writes: list) -> None:
    """(name, (first, last)) ranges: what a kernel writes must not overlap
    anything else it reads or writes, as threads run in no particular order."""
    ranges = [(name, span, i >= len(reads)) for i, (name, span) in enumerate(reads + writes) if span[0] < span[1]]
    for i, (name_a, (lo_a, hi_a), written_a) in enumerate(ranges):
        for name_b, (lo_b, hi_b), written_b in ranges[i + 1 :]:
            if (written_a or written_b) and lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{name_b} overlaps {name_a} in device memory; pass separate buffers")


def global_scale_argument(global_scale, device_id: int, x_shape: tuple):
    """(device array or None, host float32, which): a device scale is read by
    the kernel (no host sync, capturable in CUDA graphs); a host one is checked
    here. `which` is "one"; "expert" for a 1-D array of E scales with x of
    shape [E, m, n]; or "row" for a 1-D array with one scale per row of x."""
    if type(global_scale) is float or (
        isinstance(global_scale, (numbers.Real, np.generic)) and not isinstance(global_scale, np.ndarray)
    ):
        return None, host_global_scale(global_scale), "one"
    array = device_array(global_scale, "global_scale")
    if array.dtype != np.float32:
        raise TypeError(f"global_scale as a device array must be float32, got {array.dtype}")
    if array.data.device_id != device_id:
        raise ValueError(f"global_scale is on device {array.data.device_id} but x is on device {device_id}")
    if array.ndim == 1 and len(x_shape) == 3 and array.shape[0] == x_shape[0]:
        return array, np.float32(0), "expert"
    if array.size == 1:
        return array, np.float32(0), "one"
    if array.ndim == 1 and array.shape[0] == math.prod(x_shape[:-1]):
        return array, np.float32(0), "row"
    raise ValueError(
        f"global_scale as a device array must hold one element, one per expert for x of shape "
        f"[E, m, n], or one per row, got shape {array.shape} for x of shape {x_shape}"
    )


def _torch_stream(obj):
    """A torch.cuda.Stream as a CuPy stream, else None (no torch import here:
    anything with a cuda_stream handle qualifies)."""
    handle = getattr(obj, "cuda_stream", None)
    if handle is None:
        return None
    from_external = getattr(cp.cuda.Stream, "from_external", None)  # CuPy >= 14
    if from_external is not None and hasattr(obj, "__cuda_stream__"):
        return from_external(obj)
    return cp.cuda.ExternalStream(handle, getattr(getattr(obj, "device", None), "index", None) or 0)


def resolve_stream(stream, device_id: int, source=None):
    """The launch stream: `stream` (a CuPy stream or a torch.cuda.Stream);
    by default torch's current stream when the input is a torch tensor (so
    the work is ordered with the caller's torch work, no sync), else CuPy's."""
    if stream is None:
        if type(source).__module__.startswith("torch"):
            import torch

            return _torch_stream(torch.cuda.current_stream(device_id))
        return cp.cuda.get_current_stream()
    if not isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        converted = _torch_stream(stream)
        if converted is None:
            raise TypeError(f"stream must be a cupy.cuda.Stream, a torch.cuda.Stream or None, got {type(stream).__name__}")
        stream = converted
    stream_device = getattr(stream, "device_id", device_id)
    if stream_device not in (-1, device_id):
        raise ValueError(f"stream belongs to device {stream_device} but x is on device {device_id}")
    return stream


def launch_geometry(scale_rows: int, scale_cols: int):
    """One thread per 16-value block: threads x over block columns (a power of
    two), y over rows, 256 in all. Returns (grid, block)."""
    threads_x = min(THREADS_PER_BLOCK, 1 << (scale_cols - 1).bit_length())
    threads_y = THREADS_PER_BLOCK // threads_x
    grid = (-(-scale_rows // threads_y), -(-scale_cols // threads_x))
    return grid, (threads_x, threads_y)


def check_like(like) -> None:
    if like not in (None, "cupy", "torch"):
        raise ValueError(f"like must be None, 'cupy' or 'torch', got {like!r}")


def as_like(arrays: tuple, like):
    """CuPy arrays, or the same memory as torch tensors (zero-copy)."""
    if like != "torch":
        return arrays
    import torch

    return tuple(torch.from_dlpack(array) for array in arrays)
