"""Every kernel family on small, awkward shapes, checked against the golden
model: the workload tests/test_sanitizer_gpu.py runs under compute-sanitizer
(memcheck, racecheck, synccheck, initcheck). Run it by hand as

    compute-sanitizer --tool memcheck --error-exitcode 99 python tests/sanitizer_workload.py

Shapes end mid-block, mid-tile and mid-vector, inputs start unaligned and
rows are strided, so every guard in the kernels is crossed. Exit status 1 on
a wrong byte."""

from __future__ import annotations

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nvfp4_cupy as nv  # noqa: E402
from nvfp4_cupy import reference as ref  # noqa: E402
from nvfp4_cupy._format import NUMPY_DTYPES  # noqa: E402

DTYPES = NUMPY_DTYPES
LAYOUTS = ("swizzled", "linear", "8x4")


def check(got, want, what: str) -> None:
    got = cp.asnumpy(got)
    if not np.array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8)):
        print(f"MISMATCH: {what}")
        sys.exit(1)


def device_rows(host: np.ndarray, offset: int) -> cp.ndarray:
    """host [m, n] on the device, starting `offset` elements past an aligned
    base, with rows 5 elements longer than n (a strided column slice)."""
    m, n = host.shape
    storage = cp.zeros(offset + m * (n + 5), dtype=host.dtype)
    rows = storage[offset:].reshape(m, n + 5)[:, :n]
    rows[...] = cp.asarray(host)
    return rows


def main() -> int:
    rng = np.random.default_rng(7)
    launches = 0
    for name, dtype in DTYPES.items():
        for m, n, padded_n in ((1, 16, 16), (129, 40, 64), (3, 200, 256)):
            host = (rng.standard_normal((m, n)) * 10).astype(dtype)
            for offset in (0, 3):
                x = cp.asarray(host) if offset == 0 else device_rows(host, offset)
                gs = nv.compute_global_scale(x)
                per_row = nv.compute_global_scale(x, per_row=True)
                check(gs, ref.compute_global_scale(host), f"global scale {name} {m}x{n}")
                check(per_row, ref.compute_global_scale(host, per_row=True), f"per-row scales {name} {m}x{n}")
                for layout in LAYOUTS:
                    packed, scales = nv.scaled_fp4_quant(x, per_row, padded_n=padded_n, layout=layout)
                    want = ref.scaled_fp4_quant(host, cp.asnumpy(per_row), padded_n=padded_n, layout=layout)
                    check(packed, want[0], f"packed {name} {m}x{n} {layout}")
                    check(scales, want[1], f"scales {name} {m}x{n} {layout}")
                    out = nv.dequantize_fp4(packed, scales, per_row, n=n, layout=layout, dtype=dtype)
                    check(out, ref.dequantize(want[0], want[1], cp.asnumpy(per_row), n=n, layout=layout, dtype=dtype),
                          f"dequantized {name} {m}x{n} {layout}")
                    mx = nv.scaled_fp4_quant(x, None, padded_n=round_up(padded_n, 32), layout=layout, fmt="mxfp4")
                    want_mx = ref.scaled_fp4_quant(host, None, padded_n=round_up(padded_n, 32), layout=layout, fmt="mxfp4")
                    check(mx[0], want_mx[0], f"mxfp4 packed {name} {m}x{n} {layout}")
                    check(mx[1], want_mx[1], f"mxfp4 scales {name} {m}x{n} {layout}")
                    back = nv.dequantize_fp4(*mx, None, n=n, layout=layout, dtype=dtype, fmt="mxfp4")
                    check(back, ref.dequantize(*want_mx, None, n=n, layout=layout, dtype=dtype, fmt="mxfp4"),
                          f"mxfp4 dequantized {name} {m}x{n} {layout}")
                    launches += 6
        experts = (rng.standard_normal((3, 33, 48)) * 4).astype(dtype)
        expert_scales = np.array([ref.compute_global_scale(e)[0] for e in experts], np.float32)
        packed, scales = nv.scaled_fp4_quant(cp.asarray(experts), cp.asarray(expert_scales), padded_n=64)
        want = ref.scaled_fp4_quant(experts, expert_scales, padded_n=64)
        check(packed, want[0], f"expert packed {name}")
        check(scales, want[1], f"expert scales {name}")
        launches += 1
    launches += fused_and_variants(rng)
    cp.cuda.Device().synchronize()
    print(f"sanitizer workload: {launches} launches of every kernel family (and their global scales), all bit-exact")
    return 0


def fused_and_variants(rng) -> int:
    """quantize() in one launch, TE numerics, the MX scale rules,
    stochastic rounding and the fused ops of issue 16, on awkward shapes;
    returns the calls made."""
    from nvfp4_cupy.reference import fused, mx_rules, stochastic, te, te_4over6, te_rht

    calls = 0
    for name, dtype in DTYPES.items():
        host = (rng.standard_normal((3, 40)) * 10).astype(dtype)
        x = device_rows(host, 3)
        packed, scales, gs = nv.quantize(x, padded_n=64)  # one launch: its kernel derives the scale
        want_gs = ref.compute_global_scale(host)
        check(gs, want_gs, f"one-launch quantize scale {name}")
        check(packed, ref.scaled_fp4_quant(host, want_gs, padded_n=64)[0], f"one-launch quantize packed {name}")
        te_gs = te.compute_global_scale_te(host)
        check(nv.scaled_fp4_quant(x, cp.asarray(te_gs), padded_n=64, numerics="te")[0],
              te.scaled_fp4_quant_te(host, te_gs, padded_n=64)[0], f"te packed {name}")
        sr = nv.scaled_fp4_quant_sr(x, cp.asarray(want_gs), padded_n=64, layout="8x4", seed=2**40 + 3, offset=9)
        want_sr = stochastic.scaled_fp4_quant_sr(host, want_gs, padded_n=64, layout="8x4", seed=2**40 + 3, offset=9)
        check(sr[0], want_sr[0], f"sr packed {name}")
        check(sr[1], want_sr[1], f"sr scales {name}")
        for rule in ("rceil", "te_pow2"):
            check(nv.scaled_fp4_quant(x, None, padded_n=64, fmt="mxfp4", mx_scale_rule=rule)[1],
                  mx_rules.scaled_mxfp4_quant(host, padded_n=64, mx_scale_rule=rule)[1], f"mxfp4 {rule} {name}")
        check(nv.fake_quantize(x, cp.asarray(want_gs)), fused.fake_quantize(host, want_gs), f"fake_quantize {name}")
        check(nv.saturation_mask(x, cp.asarray(want_gs)), fused.saturation_mask(host, want_gs),
              f"saturation mask {name}")
        check(nv.fake_quantize(x, numerics="te", row_scaled=True), fused.fake_quantize(host, numerics="te",
                                                                                       row_scaled=True),
              f"te row-scaled fake_quantize {name}")
        check(nv.fake_quantize(x, cp.asarray(want_gs), rounding="stochastic", seed=2**40 + 3, offset=9),
              fused.fake_quantize(host, want_gs, rounding="stochastic", seed=2**40 + 3, offset=9),
              f"sr fake_quantize {name}")
        check(nv.fake_quantize(x, fmt="mxfp4", mx_scale_rule="rceil"),
              fused.fake_quantize(host, fmt="mxfp4", mx_scale_rule="rceil"), f"rceil fake_quantize {name}")
        weight = rng.standard_normal(40).astype(dtype)
        residual_host = rng.standard_normal((3, 40)).astype(dtype)
        residual = cp.asarray(residual_host)
        got = nv.rms_norm_quant(cp.asarray(host), cp.asarray(weight), 1e-6, 2.0, padded_n=64, layout="8x4",
                                residual=residual)
        want = fused.rms_norm_quant(host, weight, 1e-6, 2.0, padded_n=64, layout="8x4", residual=residual_host)
        for i in range(3):
            check(got[i], want[i], f"rms_norm_quant output {i} {name}")
        check(nv.silu_and_mul_quant(cp.asarray(host), 2.0, padded_n=32)[0],
              fused.silu_and_mul_quant(host, 2.0, padded_n=32)[0], f"silu_and_mul_quant {name}")
        tokens = (rng.standard_normal((37, 48)) * 4).astype(dtype)
        offsets = np.array([0, 5, 5, 30, 37], np.int32)  # an empty expert
        expert_scales = rng.uniform(0.5, 4, 4).astype(np.float32)
        got = nv.scaled_fp4_experts_quant(cp.asarray(tokens), cp.asarray(expert_scales), cp.asarray(offsets))
        want = fused.scaled_fp4_experts_quant(tokens, expert_scales, offsets)
        for i in range(3):
            check(got[i], want[i], f"grouped experts output {i} {name}")
        batch = (rng.standard_normal((3, 20, 48)) * 4).astype(dtype)
        counts = np.array([20, 0, 7], np.int32)
        got = nv.scaled_fp4_masked_quant(cp.asarray(batch), cp.asarray(expert_scales[:3]), cp.asarray(counts))
        want = fused.scaled_fp4_masked_quant(batch, expert_scales[:3], counts)
        check(got[0], want[0], f"masked experts packed {name}")
        check(got[1], want[1], f"masked experts scales {name}")
        for i, (got, want) in enumerate(zip(
                nv.scaled_fp4_quant_4over6(x, padded_n=64, layout="8x4", err_mode="MSE", per_row=True),
                te_4over6.scaled_fp4_quant_4over6(host, padded_n=64, layout="8x4", err_mode="MSE", per_row=True))):
            check(got, want, f"Four Over Six output {i} {name}")
        strided_tokens = device_rows(tokens, 3)
        for i, (got, want) in enumerate(zip(nv.scaled_fp4_quant_rht(strided_tokens, padded_n=64),
                                            te_rht.scaled_fp4_quant_rht(tokens, padded_n=64))):
            check(got, want, f"RHT output {i} {name}")
        four_over_six = dict(numerics="te", four_over_six=True, err_mode="MSE", row_scaled=True)
        check(nv.fake_quantize(x, **four_over_six), fused.fake_quantize(host, **four_over_six),
              f"Four Over Six fake_quantize {name}")
        check(nv.saturation_mask(x, **four_over_six), fused.saturation_mask(host, **four_over_six),
              f"Four Over Six saturation mask {name}")
        check(nv.fake_quantize(strided_tokens, numerics="te", rht=True),
              fused.fake_quantize(tokens, numerics="te", rht=True), f"RHT fake_quantize {name}")
        check(nv.fake_quantize(x, numerics="te", tile="16x16"), fused.fake_quantize(host, numerics="te", tile="16x16"),
              f"16x16 tiles fake_quantize {name}")
        check(nv.saturation_mask(x, cp.asarray(4 * te_gs), numerics="te", tile="16x16"),
              fused.saturation_mask(host, 4 * te_gs, numerics="te", tile="16x16"),
              f"16x16 tiles saturation mask {name}")
        calls += 21
    return calls


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


if __name__ == "__main__":
    sys.exit(main())
