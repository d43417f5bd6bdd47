"""A tensor's bytes from a file to the GPU at the host's copy rates.

The naive path, `f.read()` then `cupy.asarray`, moves a 1 GiB weight at about
1.4 GB/s on the H200 machine: the read lands in fresh anonymous memory, whose
page faults cost more than the copy itself, and the upload from pageable memory
runs at 8 GB/s after the read, not beside it (measured there:
BENCHMARKS.md, checkpoint conversion). Here several threads `preadv` the file
into page-locked (pinned) host chunks, allocated once and reused, and each half
of the ring is uploaded asynchronously while the other half is being read:
27 GB/s page-cache reads and 55 GB/s pinned uploads on that machine, so a
weight reaches the GPU in a few tens of milliseconds. Host memory: the ring,
a fixed size whatever the tensor.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .safetensors_io import DTYPES, READ_PIECE, READ_THREADS, TensorInfo, read_pieces


class DeviceReader:
    """read(path, info) -> a CuPy array on the current device holding the
    tensor's bytes, through a ring of two halves of `half_bytes` pinned
    memory. Not for concurrent use: one per producing thread (a converter
    has one)."""

    def __init__(self, half_bytes: int = READ_PIECE * READ_THREADS) -> None:
        import cupy as cp

        self._cp = cp
        self._half = half = half_bytes
        self._pinned_memory = cp.cuda.alloc_pinned_memory(2 * half)
        self._halves = [np.frombuffer(self._pinned_memory, np.uint8, half, offset=h * half) for h in (0, 1)]
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._uploaded = [None, None]  # per half: the event after its last upload
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="nvfp4-read")

    def read(self, path: Path, info: TensorInfo):
        cp = self._cp
        device = cp.empty(info.nbytes, np.uint8)
        # The pool may hand back memory that work on the current stream still uses.
        self._stream.wait_event(cp.cuda.get_current_stream().record())
        fd = os.open(path, os.O_RDONLY)
        try:
            for wave, start in enumerate(range(0, info.nbytes, self._half)):
                h = wave % 2
                if self._uploaded[h] is not None:
                    self._uploaded[h].synchronize()  # this half's previous upload has left it
                size = min(self._half, info.nbytes - start)
                read_pieces(fd, memoryview(self._halves[h])[:size], info.begin + start, path, self._pool)
                cp.cuda.runtime.memcpyAsync(device.data.ptr + start, self._halves[h].ctypes.data, size,
                                            cp.cuda.runtime.memcpyHostToDevice, self._stream.ptr)
                self._uploaded[h] = self._stream.record()
        finally:
            os.close(fd)
        self._stream.synchronize()  # the caller's stream may use the array at once
        return device.view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
