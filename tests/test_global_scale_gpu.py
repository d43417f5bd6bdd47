"""compute_global_scale and quantize() in one and two launches (issue 13),
against the golden model byte for byte, with every result buffer poisoned:
each way the kernel cuts the work (grid-stride over the whole tensor, many
thread blocks finishing through the workspace, short rows to groups of lanes,
long rows split across warps), the workspace zero at rest between calls,
streams, threads and CUDA graphs (a first call inside a capture included)."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, poisoned_allocations
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, make_input
from nvfp4_cupy import reference as ref

pytestmark = pytest.mark.gpu
cp = import_cupy()


@pytest.fixture(scope="module")
def gsm():
    from nvfp4_cupy.ops import global_scale

    return global_scale


def scale_bits(array) -> np.ndarray:
    return cp.asnumpy(array).view(np.uint32)


def golden(x, per_row: bool) -> np.ndarray:
    return ref.compute_global_scale(cp.asnumpy(x), per_row=per_row).view(np.uint32)


def check_scales(nv, x, per_row: bool, label: str, **kwargs) -> None:
    """compute_global_scale(x) under both poisons equals the golden model."""
    want = golden(x, per_row)
    for poison in POISONS:
        with poisoned_allocations(poison) as pointers:
            got = nv.compute_global_scale(x, per_row=per_row, **kwargs)
        if got.size:
            assert got.data.ptr in pointers, f"{label}: the result was not a poisoned allocation"
        assert got.dtype == cp.float32
        assert_bytes_equal(scale_bits(got), want, f"{label} per_row={per_row} poison {poison:#x}")


def workspace_view(gsm, device_id: int, handle: int):
    """The workspace of (device, stream) as a uint32 CuPy array (not owned)."""
    pointer = gsm._workspaces[(device_id, handle)]
    words = gsm.workspace_words(gsm.resident_warps(device_id))
    memory = cp.cuda.UnownedMemory(pointer, 4 * words, None, device_id)
    return cp.ndarray((words,), cp.uint32, cp.cuda.MemoryPointer(memory, 0))


def assert_workspace_zero(gsm, handle: int) -> None:
    device_id = cp.cuda.Device().id
    cp.cuda.Device(device_id).synchronize()
    words = cp.asnumpy(workspace_view(gsm, device_id, handle))
    assert not words.any(), f"workspace not zero at rest: nonzero words at {np.flatnonzero(words)[:8]}"


def work_of(gsm, x, per_row: bool):
    """(segments a row, lanes per item, thread blocks, 16-byte loads): how
    the plan cuts x's work on this device."""
    from nvfp4_cupy._runtime.arrays import CUPY

    array = CUPY.array(x, "x")
    plan = gsm._make_plan(CUPY, array, per_row, gsm.resident_warps(array.device_id))
    kernel = plan.kernels[plan.kernels[1] is not None and array.pointer % 16 == 0]
    static = kernel.static
    return static["segments"], static["lanes_per_item"], kernel.grid[0], kernel.variant.vector_loads


def device_input(host: np.ndarray):
    return cp.asarray(host)


def with_specials(host: np.ndarray, seed: int) -> dict:
    """Copies of host with one special value each, somewhere in the last rows."""
    rng = np.random.default_rng(seed)
    cases = {"data": host}
    for label, value in (("nan", np.nan), ("inf", -np.inf), ("tiny", None), ("zeros", None)):
        x = host.copy()
        if label == "tiny":  # subnormal amax: the scale clamps to FLT_MAX (float32, bfloat16)
            x[:] = ml_dtypes.finfo(x.dtype).smallest_subnormal
        elif label == "zeros":
            x[:] = 0
        else:
            x[rng.integers(x.shape[0] // 2, x.shape[0]), rng.integers(x.shape[1])] = value
        cases[label] = x
    return cases


# Each way the kernel cuts the work, as (m, n): checked below per device.
SHAPES = {
    "whole, many thread blocks": (2048, 4096),
    "one short row": (1, 40),
    "short rows, lanes per row": (3000, 200),
    "long rows split across warps": (5, 70_003),
    "rows, one per warp group": (9000, 2304),
}


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_every_work_split_matches_golden(nv, gsm, dtype, shape_name):
    m, n = SHAPES[shape_name]
    host = make_input("outliers", m, n, seed=m + n).astype(HOST_DTYPES[dtype])
    for label, values in with_specials(host, seed=m).items():
        x = device_input(values)
        for per_row in (False, True):
            check_scales(nv, x, per_row, f"{shape_name} {dtype} {label}")


def test_the_shapes_reach_every_path(gsm):
    """The shapes above take the paths their names say on this GPU."""
    segments, lanes, blocks, vectors = work_of(gsm, cp.zeros(SHAPES["whole, many thread blocks"], cp.float16), False)
    assert blocks > 1 and lanes == 32 and vectors
    segments, lanes, _, _ = work_of(gsm, cp.zeros(SHAPES["short rows, lanes per row"], cp.float16), True)
    assert lanes < 32 and segments == 1
    segments, lanes, _, vectors = work_of(gsm, cp.zeros(SHAPES["long rows split across warps"], cp.float16), True)
    assert segments > 1 and lanes == 32 and not vectors  # n odd: rows are not 16-byte aligned
    segments, _, _, vectors = work_of(gsm, cp.zeros((5, 70_000), cp.float16), True)
    assert segments > 1 and vectors
    segments, lanes, _, _ = work_of(gsm, cp.zeros(SHAPES["rows, one per warp group"], cp.float16), True)
    assert segments == 1 and lanes == 32


@pytest.mark.parametrize("per_row", [False, True])
def test_views_misaligned_and_strided(nv, gsm, per_row):
    """Rows that are not contiguous (h[:, :k]), a start off the 16-byte grid
    (element loads), a row tail past the last 16-byte piece, rows taken
    every other one, and n not a multiple of 8 in a contiguous tensor."""
    host = make_input("outliers", 700, 8192, seed=5).astype(np.float16)
    host[650, 7000] = np.nan
    big = device_input(host)
    views = {
        "h[:, :7152]": big[:, :7152],
        "h[:, :7150] (row tails)": big[:, :7150],
        "h[:, 1:7150] (misaligned)": big[:, 1:7150],
        "h[::2, :4096]": big[::2, :4096],
        "h[:600, :7000] (no NaN)": big[:600, :7000],
        "contiguous [1000, 1001]": device_input(make_input("normal", 1000, 1001, seed=6).astype(np.float16)),
        "flat[1:] of contiguous": big.reshape(-1)[1:].reshape(1, -1),
    }
    for label, x in views.items():
        check_scales(nv, x, per_row, label)


def test_empty_inputs(nv):
    for shape in ((0, 64), (5, 0), (0, 0), (2, 3, 0)):
        x = cp.zeros(shape, cp.float16)
        check_scales(nv, x, False, f"empty {shape}")
        check_scales(nv, x, True, f"empty {shape}")
        assert nv.compute_global_scale(x, per_row=True).shape == (int(np.prod(shape[:-1])),)


def test_repeated_calls_leave_the_workspace_zero(nv, gsm):
    """The workspace is zero at rest: a large amax, then a small one, on the
    same stream, each right (a leftover accumulator would keep the first),
    and the workspace reads all zero after every call."""
    handle = cp.cuda.get_current_stream().ptr
    big = make_input("outliers", 2048, 4096, seed=7).astype(np.float16)
    small = (big * np.float16(1e-3)).astype(np.float16)
    rows_big = make_input("outliers", 5, 70_000, seed=8).astype(np.float16)
    rows_small = (rows_big * np.float16(1e-3)).astype(np.float16)
    for _ in range(2):
        for host, per_row in ((big, False), (small, False), (rows_big, True), (rows_small, True)):
            check_scales(nv, device_input(host), per_row, f"repeat {host.shape} per_row={per_row}")
            assert_workspace_zero(gsm, handle)


def test_per_row_and_whole_tensor_alternate(nv, gsm):
    handle = cp.cuda.get_current_stream().ptr
    inputs = [make_input(kind, m, n, seed=i).astype(np.float16)
              for i, (kind, m, n) in enumerate((("outliers", 3, 50_000), ("normal", 2048, 4096),
                                                 ("specials", 300, 7152), ("zero_rows", 4, 65_536)))]
    for round_ in range(2):
        for i, host in enumerate(inputs):
            per_row = (i + round_) % 2 == 0
            check_scales(nv, device_input(host), per_row, f"alternating {host.shape} per_row={per_row}")
            check_scales(nv, device_input(host), not per_row, f"alternating {host.shape} per_row={not per_row}")
    assert_workspace_zero(gsm, handle)


def test_larger_m_after_smaller_m(nv, gsm):
    """Per-row calls with m growing past the device's warp count (where rows
    stop being split) and back: each row's scale right every time."""
    handle = cp.cuda.get_current_stream().ptr
    warps = gsm.resident_warps(cp.cuda.Device().id)
    ms = (1, 2, 64, warps // 2, warps - 1, warps, warps + 1, 2 * warps + 3, 64, 1)
    rng = np.random.default_rng(9)
    for m in ms:
        host = (rng.standard_normal((m, 4096)) * rng.uniform(0.1, 100, (m, 1))).astype(np.float16)
        host[rng.integers(m), rng.integers(4096)] = np.inf
        check_scales(nv, device_input(host), True, f"m={m}")
    assert_workspace_zero(gsm, handle)


def test_quantize_matches_golden_with_poisoned_outputs(nv):
    host = make_input("outliers", 1024, 7152, seed=10).astype(np.float16)
    x = device_input(host)
    for per_row in (False, True):
        want_gs = ref.compute_global_scale(host, per_row=per_row)
        want = ref.scaled_fp4_quant(host, want_gs, padded_n=7168)
        for poison in POISONS:
            out, out_scale = nv.create_fp4_output_tensors(1024, 7152, padded_n=7168)
            out.fill(poison)
            out_scale.fill(poison)
            with poisoned_allocations(poison) as pointers:
                packed, scales, gs = nv.quantize(x, padded_n=7168, per_row=per_row, out=out, out_scale=out_scale)
            assert packed is out and scales is out_scale and gs.data.ptr in pointers
            assert_bytes_equal(scale_bits(gs), want_gs.view(np.uint32), f"quantize gs per_row={per_row}")
            assert_bytes_equal(cp.asnumpy(packed), want[0], f"quantize packed per_row={per_row}")
            assert_bytes_equal(cp.asnumpy(scales), want[1], f"quantize scales per_row={per_row}")


def count_launches(monkeypatch) -> list:
    """The cuda_src file of every kernel launched from here on, in order
    (and a failure for any memset)."""
    from nvfp4_cupy._runtime import launch

    launched = []
    original = launch.BoundKernel.__call__

    def counting(self, *args):
        launched.append(self.variant.source)
        return original(self, *args)

    monkeypatch.setattr(launch.BoundKernel, "__call__", counting)
    monkeypatch.setattr(cp.cuda.runtime, "memsetAsync", lambda *a: pytest.fail("a memset was launched"))
    return launched


# (m, n, padded_n, kind): one thread block with a partial last warp (7
# blocks a row: 7 x 36 threads), rows shorter than a block, padding, and the
# one-launch limit (2048 blocks) from both sides.
SMALL_QUANTIZE_CASES = ((1, 4096, 4096, "normal"), (3, 112, 128, "specials"), (2, 50, 64, "outliers"),
                        (5, 16, 16, "zero_rows"), (8, 4096, 4096, "specials"), (8, 4112, 4160, "outliers"),
                        (1, 7152, 7168, "outliers"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("m, n, padded_n, kind", SMALL_QUANTIZE_CASES)
def test_small_quantize_is_one_launch_and_exact(nv, monkeypatch, m, n, padded_n, kind, dtype):
    """quantize() of at most ONE_LAUNCH_MAX_BLOCKS blocks: one kernel, which
    computes the global scale itself; the same bytes as the golden model,
    through the full path (poisoned outputs) and the repeated-call path, in
    every layout. Larger inputs: the two launches."""
    from nvfp4_cupy.ops.quantize import ONE_LAUNCH_MAX_BLOCKS

    host = make_input(kind, m, n, seed=m * n).astype(HOST_DTYPES[dtype])
    x = device_input(host)
    one_launch = m * -(-n // 16) <= ONE_LAUNCH_MAX_BLOCKS
    want_gs = ref.compute_global_scale(host)
    nv.quantize(x, padded_n=padded_n, per_row=True)  # may create the stream's global-scale workspace (a memset, once)
    launched = count_launches(monkeypatch)
    for layout in ("swizzled", "linear", "8x4"):
        want = ref.scaled_fp4_quant(host, want_gs, padded_n=padded_n, layout=layout)
        for poison in POISONS:
            with poisoned_allocations(poison):
                # The first call of a signature takes the full path, and records it; the second repeats it.
                results = [nv.quantize(x, padded_n=padded_n, layout=layout) for _ in range(2)]
            for call, (packed, scales, gs) in enumerate(results):
                what = f"{dtype} {m}x{n} {layout} call {call}"
                assert_bytes_equal(scale_bits(gs), want_gs.view(np.uint32), f"{what}: global scale")
                assert_bytes_equal(cp.asnumpy(packed), want[0], f"{what}: packed")
                assert_bytes_equal(cp.asnumpy(scales), want[1], f"{what}: scales")
    assert launched == (["quantize.cu"] if one_launch else ["global_scale.cu", "quantize.cu"]) * 12


def test_small_quantize_torch_and_graph_replays(nv, torch_cuda):
    """The one-launch quantize() through torch (eager and torch.ops) and
    captured in a CUDA graph, replayed on new data: right every replay."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    m, n = 4, 4096
    x = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
    nvt.quantize(x)  # compile and load outside the capture
    torch.ops.nvfp4.quantize(x, None, "swizzled", False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nvt.quantize(x)
    for seed in (60, 61, 62):
        host = make_input("specials" if seed == 62 else "outliers", m, n, seed=seed)
        x.copy_(torch.from_numpy(host).to("cuda", torch.bfloat16))
        graph.replay()
        eager = nvt.quantize(x)
        registered = torch.ops.nvfp4.quantize(x, None, "swizzled", False)
        torch.cuda.synchronize()
        host_bf16 = x.float().cpu().numpy().astype(HOST_DTYPES["bfloat16"])
        want_gs = ref.compute_global_scale(host_bf16)
        want = ref.scaled_fp4_quant(host_bf16, want_gs)
        for label, (packed, scales, gs) in (("graph", captured), ("eager", eager), ("torch.ops", registered)):
            assert_bytes_equal(gs.cpu().numpy().view(np.uint32), want_gs.view(np.uint32), f"{label} {seed}: gs")
            assert_bytes_equal(packed.cpu().numpy(), want[0], f"{label} {seed}: packed")
            assert_bytes_equal(scales.cpu().numpy(), want[1], f"{label} {seed}: scales")


def test_quantize_is_two_launches(nv, monkeypatch):
    """quantize() of more than ONE_LAUNCH_MAX_BLOCKS blocks, or per row,
    launches the global-scale kernel and the quantizer, and nothing else: no
    memset, no second global-scale kernel."""
    x = device_input(make_input("normal", 64, 4096, seed=11).astype(np.float16))
    small = device_input(make_input("normal", 2, 4096, seed=11).astype(np.float16))
    for array in (x, small):
        nv.quantize(array, per_row=True)  # may create the stream's workspace, zeroed once (on a stream of its own)
    launched = count_launches(monkeypatch)
    for array, per_row in ((x, False), (x, True), (small, True)):
        nv.quantize(array, per_row=per_row)
    assert launched == ["global_scale.cu", "quantize.cu"] * 3
    launched.clear()
    nv.compute_global_scale(x)
    assert launched == ["global_scale.cu"]


def test_two_streams_at_once(nv, gsm):
    """Calls on two streams overlap in time and each gets its own workspace:
    every result is right."""
    hosts = [make_input("outliers", 4096, 4096, seed=20 + i).astype(np.float16) * np.float16(1 + i)
             for i in range(4)]
    xs = [device_input(h) for h in hosts]
    wants = [golden(x, per_row) for x in xs for per_row in (False, True)]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    cp.cuda.Device().synchronize()
    results = []
    for _ in range(3):
        for i, x in enumerate(xs):
            stream = streams[i % 2]
            for per_row in (False, True):
                with stream:
                    results.append(nv.compute_global_scale(x, per_row=per_row))
    for stream in streams:
        stream.synchronize()
    for k, got in enumerate(results):
        assert_bytes_equal(scale_bits(got), wants[k % len(wants)], f"two streams, result {k}")
    device_id = cp.cuda.Device().id
    pointers = {gsm._workspaces[(device_id, s.ptr)] for s in streams}
    assert len(pointers) == 2
    for stream in streams:
        assert_workspace_zero(gsm, stream.ptr)


def test_threads_on_the_per_thread_default_stream(nv, gsm):
    """cudaStreamPerThread is one handle for a different stream per thread:
    each thread gets its own workspace."""
    hosts = [make_input("outliers", 2048, 4096, seed=30 + i).astype(np.float16) * np.float16(1 + 3 * i)
             for i in range(2)]
    errors = []
    start = threading.Barrier(2)

    def work(host):
        try:
            with cp.cuda.Device(0), cp.cuda.Stream.ptds:
                x = cp.asarray(host)
                want = [golden(x, per_row) for per_row in (False, True)]
                start.wait()
                results = [nv.compute_global_scale(x, per_row=per_row) for _ in range(5) for per_row in (False, True)]
                for k, got in enumerate(results):
                    if not np.array_equal(scale_bits(got), want[k % 2]):
                        errors.append(f"thread {threading.get_ident()}: result {k} differs")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_cupy_graph_with_the_first_call_inside_the_capture(nv, gsm):
    """compute_global_scale and quantize captured on a stream that never ran
    them (the workspace is created inside the capture), then replayed on new
    data: right every replay."""
    m, n = 1024, 4096
    x = device_input(make_input("normal", m, n, seed=40).astype(np.float16))
    for per_row in (False, True):
        nv.quantize(x, per_row=per_row)  # compile and load outside the capture
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    assert (cp.cuda.Device().id, stream.ptr) not in gsm._workspaces
    with stream:
        stream.begin_capture()
        whole = nv.compute_global_scale(x)
        rows = nv.compute_global_scale(x, per_row=True)
        packed, scales, gs = nv.quantize(x, padded_n=n, per_row=True)
        graph = stream.end_capture()
    for seed in (41, 42, 43):
        host = make_input("outliers", m, n, seed=seed).astype(np.float16) * np.float16(seed - 40)
        x[...] = cp.asarray(host)
        cp.cuda.Device().synchronize()
        graph.launch(stream)
        stream.synchronize()
        want_rows = ref.compute_global_scale(host, per_row=True)
        assert_bytes_equal(scale_bits(whole), ref.compute_global_scale(host).view(np.uint32), f"graph whole {seed}")
        assert_bytes_equal(scale_bits(rows), want_rows.view(np.uint32), f"graph per row {seed}")
        assert_bytes_equal(scale_bits(gs), want_rows.view(np.uint32), f"graph quantize gs {seed}")
        want = ref.scaled_fp4_quant(host, want_rows, padded_n=n)
        assert_bytes_equal(cp.asnumpy(packed), want[0], f"graph packed {seed}")
        assert_bytes_equal(cp.asnumpy(scales), want[1], f"graph scales {seed}")
        assert_workspace_zero(gsm, stream.ptr)


def test_torch_graph_global_capture_mode_first_call_inside(nv, gsm, torch_cuda):
    """torch.cuda.graph (capture_error_mode "global": cudaMalloc and other
    unsafe calls are errors) on a fresh stream: the workspace is made inside
    the capture without breaking it; replays on new data are right."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    m, n = 512, 7168
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for per_row in (False, True):
        nvt.quantize(x, per_row=per_row)
        nvt.compute_global_scale(x, per_row=per_row)
    torch.cuda.synchronize()
    capture_stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        whole = nvt.compute_global_scale(x)
        rows = nvt.compute_global_scale(x, per_row=True)
        packed, scales, gs = nvt.quantize(x)
    for seed in (50, 51, 52):
        host = make_input("specials" if seed == 52 else "outliers", m, n, seed=seed)
        x.copy_(torch.from_numpy(host).to("cuda", torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        host_bf16 = x.float().cpu().numpy().astype(HOST_DTYPES["bfloat16"])
        want_gs = ref.compute_global_scale(host_bf16)
        assert_bytes_equal(whole.cpu().numpy().view(np.uint32), want_gs.view(np.uint32), f"torch graph whole {seed}")
        assert_bytes_equal(rows.cpu().numpy().view(np.uint32),
                           ref.compute_global_scale(host_bf16, per_row=True).view(np.uint32),
                           f"torch graph per row {seed}")
        assert_bytes_equal(gs.cpu().numpy().view(np.uint32), want_gs.view(np.uint32), f"torch graph gs {seed}")
        want = ref.scaled_fp4_quant(host_bf16, want_gs)
        assert_bytes_equal(packed.cpu().numpy(), want[0], f"torch graph packed {seed}")
        assert_bytes_equal(scales.cpu().numpy(), want[1], f"torch graph scales {seed}")


def test_torch_streams_at_once(nv, gsm, torch_cuda):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    xs = [torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * (1 + i) for i in range(4)]
    wants = [ref.compute_global_scale(x.cpu().numpy(), per_row=per_row).view(np.uint32)
             for x in xs for per_row in (False, True)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    results = []
    for _ in range(3):
        for i, x in enumerate(xs):
            with torch.cuda.stream(streams[i % 2]):
                for per_row in (False, True):
                    results.append(nvt.compute_global_scale(x, per_row=per_row))
    torch.cuda.synchronize()
    for k, got in enumerate(results):
        assert_bytes_equal(got.cpu().numpy().view(np.uint32), wants[k % len(wants)], f"torch streams, result {k}")
