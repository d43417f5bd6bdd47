"""The torch entry points against the golden model, byte for byte: the eager
functions of nvfp4_cupy.torch, the registered torch.ops.nvfp4 ops, the same
ops under torch.compile and inside a captured CUDA graph; and their errors,
raised before any launch."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from gpu_inputs import boundary_cases, global_scale_for, make_input
from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import NUMPY_DTYPES

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="torch is not installed")


@pytest.fixture(scope="module")
def nvt():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    import nvfp4_cupy.torch as nvt

    return nvt


def _to_torch(host: np.ndarray, dtype_name: str):
    bits = host.view({2: np.int16, 4: np.int32}[host.dtype.itemsize])
    tensor = torch.from_numpy(bits.copy()).cuda()
    return tensor.view(getattr(torch, dtype_name))


def _host(tensor) -> np.ndarray:
    return tensor.cpu().numpy()


ENTRIES = ("eager", "torch.ops")


def _quantize(nvt, entry, x, gs, **kwargs):
    if entry == "eager":
        return nvt.scaled_fp4_quant(x, gs, **kwargs)
    tensor, value = (None, float(gs)) if isinstance(gs, float) else (gs, 0.0)
    return torch.ops.nvfp4.scaled_fp4_quant(x, tensor, value, kwargs.get("padded_n"), kwargs.get("layout", "swizzled"),
                                            kwargs.get("fmt", "nvfp4"))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
@pytest.mark.parametrize("m, n, padded_n, kind", boundary_cases())
def test_torch_quantize_matches_golden(nvt, entry, dtype, m, n, padded_n, kind):
    host = make_input(kind, m, n, seed=m * 31 + n).astype(NUMPY_DTYPES[dtype])
    gs = global_scale_for(host.astype(np.float32))
    want = ref.scaled_fp4_quant(host, gs, padded_n=padded_n, layout="8x4")
    packed, scales = _quantize(nvt, entry, _to_torch(host, dtype), gs, padded_n=padded_n, layout="8x4")
    assert packed.dtype == torch.uint8 and packed.is_cuda
    assert_bytes_equal(_host(packed), want[0], f"{entry} {dtype} {m}x{n} packed")
    assert_bytes_equal(_host(scales), want[1], f"{entry} {dtype} {m}x{n} scales")


@pytest.mark.parametrize("entry", ENTRIES)
def test_torch_device_scales_quantize_dequantize_and_global_scale(nvt, entry):
    host = make_input("outliers", 300, 7152, seed=3).astype(NUMPY_DTYPES["bfloat16"])
    x = _to_torch(host, "bfloat16")
    gs_rows = ref.compute_global_scale(host, per_row=True)
    if entry == "eager":
        got_gs = nvt.compute_global_scale(x, per_row=True)
        packed, scales, gs_one = nvt.quantize(x, padded_n=7168)
        deq = nvt.dequantize_fp4(packed, scales, gs_one, n=7152, dtype=torch.bfloat16)
    else:
        got_gs = torch.ops.nvfp4.compute_global_scale(x, True)
        packed, scales, gs_one = torch.ops.nvfp4.quantize(x, 7168, "swizzled", False)
        deq = torch.ops.nvfp4.dequantize_fp4(packed, scales, gs_one, 0.0, 7152, "swizzled", "bfloat16", "nvfp4")
    assert_bytes_equal(_host(got_gs).view(np.uint32), gs_rows.view(np.uint32), "per-row global scale")
    want_gs = ref.compute_global_scale(host)
    want = ref.scaled_fp4_quant(host, want_gs, padded_n=7168)
    assert_bytes_equal(_host(gs_one).view(np.uint32), want_gs.view(np.uint32), "global scale")
    assert_bytes_equal(_host(packed), want[0], "packed")
    assert_bytes_equal(_host(scales), want[1], "scales")
    want_deq = ref.dequantize(*want, want_gs, n=7152, dtype="bfloat16")
    assert_bytes_equal(_host(deq.view(torch.int16)), want_deq.view(np.int16), "dequantized")
    per_row = nvt.scaled_fp4_quant(x, torch.from_numpy(gs_rows).cuda(), padded_n=7168)
    want_rows = ref.scaled_fp4_quant(host, gs_rows, padded_n=7168)
    assert_bytes_equal(_host(per_row[0]), want_rows[0], "per-row packed")


def test_torch_outputs_are_written_in_place_under_two_poisons(nvt):
    host = make_input("specials", 129, 80, seed=8).astype(np.float16)
    want = ref.scaled_fp4_quant(host, 5.0, padded_n=128)
    for poison in POISONS:
        out = torch.full((129, 64), poison, dtype=torch.uint8, device="cuda")
        out_scale = torch.full((256, 8), poison, dtype=torch.uint8, device="cuda")
        packed, scales = nvt.scaled_fp4_quant(_to_torch(host, "float16"), 5.0, padded_n=128, out=out,
                                              out_scale=out_scale)
        assert packed is out and scales is out_scale
        assert_bytes_equal(_host(out), want[0], f"packed, poison {poison:#x}")
        assert_bytes_equal(_host(out_scale), want[1], f"scales, poison {poison:#x}")


def test_torch_runs_on_the_current_torch_stream(nvt):
    host = make_input("normal", 4096, 4096, seed=4).astype(NUMPY_DTYPES["bfloat16"])
    want = ref.scaled_fp4_quant(host, 7.0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = _to_torch(host, "bfloat16") * 1  # produced on the side stream
        packed, scales = nvt.scaled_fp4_quant(x, 7.0)
    side.synchronize()
    assert_bytes_equal(_host(packed), want[0], "packed on a side stream")


def test_torch_compile_traces_through_without_a_graph_break(nvt):
    host = make_input("outliers", 64, 4096, seed=6).astype(NUMPY_DTYPES["bfloat16"])
    gs_host = np.array([11.0], np.float32)

    def step(x, gs):
        return nvt.scaled_fp4_quant(x * 2, gs, padded_n=4096)

    x, gs = _to_torch(host, "bfloat16"), torch.from_numpy(gs_host).cuda()
    explanation = torch._dynamo.explain(step)(x, gs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    packed, scales = compiled(x, gs)
    want = ref.scaled_fp4_quant((host.astype(np.float32) * 2).astype(host.dtype), gs_host)
    assert_bytes_equal(_host(packed), want[0], "torch.compile packed")
    assert_bytes_equal(_host(scales), want[1], "torch.compile scales")


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_captured_decode_step_replays_bit_exact(nvt, entry):
    """x * 2 -> our op -> a torch op on its output, captured once, replayed
    on fresh input: the same bytes as eager."""
    host = make_input("normal", 8, 7152, seed=9).astype(NUMPY_DTYPES["bfloat16"])
    x = _to_torch(host, "bfloat16")
    gs = torch.tensor([20.0], device="cuda")

    def step():
        packed, scales = _quantize(nvt, entry, x * 2, gs, padded_n=7168)
        return packed.to(torch.int32).sum(dim=1), packed, scales

    for _ in range(2):  # compile and load outside the capture
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sums, packed, scales = step()
    fresh = make_input("outliers", 8, 7152, seed=10).astype(NUMPY_DTYPES["bfloat16"])
    x.copy_(_to_torch(fresh, "bfloat16"))
    graph.replay()
    torch.cuda.synchronize()
    eager_sums, eager_packed, eager_scales = step()
    assert_bytes_equal(_host(packed), _host(eager_packed), "graph packed vs eager")
    assert_bytes_equal(_host(scales), _host(eager_scales), "graph scales vs eager")
    assert torch.equal(sums, eager_sums)
    want = ref.scaled_fp4_quant((fresh.astype(np.float32) * 2).astype(fresh.dtype), 20.0, padded_n=7168)
    assert_bytes_equal(_host(packed), want[0], "graph packed vs golden")


def _bad_quantize_calls():
    def cuda(*shape, dtype=torch.bfloat16):
        return torch.ones(*shape, dtype=dtype, device="cuda")

    return [
        ("cpu tensor", lambda nvt: nvt.scaled_fp4_quant(torch.ones(4, 16), 1.0), TypeError, "x is a cpu tensor"),
        ("int dtype", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16, dtype=torch.int32), 1.0), TypeError,
         "x must be float16, bfloat16 or float32, got dtype int32"),
        ("strided last dim", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 32)[:, ::2], 1.0), ValueError,
         "last dimension must be contiguous"),
        ("requires grad", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16).requires_grad_(), 1.0), TypeError,
         "no gradient"),
        ("out shape", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16), 1.0, out=torch.empty(4, 9, dtype=torch.uint8,
                                                                                           device="cuda")),
         ValueError, r"out must have shape \(4, 8\)"),
        ("out dtype", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16), 1.0, out=cuda(4, 8)), TypeError,
         "out must have dtype uint8, got bfloat16"),
        ("out on cpu", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16), 1.0, out=torch.empty(4, 8, dtype=torch.uint8)),
         TypeError, "out is a cpu tensor"),
        ("scale dtype", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16), cuda(1)), TypeError,
         "global_scale as a device array must be float32"),
        ("scale value", lambda nvt: nvt.scaled_fp4_quant(cuda(4, 16), float("inf")), ValueError,
         "global_scale must be finite and > 0"),
        ("dequantize packed dtype", lambda nvt: nvt.dequantize_fp4(cuda(4, 8), cuda(128, 4), 1.0), TypeError,
         "packed must be uint8"),
        ("global scale per_row", lambda nvt: nvt.compute_global_scale(cuda(4, 16), per_row=1), TypeError,
         "per_row must be a bool"),
    ]


@pytest.mark.parametrize("case, call, error, match", _bad_quantize_calls(), ids=lambda c: c if isinstance(c, str) else "")
def test_torch_bad_input_is_refused_before_launch(nvt, case, call, error, match):
    torch.cuda.synchronize()
    with pytest.raises(error, match=match):
        call(nvt)


@pytest.mark.parametrize("api", ["cupy", "torch"])
def test_repeated_calls_take_the_hot_path_and_stay_exact(nvt, api):
    """The second call of a signature skips the checks that the first one
    passed: still the golden bytes for new data and new scales, and a bad
    host scale value is still refused on a repeat."""
    import cupy as cp

    import nvfp4_cupy as nv
    from nvfp4_cupy.ops import quantize as ops_quantize

    quantize = nvt.scaled_fp4_quant if api == "torch" else nv.scaled_fp4_quant

    def on_device(host):
        return _to_torch(host, "bfloat16") if api == "torch" else cp.asarray(host)

    def host_of(array):
        return _host(array) if api == "torch" else cp.asnumpy(array)

    inputs = [make_input(kind, 33, 7152, seed=i).astype(NUMPY_DTYPES["bfloat16"])
              for i, kind in enumerate(("normal", "outliers", "specials"))]
    before = len(ops_quantize._repeats)
    for host, gs in zip(inputs, (3.0, 0.75, 1e-3)):
        packed, scales = quantize(on_device(host), gs, padded_n=7168, layout="8x4")
        want = ref.scaled_fp4_quant(host, gs, padded_n=7168, layout="8x4")
        assert_bytes_equal(host_of(packed), want[0], f"{api} packed, gs {gs}")
        assert_bytes_equal(host_of(scales), want[1], f"{api} scales, gs {gs}")
    assert len(ops_quantize._repeats) == before + 1  # one signature, recorded once
    # A repeat passes a normal float32 scale after one range test; the rest
    # takes host_global_scale's full check: a subnormal float32 scale and one
    # that rounds down to FLT_MAX are valid, inf, NaN and an overflow are not.
    for gs in (1e-40, 3.4028235e38):
        packed, scales = quantize(on_device(inputs[0]), gs, padded_n=7168, layout="8x4")
        want = ref.scaled_fp4_quant(inputs[0], gs, padded_n=7168, layout="8x4")
        assert_bytes_equal(host_of(packed), want[0], f"{api} packed, gs {gs}")
        assert_bytes_equal(host_of(scales), want[1], f"{api} scales, gs {gs}")
    for gs in (float("inf"), float("nan"), 3.5e38):
        with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
            quantize(on_device(inputs[0]), gs, padded_n=7168, layout="8x4")
    gs_rows = ref.compute_global_scale(inputs[1], per_row=True)
    device_rows = torch.from_numpy(gs_rows).cuda() if api == "torch" else cp.asarray(gs_rows)
    for _ in range(2):
        packed, _ = quantize(on_device(inputs[1]), device_rows, padded_n=7168, layout="8x4")
    want = ref.scaled_fp4_quant(inputs[1], gs_rows, padded_n=7168, layout="8x4")
    assert_bytes_equal(host_of(packed), want[0], f"{api} per-row repeat")
    for _ in range(2):
        packed, scales = quantize(on_device(inputs[2]), None, fmt="mxfp4")
    want = ref.scaled_fp4_quant(inputs[2], None, fmt="mxfp4")
    assert_bytes_equal(host_of(packed), want[0], f"{api} mxfp4 repeat")
    assert_bytes_equal(host_of(scales), want[1], f"{api} mxfp4 repeat scales")


@pytest.mark.parametrize("api", ["cupy", "torch"])
def test_repeated_calls_into_given_outputs_take_the_hot_path(nvt, api):
    """Given out and out_scale, the second call of a signature skips the
    checks too: the golden bytes in poisoned buffers on every call, the
    given buffers returned, and overlapping buffers of the recorded
    signature still refused on a repeat, naming them, before any launch."""
    import cupy as cp

    import nvfp4_cupy as nv
    from nvfp4_cupy.ops import quantize as ops_quantize

    quantize = nvt.scaled_fp4_quant if api == "torch" else nv.scaled_fp4_quant
    m, n = 33, 7152
    shapes = ((m, 7168 // 2), (m, 7168 // 16))  # linear layout, padded_n 7168

    def buffer(count: int, poison: int):
        return (torch.full((count,), poison, dtype=torch.uint8, device="cuda") if api == "torch"
                else cp.full((count,), poison, dtype=cp.uint8))

    def on_device(host):
        return _to_torch(host, "bfloat16") if api == "torch" else cp.asarray(host)

    def host_of(array):
        return _host(array) if api == "torch" else cp.asnumpy(array)

    sizes = [rows * cols for rows, cols in shapes]
    before = len(ops_quantize._repeats)
    device_gs = torch.tensor([0.5], device="cuda") if api == "torch" else cp.asarray(np.float32([0.5]))
    for i, (poison, gs) in enumerate(zip(POISONS * 2, (3.0, 0.75, device_gs, device_gs))):
        host = make_input(("normal", "outliers", "specials", "normal")[i], m, n, seed=i).astype(NUMPY_DTYPES["bfloat16"])
        memory = buffer(sum(sizes), poison)
        out, out_scale = memory[: sizes[0]].reshape(shapes[0]), memory[sizes[0]:].reshape(shapes[1])
        got = quantize(on_device(host), gs, padded_n=7168, layout="linear", out=out, out_scale=out_scale)
        assert got[0] is out and got[1] is out_scale
        want = ref.scaled_fp4_quant(host, 0.5 if gs is device_gs else gs, padded_n=7168, layout="linear")
        assert_bytes_equal(host_of(out), want[0], f"{api} packed, call {i}, poison {poison:#x}")
        assert_bytes_equal(host_of(out_scale), want[1], f"{api} scales, call {i}, poison {poison:#x}")
    assert len(ops_quantize._repeats) == before + 2  # host scale and device scale, each recorded once

    # The recorded signatures with overlapping pointers: refused, nothing written.
    x = on_device(make_input("normal", m, n, seed=9).astype(NUMPY_DTYPES["bfloat16"]))
    memory = buffer(sizes[0] + sizes[1], 0xA5)
    out = memory[: sizes[0]].reshape(shapes[0])
    overlapping = memory[sizes[0] - 64 : sizes[0] - 64 + sizes[1]].reshape(shapes[1])
    with pytest.raises(ValueError, match="out_scale overlaps out"):
        quantize(x, 3.0, padded_n=7168, layout="linear", out=out, out_scale=overlapping)
    x_bytes = x.view(torch.uint8).reshape(-1) if api == "torch" else x.view(cp.uint8).reshape(-1)
    with pytest.raises(ValueError, match="out overlaps x"):
        quantize(x, 3.0, padded_n=7168, layout="linear", out=x_bytes[: sizes[0]].reshape(shapes[0]),
                 out_scale=memory[sizes[0]:].reshape(shapes[1]))
    shared = buffer(sizes[1], 0xA5)  # a device scale inside out_scale's bytes
    inside = shared[:4].view(torch.float32) if api == "torch" else shared[:4].view(cp.float32)
    inside[...] = 0.5
    with pytest.raises(ValueError, match="out_scale overlaps global_scale"):
        quantize(x, inside, padded_n=7168, layout="linear", out=out, out_scale=shared.reshape(shapes[1]))
    assert np.all(host_of(memory) == 0xA5), "a refused call wrote its buffers"
