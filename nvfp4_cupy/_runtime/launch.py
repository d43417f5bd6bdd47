"""The one launcher. Every op states what its kernel needs (a variant, the grid,
the arguments by name); this module owns how that reaches the GPU: the
one-launch size limits, the 16-byte access rule, the argument layout (read
from the kernel's own parameter list, so a changed signature fails loudly),
the device switch and the raw launch on a stream handle.

A call's cost is the point: `BoundKernel` is built once per call signature
(ops cache it in their plans), and a launch is then one struct pack of the
per-call arguments (a kernel's first parameters) into the thread's copy of
the packed arguments and one cuLaunchKernel, with no CuPy argument
conversion in between."""

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


def launch_geometry(rows: int, blocks_per_row: int, *, batch: int = 1, columns: int, what: str,
                    dense: bool = False) -> tuple:
    """One thread per block of values: threads x over a row's blocks, y over
    rows, at most THREADS_PER_BLOCK in all; grid z over `batch`. Threads x are
    a power of two, so that a warp never spans two rows; `dense` instead
    fits them to the row (K = 7168's 448 blocks: two thread blocks of 224,
    not 512 threads with 64 idle), for kernels that never reduce across a
    warp. Raises ValueError (naming `what`) when the work does not fit one
    launch."""
    if dense:
        column_blocks = -(-max(blocks_per_row, 1) // THREADS_PER_BLOCK)
        threads_x = -(-max(blocks_per_row, 1) // column_blocks)
        if column_blocks > 1:
            threads_x = min(THREADS_PER_BLOCK, -(-threads_x // 32) * 32)  # whole warps
    else:
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


class _Thread(threading.local):
    """What a thread has set up: the devices it has a context on."""

    def __init__(self) -> None:
        self.devices_ready: set[int] = set()


_thread = _Thread()


class BoundKernel:
    """One kernel (variant.names[index]) with its grid and fixed arguments:
    a call gives the device, the raw stream handle and the `dynamic`
    arguments (pointers as ints, in that order). `static` and `dynamic`
    together must name exactly the kernel's parameters, and the dynamic
    ones are the kernel's first: each thread keeps its own copy of the
    packed arguments, static ones written once, so that a launch packs only
    the per-call ones, at the front (cuLaunchKernel reads the buffer through
    CU_LAUNCH_PARAM_BUFFER_POINTER and copies it before returning)."""

    __slots__ = ("variant", "index", "target", "grid", "block", "static", "_dynamic", "_image", "_buffers",
                 "_function")

    def __init__(self, variant, grid: tuple, block: tuple, static: dict, dynamic: tuple[str, ...], *,
                 index: int = 0, target: Target | None = None) -> None:
        name = variant.names[index]
        parameters = kernel_parameters(variant.source, function_name(name))
        expected = [p.name for p in parameters]
        given = list(static) + list(dynamic)
        if sorted(given) != sorted(expected) or len(set(given)) != len(given):
            raise TypeError(f"{name}: launched with arguments {given}, but its parameters are {expected}")
        if list(dynamic) != expected[:len(dynamic)]:
            raise TypeError(f"{name}: per-call arguments {list(dynamic)} must be its first parameters, in order "
                            f"(its parameters are {expected})")
        self.variant, self.index, self.target, self.grid, self.block = variant, index, target, grid, block
        self.static = dict(static)
        formats = [p.format for p in parameters]
        self._dynamic = struct.Struct("@" + "".join(formats[:len(dynamic)]))
        # All arguments, per-call ones as zeros: struct's native alignment is the CUDA ABI's.
        image = bytearray(struct.calcsize("@" + "".join(formats)))
        struct.pack_into("@" + "".join(formats), image, 0,
                         *([0.0 if f == "f" else 0 for f in formats[:len(dynamic)]] +
                           [static[p] for p in expected[len(dynamic):]]))
        self._image = bytes(image)
        self._buffers: dict[int, tuple] = {}  # thread id -> (arguments buffer, address of its `extra` array)
        self._function = None  # (the kernels memo it came from, device, CUfunction)

    def _buffer(self) -> tuple:
        """This thread's packed arguments and the `extra` array pointing at them."""
        data = ctypes.create_string_buffer(self._image, len(self._image))
        size = ctypes.c_size_t(len(self._image))
        extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(data), 2, ctypes.addressof(size), 0)
        buffer = self._buffers[threading.get_ident()] = (data, ctypes.addressof(extra), size, extra)
        return buffer

    def __call__(self, device_id: int, stream: int, *dynamic) -> None:
        buffer = self._buffers.get(threading.get_ident()) or self._buffer()
        self._dynamic.pack_into(buffer[0], 0, *dynamic)
        cached = self._function
        if cached is None or cached[0] is not kernels.memo() or cached[1] != device_id:
            # Held only while the memo that owns its module is the current one
            # (kernels.forget() replaces it), so never past the module's unload.
            cached = self._function = (kernels.memo(), device_id,
                                       kernels.function_pointer(device_id, self.variant, self.target, self.index))
        grid, block = self.grid, self.block
        ready = _thread.devices_ready
        if device_id in ready and runtime.getDevice() == device_id:
            driver.launchKernel(cached[2], grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, stream, 0,
                                buffer[1])
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
                                buffer[1])
        finally:
            runtime.setDevice(previous)


_bound_kernels: dict = {}
_MAX_BOUND_KERNELS = 4096


def bound_kernel(variant, grid: tuple, block: tuple, static: dict, dynamic: tuple[str, ...], *,
                 index: int = 0) -> BoundKernel:
    """The BoundKernel of (variant, kernel, geometry, static arguments),
    built once (it reads the kernel's parameter list and packs the static
    part) and kept, up to _MAX_BOUND_KERNELS of them."""
    key = (variant, index, grid, block, tuple(sorted(static.items())), dynamic)
    kernel = _bound_kernels.get(key)
    if kernel is None:
        kernel = BoundKernel(variant, grid, block, static, dynamic, index=index)
        if len(_bound_kernels) < _MAX_BOUND_KERNELS:
            _bound_kernels[key] = kernel
    return kernel

