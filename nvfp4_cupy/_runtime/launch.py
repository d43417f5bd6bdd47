"""The one launcher. Every op states what its kernel needs (a variant, the grid,
the arguments by name); this module owns how that reaches the GPU: the
one-launch size limits, the 16-byte access rule, the argument layout (read
from the kernel's own parameter list, so a changed signature fails loudly),
the device switch and the raw launch on a stream handle.

A call's cost is the point: `BoundKernel` is built once per call signature
(ops cache it in their plans), and a launch is then one struct pack of the
arguments into a per-thread buffer and one cuLaunchKernel, with no CuPy
argument conversion in between."""

from __future__ import annotations

import ctypes
import struct
import threading

from cupy.cuda import runtime
from cupy_backends.cuda.api import driver

from . import kernels
from .compile import THREADS_PER_BLOCK, Target, function_name, kernel_parameters

VECTOR_BYTES = 16  # a 16-byte load or store: uint4
VECTOR_PIECE = 8  # n % 8 == 0: every 16-byte access lies wholly inside or outside a row
MAX_GRID_Y = 65535  # also grid z (experts)
MAX_INDEX = 2**31 - 1  # rows and columns are 32-bit ints in the kernels


def launch_geometry(rows: int, blocks_per_row: int, *, batch: int = 1, columns: int, what: str) -> tuple:
    """One thread per block of values: threads x over a row's blocks (a power
    of two), y over rows, THREADS_PER_BLOCK in all; grid z over `batch`.
    Raises ValueError (naming `what`) when the work does not fit one launch."""
    threads_x = min(THREADS_PER_BLOCK, 1 << max(blocks_per_row - 1, 0).bit_length())
    threads_y = THREADS_PER_BLOCK // threads_x
    grid = (-(-rows // threads_y), -(-blocks_per_row // threads_x), batch)
    if rows > MAX_INDEX or columns > MAX_INDEX or grid[1] > MAX_GRID_Y or batch > MAX_GRID_Y:
        raise ValueError(f"{what} is too large for one launch")
    return grid, (threads_x, threads_y, 1)


def rows_allow_vectors(stride_bytes: tuple[int, ...], n: int) -> bool:
    """The 16-byte access rule, the part fixed by the shape: every row starts
    16 bytes after a 16-byte boundary if the first does, and n % 8 == 0 keeps
    each 16-byte piece wholly inside or outside a row. The base pointer is the
    other part (`pointer % VECTOR_BYTES == 0`), checked per call."""
    return n % VECTOR_PIECE == 0 and all(stride % VECTOR_BYTES == 0 for stride in stride_bytes)


class _ArgumentBuffer(threading.local):
    """Per-thread storage that cuLaunchKernel copies the packed arguments from
    (CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE in its `extra` array)."""

    CAPACITY = 256

    def __init__(self) -> None:
        self.data = ctypes.create_string_buffer(self.CAPACITY)
        self.size = ctypes.c_size_t(0)
        self.extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(self.data), 2, ctypes.addressof(self.size), 0)
        self.extra_address = ctypes.addressof(self.extra)
        self.devices_ready: set[int] = set()
        # One attribute read per launch instead of four (thread-local reads are not free).
        self.state = (self.data, self.size, self.extra_address, self.devices_ready)


_buffer = _ArgumentBuffer()


class BoundKernel:
    """One kernel (variant.names[index]) with its grid and fixed arguments:
    a call gives the device, the raw stream handle and the `dynamic`
    arguments (pointers as ints, in that order). `static` and `dynamic`
    together must name exactly the kernel's parameters."""

    __slots__ = ("variant", "index", "target", "grid", "block", "_struct", "_template", "_slots", "_function")

    def __init__(self, variant, grid: tuple, block: tuple, static: dict, dynamic: tuple[str, ...], *,
                 index: int = 0, target: Target | None = None) -> None:
        name = variant.names[index]
        parameters = kernel_parameters(variant.source, function_name(name))
        expected = [p.name for p in parameters]
        given = list(static) + list(dynamic)
        if sorted(given) != sorted(expected) or len(set(given)) != len(given):
            raise TypeError(f"{name}: launched with arguments {given}, but its parameters are {expected}")
        self.variant, self.index, self.target, self.grid, self.block = variant, index, target, grid, block
        self._struct = struct.Struct("@" + "".join(p.format for p in parameters))
        if self._struct.size > _ArgumentBuffer.CAPACITY:
            raise TypeError(f"{name}: {self._struct.size} bytes of arguments, more than the launcher's buffer")
        self._template = [static.get(p) for p in expected]
        self._slots = tuple(expected.index(p) for p in dynamic)
        self._function = None  # (the kernels memo it came from, device, CUfunction)

    def __call__(self, device_id: int, stream: int, *dynamic) -> None:
        arguments = self._template.copy()
        for slot, value in zip(self._slots, dynamic):
            arguments[slot] = value
        cached = self._function
        if cached is None or cached[0] is not kernels.memo() or cached[1] != device_id:
            # Held only while the memo that owns its module is the current one
            # (kernels.forget() replaces it), so never past the module's unload.
            cached = self._function = (kernels.memo(), device_id,
                                       kernels.function_pointer(device_id, self.variant, self.target, self.index))
        data, size, extra, ready = _buffer.state
        self._struct.pack_into(data, 0, *arguments)
        size.value = self._struct.size
        grid, block = self.grid, self.block
        if device_id in ready and runtime.getDevice() == device_id:
            driver.launchKernel(cached[2], grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, stream, 0,
                                extra)
            return
        previous = runtime.getDevice()
        try:
            runtime.setDevice(device_id)
            if device_id not in ready:
                # The driver API launches into the thread's current context;
                # a thread that has not used this device yet may have none.
                runtime.free(0)
                ready.add(device_id)
            driver.launchKernel(cached[2], grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, stream, 0,
                                extra)
        finally:
            runtime.setDevice(previous)


def memset_async(device_id: int, pointer: int, value: int, nbytes: int, stream: int) -> None:
    """cudaMemsetAsync on the device that owns the memory and the stream."""
    if runtime.getDevice() == device_id:
        runtime.memsetAsync(pointer, value, nbytes, stream)
        return
    previous = runtime.getDevice()
    try:
        runtime.setDevice(device_id)
        runtime.memsetAsync(pointer, value, nbytes, stream)
    finally:
        runtime.setDevice(previous)
