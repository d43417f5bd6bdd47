"""The global scale computed on the GPU (no host sync): 448 * 6 / amax, over
the whole tensor or per row (docs/format.md, Global scales)."""

from __future__ import annotations

from dataclasses import dataclass

from .._format import BLOCK_SIZE, check_bool, row_view
from .._runtime.arrays import frontend_of, output_frontend, resolve_stream
from .._runtime.compile import THREADS_PER_BLOCK, GlobalScaleVariant
from .._runtime.launch import VECTOR_BYTES, BoundKernel, launch_geometry, memset_async, rows_allow_vectors


def compute_global_scale(x, per_row=False, *, stream=None, like=None):
    """448 * 6 / amax(|x|) as a float32 device array [1] (or [m], one per row
    of x [..., n]), computed on the device: scaled_fp4_quant takes it without
    a host sync. 1.0 where amax is 0 or x is empty; a NaN in x gives NaN and
    an inf gives 0.0, both invalid scales, so every block quantized with them
    is NaN-scaled and bad calibration data cannot pass unnoticed; a tiny amax
    clamps to FLT_MAX. Bit-exact to nvfp4_cupy.reference.compute_global_scale."""
    launch, result = prepare_global_scale(x, per_row, stream, like)
    launch()
    return result


@dataclass(frozen=True)
class _Plan:
    amax: tuple  # BoundKernel with element loads, with 16-byte loads (None where impossible)
    finish: BoundKernel
    scales: int  # outputs: 1, or one per row
    reads: bool  # any element to read


_plans: dict = {}


def _make_plan(frontend, x, per_row: bool) -> _Plan:
    dtype_name = frontend.dtype_name(x.dtype)
    view = row_view(x.shape, x.strides, x.itemsize, per_expert=False)
    grid, block = launch_geometry(view.m, -(-view.n // BLOCK_SIZE), columns=view.n, what=f"x: shape {x.shape}")
    vectors = rows_allow_vectors((view.row_stride * x.itemsize,), view.n)
    static = dict(row_stride=view.row_stride, m=view.m, n=view.n, per_row=int(per_row))
    amax = tuple(
        BoundKernel(GlobalScaleVariant(dtype_name, vector), grid, block, static, ("x", "amax_bits"))
        if (vectors or not vector) else None
        for vector in (False, True)
    )
    scales = view.m if per_row else 1
    finish = BoundKernel(GlobalScaleVariant(dtype_name, False), (-(-scales // THREADS_PER_BLOCK), 1, 1),
                         (THREADS_PER_BLOCK, 1, 1), dict(count=scales), ("values",), index=1)
    return _Plan(amax, finish, scales, view.m > 0 and view.n > 0)


def prepare_global_scale(x, per_row, stream, like):
    """Checks and the result buffer, nothing launched: (launch, float32 result)."""
    per_row = check_bool(per_row, "per_row")
    frontend = frontend_of(x)
    array = frontend.array(x, "x")
    key = (array.dtype, array.shape, array.strides, per_row)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _make_plan(frontend, array, per_row)
    device_id = array.device_id
    handle = resolve_stream(stream, device_id, frontend)
    results = output_frontend(like, frontend)
    result = results.allocator(device_id, handle)((plan.scales,), "float32")
    result_pointer = results.pointer(result)
    kernel = plan.amax[plan.amax[1] is not None and array.pointer % VECTOR_BYTES == 0]

    def launch() -> None:
        if not plan.scales:
            return
        # amax bits start at 0 (atomicMax), then become scales in place.
        memset_async(device_id, result_pointer, 0, 4 * plan.scales, handle)
        if plan.reads:
            kernel(device_id, handle, array.pointer, result_pointer)
        plan.finish(device_id, handle, result_pointer)

    return launch, result
