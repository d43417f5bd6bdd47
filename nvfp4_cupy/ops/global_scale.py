"""The global scale computed on the GPU (no host sync): 448 * 6 / amax, over
the whole tensor or per row (docs/format.md, section 7; with numerics="te",
TransformerEngine's, docs/te_numerics.md, section 3), in one launch.

One kernel (cuda_src/global_scale.cu) reads x, reduces it and writes the
scales: thread blocks fold their amax into a small workspace with atomics,
and the last one to finish converts it into the scale and sets the workspace
back to zero. The workspace is zero at rest, so a call needs no memset.

It is owned here, one per (device, stream): calls on one stream run in
order, so they never share it at the same time; calls on two streams use two.
It is created, and zeroed, once, on a stream's first call, even inside a CUDA
graph capture (see _zeroed_buffer), and never freed (graphs keep its address).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from dataclasses import dataclass

from cupy.cuda import runtime

from .._format import check_bool, round_up, row_view
from ..reference.te import check_numerics
from .._runtime.arrays import frontend_of, output_frontend, resolve_stream
from .._runtime.compile import THREADS_PER_BLOCK, GlobalScaleVariant, kernel_constant
from .._runtime.launch import MAX_INDEX, VECTOR_BYTES, BoundKernel

WARP = 32
WARPS_PER_BLOCK = THREADS_PER_BLOCK // WARP


def _kernel_constant(name: str) -> int:
    return kernel_constant(GlobalScaleVariant.source, name)


LOADS_PER_STEP = _kernel_constant("kLoadsPerStep")  # 16-byte loads a lane issues per loop step
BLOCKS_PER_SM = _kernel_constant("kBlocksPerSM")  # thread blocks of the kernel an SM holds at once


def compute_global_scale(x, per_row=False, *, stream=None, like=None, numerics="ieee"):
    """448 * 6 / amax(|x|) as a float32 device array [1] (or [m], one per row
    of x [..., n]), computed on the device in one launch: scaled_fp4_quant
    takes it without a host sync. 1.0 where amax is 0 or x is empty; a NaN in
    x gives NaN and an inf gives 0.0, both invalid scales, so every block
    quantized with them is NaN-scaled and bad calibration data cannot pass
    unnoticed; a tiny amax clamps to FLT_MAX. Bit-exact to
    nvfp4_cupy.reference.compute_global_scale.

    numerics="te": TransformerEngine's global encode scale instead
    (docs/te_numerics.md, section 3): FLT_MAX where amax is 0 or x is empty,
    1.0 where x holds an inf, NaN (0x7FC00000) where it holds a NaN; with
    per_row, the scales of row-scaled NVFP4. Bit-exact to
    nvfp4_cupy.reference.compute_global_scale_te (a NaN is always 0x7FC00000).

    Streams and CUDA graphs: the kernel finishes through a small workspace
    the library keeps per (device, stream), zero between calls. Calls on
    different streams may run concurrently. A call captured in a CUDA graph
    keeps the workspace of the stream it was captured on, so replays of
    graphs captured on the same stream must not overlap in time (for
    example, replayed on two streams at once), nor overlap calls made on
    that stream itself; replays in stream order are fine."""
    launch, result = prepare_global_scale(x, per_row, stream, like, numerics)
    launch()
    return result


# ---------------------------------------------------------------------------
# How the work is cut (the kernel's parameters)
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def resident_warps(device_id: int) -> int:
    """Warps of the kernel the device runs at once: the grid's ceiling and
    the per-row split's target. The SM count, read once per device."""
    sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)
    return sms * BLOCKS_PER_SM * WARPS_PER_BLOCK


def workspace_words(warps: int) -> int:
    """The whole tensor's accumulator and counter, then one pair per row for
    the rows a per-row call splits (fewer than `warps`: see split_work)."""
    return 2 + 2 * warps


@dataclass(frozen=True)
class Work:
    """Items are (row, range of `segment` values); `segments` ranges a row,
    each taken by `lanes_per_item` lanes; `blocks` thread blocks."""

    lanes_per_item: int
    segment: int
    segments: int
    blocks: int


def split_work(rows: int, n: int, itemsize: int, per_row: bool, warps: int) -> Work:
    """rows of n values (rows >= 1) for a device running `warps` warps at once.

    A lane reads LOADS_PER_STEP 16-byte pieces a step. Rows shorter than a
    warp's step go to groups of fewer lanes, a row per group, so that a warp
    still reads a whole step. Otherwise whole-tensor items are one warp step
    each (a grid-stride loop over the tensor); per-row items are whole rows,
    except that when there are fewer rows than warps, long rows are split so
    that every warp has work (their pieces then meet in the workspace)."""
    lane_values = LOADS_PER_STEP * VECTOR_BYTES // itemsize
    step = WARP * lane_values
    lanes = min(WARP, 1 << max(-(-n // lane_values) - 1, 0).bit_length())
    if lanes < WARP:
        segment, segments = max(n, 1), 1
    else:
        if not per_row:
            wanted = -(-n // step)
        elif rows >= warps:
            wanted = 1
        else:
            wanted = min(-(-warps // rows), -(-n // step))
        wanted = max(1, min(wanted, MAX_INDEX // rows))  # items stay 32-bit
        segment = round_up(-(-n // wanted), step)
        segments = -(-n // segment)
    items_per_block = WARPS_PER_BLOCK * (WARP // lanes)
    blocks = max(1, min(-(-rows * segments // items_per_block), warps // WARPS_PER_BLOCK))
    return Work(lanes, segment, segments, blocks)


@dataclass(frozen=True)
class _Plan:
    kernels: tuple  # BoundKernel with element loads, with 16-byte loads (None where impossible)
    scales: int  # outputs: 1, or one per row (0: nothing to launch)


_plans: dict = {}
_MAX_PLANS = 4096


def _make_plan(frontend, x, per_row: bool, warps: int, numerics: str = "ieee") -> _Plan:
    dtype_name = frontend.dtype_name(x.dtype)
    view = row_view(x.shape, x.strides, x.itemsize, per_expert=False)
    rows, n, row_stride = view.m, view.n, view.row_stride
    if rows > MAX_INDEX:
        raise ValueError(f"x: shape {x.shape} is too large for one launch")
    if per_row and rows == 0:
        return _Plan((None, None), 0)
    if not per_row and (rows <= 1 or n == 0 or row_stride == n):
        # Contiguous rows read whole are one row: in order, and in 16-byte
        # pieces whenever x is aligned, whatever n is.
        rows, n, row_stride = 1, rows * n, 0
    work = split_work(rows, n, x.itemsize, per_row, warps)
    static = dict(row_stride=row_stride, rows=rows, n=n, segment=work.segment, segments=work.segments,
                  lanes_per_item=work.lanes_per_item, per_row=int(per_row))
    # 16-byte loads need every row start aligned when the first is (the
    # kernel reads a row's tail past its last whole piece value by value).
    vectors = rows == 1 or (row_stride * x.itemsize) % VECTOR_BYTES == 0
    kernels = tuple(
        BoundKernel(GlobalScaleVariant(dtype_name, vector, numerics), (work.blocks, 1, 1), (THREADS_PER_BLOCK, 1, 1),
                    static,
                    ("x", "workspace", "result"))
        if (vectors or not vector) else None
        for vector in (False, True)
    )
    return _Plan(kernels, view.m if per_row else 1)


# ---------------------------------------------------------------------------
# The workspace
# ---------------------------------------------------------------------------
_workspaces: dict = {}  # (device, stream handle[, thread for the per-thread default stream]) -> pointer
_workspace_lock = threading.Lock()
_PER_THREAD_STREAM = runtime.streamPerThread
_CAPTURE_MODE_RELAXED = 2  # CUstreamCaptureMode / cudaStreamCaptureMode
_DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


def workspace(device_id: int, stream: int) -> int:
    """The zero-at-rest workspace of this device and stream (created on
    first use). cudaStreamPerThread is one handle for a different stream in
    each thread, so it is kept per thread."""
    key = (device_id, stream, threading.get_ident()) if stream == _PER_THREAD_STREAM else (device_id, stream)
    pointer = _workspaces.get(key)
    if pointer is None:
        with _workspace_lock:
            pointer = _workspaces.get(key)
            if pointer is None:
                pointer = _workspaces[key] = _zeroed_buffer(device_id, 4 * workspace_words(resident_warps(device_id)))
    return pointer


@functools.lru_cache(maxsize=None)
def _driver():
    return ctypes.CDLL(_DRIVER_LIBRARY)


def _exchange_capture_mode(mode: int) -> int:
    """Sets this thread's stream-capture interaction mode; returns the old."""
    value = ctypes.c_int(mode)
    status = _driver().cuThreadExchangeStreamCaptureMode(ctypes.byref(value))
    if status:
        raise RuntimeError(f"cuThreadExchangeStreamCaptureMode failed (CUresult {status})")
    return value.value


def _zeroed_buffer(device_id: int, nbytes: int) -> int:
    """nbytes of device memory, zero when this returns. Safe while a stream
    of this or another thread is being captured into a CUDA graph (a first
    call may come inside a capture): cudaMalloc under the relaxed capture
    mode (as torch's allocator does), and the memset on a private
    non-blocking stream that no capture sees and nothing else waits on."""
    previous = runtime.getDevice()
    try:
        runtime.setDevice(device_id)
        mode = _exchange_capture_mode(_CAPTURE_MODE_RELAXED)
        try:
            pointer = runtime.malloc(nbytes)
            side = runtime.streamCreateWithFlags(runtime.streamNonBlocking)
            try:
                runtime.memsetAsync(pointer, 0, nbytes, side)
                runtime.streamSynchronize(side)
            finally:
                runtime.streamDestroy(side)
        finally:
            _exchange_capture_mode(mode)
    finally:
        runtime.setDevice(previous)
    return pointer


# ---------------------------------------------------------------------------
# A call
# ---------------------------------------------------------------------------
def prepare_global_scale(x, per_row, stream, like, numerics="ieee"):
    """Checks, the result buffer and the workspace, nothing launched:
    (launch, float32 result). The launch is one kernel."""
    return _prepare(x, check_bool(per_row, "per_row"), stream, like, check_numerics(numerics))


def prepare_global_amax(x, per_row: bool, stream, like):
    """As prepare_global_scale, for the amax max |x| itself (per row with
    per_row; 0 for no values, a NaN where x holds one): Four Over Six's A."""
    return _prepare(x, per_row, stream, like, "amax")


def _prepare(x, per_row: bool, stream, like, numerics: str):
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    device_id = array.device_id
    key = (array.dtype, array.shape, array.strides, per_row, device_id, numerics)
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(frontend, array, per_row, resident_warps(device_id), numerics)
        if len(_plans) < _MAX_PLANS:
            _plans[key] = plan
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    result = results.allocator(device_id, handle)((plan.scales,), "float32")
    if not plan.scales:
        return _nothing, result
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % VECTOR_BYTES == 0]
    return (functools.partial(kernel, device_id, handle, array.pointer, workspace(device_id, handle),
                              results.pointer(result)), result)


def _nothing() -> None:
    """The launch of a per-row call on no rows."""
