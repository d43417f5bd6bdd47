"""Stochastic rounding (scaled_fp4_quant_sr) on the GPU, byte for byte against
its golden model (reference.stochastic.scaled_fp4_quant_sr), every output
poisoned: the boundary shapes in every dtype, layout and K padding, every kind
of global scale with special blocks, the E4M3 and E2M1 ties, seeds and
offsets that use their high 32 bits, the torch entry points (eager,
torch.ops, torch.compile), the hot path left to round-to-nearest, and the
argument checks, made before any launch. Spec:
docs/stochastic_rounding_and_mx_rules.md, sections 2 and 4. (The golden
model's Philox stream and rounding rule are held to Random123's and PyTorch's
answers and to exact arithmetic on the CPU: tests/test_reference_sr_mx.py.)"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bytes_check import assert_bytes_equal, quantize_poisoned
from conftest import import_cupy
from gpu_inputs import HOST_DTYPES, boundary_cases, global_scale_for, make_input, numerics_probe
from nvfp4_cupy import reference as ref
from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy.reference.stochastic import scaled_fp4_quant_sr as golden_sr

pytestmark = pytest.mark.gpu
cp = import_cupy()

LAYOUT_NAMES = sorted(LAYOUTS)
DTYPE_NAMES = sorted(HOST_DTYPES)
U64_MAX = 2**64 - 1
# (seed, offset) pairs: small, and using the high 32 bits of each.
SEEDS = ((1, 0), (0x0123456789ABCDEF, 2**32 + 7), (U64_MAX, U64_MAX), (2**32, 1))


def assert_sr_matches_golden(x_host, gs_gpu, gs_golden, seed, offset, what, num_experts=None, **layout_args):
    want = golden_sr(x_host, gs_golden, seed=seed, offset=offset, **layout_args)
    got = quantize_poisoned(cp.asarray(x_host), gs_gpu, num_experts=num_experts, stochastic=(seed, offset),
                            **layout_args)
    assert_bytes_equal(got[0], want[0], f"{what}: packed")
    assert_bytes_equal(got[1], want[1], f"{what}: scales")


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_sr_matches_golden_on_boundary_shapes(dtype, layout):
    for case, (m, n, padded_n, kind) in enumerate(boundary_cases()):
        x_host = make_input(kind, m, n, seed=case).astype(HOST_DTYPES[dtype])
        gs = global_scale_for(x_host.astype(np.float32))
        seed, offset = SEEDS[case % len(SEEDS)]
        assert_sr_matches_golden(x_host, gs, gs, seed, offset, f"{dtype} {layout} {m}x{n}->{padded_n} {kind}",
                                 padded_n=padded_n, layout=layout)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_sr_every_kind_of_global_scale(dtype):
    """A host float, a one-element device array, one per row, and one per
    expert of [E, m, n] (element groups counted over all experts' rows), with
    special values, zero rows and an invalid scale (NaN scale bytes, zero
    codes) in the device forms."""
    x_host = make_input("specials", 6 * 33, 80, seed=3).astype(HOST_DTYPES[dtype])
    x_host[::5] = 0
    rows = np.array([global_scale_for(row.astype(np.float32)) for row in x_host], np.float32)
    rows[7] = 0.0
    for seed, offset in SEEDS[:2]:
        label = f"{dtype} seed={seed:#x} offset={offset:#x}"
        one = float(rows[0])
        assert_sr_matches_golden(x_host, one, one, seed, offset, f"{label} host", padded_n=128)
        device_one = np.array([one], np.float32)
        assert_sr_matches_golden(x_host, cp.asarray(device_one), device_one, seed, offset, f"{label} device",
                                 layout="8x4")
        assert_sr_matches_golden(x_host, cp.asarray(rows), rows, seed, offset, f"{label} per row", layout="linear")
        experts = x_host.reshape(6, 33, 80)
        per_expert = rows[::33].copy()
        per_expert[2] = np.nan
        assert_sr_matches_golden(experts, cp.asarray(per_expert), per_expert, seed, offset, f"{label} per expert",
                                 num_experts=6, padded_n=96)


def test_sr_on_the_ties():
    """Blocks whose scales land on every E4M3 tie and whose values land on
    every E2M1 tie and one ulp either side, both signs (gs = 1): exact E2M1
    values never move, the rest round up or down by their random byte."""
    x_host = numerics_probe()
    for seed, offset in SEEDS:
        assert_sr_matches_golden(x_host, 1.0, 1.0, seed, offset, f"probe seed={seed:#x} offset={offset:#x}")


def test_public_function_and_the_hot_path():
    """nvfp4_cupy.scaled_fp4_quant_sr allocates its outputs; an SR call is
    never recorded for the hot path, so a round-to-nearest call of the same
    signature after it still gives round-to-nearest bytes, and the other way
    round."""
    import nvfp4_cupy as nv

    x_host = make_input("outliers", 33, 7152, seed=11).astype(ml_dtypes.bfloat16)
    x = cp.asarray(x_host)
    for _ in range(2):
        packed, scales = nv.scaled_fp4_quant_sr(x, 0.5, padded_n=7168, seed=9, offset=2)
        want = golden_sr(x_host, 0.5, padded_n=7168, seed=9, offset=2)
        assert_bytes_equal(cp.asnumpy(packed), want[0], "scaled_fp4_quant_sr packed")
        assert_bytes_equal(cp.asnumpy(scales), want[1], "scaled_fp4_quant_sr scales")
        for _ in range(2):
            packed, scales = nv.scaled_fp4_quant(x, 0.5, padded_n=7168)
        want = ref.scaled_fp4_quant(x_host, 0.5, padded_n=7168)
        assert_bytes_equal(cp.asnumpy(packed), want[0], "scaled_fp4_quant after SR: packed")
        assert_bytes_equal(cp.asnumpy(scales), want[1], "scaled_fp4_quant after SR: scales")


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        ({"seed": None}, ValueError, "stochastic rounding needs a seed"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
        ({"seed": 1, "offset": 2**64}, ValueError, r"offset must be in \[0, 2\*\*64\)"),
        ({"seed": True}, TypeError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": 1, "layout": "diagonal"}, ValueError, "layout"),
    ],
)
def test_bad_arguments_are_refused_before_launch(arguments, error, match):
    import nvfp4_cupy as nv
    from nvfp4_cupy import create_fp4_output_tensors

    x = cp.ones((4, 64), cp.float16)
    out, out_scale = create_fp4_output_tensors(4, 64)
    out.fill(0xA5)
    out_scale.fill(0xA5)
    with pytest.raises(error, match=match):
        nv.scaled_fp4_quant_sr(x, 1.0, out=out, out_scale=out_scale, **arguments)
    cp.cuda.Device().synchronize()
    assert int((out != 0xA5).sum()) == 0 and int((out_scale != 0xA5).sum()) == 0, "an output was written"


def _to_torch(torch, host: np.ndarray):
    dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(ml_dtypes.bfloat16): torch.bfloat16}[host.dtype]
    bits = host.view({2: np.int16, 4: np.int32}[host.dtype.itemsize])
    return torch.from_numpy(bits.copy()).cuda().view(dtype)


@pytest.mark.parametrize("entry", ["eager", "torch.ops", "compiled"])
def test_torch_entries(torch_cuda, entry):
    """Seeds and offsets past 2^63 reach the registered op as the int64 of
    their bits and come back out of it unchanged."""
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    x_host = make_input("normal", 129, 96, seed=5).astype(ml_dtypes.bfloat16)
    x = _to_torch(torch, x_host)
    gs_host = np.array([3.0], np.float32)
    gs = torch.from_numpy(gs_host).cuda()
    seed, offset = 2**63 + 12345, U64_MAX - 1
    if entry == "eager":
        packed, scales = nvt.scaled_fp4_quant_sr(x, gs, padded_n=128, layout="8x4", seed=seed, offset=offset)
    elif entry == "torch.ops":
        packed, scales = torch.ops.nvfp4.scaled_fp4_quant_sr(x, gs, 0.0, 128, "8x4", seed - 2**64, offset - 2**64)
    else:
        compiled = torch.compile(
            lambda t, s: nvt.scaled_fp4_quant_sr(t, s, padded_n=128, layout="8x4", seed=seed, offset=offset),
            fullgraph=True)
        packed, scales = compiled(x, gs)
    want = golden_sr(x_host, gs_host, padded_n=128, layout="8x4", seed=seed, offset=offset)
    assert packed.dtype == torch.uint8 and packed.is_cuda
    assert_bytes_equal(packed.cpu().numpy(), want[0], f"{entry}: packed")
    assert_bytes_equal(scales.cpu().numpy(), want[1], f"{entry}: scales")
