"""The GPU kernels against the golden model, byte for byte, with every output
buffer poisoned (twice, with different bytes) before each launch."""

from __future__ import annotations

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal, quantize_poisoned
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, boundary_cases, global_scale_for, make_input, numerics_probe
from nvfp4_cupy import reference as ref
from nvfp4_cupy._runtime.compile import SOFTWARE
from nvfp4_cupy._format import LAYOUTS

pytestmark = pytest.mark.gpu
cp = import_cupy()


def to_device(x_host: np.ndarray):
    return cp.asarray(x_host)


def assert_matches_golden(x_host, global_scale, label, *, target=None, layouts=tuple(LAYOUTS), **kwargs):
    """Golden codes once, then every layout on the GPU."""
    x = to_device(x_host)
    for layout in layouts:
        want_packed, want_scales = ref.scaled_fp4_quant(
            x_host, cp.asnumpy(global_scale) if isinstance(global_scale, cp.ndarray) else global_scale,
            layout=layout, **kwargs,
        )
        packed, scales = quantize_poisoned(x, global_scale, target=target, layout=layout, **kwargs)
        assert_bytes_equal(packed, want_packed, f"{label} {layout}: packed")
        assert_bytes_equal(scales, want_scales, f"{label} {layout}: scales")


CASES = boundary_cases()


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("m, n, padded_n, kind", CASES, ids=[f"m{c[0]}-n{c[1]}-p{c[2]}-{c[3]}" for c in CASES])
def test_bit_exact_at_the_boundaries(dtype, m, n, padded_n, kind):
    x_host = make_input(kind, m, n, seed=m * 7919 + n).astype(HOST_DTYPES[dtype])
    gs = global_scale_for(x_host.astype(np.float32))
    assert_matches_golden(x_host, gs, f"{dtype} [{m}, {n}] padded {padded_n} {kind}", padded_n=padded_n)


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("target", ["device", "software"])
def test_every_tie_on_the_device(dtype, target):
    """E4M3 ties and E2M1 ties, on the device's conversion path and on the
    sm_80 software path (run here on whatever GPU this is)."""
    x_host = numerics_probe().astype(HOST_DTYPES[dtype])
    assert_matches_golden(
        x_host, 1.0, f"{dtype} tie probe ({target})", target=SOFTWARE if target == "software" else None,
        layouts=("linear",),
    )


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_software_path_matches_on_real_shapes(dtype):
    x_host = make_input("specials", 150, 7152, seed=5).astype(HOST_DTYPES[dtype])
    assert_matches_golden(x_host, global_scale_for(x_host.astype(np.float32)), f"{dtype} software", target=SOFTWARE, padded_n=7168)


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_special_values(dtype):
    host = HOST_DTYPES[dtype]
    x = np.ones((5, 64), np.float32)
    x[0, 3] = np.nan  # NaN block
    x[1, 16:32] = 0.0  # all-zero block
    x[1, 32:48] = -0.0  # negative zeros
    x[2, 5] = np.inf
    x[2, 40] = -np.inf
    x[3] = np.linspace(-2688, 2688, 64)  # near 448 * 6
    x[4] = np.float32(1e-39) if dtype == "float32" else 1e-7  # subnormal territory
    x_host = x.astype(host)
    for gs in (1.0, 3.4e38, 1e-30, 1e-37, 448 * 6 / 2688):  # 1e-37: sf / gs overflows, r = 0
        assert_matches_golden(x_host, gs, f"{dtype} specials gs={gs}", padded_n=96)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 0.0, -1.0])
def test_invalid_device_global_scale(bad):
    x_host = make_input("normal", 129, 80, seed=3).astype(np.float16)
    gs = cp.asarray(np.array([bad], np.float32))
    assert_matches_golden(x_host, gs, f"device gs={bad}", padded_n=128)


def test_device_global_scale_matches_host_scale():
    x_host = make_input("outliers", 150, 7152, seed=9).astype(np.float16)
    gs = np.float32(global_scale_for(x_host.astype(np.float32)))
    host_result = quantize_poisoned(to_device(x_host), float(gs), padded_n=7168)
    device_result = quantize_poisoned(to_device(x_host), cp.asarray([gs], dtype=cp.float32), padded_n=7168)
    assert_bytes_equal(device_result[0], host_result[0], "packed")
    assert_bytes_equal(device_result[1], host_result[1], "scales")


def test_issue_example_and_default_outputs():
    """The README quick start, without out=: every allocation the call makes
    is filled with poison first, so unwritten bytes in the fresh outputs
    would show."""
    import nvfp4_cupy as nv

    x = cp.random.standard_normal((150, 7152), dtype=cp.float32).astype(cp.float16)
    gs = 448 * 6 / float(abs(x).max())
    pool = cp.get_default_memory_pool()
    poisoned = []

    def poisoning_malloc(nbytes):
        memory = pool.malloc(nbytes)
        memory.memset_async(POISONS[0], nbytes)
        poisoned.append((memory.ptr, memory.ptr + nbytes))
        return memory

    with cp.cuda.using_allocator(poisoning_malloc):
        packed, scales = nv.scaled_fp4_quant(x, gs, padded_n=7168)
    for output in (packed, scales):
        assert any(low <= output.data.ptr and output.data.ptr + output.nbytes <= high for low, high in poisoned), (
            f"output at {output.data.ptr:#x} not inside the poisoned allocations "
            f"{[(hex(low), hex(high)) for low, high in poisoned]}: the poison never reached it"
        )
    want_packed, want_scales = ref.scaled_fp4_quant(cp.asnumpy(x), gs, padded_n=7168)
    assert packed.shape == (150, 3584) and scales.shape == (256, 448)
    assert_bytes_equal(cp.asnumpy(packed), want_packed, "packed")
    assert_bytes_equal(cp.asnumpy(scales), want_scales, "scales")


def test_is_sf_swizzled_layout_false_is_linear():
    import nvfp4_cupy as nv

    x = to_device(make_input("normal", 33, 128, seed=4).astype(np.float16))
    _, linear = nv.scaled_fp4_quant(x, 10.0, False)
    _, explicit = nv.scaled_fp4_quant(x, 10.0, layout="linear")
    assert linear.shape == (33, 8)
    assert_bytes_equal(cp.asnumpy(linear), cp.asnumpy(explicit), "linear scales")


def test_nd_input_flattens_and_row_strided_view():
    host = make_input("outliers", 24, 256, seed=6).astype(np.float16)
    x3 = to_device(host.reshape(2, 12, 256))
    got = quantize_poisoned(x3, 50.0, padded_n=256)
    want = ref.scaled_fp4_quant(host, 50.0)
    assert_bytes_equal(got[0], want[0], "3-D packed")
    assert_bytes_equal(got[1], want[1], "3-D scales")
    # A column slice of a wider activation, quantized in place (no copy).
    wide = to_device(make_input("normal", 40, 384, seed=7).astype(np.float16))
    view = wide[:, :256]
    got = quantize_poisoned(view, 50.0, layout="linear")
    want = ref.scaled_fp4_quant(cp.asnumpy(view), 50.0, layout="linear")
    assert_bytes_equal(got[0], want[0], "strided packed")
    assert_bytes_equal(got[1], want[1], "strided scales")


def test_unaligned_base_uses_the_general_path():
    host = make_input("normal", 17, 64 * 17 + 3, seed=8).astype(np.float16).reshape(-1)
    flat = to_device(host)
    x = flat[3 : 3 + 17 * 64].reshape(17, 64)  # base 6 bytes past an aligned address
    assert x.data.ptr % 16
    got = quantize_poisoned(x, 20.0, padded_n=96)
    want = ref.scaled_fp4_quant(host[3 : 3 + 17 * 64].reshape(17, 64), 20.0, padded_n=96)
    assert_bytes_equal(got[0], want[0], "unaligned packed")
    assert_bytes_equal(got[1], want[1], "unaligned scales")


def test_non_default_stream_orders_the_work():
    import nvfp4_cupy as nv

    host = make_input("outliers", 1000, 8192, seed=10).astype(np.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(host)  # async upload on `stream`
        out, out_scale = nv.create_fp4_output_tensors(1000, 8192)
        out.fill(POISONS[0])
        out_scale.fill(POISONS[0])
    nv.scaled_fp4_quant(x, 30.0, out=out, out_scale=out_scale, stream=stream)
    stream.synchronize()
    want = ref.scaled_fp4_quant(host, 30.0)
    assert_bytes_equal(cp.asnumpy(out), want[0], "packed on a side stream")
    assert_bytes_equal(cp.asnumpy(out_scale), want[1], "scales on a side stream")


def test_cuda_graph_capture_and_replay():
    import nvfp4_cupy as nv

    host = make_input("normal", 64, 4096, seed=11).astype(np.float16)
    x = to_device(host)
    gs = cp.asarray([20.0], dtype=cp.float32)
    out, out_scale = nv.create_fp4_output_tensors(64, 4096)
    stream = cp.cuda.Stream(non_blocking=True)
    nv.scaled_fp4_quant(x, gs, out=out, out_scale=out_scale, stream=stream)  # compile outside capture
    stream.synchronize()
    out.fill(POISONS[0])
    out_scale.fill(POISONS[0])
    with stream:
        stream.begin_capture()
        nv.scaled_fp4_quant(x, gs, out=out, out_scale=out_scale, stream=stream)
        graph = stream.end_capture()
    gs.fill(35.0)  # the graph reads the scale from device memory at replay
    graph.launch(stream)
    stream.synchronize()
    want = ref.scaled_fp4_quant(host, 35.0)
    assert_bytes_equal(cp.asnumpy(out), want[0], "packed after graph replay")
    assert_bytes_equal(cp.asnumpy(out_scale), want[1], "scales after graph replay")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_tensor_via_dlpack(dtype, torch_cuda):
    torch = torch_cuda
    import nvfp4_cupy as nv

    host = make_input("outliers", 130, 7152, seed=12)
    t = torch.from_numpy(host).to(device="cuda", dtype=getattr(torch, dtype))
    packed, scales = nv.scaled_fp4_quant(t, 25.0, padded_n=7168)
    want_input = t.float().cpu().numpy().astype(HOST_DTYPES[dtype])
    want = ref.scaled_fp4_quant(want_input, 25.0, padded_n=7168)
    torch.cuda.synchronize()
    assert_bytes_equal(cp.asnumpy(packed), want[0], f"torch {dtype} packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], f"torch {dtype} scales")


def test_empty_input_launches_nothing():
    import nvfp4_cupy as nv

    packed, scales = nv.scaled_fp4_quant(cp.zeros((0, 64), cp.float16), 1.0)
    assert packed.shape == (0, 32) and scales.shape == (0, 4)
    packed, scales = nv.scaled_fp4_quant(cp.zeros((0, 64), cp.float16), 1.0, layout="linear")
    assert scales.shape == (0, 4)


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("m, n, padded_n", [(1, 1, 16), (7, 15, 16), (9, 17, 64), (33, 100, 128), (8, 7150, 7168)])
def test_any_k_zero_fills_the_partial_block(dtype, m, n, padded_n):
    """n need not be a multiple of 16: the kernel reads the partial last
    block element by element and fills the rest with +0."""
    x_host = make_input("outliers", m, n, seed=n).astype(HOST_DTYPES[dtype])
    assert_matches_golden(x_host, global_scale_for(x_host.astype(np.float32)), f"{dtype} n={n}", padded_n=padded_n)


@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expert_batches_with_a_scale_per_expert(dtype, layout):
    """x [E, m, n] with E device global scales: each expert quantized alone
    into its own packed rows and its own complete scale tensor."""
    import nvfp4_cupy as nv

    experts, m, n, padded_n = 4, 129, 7152, 7168
    wide = np.stack([make_input(kind, m, 7200, seed=e) for e, kind in enumerate(
        ("normal", "outliers", "zero_rows", "specials"))]).astype(HOST_DTYPES[dtype])
    x_host = wide[:, :, :n]  # each expert's rows are a column slice of a wider buffer
    scales_host = np.array([global_scale_for(x_host[e].astype(np.float32)) for e in range(experts)], np.float32)
    scales_host[2] = np.nan  # an invalid scale NaNs its own expert only
    want_packed, want_scales = ref.scaled_fp4_quant(x_host, scales_host, padded_n=padded_n, layout=layout)
    x = to_device(wide)[:, :, :n]
    packed, scales = quantize_poisoned(x, cp.asarray(scales_host), num_experts=experts, padded_n=padded_n, layout=layout)
    assert_bytes_equal(packed, want_packed, f"{dtype} {layout} experts packed")
    assert_bytes_equal(scales, want_scales, f"{dtype} {layout} experts scales")
    packed, scales = nv.scaled_fp4_quant(x, cp.asarray(scales_host), padded_n=padded_n, layout=layout)
    assert packed.shape == (experts, m, padded_n // 2) and scales.shape == want_scales.shape
