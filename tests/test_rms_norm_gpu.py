"""RMSNorm on the GPU (cuda_src/rms_norm.cu, ops/rms_norm.py) against the
golden model (reference.fused, docs/fused_ops.md section 3), bit for bit:
rms_norm's values and rms_norm_quant's bytes, with and without weight and
residual, every global-scale form, layout and format, K padding, rows longer
than the kernel keeps in registers, special values; the fused bytes against our
own GPU rms_norm then scaled_fp4_quant; the new residual written in place and
x untouched; every output buffer poisoned (twice, with different bytes) before
each launch; bad input refused before anything is written; the torch entry
points and torch.compile."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from nvfp4_cupy._format import LAYOUTS, NUMPY_DTYPES, round_up
from nvfp4_cupy._runtime.compile import SOFTWARE
from nvfp4_cupy.reference import fused as F

pytestmark = pytest.mark.gpu
cp = import_cupy()

EPS = 1e-6
DTYPES = sorted(NUMPY_DTYPES)
LAYOUT_NAMES = tuple(LAYOUTS)
# (shape, padded_n): short and long rows, n not a multiple of 16 (K padding)
# or of 8 (element loads), 5120 + 8, rows past what the kernel keeps in
# registers (8192 values: a second read), [E, m, n] batches (per-expert scales).
SHAPES = (
    ((1, 16), None),
    ((3, 48), None),
    ((129, 40), 64),
    ((7, 33), 96),
    ((300, 4096), None),
    ((64, 7168), None),
    ((17, 5128), None),
    ((8, 7152), 7168),
    ((4, 8208), None),
    ((2, 16384), None),
    ((2, 20000), None),
    ((2, 3, 160), None),
    ((3, 130, 48), 64),
)
SMALL = 1 << 15  # shapes with at most this many values get every layout


def bits(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array)).view(np.uint8)


def host_data(shape, dtype: str, rng, kind: str = "normal") -> np.ndarray:
    values = rng.standard_normal(shape)
    if kind == "heavy":  # a wide dynamic range, as LLM activations have
        values = values * np.exp(2 * rng.standard_normal(shape))
    return values.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def poisoned(shape, dtype, poison: int):
    host = np.zeros(shape, dtype)
    host.view(np.uint8)[...] = poison
    return cp.asarray(host)


def scale_forms(shape, rng) -> list:
    """(name, host form, device form) of every global scale x of this shape takes."""
    m = math.prod(shape[:-1])
    forms = [("host", 37.5, 37.5), ("one", np.array([0.75], np.float32)),
             ("row", rng.uniform(0.5, 200, m).astype(np.float32))]
    if len(shape) == 3:
        forms.append(("expert", rng.uniform(0.5, 200, shape[0]).astype(np.float32)))
    return [form if len(form) == 3 else (*form, cp.asarray(form[1])) for form in forms]


def gpu_rms_norm(x, weight, eps, residual_host):
    """nv.rms_norm into poisoned outputs, once per poison (a fresh device
    residual each time); both runs must agree. Returns host (out, z)."""
    import nvfp4_cupy as nv

    runs = []
    for poison in POISONS:
        out = poisoned(x.shape, x.dtype, poison)
        residual = None if residual_host is None else cp.asarray(residual_host)
        result = nv.rms_norm(x, weight, eps, residual, out=out)
        if residual is None:
            assert result is out
        else:
            assert result[0] is out and result[1] is residual
        runs.append((cp.asnumpy(out), None if residual is None else cp.asnumpy(residual)))
    assert_bytes_equal(bits(runs[0][0]), bits(runs[1][0]), "rms_norm out under two poisons (unwritten bytes)")
    return runs[0]


def gpu_rms_norm_quant(x, weight, eps, global_scale, residual_host, shapes, *, target=None, padded_n=None,
                       layout="swizzled", fmt="nvfp4"):
    """rms_norm_quant into poisoned outputs of these shapes, once per poison
    (a fresh device residual each time); both runs must agree. Returns host
    (packed, scales, z or None)."""
    from nvfp4_cupy.ops.rms_norm import prepare_rms_norm_quant

    runs = []
    for poison in POISONS:
        out, out_scale = (poisoned(shape, np.uint8, poison) for shape in shapes)
        residual = None if residual_host is None else cp.asarray(residual_host)
        launch, result = prepare_rms_norm_quant(x, weight, eps, global_scale, True, padded_n, layout, fmt, residual,
                                                out, out_scale, None, None, target)
        launch()
        assert result[0] is out and result[1] is out_scale
        assert residual is None or result[2] is residual
        runs.append((cp.asnumpy(out), cp.asnumpy(out_scale), None if residual is None else cp.asnumpy(residual)))
    assert_bytes_equal(runs[0][0], runs[1][0], "packed under two poisons (unwritten bytes)")
    assert_bytes_equal(runs[0][1], runs[1][1], "scales under two poisons (unwritten bytes)")
    return runs[0]


def check_case(x_host, w_host, r_host, gs_host, gs_device, *, padded_n, layout, fmt, label, eps=EPS, target=None,
               x=None):
    """Fused GPU == golden (bytes and new residual), GPU rms_norm == golden
    (values), fused == our GPU rms_norm then scaled_fp4_quant; x untouched.
    `x`: the device x (default: a copy of x_host)."""
    import nvfp4_cupy as nv

    x = cp.asarray(x_host) if x is None else x
    w = None if w_host is None else cp.asarray(w_host)
    want = F.rms_norm_quant(x_host, w_host, eps, gs_host, padded_n=padded_n, layout=layout, fmt=fmt,
                            residual=r_host)
    packed, scales, z = gpu_rms_norm_quant(x, w, eps, gs_device, r_host, (want[0].shape, want[1].shape),
                                           target=target, padded_n=padded_n, layout=layout, fmt=fmt)
    assert_bytes_equal(packed, want[0], f"{label}: packed")
    assert_bytes_equal(scales, want[1], f"{label}: scales")
    if r_host is not None:
        assert_bytes_equal(bits(z), bits(want[2]), f"{label}: new residual")
    assert_bytes_equal(bits(cp.asnumpy(x)), bits(x_host), f"{label}: x was written")

    normed, normed_z = gpu_rms_norm(x, w, eps, r_host)
    want_normed = F.rms_norm(x_host, w_host, eps, residual=r_host)
    want_out = want_normed if r_host is None else want_normed[0]
    assert_bytes_equal(bits(normed), bits(want_out), f"{label}: rms_norm values")
    if r_host is not None:
        assert_bytes_equal(bits(normed_z), bits(want_normed[1]), f"{label}: rms_norm new residual")
    unfused = nv.scaled_fp4_quant(cp.asarray(normed), gs_device, padded_n=padded_n, layout=layout, fmt=fmt)
    assert_bytes_equal(cp.asnumpy(unfused[0]), packed, f"{label}: fused vs rms_norm + scaled_fp4_quant, packed")
    assert_bytes_equal(cp.asnumpy(unfused[1]), scales, f"{label}: fused vs rms_norm + scaled_fp4_quant, scales")


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, padded_n", SHAPES, ids=[f"{'x'.join(map(str, s))}-p{p}" for s, p in SHAPES])
def test_matches_golden_bit_for_bit(shape, padded_n, dtype, fmt):
    """Every weight x residual combination; the global-scale forms and (for
    large shapes) the layouts rotate over them, small shapes take every layout."""
    index = SHAPES.index((shape, padded_n))
    rng = np.random.default_rng(100 * index + 10 * DTYPES.index(dtype) + (fmt == "mxfp4"))
    block = 16 if fmt == "nvfp4" else 32
    k = None if padded_n is None else round_up(padded_n, block)
    x_host = host_data(shape, dtype, rng, "heavy")
    forms = [("mx", None, None)] if fmt == "mxfp4" else scale_forms(shape, rng)
    for combo, (with_weight, with_residual) in enumerate(itertools.product((False, True), (False, True))):
        w_host = host_data((shape[-1],), dtype, rng) if with_weight else None
        r_host = host_data(shape, dtype, rng) if with_residual else None
        name, gs_host, gs_device = forms[combo % len(forms)]
        layouts = LAYOUT_NAMES if math.prod(shape) <= SMALL else (LAYOUT_NAMES[(index + combo) % 3],)
        for layout in layouts:
            check_case(x_host, w_host, r_host, gs_host, gs_device, padded_n=k, layout=layout, fmt=fmt,
                       label=f"{dtype} {shape} p{k} {fmt} weight={with_weight} residual={with_residual} "
                             f"gs={name} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_software_conversions_match(dtype):
    """The sm_80 path (software E4M3 and E2M1), run on whatever GPU this is."""
    rng = np.random.default_rng(3)
    shape = (150, 7152)
    x_host = host_data(shape, dtype, rng, "heavy")
    w_host = host_data((7152,), dtype, rng)
    r_host = host_data(shape, dtype, rng)
    gs = rng.uniform(0.5, 200, 150).astype(np.float32)
    for fmt, gs_host, gs_device in (("nvfp4", gs, cp.asarray(gs)), ("mxfp4", None, None)):
        check_case(x_host, w_host, r_host, gs_host, gs_device, padded_n=7168, layout="swizzled", fmt=fmt,
                   label=f"{dtype} software {fmt}", target=SOFTWARE)


def test_strided_and_unaligned_x():
    """A column slice of a wider activation (rows 16-byte aligned) and a base
    2 bytes past an aligned address (the element-load kernel)."""
    rng = np.random.default_rng(4)
    wide = host_data((40, 384), "bfloat16", rng, "heavy")
    r_host = host_data((40, 256), "bfloat16", rng)
    w_host = host_data((256,), "bfloat16", rng)
    view = cp.asarray(wide)[:, :256]
    check_case(np.ascontiguousarray(wide[:, :256]), w_host, r_host, 20.0, 20.0, padded_n=None, layout="linear",
               fmt="nvfp4", label="column slice", x=view)
    flat = host_data((17 * 64 + 1,), "float16", rng, "heavy")
    x = cp.asarray(flat)[1:].reshape(17, 64)
    assert x.data.ptr % 16
    check_case(flat[1:].reshape(17, 64), host_data((64,), "float16", rng), host_data((17, 64), "float16", rng),
               5.0, 5.0, padded_n=96, layout="8x4", fmt="nvfp4", label="unaligned base", x=x)


# ---------------------------------------------------------------------------
# Special values (docs/fused_ops.md, section 3.6)
# ---------------------------------------------------------------------------
NAN_PAYLOADS = {"float16": (0x7C01, 0xFFFF), "bfloat16": (0x7F81, 0xFFFF), "float32": (0x7F800001, 0xFFFFFFFF)}


def special_rows(dtype: str, n: int) -> np.ndarray:
    """Rows that reach every special case of section 3.6, as float32 cast to
    dtype, with non-canonical NaN payloads set in the dtype's bits."""
    t = NUMPY_DTYPES[dtype]
    rows = np.ones((10, n), np.float32)
    rows[0] = 0.0  # zeros: NaN with eps = 0, zeros with eps > 0
    rows[1, :] = -0.0
    rows[2, 5] = np.inf  # S = inf: inv = 0, finite values -> +-0, inf -> NaN
    rows[3, 7] = -np.inf
    rows[3, 8] = np.inf
    rows[5] = np.linspace(-3, 3, n)
    rows[6] = np.float32(1e-7) if dtype != "float32" else np.float32(1e-41)  # subnormal in T (or its square is 0)
    rows[7] = np.float32(3e19) if dtype == "float32" else np.float32(60000 if dtype == "float16" else 1e38)
    rows[8] = np.linspace(-1e-3, 5e-3, n)
    rows[9, ::3] = 0.0
    out = rows.astype(t)
    payload, negative = NAN_PAYLOADS[dtype]
    raw = out.view({2: np.uint16, 4: np.uint32}[out.itemsize])
    raw[4, 3] = payload  # a NaN anywhere makes the row NaN
    raw[9, 1] = negative
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    n = 48
    x_host = special_rows(dtype, n)
    rng = np.random.default_rng(5)
    weight = host_data((n,), dtype, rng)
    big = np.full(n, 60000 if dtype == "float16" else 3e38, np.float32).astype(NUMPY_DTYPES[dtype])  # products overflow
    residual = special_rows(dtype, n)[::-1].copy()  # inf + -inf, NaN + finite, ...
    for eps, w_host, r_host, fmt in itertools.product((0.0, 1e-5), (None, weight, big), (None, residual),
                                                     ("nvfp4", "mxfp4")):
        gs = (None, None) if fmt == "mxfp4" else (3.0, cp.asarray(np.array([3.0], np.float32)))
        label = (f"{dtype} specials eps={eps} weight={'none' if w_host is None else w_host[0]} "
                 f"residual={r_host is not None} {fmt}")
        check_case(x_host, w_host, r_host, gs[0], gs[1], padded_n=64, layout="linear", fmt=fmt, label=label,
                   eps=eps)


def test_zero_rows_with_eps_zero_are_nan():
    """docs/fused_ops.md section 3.6 stated directly: 0 * inf."""
    import nvfp4_cupy as nv

    x = cp.zeros((3, 32), cp.float16)
    out = cp.asnumpy(nv.rms_norm(x, None, 0.0))
    assert np.all(out.view(np.uint16) == 0x7E00)
    packed, scales = nv.rms_norm_quant(x, None, 0.0, 1.0, layout="linear")
    assert np.all(cp.asnumpy(scales) == 0x7F) and np.all(cp.asnumpy(packed) == 0)
    assert np.all(cp.asnumpy(nv.rms_norm(x, None, 1e-6)) == 0)


# ---------------------------------------------------------------------------
# Outputs the call allocates, empty input, the expert batch's shapes
# ---------------------------------------------------------------------------
def test_default_outputs_are_every_byte_written():
    """Without out=: every allocation the calls make is poisoned first."""
    import nvfp4_cupy as nv

    rng = np.random.default_rng(6)
    x_host = host_data((150, 7152), "bfloat16", rng, "heavy")
    r_host = host_data((150, 7152), "bfloat16", rng)
    w_host = host_data((7152,), "bfloat16", rng)
    x, w, r = cp.asarray(x_host), cp.asarray(w_host), cp.asarray(r_host)
    pool = cp.get_default_memory_pool()

    def poisoning_malloc(nbytes):
        memory = pool.malloc(nbytes)
        memory.memset_async(POISONS[0], nbytes)
        return memory

    with cp.cuda.using_allocator(poisoning_malloc):
        packed, scales, same = nv.rms_norm_quant(x, w, EPS, 12.0, padded_n=7168, residual=r)
        out = nv.rms_norm(x, w, EPS)
    assert same is r
    want = F.rms_norm_quant(x_host, w_host, EPS, 12.0, padded_n=7168, residual=r_host)
    assert packed.shape == (150, 3584) and scales.shape == (256, 448)
    assert_bytes_equal(cp.asnumpy(packed), want[0], "packed")
    assert_bytes_equal(cp.asnumpy(scales), want[1], "scales")
    assert_bytes_equal(bits(cp.asnumpy(r)), bits(want[2]), "new residual")
    assert_bytes_equal(bits(cp.asnumpy(out)), bits(F.rms_norm(x_host, w_host, EPS)), "rms_norm")


@pytest.mark.parametrize("shape, gs", [((0, 64), 1.0), ((2, 0, 32), "expert"), ((0, 3, 32), "expert"),
                                       ((0, 40), None)])
def test_empty_input_launches_nothing(shape, gs):
    import nvfp4_cupy as nv

    x_host = np.zeros(shape, np.float16)
    fmt = "mxfp4" if gs is None else "nvfp4"
    gs_host = np.ones(shape[0], np.float32) if gs == "expert" else gs
    gs_device = cp.asarray(gs_host) if gs == "expert" else gs
    x, residual = cp.asarray(x_host), cp.asarray(x_host)
    packed, scales, same = nv.rms_norm_quant(x, None, EPS, gs_device, fmt=fmt, residual=residual)
    want = F.rms_norm_quant(x_host, None, EPS, gs_host, fmt=fmt, residual=x_host)
    assert packed.shape == want[0].shape and scales.shape == want[1].shape and same is residual
    assert_bytes_equal(cp.asnumpy(scales), want[1], "empty scales")  # expert batches of 0 rows: 0 scale rows
    out = nv.rms_norm(x, None, EPS)
    assert out.shape == shape and out.dtype == x.dtype


# ---------------------------------------------------------------------------
# Bad input: refused before anything is written
# ---------------------------------------------------------------------------
def _bad_calls():
    def f16(*shape):
        return cp.asarray(np.ones(shape, np.float16))

    return [
        ("weight length", lambda nv, o: nv.rms_norm_quant(f16(4, 32), f16(31), EPS, 1.0, **o), ValueError,
         r"weight must have shape \(32,\)"),
        ("weight dtype", lambda nv, o: nv.rms_norm_quant(f16(4, 32), f16(32).astype(cp.float32), EPS, 1.0, **o),
         TypeError, "weight must have x's dtype float16"),
        ("weight int", lambda nv, o: nv.rms_norm_quant(f16(4, 32), cp.ones(32, cp.int32), EPS, 1.0, **o),
         TypeError, "weight must be float16, bfloat16 or float32"),
        ("weight on the host", lambda nv, o: nv.rms_norm_quant(f16(4, 32), np.ones(32, np.float16), EPS, 1.0, **o),
         TypeError, "weight is a NumPy"),
        ("weight strided", lambda nv, o: nv.rms_norm_quant(f16(4, 32), f16(64)[::2], EPS, 1.0, **o), ValueError,
         "weight must be C-contiguous"),
        ("eps negative", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, -1e-6, 1.0, **o), ValueError,
         "eps must be finite and >= 0"),
        ("eps NaN", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, float("nan"), 1.0, **o), ValueError,
         "eps must be finite and >= 0"),
        ("eps bool", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, True, 1.0, **o), TypeError,
         "eps must be a float"),
        ("residual shape", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 1.0, residual=f16(3, 32), **o),
         ValueError, r"residual must have shape \(4, 32\)"),
        ("residual dtype", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 1.0,
                                                          residual=f16(4, 32).astype(cp.float32), **o),
         TypeError, "residual must have x's dtype"),
        ("global scale", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 0.0, **o), ValueError,
         "global_scale must be finite and > 0"),
        ("mxfp4 scale", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 1.0, fmt="mxfp4", **o), ValueError,
         "global_scale must be None"),
        ("padded_n", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 1.0, padded_n=40, **o), ValueError,
         "padded_n must be a multiple of 16"),
        ("layout", lambda nv, o: nv.rms_norm_quant(f16(4, 32), None, EPS, 1.0, layout="4x4", **o), ValueError,
         "layout must be one of"),
    ]


@pytest.mark.parametrize("case, call, error, match", _bad_calls(), ids=lambda c: c if isinstance(c, str) else "")
def test_bad_input_is_refused_and_nothing_is_written(case, call, error, match):
    import nvfp4_cupy as nv

    out, out_scale = poisoned((4, 16), np.uint8, POISONS[0]), poisoned((128, 4), np.uint8, POISONS[0])
    cp.cuda.Device().synchronize()
    with pytest.raises(error, match=match):
        call(nv, dict(out=out, out_scale=out_scale))
    cp.cuda.Device().synchronize()
    assert np.all(cp.asnumpy(out) == POISONS[0]) and np.all(cp.asnumpy(out_scale) == POISONS[0])


def test_residual_overlapping_x_is_refused_and_nothing_is_written():
    import nvfp4_cupy as nv

    host = np.arange(8 * 32, dtype=np.float32).astype(np.float16).reshape(8, 32)
    buffer = cp.asarray(host)
    x, overlapping = buffer[:4], buffer[3:7]  # one shared row
    out = poisoned((4, 32), np.float16, POISONS[0])
    for residual in (x, overlapping):
        with pytest.raises(ValueError, match="residual overlaps x in device memory"):
            nv.rms_norm(x, None, EPS, residual, out=out)
        with pytest.raises(ValueError, match="residual overlaps x in device memory"):
            nv.rms_norm_quant(x, None, EPS, 1.0, residual=residual)
    cp.cuda.Device().synchronize()
    assert_bytes_equal(bits(cp.asnumpy(buffer)), bits(host), "x and residual after the refusals")
    assert np.all(bits(cp.asnumpy(out)) == POISONS[0])
    with pytest.raises(ValueError, match="residual must be C-contiguous"):
        nv.rms_norm(x, None, EPS, cp.asarray(np.ones((32, 4), np.float16)).T)


def test_weight_on_another_device_is_refused():
    import nvfp4_cupy as nv

    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: no second device to put weight on")
    x = cp.ones((4, 32), cp.float16)
    with cp.cuda.Device(1):
        weight = cp.ones(32, cp.float16)
    with pytest.raises(ValueError, match="weight is on device 1 but x is on device 0"):
        nv.rms_norm_quant(x, weight, EPS, 1.0)


# ---------------------------------------------------------------------------
# torch: the eager functions, the registered ops, torch.compile
# ---------------------------------------------------------------------------
def _to_torch(torch, host: np.ndarray):
    """A CUDA tensor of host's dtype and bits (NumPy has no bfloat16 torch knows)."""
    dtype_name = next(name for name, dtype in NUMPY_DTYPES.items() if dtype == host.dtype)
    tensor = torch.from_numpy(host.view({2: np.int16, 4: np.int32}[host.itemsize]).copy()).cuda()
    return tensor.view(getattr(torch, dtype_name))


def _from_torch(tensor) -> np.ndarray:
    """Host bits of a torch tensor: integers of the float's width, uint8 as is."""
    import torch

    if tensor.dtype.is_floating_point:
        tensor = tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])
    return tensor.cpu().numpy()


@pytest.mark.parametrize("entry", ["eager", "torch.ops"])
def test_torch_entry_points(torch_cuda, entry):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    rng = np.random.default_rng(7)
    shape = (70, 7168)
    x_host, r_host = host_data(shape, "bfloat16", rng, "heavy"), host_data(shape, "bfloat16", rng)
    w_host = host_data((7168,), "bfloat16", rng)
    gs_host = rng.uniform(0.5, 200, 70).astype(np.float32)
    x, w, r = (_to_torch(torch, a) for a in (x_host, w_host, r_host))
    gs = torch.from_numpy(gs_host).cuda()
    if entry == "eager":
        packed, scales, same = nvt.rms_norm_quant(x, w, EPS, gs, layout="8x4", residual=r)
        assert same is r
        r2 = _to_torch(torch, r_host)
        out, same2 = nvt.rms_norm(x, w, EPS, residual=r2)
        assert same2 is r2
    else:
        packed, scales = torch.ops.nvfp4.fused_add_rms_norm_quant(x, w, EPS, gs, 0.0, None, "8x4", "nvfp4", r)
        r2 = _to_torch(torch, r_host)
        out = torch.ops.nvfp4.fused_add_rms_norm(x, w, EPS, r2)
    want = F.rms_norm_quant(x_host, w_host, EPS, gs_host, layout="8x4", residual=r_host)
    assert packed.dtype == torch.uint8 and packed.is_cuda
    assert_bytes_equal(_from_torch(packed), want[0], f"{entry} packed")
    assert_bytes_equal(_from_torch(scales), want[1], f"{entry} scales")
    assert_bytes_equal(bits(_from_torch(r)), bits(want[2]), f"{entry} new residual")
    want_out, want_z = F.rms_norm(x_host, w_host, EPS, residual=r_host)
    assert_bytes_equal(bits(_from_torch(out)), bits(want_out), f"{entry} rms_norm")
    assert_bytes_equal(bits(_from_torch(r2)), bits(want_z), f"{entry} rms_norm new residual")
    mx = nvt.rms_norm_quant(x, w, EPS, None, fmt="mxfp4")
    want_mx = F.rms_norm_quant(x_host, w_host, EPS, None, fmt="mxfp4")
    assert_bytes_equal(_from_torch(mx[0]), want_mx[0], f"{entry} mxfp4 packed")


def test_torch_compile_without_a_graph_break(torch_cuda):
    torch = torch_cuda
    import nvfp4_cupy.torch as nvt

    rng = np.random.default_rng(8)
    shape = (64, 4096)
    x_host, r_host = host_data(shape, "bfloat16", rng, "heavy"), host_data(shape, "bfloat16", rng)
    w_host = host_data((4096,), "bfloat16", rng)
    x, w = _to_torch(torch, x_host), _to_torch(torch, w_host)
    gs = torch.tensor([9.0], device="cuda")

    def step(x, w, r, gs):
        packed, scales, _ = nvt.rms_norm_quant(x * 2, w, EPS, gs, residual=r)
        return packed, scales, nvt.rms_norm(x * 2, w, EPS)

    explanation = torch._dynamo.explain(step)(x, w, _to_torch(torch, r_host), gs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    residual = _to_torch(torch, r_host)
    # Inductor (torch 2.11) cannot lower an auto-functionalized op of ours
    # that mutates `residual` ("getitem is not an OpOverload"): the residual
    # form compiles with aot_eager (the same traced graph without inductor's
    # codegen); the plain ops, pure functions, with inductor.
    packed, scales, normed = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, residual, gs)
    plain = torch.compile(lambda x, w, gs: (nvt.rms_norm_quant(x * 2, w, EPS, gs), nvt.rms_norm(x * 2, w, EPS)),
                          fullgraph=True)
    (plain_packed, plain_scales), plain_normed = plain(x, w, gs)
    x2_host = (x_host.astype(np.float32) * 2).astype(x_host.dtype)
    want_plain = F.rms_norm_quant(x2_host, w_host, EPS, np.array([9.0], np.float32))
    assert_bytes_equal(_from_torch(plain_packed), want_plain[0], "torch.compile (inductor) packed")
    assert_bytes_equal(_from_torch(plain_scales), want_plain[1], "torch.compile (inductor) scales")
    assert_bytes_equal(bits(_from_torch(plain_normed)), bits(F.rms_norm(x2_host, w_host, EPS)),
                       "torch.compile (inductor) rms_norm")
    want = F.rms_norm_quant(x2_host, w_host, EPS, np.array([9.0], np.float32), residual=r_host)
    assert_bytes_equal(_from_torch(packed), want[0], "torch.compile packed")
    assert_bytes_equal(_from_torch(scales), want[1], "torch.compile scales")
    assert_bytes_equal(bits(_from_torch(residual)), bits(want[2]), "torch.compile new residual (in place)")
    assert_bytes_equal(bits(_from_torch(normed)), bits(F.rms_norm(x2_host, w_host, EPS)), "torch.compile rms_norm")
