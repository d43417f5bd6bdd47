"""Fake quantization (docs/fused_ops.md, section 6) on the GPU, bit for bit:
the one-kernel fake_quantize against the golden model
(reference.fused.fake_quantize) and against our own unfused GPU ops
(scaled_fp4_quant then dequantize_fp4), on the boundary cases of
tests/gpu_inputs.py for every dtype, every kind of global scale and both
formats; the saturation mask and the straight-through gradient against
reference.fused; the torch op under torch.compile (no graph break) and in a
training loop; bad input refused before anything runs; empty input.
Outputs are poisoned twice (tests/bytes_check.py).

The argument checks that need no GPU, and the torch autograd and
torch.compile plumbing with the golden model standing in for the kernel,
run on the CPU (the tests not marked gpu)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import gpu_unavailable_reason
from gpu_inputs import HOST_DTYPES, boundary_cases, global_scale_for, make_input
from nvfp4_cupy import reference as ref
from nvfp4_cupy.reference import fused

BITS = {2: np.uint16, 4: np.uint32}
FORMATS = ("nvfp4", "mxfp4")
SCALE_KINDS = ("one", "row", "expert")
# The "one" kind cycles through its three forms over the cases.
ONE_FORMS = ("host", "device", "computed")


def bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).view(BITS[np.asarray(values).dtype.itemsize])


def scale_case(x_host: np.ndarray, kind: str, form: str, rng) -> tuple:
    """(x shaped for the kind, global scale for the golden model, for the
    GPU). kind "expert" makes x [E, m / E, n] (E = 2 for even m, else 1)."""
    m, n = x_host.shape
    if kind == "one":
        value = global_scale_for(x_host.astype(np.float32))
        if form == "host":
            return x_host, value, value
        if form == "device":
            return x_host, np.array([value], np.float32), np.array([value], np.float32)
        return x_host, None, None
    if kind == "row":
        per_row = rng.uniform(0.5, 2.0, m).astype(np.float32) * np.float32(global_scale_for(x_host.astype(np.float32)))
        return x_host, per_row, per_row
    experts = 2 if m % 2 == 0 else 1
    shaped = x_host.reshape(experts, m // experts, n)
    per_expert = np.array([global_scale_for(shaped[e].astype(np.float32)) for e in range(experts)], np.float32)
    return shaped, per_expert, per_expert


# ---------------------------------------------------------------------------
# CPU: the option checks, with the golden model's own messages
# ---------------------------------------------------------------------------
def _cupy_ops():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    from nvfp4_cupy.ops import fake_quantize as ops

    return ops


@pytest.mark.parametrize("options, quantizer", [
    ({}, "nvfp4_ieee"),
    ({"fmt": "nvfp4", "rounding": "nearest"}, "nvfp4_ieee"),
    ({"fmt": "mxfp4"}, "mxfp4_floor"),
    ({"fmt": "mxfp4", "mx_scale_rule": "floor"}, "mxfp4_floor"),
    ({"numerics": "te"}, "nvfp4_te"),
    ({"numerics": "te", "row_scaled": True}, "nvfp4_te"),
    ({"fmt": "mxfp4", "mx_scale_rule": "rceil"}, "mxfp4_rceil"),
    ({"fmt": "mxfp4", "mx_scale_rule": "te_pow2"}, "mxfp4_te_pow2"),
    ({"rounding": "stochastic", "seed": 7}, "nvfp4_sr"),
    ({"numerics": "te", "four_over_six": True}, "nvfp4_4over6_mae"),
    ({"numerics": "te", "four_over_six": True, "err_mode": "mse", "e4m3_max": 256}, "nvfp4_4over6_mse"),
    ({"numerics": "te", "rht": True}, "nvfp4_rht"),
    ({"numerics": "te", "rht": True, "transform_dtype": "float32"}, "nvfp4_rht_float32"),
    ({"numerics": "te", "tile": "16x16"}, "nvfp4_te_tiles"),
])
def test_supported_options_pick_their_quantizer(options, quantizer):
    """Stochastic rounding's mask is round to nearest's (the same scale bytes)."""
    ops = _cupy_ops()
    assert ops.gpu_quantizer(None, options) == quantizer
    if not options.get("rht"):  # (refused below)
        assert ops.gpu_quantizer(None, options, mask=True) == ("nvfp4_ieee" if quantizer == "nvfp4_sr" else quantizer)


def test_every_golden_combination_has_a_gpu_quantizer():
    """Every combination of options the golden model accepts maps to a
    quantizer of fake_quantize.cu (none is refused for want of a kernel)."""
    import itertools

    ops = _cupy_ops()
    from nvfp4_cupy._runtime.compile import FAKE_QUANTIZERS

    grid = dict(fmt=("nvfp4", "mxfp4"), numerics=("ieee", "te"), tile=("1x16", "16x16"), row_scaled=(False, True),
                rounding=("nearest", "stochastic"), mx_scale_rule=("floor", "rceil", "te_pow2"),
                four_over_six=(False, True), err_mode=(None, "MSE"), rht=(False, True),
                transform_dtype=("input", "float32"))
    accepted = set()
    for values in itertools.product(*grid.values()):
        options = dict(zip(grid, values))
        if options["rounding"] == "stochastic":
            options["seed"] = 1
        try:
            fused._check_fake_options(**fused._fake_options(None, options))
        except ValueError:
            continue
        accepted.add(ops.gpu_quantizer(None, options))
    assert accepted == set(FAKE_QUANTIZERS)


@pytest.mark.parametrize("global_scale, options", [
    (1.0, {"fmt": "mxfp4"}),
    (None, {"tile": "16x16"}),
    (None, {"row_scaled": True}),
    (None, {"numerics": "te", "fmt": "mxfp4"}),
    (None, {"rounding": "up"}),
    (None, {"seed": 3}),
    (None, {"rounding": "stochastic"}),
    (None, {"four_over_six": True}),
    (1.0, {"numerics": "te", "rht": True}),
    (None, {"global_amax": 1.0}),
    (None, {"e4m3_max": 256}),
    (None, {"mx_scale_rule": "rceil"}),
    (None, {"fmt": "nvfp5"}),
])
def test_refused_combinations_give_the_golden_models_errors(global_scale, options):
    ops = _cupy_ops()
    with pytest.raises(ValueError) as golden:
        fused.fake_quantize(np.ones((2, 16), np.float32), global_scale, **options)
    with pytest.raises(ValueError) as gpu:
        ops.gpu_quantizer(global_scale, options)
    assert str(gpu.value) == str(golden.value)


def test_unknown_options_and_the_mask_with_rht_are_refused():
    ops = _cupy_ops()
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        ops.gpu_quantizer(None, {"numeric": "te"})
    with pytest.raises(ValueError, match="not defined with rht=True"):
        ops.gpu_quantizer(None, {"numerics": "te", "rht": True}, mask=True)


def test_host_arrays_are_refused_before_any_device_work():
    ops = _cupy_ops()
    with pytest.raises(TypeError, match="x is a NumPy"):
        ops.fake_quantize(np.ones((2, 16), np.float32))
    with pytest.raises(TypeError, match="x is a NumPy"):
        ops.saturation_mask(np.ones((2, 16), np.float32))


# ---------------------------------------------------------------------------
# CPU: the torch op's autograd and torch.compile plumbing, with the golden
# model in place of the kernel (the GPU tests below run the kernel)
# ---------------------------------------------------------------------------
def _torch_to_host(tensor) -> np.ndarray:
    import torch

    dtype_name = str(tensor.dtype).replace("torch.", "")
    raw = tensor.detach().cpu().contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()]).numpy()
    return raw.view(HOST_DTYPES[dtype_name])


def _host_to_torch(host: np.ndarray, device="cpu"):
    import torch

    name = "bfloat16" if host.dtype == HOST_DTYPES["bfloat16"] else host.dtype.name
    raw = torch.from_numpy(host.view(BITS[host.dtype.itemsize]).astype({2: np.int16, 4: np.int32}[host.itemsize]))
    return raw.to(device).view(getattr(torch, name))


@pytest.fixture
def golden_torch_ops(monkeypatch):
    """nvfp4_cupy.torch with the golden model standing in for the GPU
    launchers: CPU tensors in, CPU tensors out."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    _cupy_ops()
    import nvfp4_cupy.torch as nvt

    def scale_of(global_scale):
        return global_scale.cpu().numpy() if isinstance(global_scale, torch.Tensor) else global_scale

    def fake(x, global_scale=None, *, like=None, global_amax=None, **options):
        return _host_to_torch(fused.fake_quantize(_torch_to_host(x), scale_of(global_scale),
                                                  global_amax=scale_of(global_amax), **options))

    def mask(x, global_scale=None, *, like=None, global_amax=None, **options):
        return torch.from_numpy(fused.saturation_mask(_torch_to_host(x), scale_of(global_scale),
                                                      global_amax=scale_of(global_amax), **options))

    monkeypatch.setattr(nvt._fake_quantize, "fake_quantize", fake)
    monkeypatch.setattr(nvt._fake_quantize, "saturation_mask", mask)
    return torch, nvt


def _saturating_case(dtype_name: str, seed: int):
    """x with infinities and a global scale 4x the calibrated one: values
    beyond a quarter of amax saturate."""
    host = make_input("specials", 6, 80, seed=seed).astype(HOST_DTYPES[dtype_name])
    return host, 4 * global_scale_for(host.astype(np.float32))


@pytest.mark.parametrize("zero_saturated", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_autograd_plumbing_gives_the_golden_gradient(golden_torch_ops, dtype, zero_saturated):
    torch, nvt = golden_torch_ops
    host, gs = _saturating_case(dtype, seed=1)
    grad_host = make_input("normal", *host.shape, seed=2).astype(host.dtype)
    want_mask = fused.saturation_mask(host, gs)
    assert want_mask.any() and not want_mask.all()
    for scale in (gs, torch.tensor([gs], dtype=torch.float32)):
        x = _host_to_torch(host).requires_grad_()
        y = nvt.fake_quantize(x, scale, zero_saturated=zero_saturated)
        assert_bytes_equal(bits(_torch_to_host(y)), bits(fused.fake_quantize(host, gs)), "forward")
        y.backward(_host_to_torch(grad_host))
        want = fused.fake_quantize_backward(grad_host, host, gs, zero_saturated=zero_saturated)
        assert_bytes_equal(bits(_torch_to_host(x.grad)), bits(want), f"gradient, scale {type(scale).__name__}")


def test_torch_no_gradient_flows_to_the_global_scale(golden_torch_ops):
    torch, nvt = golden_torch_ops
    host, gs = _saturating_case("float32", seed=4)
    scale = torch.tensor([gs], dtype=torch.float32, requires_grad=True)
    x = _host_to_torch(host).requires_grad_()
    nvt.fake_quantize(x, scale, zero_saturated=True).sum().backward()
    assert scale.grad is None and x.grad is not None
    y = nvt.fake_quantize(_host_to_torch(host), scale)  # only the scale requires grad
    assert_bytes_equal(bits(_torch_to_host(y)), bits(fused.fake_quantize(host, gs)), "scale requiring grad")
    y.sum().backward()
    assert scale.grad is None


def test_torch_compile_plumbing_traces_forward_and_backward(golden_torch_ops):
    torch, nvt = golden_torch_ops
    host, gs = _saturating_case("float32", seed=3)
    scale = torch.tensor([gs], dtype=torch.float32)

    def step(x, scale):
        return nvt.fake_quantize(x * 2, scale, zero_saturated=True) * 3

    x = _host_to_torch(host).requires_grad_()
    explanation = torch._dynamo.explain(step)(x, scale)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for run in (step, compiled):
        x = _host_to_torch(host).requires_grad_()
        run(x, scale).sum().backward()
        doubled = (host * 2).astype(host.dtype)
        want = fused.fake_quantize_backward(np.full(host.shape, 6, host.dtype), doubled, gs, zero_saturated=True)
        assert_bytes_equal(bits(_torch_to_host(x.grad)), bits(want), f"gradient through {run.__name__}")


FOUR_OVER_SIX = {"numerics": "te", "four_over_six": True}


@pytest.mark.parametrize("options", [{"numerics": "te"}, {"numerics": "te", "row_scaled": True},
                                     {"numerics": "te", "tile": "16x16"},
                                     {"fmt": "mxfp4", "mx_scale_rule": "rceil"},
                                     {"fmt": "mxfp4", "mx_scale_rule": "te_pow2"},
                                     {"rounding": "stochastic", "seed": 2**63 + 5, "offset": 2**64 - 1},
                                     dict(FOUR_OVER_SIX, err_mode="MSE", e4m3_max=256, err_use_fast_math=True),
                                     dict(FOUR_OVER_SIX, row_scaled=False),
                                     dict(FOUR_OVER_SIX, row_scaled=True),
                                     {"numerics": "te", "rht": True, "transform_dtype": "float32"},
                                     {"numerics": "te", "rht": True, "row_scaled": True}], ids=str)
def test_torch_ops_carry_the_variant_options(golden_torch_ops, options):
    """The options a GPU quantizer depends on reach it through the
    registered ops (torch.compile) and the backward's mask, not only
    through the eager call; Four Over Six's and the RHT's global amax
    through the ops' scale arguments."""
    torch, nvt = golden_torch_ops
    from nvfp4_cupy.reference import te

    host = make_input("specials", 6, 80, seed=8).astype(np.float32)
    gs = amax = None
    if options.get("four_over_six") or options.get("rht"):
        if options.get("four_over_six") and not options.get("row_scaled"):
            # a quarter of the amax (one, or one a row where row_scaled=False
            # is spelled out): values beyond it saturate
            per_row = "row_scaled" in options
            amax = np.max(np.abs(host), axis=1 if per_row else None).astype(np.float32) / np.float32(4)
            amax = np.atleast_1d(np.where(np.isfinite(amax), amax, np.float32(1e3)).astype(np.float32))
        # else computed from x (the RHT: from the transformed x)
    elif options.get("numerics") == "te":  # 4x TE's scale: values beyond a quarter of amax saturate
        gs = np.float32(4) * te.compute_global_scale_te(host, per_row=options.get("row_scaled", False))
    elif "rounding" in options:
        gs = np.float32(4) * ref.compute_global_scale(host)
    masked = not options.get("rht")  # the RHT has no saturation mask
    want = fused.fake_quantize(host, gs, global_amax=amax, **options)
    want_grad = fused.fake_quantize_backward(np.ones_like(host), host, gs, zero_saturated=masked, global_amax=amax,
                                             **options)
    scalar = gs if amax is None else amax
    scalar = None if scalar is None else torch.from_numpy(scalar)

    def step(x, scalar):
        if amax is None:
            return nvt.fake_quantize(x, scalar, zero_saturated=masked, **options)
        return nvt.fake_quantize(x, zero_saturated=masked, global_amax=scalar, **options)

    scale = scalar
    torch._dynamo.reset()  # each case compiles `step` anew (its closure differs), not a recompile
    for run in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        x = _host_to_torch(host).requires_grad_()
        y = run(x, scale)
        assert_bytes_equal(bits(_torch_to_host(y)), bits(want), f"{options} forward through {run}")
        y.sum().backward()
        assert_bytes_equal(bits(_torch_to_host(x.grad)), bits(want_grad), f"{options} gradient through {run}")


def _train(torch, nvt, model, steps: int = 3) -> list:
    torch.manual_seed(5)
    inputs = torch.randn(8, 64, device=model.weight.device)
    target = torch.randn(8, 32, device=model.weight.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [float(loss) for loss in losses]


def _fake_quantized_linear(torch, nvt, device):
    class FakeQuantizedLinear(torch.nn.Linear):
        """A Linear layer whose weight is fake-quantized in the forward pass
        (quantization-aware training), saturated weights getting no gradient."""

        def forward(self, x):
            # 4x the scale of weights up to the init bound 1/sqrt(64): those
            # beyond a quarter of it saturate.
            gs = 4 * 2688.0 / 0.125
            weight = nvt.fake_quantize(self.weight, gs, zero_saturated=True)
            return torch.nn.functional.linear(x, weight, self.bias)

    torch.manual_seed(4)
    return FakeQuantizedLinear(64, 32, device=device)


def test_torch_training_loop_plumbing_eager_and_compiled(golden_torch_ops):
    torch, nvt = golden_torch_ops
    eager = _fake_quantized_linear(torch, nvt, "cpu")
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    eager_losses = _train(torch, nvt, eager)
    assert eager_losses[-1] < eager_losses[0]
    assert _train(torch, nvt, compiled) == eager_losses


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cp():
    reason = gpu_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    return cupy


def device_scale(cp, gs):
    return cp.asarray(gs) if isinstance(gs, np.ndarray) else gs


def fake_quantize_poisoned(cp, x, gs, *, mask=False, target=None, **options):
    """The GPU's fake_quantize (or saturation mask) into output buffers
    filled with each of POISONS in turn; both must agree. Host result."""
    from nvfp4_cupy.ops.fake_quantize import prepare_fake_quantize

    results = []
    for poison in POISONS:
        out = cp.empty(x.shape, dtype=np.bool_ if mask else x.dtype)
        out.view(cp.uint8).fill(poison)
        launch, got = prepare_fake_quantize(x, gs, options, out, None, None, mask=mask, target=target)
        launch()
        assert got is out
        results.append(cp.asnumpy(out.view(cp.uint8) if mask else out))
    first, second = results
    if mask:
        assert_bytes_equal(first, second, "mask under two poisons (unwritten bytes)")
        return first
    assert_bytes_equal(bits(first), bits(second), "values under two poisons (unwritten bytes)")
    return first


def unfused(cp, x, gs, fmt: str):
    """Our own GPU ops one after another: quantize (linear scales), then dequantize to x's dtype."""
    import nvfp4_cupy as nv

    if fmt == "nvfp4" and gs is None:
        gs = nv.compute_global_scale(x)
    packed, scales = nv.scaled_fp4_quant(x, gs if fmt == "nvfp4" else None, layout="linear", fmt=fmt)
    dtype_name = "bfloat16" if x.dtype == HOST_DTYPES["bfloat16"] else x.dtype.name
    return nv.dequantize_fp4(packed, scales, gs if fmt == "nvfp4" else None, n=x.shape[-1], layout="linear",
                             dtype=dtype_name, fmt=fmt)


CASES = boundary_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "{}x{}-{}".format(*CASES[i][:2], CASES[i][3]))
def test_fake_quantize_matches_golden_and_the_unfused_ops(cp, case, dtype, fmt):
    m, n, _, kind = CASES[case]
    rng = np.random.default_rng(case)
    x_host = make_input(kind, m, n, seed=m * 31 + n).astype(HOST_DTYPES[dtype])
    for scale_kind in SCALE_KINDS if fmt == "nvfp4" else ("mx",):
        form = ONE_FORMS[case % len(ONE_FORMS)]
        shaped, gs_host, gs = (x_host, None, None) if fmt == "mxfp4" else scale_case(x_host, scale_kind, form, rng)
        label = f"{dtype} {fmt} {m}x{n} {kind} scale={scale_kind}" + (f"/{form}" if scale_kind == "one" else "")
        want = fused.fake_quantize(shaped, gs_host, fmt=fmt)
        x = cp.asarray(shaped)
        got = fake_quantize_poisoned(cp, x, device_scale(cp, gs), fmt=fmt)
        assert got.shape == shaped.shape and got.dtype == shaped.dtype
        assert_bytes_equal(bits(got), bits(want), f"{label}: vs golden")
        assert_bytes_equal(bits(got), bits(cp.asnumpy(unfused(cp, x, device_scale(cp, gs), fmt))),
                           f"{label}: vs unfused GPU ops")


# The variants beyond ieee / floor: (options, the kinds of global scale each takes).
VARIANTS = {
    "te": ({"numerics": "te"}, ("one", "expert")),
    "te row_scaled": ({"numerics": "te", "row_scaled": True}, ("row", "computed")),
    "te 16x16": ({"numerics": "te", "tile": "16x16"}, ("one",)),
    "mxfp4 rceil": ({"fmt": "mxfp4", "mx_scale_rule": "rceil"}, ("mx",)),
    "mxfp4 te_pow2": ({"fmt": "mxfp4", "mx_scale_rule": "te_pow2"}, ("mx",)),
    "sr": ({"rounding": "stochastic", "seed": 2**40 + 5, "offset": 2**63 + 3}, ("one", "row", "expert")),
}


def variant_scale_case(x_host: np.ndarray, kind: str, form: str, rng) -> tuple:
    """scale_case, with numerics="te"'s own forms: a computed scale per row
    ("computed" with row_scaled) and TE's S_enc for the one-scale forms."""
    from nvfp4_cupy.reference import te

    if kind == "mx":
        return x_host, None, None
    if kind == "computed":
        return x_host, None, None
    shaped, gs_host, gs = scale_case(x_host, kind, form, rng)
    if kind == "one" and form != "computed":  # TE's own encode scale of x
        value = np.float32(te.compute_global_scale_te(x_host)[0])
        # a NaN or infinite S_enc (x with NaN or inf) can only be passed as an array
        host_form = form == "host" and np.isfinite(value) and value > 0
        gs_host, gs = (value, value) if host_form else (np.array([value]),) * 2
    return shaped, gs_host, gs


def unfused_variant(cp, x, gs, options: dict):
    """scaled_fp4_quant (or scaled_fp4_quant_sr) then dequantize_fp4 with
    the variant's options (no expert batch for numerics="te": TE defines
    none)."""
    import nvfp4_cupy as nv

    fmt = options.get("fmt", "nvfp4")
    if fmt == "nvfp4" and gs is None:
        gs = nv.compute_global_scale(x, per_row=options.get("row_scaled", False),
                                     numerics=options.get("numerics", "ieee"))
    if options.get("rounding") == "stochastic":
        packed, scales = nv.scaled_fp4_quant_sr(x, gs, layout="linear", seed=options["seed"], offset=options["offset"])
    else:
        packed, scales = nv.scaled_fp4_quant(x, gs if fmt == "nvfp4" else None, layout="linear", fmt=fmt,
                                             **{k: v for k, v in options.items() if k != "fmt"})
    dtype_name = "bfloat16" if x.dtype == HOST_DTYPES["bfloat16"] else x.dtype.name
    return nv.dequantize_fp4(packed, scales, gs if fmt == "nvfp4" else None, n=x.shape[-1], layout="linear",
                             dtype=dtype_name, fmt=fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "{}x{}-{}".format(*CASES[i][:2], CASES[i][3]))
def test_te_and_mx_rule_variants_match_golden_and_the_unfused_ops(cp, case, dtype, variant):
    """numerics="te" (one scale, host, device or computed; per expert; per
    row with row_scaled, given or computed) and the MXFP4 rules "rceil" and
    "te_pow2", on the boundary cases; and their saturation masks under 4x
    the scales (NVFP4) or with infinities (MXFP4)."""
    options, kinds = VARIANTS[variant]
    m, n, _, kind = CASES[case]
    rng = np.random.default_rng(case)
    x_host = make_input(kind, m, n, seed=m * 31 + n).astype(HOST_DTYPES[dtype])
    for scale_kind in kinds:
        form = ONE_FORMS[case % len(ONE_FORMS)]
        shaped, gs_host, gs = variant_scale_case(x_host, scale_kind, form, rng)
        label = f"{dtype} {variant} {m}x{n} {kind} scale={scale_kind}" + (f"/{form}" if scale_kind == "one" else "")
        want = fused.fake_quantize(shaped, gs_host, **options)
        x = cp.asarray(shaped)
        got = fake_quantize_poisoned(cp, x, device_scale(cp, gs), **options)
        assert got.shape == shaped.shape and got.dtype == shaped.dtype
        assert_bytes_equal(bits(got), bits(want), f"{label}: vs golden")
        if scale_kind != "expert" or "rounding" in options:
            assert_bytes_equal(bits(got), bits(cp.asnumpy(unfused_variant(cp, x, device_scale(cp, gs), options))),
                               f"{label}: vs unfused GPU ops")
        saturating = None if gs_host is None else np.atleast_1d(np.float32(4) * np.asarray(gs_host, np.float32))
        if saturating is not None or "fmt" in options:
            want_mask = fused.saturation_mask(shaped, saturating, **options).astype(np.uint8)
            got_mask = fake_quantize_poisoned(cp, x, device_scale(cp, saturating), mask=True, **options)
            assert_bytes_equal(got_mask, want_mask, f"{label}: saturation mask")


# Four Over Six and the RHT: (options, the global amax forms each takes):
# "host" / "device" one amax (a device array where x holds NaN or inf),
# "rows" one a row, "computed" / "computed rows" None (row_scaled False / True).
AMAX_VARIANTS = {
    "4over6 MAE": (FOUR_OVER_SIX, ("one", "rows", "computed")),
    "4over6 MSE 256": (dict(FOUR_OVER_SIX, err_mode="MSE", e4m3_max=256), ("one", "computed rows")),
    "4over6 fast math": (dict(FOUR_OVER_SIX, err_use_fast_math=True), ("rows", "computed")),
    "rht": ({"numerics": "te", "rht": True}, ("computed", "computed rows", "one")),
    "rht float32": ({"numerics": "te", "rht": True, "transform_dtype": "float32"}, ("computed", "rows")),
}


def amax_case(x_host: np.ndarray, form: str, case: int, rng) -> tuple:
    """(global amax for the golden model, for the GPU, row_scaled) of a
    form: the largest magnitude of x (of each row) times a factor in [0.5,
    2), so that some blocks saturate."""
    if form.startswith("computed"):
        return None, None, form == "computed rows"
    magnitudes = np.abs(x_host.astype(np.float32))
    amax = np.max(magnitudes, axis=1 if form == "rows" else None, keepdims=False).reshape(-1)
    amax = (amax * rng.uniform(0.5, 2.0, amax.size)).astype(np.float32)
    if form == "one" and case % 2 == 0 and np.isfinite(amax[0]):
        return float(amax[0]), float(amax[0]), False
    return amax, amax, False


def unfused_amax_variant(cp, x, amax, options: dict, row_scaled: bool) -> np.ndarray:
    """Our own GPU quantizer (scaled_fp4_quant_4over6 or _rht, linear
    scales), then dequantize_fp4 under S_enc of the amax it used; for the
    RHT to float32, transformed back on the host (reference.fused's
    inverse) and rounded to x's dtype."""
    import nvfp4_cupy as nv
    from nvfp4_cupy.reference import te

    dtype_name = "bfloat16" if x.dtype == HOST_DTYPES["bfloat16"] else x.dtype.name
    settings = {k: v for k, v in options.items() if k in ("err_mode", "e4m3_max", "err_use_fast_math")}
    if options.get("rht"):
        packed, scales, used = nv.scaled_fp4_quant_rht(x, amax, layout="linear", per_row=row_scaled,
                                                       transform_dtype=options.get("transform_dtype", "input"))
    else:
        packed, scales, used = nv.scaled_fp4_quant_4over6(x, amax, layout="linear", per_row=row_scaled, **settings)
    used = cp.asnumpy(used) if isinstance(used, cp.ndarray) else np.float32(used)
    s_enc = te.encode_scale_from_amax_te(np.atleast_1d(used).astype(np.float32), e4m3_max=settings.get("e4m3_max", 448))
    values = nv.dequantize_fp4(packed, scales, cp.asarray(s_enc), n=x.shape[-1], layout="linear",
                               dtype="float32" if options.get("rht") else dtype_name)
    if not options.get("rht"):
        return cp.asnumpy(values)
    return fused._to_dtype(fused._inverse_rht_rows(cp.asnumpy(values)), dtype_name)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(AMAX_VARIANTS))
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "{}x{}-{}".format(*CASES[i][:2], CASES[i][3]))
def test_four_over_six_and_rht_match_golden_and_the_unfused_ops(cp, case, dtype, variant):
    """Four Over Six (both error modes, E4M3 max 448 and 256, fast math) and
    the RHT (the transform rounded to x's dtype or kept in float32) under a
    global amax given (host, device, one a row) or computed (per tensor or
    per row), on the boundary cases (the RHT's with n a multiple of 16):
    golden == GPU == our unfused GPU ops; and Four Over Six's saturation
    mask."""
    options, forms = AMAX_VARIANTS[variant]
    m, n, _, kind = CASES[case]
    if options.get("rht") and n % 16:
        pytest.skip("the RHT needs n to be a multiple of 16")
    rng = np.random.default_rng(case)
    x_host = make_input(kind, m, n, seed=m * 31 + n).astype(HOST_DTYPES[dtype])
    x = cp.asarray(x_host)
    for form in forms:
        amax_host, amax, row_scaled = amax_case(x_host, form, case, rng)
        call = dict(options, row_scaled=row_scaled)
        label = f"{dtype} {variant} {m}x{n} {kind} amax={form}"
        want = fused.fake_quantize(x_host, global_amax=amax_host, **call)
        got = fake_quantize_poisoned(cp, x, None, global_amax=device_scale(cp, amax), **call)
        assert got.shape == x_host.shape and got.dtype == x_host.dtype
        assert_bytes_equal(bits(got), bits(want), f"{label}: vs golden")
        assert_bytes_equal(bits(got), bits(unfused_amax_variant(cp, x, device_scale(cp, amax), options, row_scaled)),
                           f"{label}: vs unfused GPU ops")
        if options.get("four_over_six"):
            want_mask = fused.saturation_mask(x_host, global_amax=amax_host, **call).astype(np.uint8)
            got_mask = fake_quantize_poisoned(cp, x, None, mask=True, global_amax=device_scale(cp, amax), **call)
            assert_bytes_equal(got_mask, want_mask, f"{label}: saturation mask")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_software_path_and_special_global_scales(cp, dtype, fmt):
    """The sm_80 conversion path on this GPU; and per-row scales that are
    invalid (NaN rows), tiny (2688 / S overflows), huge, or outside the
    decoder's fast range, next to ordinary ones."""
    from nvfp4_cupy._runtime.compile import SOFTWARE

    for n in (7152, 80):  # one row a thread block (shared decode tables), several (a table a block)
        x_host = make_input("specials", 40, n, seed=11).astype(HOST_DTYPES[dtype])
        want = fused.fake_quantize(x_host, None, fmt=fmt)
        got = fake_quantize_poisoned(cp, cp.asarray(x_host), None, target=SOFTWARE, fmt=fmt)
        assert_bytes_equal(bits(got), bits(want), f"{dtype} {fmt} n={n} software path")
        if fmt == "mxfp4":
            continue
        specials = np.array([0.0, -1.0, np.inf, np.nan, 1e-45, 2.0**-101, 2.0**-60, 2.0**60, 2.0**101, 3.0e38,
                             1e-36, 1e30], np.float32)
        calibrated = global_scale_for(x_host.astype(np.float32))
        gs = np.concatenate([specials, np.full(40 - len(specials), calibrated, np.float32)])
        for options in ({}, {"numerics": "te", "row_scaled": True}):  # TE NaN-scales the invalid rows
            want = fused.fake_quantize(x_host, gs, **options)
            want_mask = fused.saturation_mask(x_host, gs, **options).astype(np.uint8)
            for target in (None, SOFTWARE):
                label = f"{dtype} n={n} {options} special per-row scales, target {target}"
                got = fake_quantize_poisoned(cp, cp.asarray(x_host), cp.asarray(gs), target=target, **options)
                assert_bytes_equal(bits(got), bits(want), label)
                mask = fake_quantize_poisoned(cp, cp.asarray(x_host), cp.asarray(gs), mask=True, target=target,
                                              **options)
                assert_bytes_equal(mask, want_mask, f"{label}: mask")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
@pytest.mark.parametrize("m, n", [(2, 16), (129, 80), (31, 7152), (150, 100), (1000, 8192)])
def test_saturation_mask_matches_golden(cp, m, n, dtype, fmt):
    """Global scales 4x the calibrated one, so that blocks saturate; every
    kind of scale; infinities (specials). n = 100: the element path."""
    import nvfp4_cupy as nv

    rng = np.random.default_rng(m + n)
    x_host = make_input("specials" if m % 2 else "outliers", m, n, seed=m * n).astype(HOST_DTYPES[dtype])
    x_host[0, :2] = [np.inf, -np.inf]
    for scale_kind in SCALE_KINDS if fmt == "nvfp4" else ("mx",):
        shaped, gs_host, _ = (x_host, None, None) if fmt == "mxfp4" else scale_case(x_host, scale_kind, "device", rng)
        if gs_host is not None:
            gs_host = (np.float32(4) * np.asarray(gs_host, np.float32)).astype(np.float32)
        want = fused.saturation_mask(shaped, gs_host, fmt=fmt)
        assert want.any()
        got = fake_quantize_poisoned(cp, cp.asarray(shaped), device_scale(cp, gs_host), mask=True, fmt=fmt)
        assert_bytes_equal(got, want.astype(np.uint8), f"{dtype} {fmt} {m}x{n} scale={scale_kind} mask")
        public = nv.saturation_mask(cp.asarray(shaped), device_scale(cp, gs_host), fmt=fmt)
        assert public.dtype == np.bool_ and public.shape == shaped.shape
        assert_bytes_equal(cp.asnumpy(public).view(np.uint8), want.view(np.uint8), "public saturation_mask")


@pytest.mark.gpu
def test_strided_rows_unaligned_base_streams_and_outputs(cp):
    import nvfp4_cupy as nv

    host = make_input("outliers", 40, 384, seed=7).astype(np.float16)
    wide = cp.asarray(host)
    view = wide[:, :256]  # a column slice of a wider activation: read in place
    want = fused.fake_quantize(host[:, :256], 50.0)
    assert_bytes_equal(bits(fake_quantize_poisoned(cp, view, 50.0)), bits(want), "strided rows")
    flat = cp.asarray(host.reshape(-1))
    unaligned = flat[3 : 3 + 17 * 64].reshape(17, 64)  # 6 bytes past an aligned address: element accesses
    assert unaligned.data.ptr % 16
    want = fused.fake_quantize(host.reshape(-1)[3 : 3 + 17 * 64].reshape(17, 64), 20.0)
    assert_bytes_equal(bits(fake_quantize_poisoned(cp, unaligned, 20.0)), bits(want), "unaligned base")
    three_d = cp.asarray(host.reshape(4, 10, 384))
    got = nv.fake_quantize(three_d, 30.0)
    assert got.shape == (4, 10, 384)
    assert_bytes_equal(bits(cp.asnumpy(got)), bits(fused.fake_quantize(host.reshape(4, 10, 384), 30.0)), "3-D")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(host) * 1  # produced on the side stream
    got = nv.fake_quantize(x, 30.0, stream=stream)
    stream.synchronize()
    assert_bytes_equal(bits(cp.asnumpy(got)), bits(fused.fake_quantize(host, 30.0)), "side stream")


@pytest.mark.gpu
def test_empty_input_launches_nothing(cp):
    import nvfp4_cupy as nv

    for shape in ((0, 64), (3, 0, 16), (0, 2, 5)):
        for fmt in FORMATS:
            got = nv.fake_quantize(cp.zeros(shape, cp.float16), fmt=fmt)
            assert got.shape == shape and got.dtype == np.float16
            mask = nv.saturation_mask(cp.zeros(shape, cp.float32), fmt=fmt)
            assert mask.shape == shape and mask.dtype == np.bool_


def _bad_calls(cp):
    import nvfp4_cupy as nv

    x = cp.ones((4, 32), cp.float16)
    return [
        ("int dtype", lambda: nv.fake_quantize(cp.ones((4, 16), cp.int32), 1.0), TypeError,
         "x must be float16, bfloat16 or float32, got dtype int32"),
        ("0-d", lambda: nv.fake_quantize(cp.ones((), cp.float32), 1.0), ValueError, "at least one dimension"),
        ("n = 0", lambda: nv.fake_quantize(cp.ones((4, 0), cp.float16), 1.0), ValueError, "must be positive"),
        ("strided last dim", lambda: nv.fake_quantize(cp.ones((4, 64), cp.float16)[:, ::2], 1.0), ValueError,
         "last dimension must be contiguous"),
        ("te 16x16 tiles, a scale per expert", lambda: nv.fake_quantize(
            cp.ones((2, 4, 32), cp.float16), cp.ones(2, cp.float32), numerics="te", tile="16x16"),
         ValueError, "not available on the GPU yet"),
        ("rht with n not a multiple of 16", lambda: nv.fake_quantize(cp.ones((4, 24), cp.float16), numerics="te",
                                                                     rht=True), ValueError, "multiple of 16"),
        ("4over6 with a global scale", lambda: nv.fake_quantize(x, 1.0, numerics="te", four_over_six=True),
         ValueError, "global_amax"),
        ("4over6 amax shape", lambda: nv.fake_quantize(x, numerics="te", four_over_six=True,
                                                       global_amax=cp.ones(3, cp.float32)), ValueError, "one per row"),
        ("4over6 amax dtype", lambda: nv.fake_quantize(x, numerics="te", four_over_six=True,
                                                       global_amax=cp.ones(1, cp.float16)), TypeError, "float32"),
        ("stochastic without a seed", lambda: nv.fake_quantize(x, rounding="stochastic"), ValueError, "seed"),
        ("te per-row scale without row_scaled", lambda: nv.fake_quantize(x, cp.ones(4, cp.float32), numerics="te"),
         ValueError, "row_scaled"),
        ("te per-row scales of each expert", lambda: nv.fake_quantize(
            cp.ones((2, 4, 32), cp.float16), cp.ones((2, 4), cp.float32), numerics="te", row_scaled=True),
         ValueError, "not available on the GPU yet"),
        ("scale with mxfp4", lambda: nv.fake_quantize(x, 1.0, fmt="mxfp4"), ValueError, "global_scale must be None"),
        ("host scale value", lambda: nv.fake_quantize(x, float("nan")), ValueError, "finite and > 0"),
        ("scale dtype", lambda: nv.fake_quantize(x, cp.ones(1, cp.float16)), TypeError, "must be float32"),
        ("scale shape", lambda: nv.fake_quantize(x, cp.ones(3, cp.float32)), ValueError, "one per row"),
        ("out dtype", lambda: nv.fake_quantize(x, 1.0, out=cp.empty((4, 32), cp.float32)), TypeError,
         "out must have dtype float16"),
        ("out shape", lambda: nv.fake_quantize(x, 1.0, out=cp.empty((4, 16), cp.float16)), ValueError,
         r"out must have shape \(4, 32\)"),
        ("mask out dtype", lambda: nv.saturation_mask(x, 1.0, out=cp.empty((4, 32), cp.uint8)), TypeError,
         "out must have dtype bool"),
        ("mask option", lambda: nv.saturation_mask(x, 1.0, numeric="te"), TypeError, "unexpected keyword"),
        ("mask with rht", lambda: nv.saturation_mask(x, numerics="te", rht=True), ValueError, "not defined"),
    ]


@pytest.mark.gpu
def test_bad_input_is_refused_before_launch(cp):
    for case, call, error, match in _bad_calls(cp):
        with pytest.raises(error, match=match):
            call()
    import nvfp4_cupy as nv

    # An output overlapping x is refused, and left as it was.
    buffer = cp.ones((8, 32), cp.float16)
    with pytest.raises(ValueError, match="out overlaps x"):
        nv.fake_quantize(buffer[:4], 1.0, out=buffer[2:6])
    assert bool((buffer == 1).all())


# ---------------------------------------------------------------------------
# GPU, torch
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nvt(cp):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    import nvfp4_cupy.torch as nvt

    return torch, nvt


@pytest.mark.gpu
@pytest.mark.parametrize("zero_saturated", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", sorted(HOST_DTYPES))
def test_torch_forward_and_backward_match_golden(nvt, dtype, fmt, zero_saturated):
    torch, nvt = nvt
    rng = np.random.default_rng(len(dtype))
    host = make_input("specials", 130, 7152, seed=12).astype(HOST_DTYPES[dtype])
    host[3, 5], host[7, 100] = np.inf, -np.inf
    grad_host = make_input("normal", 130, 7152, seed=13).astype(host.dtype)
    for scale_kind in SCALE_KINDS if fmt == "nvfp4" else ("mx",):
        shaped, gs_host, _ = (host, None, None) if fmt == "mxfp4" else scale_case(host, scale_kind, "host", rng)
        if isinstance(gs_host, float):
            gs_host = 4 * gs_host  # saturating
        grad_shaped = grad_host.reshape(shaped.shape)
        gs = gs_host if not isinstance(gs_host, np.ndarray) else torch.from_numpy(gs_host).cuda()
        x = _host_to_torch(shaped, "cuda").requires_grad_()
        y = nvt.fake_quantize(x, gs, zero_saturated=zero_saturated, fmt=fmt)
        label = f"{dtype} {fmt} scale={scale_kind} zero_saturated={zero_saturated}"
        assert_bytes_equal(bits(_torch_to_host(y)), bits(fused.fake_quantize(shaped, gs_host, fmt=fmt)), label)
        y.backward(_host_to_torch(grad_shaped, "cuda"))
        want = fused.fake_quantize_backward(grad_shaped, shaped, gs_host, zero_saturated=zero_saturated, fmt=fmt)
        assert_bytes_equal(bits(_torch_to_host(x.grad)), bits(want), f"{label}: gradient")
        if zero_saturated:
            mask = nvt.saturation_mask(_host_to_torch(shaped, "cuda"), gs, fmt=fmt)
            assert mask.dtype == torch.bool
            assert_bytes_equal(mask.cpu().numpy().view(np.uint8),
                               fused.saturation_mask(shaped, gs_host, fmt=fmt).view(np.uint8), f"{label}: mask")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["4over6 MAE", "4over6 MSE 256", "rht", "rht float32"])
def test_torch_four_over_six_and_rht_eager_and_compiled(nvt, variant):
    """Four Over Six and the RHT through the torch ops, eager and under
    torch.compile (the global amax a CUDA tensor, or computed): forward
    bytes and the gradient (Four Over Six's zero_saturated mask) equal the
    golden model's."""
    torch, nvt = nvt
    options, _ = AMAX_VARIANTS[variant]
    host = make_input("outliers", 130, 7168, seed=14).astype(HOST_DTYPES["bfloat16"])
    masked = bool(options.get("four_over_six"))
    amax_host = np.array([np.max(np.abs(host.astype(np.float32))) / 4], np.float32) if masked else None
    amax = None if amax_host is None else torch.from_numpy(amax_host).cuda()
    want = fused.fake_quantize(host, global_amax=amax_host, **options)
    want_grad = fused.fake_quantize_backward(np.ones_like(host), host, zero_saturated=masked, global_amax=amax_host,
                                             **options)
    assert not masked or not np.array_equal(bits(want_grad), bits(np.ones_like(host)))  # some values saturate

    def step(x, amax):
        return nvt.fake_quantize(x, zero_saturated=masked, global_amax=amax, **options)

    torch._dynamo.reset()
    for run in (step, torch.compile(step, fullgraph=True)):
        x = _host_to_torch(host, "cuda").requires_grad_()
        y = run(x, amax)
        assert_bytes_equal(bits(_torch_to_host(y)), bits(want), f"{variant} forward through {run}")
        y.sum().backward()
        assert_bytes_equal(bits(_torch_to_host(x.grad)), bits(want_grad), f"{variant} gradient through {run}")


@pytest.mark.gpu
def test_torch_compile_has_no_graph_break_and_matches_eager(nvt):
    torch, nvt = nvt
    host = make_input("outliers", 64, 4096, seed=14).astype(HOST_DTYPES["bfloat16"])
    gs = torch.tensor([4 * global_scale_for(host.astype(np.float32))], device="cuda")

    def step(x, gs):
        return nvt.fake_quantize(x * 2, gs, zero_saturated=True) * 3

    x = _host_to_torch(host, "cuda").requires_grad_()
    explanation = torch._dynamo.explain(step)(x, gs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for run in (step, compiled):
        x = _host_to_torch(host, "cuda").requires_grad_()
        y = run(x, gs)
        y.sum().backward()
        results.append((_torch_to_host(y), _torch_to_host(x.grad)))
    (eager_y, eager_grad), (compiled_y, compiled_grad) = results
    assert_bytes_equal(bits(compiled_y), bits(eager_y), "torch.compile forward vs eager")
    assert_bytes_equal(bits(compiled_grad), bits(eager_grad), "torch.compile gradient vs eager")
    doubled = (host.astype(np.float32) * 2).astype(host.dtype)
    want = (fused.fake_quantize(doubled, gs.cpu().numpy()).astype(np.float32) * 3).astype(host.dtype)
    assert_bytes_equal(bits(eager_y), bits(want), "forward vs golden")


@pytest.mark.gpu
def test_torch_training_loop_eager_and_compiled(nvt):
    """Three SGD steps of a Linear layer with fake-quantized weights: the
    forward, loss.backward() and the optimizer step run in eager and in
    compiled mode and give the same losses (inductor may round the loss's
    mean differently from eager: a tolerance on the loss only)."""
    torch, nvt = nvt
    eager = _fake_quantized_linear(torch, nvt, "cuda")
    model = copy.deepcopy(eager)

    def forward(inputs):
        return model(inputs)

    explanation = torch._dynamo.explain(forward)(torch.randn(8, 64, device="cuda"))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    eager_losses = _train(torch, nvt, eager)
    compiled_losses = _train(torch, nvt, compiled)
    assert eager_losses[-1] < eager_losses[0]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_torch_bad_input_is_refused_before_launch(nvt):
    torch, nvt = nvt
    x = torch.ones(4, 32, device="cuda")
    with pytest.raises(TypeError, match="x is a cpu tensor"):
        nvt.fake_quantize(torch.ones(4, 32))
    with pytest.raises(TypeError, match="zero_saturated must be a bool"):
        nvt.fake_quantize(x, zero_saturated=1)
    with pytest.raises(ValueError, match="not available on the GPU yet"):
        nvt.fake_quantize(x.reshape(2, 2, 32), torch.ones(2, device="cuda"), numerics="te", tile="16x16")
    with pytest.raises(ValueError, match="global_amax"):
        nvt.fake_quantize(x, 1.0, numerics="te", rht=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        nvt.fake_quantize(x, numeric="te")
