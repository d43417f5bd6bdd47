"""nvfp4_cupy.checkpoint and the convert / dequantize-checkpoint / inspect
commands, checked by the formats' own libraries (compressed-tensors,
nvidia-modelopt, transformers) on a tiny random Llama made here (no download).
CPU tests use --cpu (the golden model); the GPU tests (marked gpu) check that
the GPU path writes the same bytes."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("compressed_tensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from nvfp4_cupy import reference as ref  # noqa: E402
from nvfp4_cupy._cli import main  # noqa: E402
from nvfp4_cupy.checkpoint import convert, dequantize_checkpoint, inspect_checkpoint  # noqa: E402
from nvfp4_cupy.checkpoint import safetensors_io  # noqa: E402
from nvfp4_cupy.checkpoint.convert import MANIFEST_FILE  # noqa: E402

convert_module = sys.modules["nvfp4_cupy.checkpoint.convert"]
from nvfp4_cupy.checkpoint.formats import compressed_tensors as ct_fmt  # noqa: E402
from nvfp4_cupy.checkpoint.formats import modelopt as mo_fmt  # noqa: E402

from test_cli_errors import expect_error  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama(path: Path, shard_size="1MB", dtype=torch.bfloat16) -> Path:
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, max_shard_size=shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for fmt in ("modelopt", "compressed-tensors"):
        out[fmt] = tmp_path_factory.mktemp("out") / fmt
        convert(model_dir, out[fmt], fmt, cpu=True, progress=False)
    return out


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _modules(tensors) -> list[str]:
    return sorted(n[: -len(".weight")] for n in tensors if n.endswith(".weight") and n.rpartition(".")[0].endswith(PROJ))


def _golden(weight: torch.Tensor, gs: np.float32):
    w = weight.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return ref.scaled_fp4_quant(w, np.array([gs], np.float32), layout="linear")


def _expected_global_scales(original) -> dict[str, np.float32]:
    """Our encode scale per module: 448*6/amax, shared by q/k/v and by gate/up (the largest amax)."""
    def gs(names):
        return min(np.float32(ref.compute_global_scale(
            original[f"{n}.weight"].view(torch.uint16).numpy().view(ml_dtypes.bfloat16))[0]) for n in names)

    out = {}
    for module in _modules(original):
        parent, _, leaf = module.rpartition(".")
        group = [f"{parent}.{x}" for x in (("q_proj", "k_proj", "v_proj") if leaf in ("q_proj", "k_proj", "v_proj")
                                           else ("gate_proj", "up_proj") if leaf in ("gate_proj", "up_proj") else (leaf,))]
        out[module] = gs(group)
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint16).numpy()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- the bytes: golden model, and each library's own dequantization ----------

def test_compressed_tensors_bytes_and_decompressor(model_dir, converted):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    original, ours = _all_tensors(model_dir), _all_tensors(converted["compressed-tensors"])
    config = json.loads((converted["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    expected_gs = _expected_global_scales(original)
    assert len(expected_gs) == 14
    for module, gs in expected_gs.items():
        packed, scale, glob = (ours[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert f"{module}.weight" not in ours
        assert packed.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn and glob.dtype == torch.float32
        assert tuple(glob.shape) == (1,) and glob.item() == gs  # the encode scale, [1]
        golden_packed, golden_scales = _golden(original[f"{module}.weight"], gs)
        np.testing.assert_array_equal(packed.numpy(), golden_packed)
        np.testing.assert_array_equal(scale.view(torch.uint8).numpy(), golden_scales)
        theirs = NVFP4PackedCompressor.decompress(
            {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": glob}, scheme)["weight"]
        mine = ct_fmt.dequantize(packed.numpy(), scale.view(torch.uint8).numpy(), glob.numpy()).astype(ml_dtypes.bfloat16)
        assert theirs.dtype == torch.bfloat16
        np.testing.assert_array_equal(_bits(theirs), mine.view(np.uint16))


def test_modelopt_bytes_and_qtensor_dequantize(model_dir, converted):
    pytest.importorskip("modelopt")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    original, ours = _all_tensors(model_dir), _all_tensors(converted["modelopt"])
    for module, gs in _expected_global_scales(original).items():
        packed, scale, scale_2 = (ours[f"{module}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2"))
        assert packed.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn
        assert scale_2.dtype == torch.float32 and scale_2.dim() == 0  # 0-dim decode scale
        assert scale_2.item() == np.float32(1) / gs
        golden_packed, golden_scales = _golden(original[f"{module}.weight"], gs)
        np.testing.assert_array_equal(packed.numpy(), golden_packed)
        np.testing.assert_array_equal(scale.view(torch.uint8).numpy(), golden_scales)
        n, half = packed.shape
        qtensor = NVFP4QTensor(torch.Size([n, half * 2]), torch.bfloat16, packed)
        theirs = qtensor.dequantize(dtype=torch.bfloat16, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        mine = mo_fmt.dequantize(packed.numpy(), scale.view(torch.uint8).numpy(), scale_2.numpy()).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(_bits(theirs), mine.view(np.uint16))


def test_zero_blocks_dequantize_the_same_under_each_librarys_zero_scale_rule(tmp_path):
    """Our bytes are written as they are: a block whose scale byte is 0 has
    all-zero codes, so ModelOpt's 0 -> 1.0 and compressed-tensors' 0 -> 0.125
    replacements (applied when they quantize) cannot change what it decodes to."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    w = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    w[0, :16] = 0
    w[1, :16] = 1e-30  # rounds to a zero block scale next to large blocks
    w[2, 16:32] = -0.0
    gs = ref.compute_global_scale(w)
    packed, scales = ref.scaled_fp4_quant(w, gs, layout="linear")
    assert (scales == 0).sum() >= 3
    zero = np.repeat(scales == 0, 16, axis=1)
    assert np.all(ref.unpack_codes(packed)[zero] & 0x7 == 0)
    scheme = QuantizationConfig.model_validate(ct_fmt.quantization_config([], False)).config_groups["group_0"]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    for replacement in (1.0, 0.125):  # what each library would have stored instead of 0
        replaced = np.where(scales == 0, np.float32(replacement), ref.e4m3_values(scales)).astype(ml_dtypes.float8_e4m3fn)
        got = NVFP4PackedCompressor.decompress({"weight_packed": t(packed), "weight_scale": t(replaced.view(np.uint8)).view(
            torch.float8_e4m3fn), "weight_global_scale": t(gs)}, scheme)["weight"]
        mine = ct_fmt.dequantize(packed, scales, gs).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(_bits(got), mine.view(np.uint16))


def test_format_dequantize_vs_golden_dequantize(model_dir, converted):
    """Each format's arithmetic (q * (s / gs), q * (s * (1/gs))) against the
    golden model's q * s / gs: the same weight up to float32 rounding, which
    is what bfloat16 output can show in its last bit, rarely."""
    ours = _all_tensors(converted["compressed-tensors"])
    for module in _modules(_all_tensors(model_dir)):
        packed = ours[f"{module}.weight_packed"].numpy()
        scales = ours[f"{module}.weight_scale"].view(torch.uint8).numpy()
        gs = ours[f"{module}.weight_global_scale"].numpy()
        golden = ref.dequantize(packed, scales, gs, layout="linear", dtype="float32")
        fmt = ct_fmt.dequantize(packed, scales, gs)
        np.testing.assert_allclose(fmt, golden, rtol=2 ** -22, atol=0)


def test_fused_projections_share_global_scale(converted):
    for fmt, key in (("modelopt", "weight_scale_2"), ("compressed-tensors", "weight_global_scale")):
        tensors = _all_tensors(converted[fmt])
        for layer in range(2):
            qkv = {tensors[f"model.layers.{layer}.self_attn.{p}.{key}"].item() for p in ("q_proj", "k_proj", "v_proj")}
            gate_up = {tensors[f"model.layers.{layer}.mlp.{p}.{key}"].item() for p in ("gate_proj", "up_proj")}
            assert len(qkv) == 1 and len(gate_up) == 1, (fmt, layer, qkv, gate_up)


# -- configs, loading and forward passes ------------------------------------

def test_modelopt_config_files(converted):
    pytest.importorskip("modelopt")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf = json.loads((converted["modelopt"] / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4" and hf["quantization"]["group_size"] == 16
    assert set(hf["quantization"]["exclude_modules"]) == {"lm_head", "model.embed_tokens"}
    config = json.loads((converted["modelopt"] / "config.json").read_text())
    assert config["quantization_config"] == convert_hf_quant_config_format(hf)


def _forward(model):
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()
    return logits


def _load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_compressed_tensors_loads_with_transformers(model_dir, converted, tmp_path):
    from transformers import CompressedTensorsConfig

    model = _load(converted["compressed-tensors"], quantization_config=CompressedTensorsConfig(dequantize=True))
    _forward(model)
    dequantize_checkpoint(converted["compressed-tensors"], tmp_path / "deq")
    dense = _all_tensors(tmp_path / "deq")
    state = model.state_dict()
    for module in _modules(_all_tensors(model_dir)):
        np.testing.assert_array_equal(_bits(state[f"{module}.weight"].to(torch.bfloat16)), _bits(dense[f"{module}.weight"]))


def test_modelopt_loads_through_compressed_tensors_converter(model_dir, converted, tmp_path):
    """transformers has no loader for hf_quant_config.json; compressed-tensors'
    ModelOpt converter maps our tensors (1 / weight_scale_2 -> weight_global_scale,
    weight -> weight_packed) and transformers loads the result."""
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from transformers import CompressedTensorsConfig

    hf = json.loads((converted["modelopt"] / "hf_quant_config.json").read_text())
    converter = ModelOptNvfp4Converter(ignore=hf["quantization"]["exclude_modules"], targets=["re:.*_proj$"])
    out = tmp_path / "ct"
    out.mkdir()
    for shard in converted["modelopt"].glob("*.safetensors"):
        tensors = converter.validate(load_file(shard))
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    config = json.loads((converted["modelopt"] / "config.json").read_text())
    config["quantization_config"] = ct_fmt.quantization_config(hf["quantization"]["exclude_modules"], False)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors.index.json").write_text((converted["modelopt"] / "model.safetensors.index.json").read_text()
                                                      .replace(".weight_scale_2", ".weight_global_scale"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _all_tensors(out)
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if n in tensors}
    for name in tensors:
        index["weight_map"].setdefault(name, next(s.name for s in out.glob("*.safetensors") if name in load_file(s)))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _forward(_load(out, quantization_config=CompressedTensorsConfig(dequantize=True)))


def test_dequantize_checkpoint_loads_and_round_trip_sqnr(model_dir, converted, tmp_path, capsys):
    for fmt in converted:
        deq = tmp_path / fmt
        assert main(["dequantize-checkpoint", str(converted[fmt]), str(deq)]) == 0
        model = _load(deq)
        _forward(model)
        result = inspect_checkpoint(converted[fmt], model_dir)
        sqnr = [e["sqnr_db"] for e in result["error"].values()]
        assert len(sqnr) == 14
        # 4-bit E2M1 with 16-value blocks on Gaussian weights: about 20 dB (theory and measurement agree: 20.4)
        assert 19.0 < min(sqnr) and max(sqnr) < 22.0, sqnr
    assert main(["inspect", str(converted["modelopt"]), "--reference", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "14 NVFP4 weights" in out and "global scale shared" in out and "SQNR min" in out and "NOT shared" not in out


def test_carried_over_files_and_tensors(model_dir, converted):
    original = _all_tensors(model_dir)
    for fmt, out in converted.items():
        ours = _all_tensors(out)
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                     "model.layers.0.input_layernorm.weight"):
            assert torch.equal(ours[name], original[name])
        assert (out / "tokenizer_config.json").read_text() == (model_dir / "tokenizer_config.json").read_text()
        assert (out / "generation_config.json").is_file()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ours)
        assert not list(out.glob(".*.tmp"))


def test_single_file_without_index(tmp_path):
    model = _tiny_llama(tmp_path / "one", shard_size="100MB")
    assert not (model / "model.safetensors.index.json").exists()
    convert(model, tmp_path / "out", "compressed-tensors", cpu=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# -- streaming, atomic shards, resume, splitting the work -------------------

def _shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def test_resume_skips_verified_shards_and_redoes_damaged_ones(model_dir, converted, tmp_path):
    out = tmp_path / "o"
    convert(model_dir, out, "modelopt", cpu=True, progress=False)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    report = convert(model_dir, out, "modelopt", cpu=True, resume=True, progress=False)
    assert report.written == [] and len(report.resumed) == 4
    victim = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = convert(model_dir, out, "modelopt", cpu=True, resume=True, progress=False)
    assert report.written == [victim.name]
    assert _shard_bytes(out) == _shard_bytes(converted["modelopt"])


def test_killed_run_leaves_no_half_shard(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    calls = {"n": 0}
    real = safetensors_io.read_tensor

    def dying(path, info):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # as if killed in the middle of a shard
        return real(path, info)

    monkeypatch.setattr(convert_module, "read_tensor", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(model_dir, out, "compressed-tensors", cpu=True, progress=False)
    files = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert not [f for f in files if f.endswith(".tmp")]
    complete = [p for p in out.glob("*.safetensors")] if out.exists() else []
    for shard in complete:  # what is there is whole, and --resume keeps it
        safetensors_io.read_header(shard)
    monkeypatch.setattr(convert_module, "read_tensor", real)
    report = convert(model_dir, out, "compressed-tensors", cpu=True, resume=True, progress=False)
    assert len(report.resumed) == len(complete) and len(report.written) == 4 - len(complete)


def test_split_across_machines_gives_the_same_bytes(model_dir, converted, tmp_path):
    out = tmp_path / "split"
    for i in range(3):
        convert(model_dir, out, "compressed-tensors", cpu=True, shard_index=i, num_shards=3, resume=True,
                progress=False)
    assert _shard_bytes(out) == _shard_bytes(converted["compressed-tensors"])
    assert json.loads((out / MANIFEST_FILE).read_text())["complete"]
    for name in ("config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (converted["compressed-tensors"] / name).read_bytes()


# -- bad input: one line, nothing written ----------------------------------

def test_missing_directory(capsys, tmp_path):
    expect_error(capsys, tmp_path, "convert", tmp_path / "nope", tmp_path / "o", "--format", "modelopt", "--cpu",
                 names=["nope", "no such directory"])


def test_no_safetensors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, tmp_path, "convert", tmp_path / "empty", tmp_path / "o", "--format", "modelopt", "--cpu",
                 names=["no .safetensors"])


def test_index_names_absent_shard(capsys, tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    victim = sorted(broken.glob("*.safetensors"))[2]
    victim.unlink()
    expect_error(capsys, tmp_path, "convert", broken, tmp_path / "o", "--format", "compressed-tensors", "--cpu",
                 names=[victim.name, "not there"])


def test_output_exists(capsys, tmp_path, model_dir):
    (tmp_path / "o").mkdir()
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "modelopt", "--cpu",
                 names=["exists", "--resume", "--overwrite"])


def test_already_quantized(capsys, tmp_path, converted):
    for fmt, path in converted.items():
        expect_error(capsys, tmp_path, "convert", path, tmp_path / "o", "--format", fmt, "--cpu",
                     names=["already quantized"])


def test_no_gpu_says_so(capsys, tmp_path, model_dir):
    from conftest import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is here")
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "modelopt", names=["--cpu"])


def test_k_not_multiple_of_16_is_skipped_with_a_warning(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    save_file({"a.up_proj.weight": torch.randn(32, 40, dtype=torch.bfloat16),
               "a.down_proj.weight": torch.randn(40, 32, dtype=torch.bfloat16),
               "a.bias": torch.zeros(3)}, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "o"), "--format", "compressed-tensors", "--cpu",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "a.up_proj" in err and "a.down_proj" not in err
    out = load_file(tmp_path / "o" / "model.safetensors")
    assert out["a.up_proj.weight"].shape == (32, 40) and "a.down_proj.weight_packed" in out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["ignore"] == ["a.up_proj"]


def test_full_disk_removes_the_temporary_file(tmp_path, capsys, model_dir, monkeypatch):
    import errno

    real = safetensors_io.write_streaming

    def full(path, planned, produce, metadata=None):
        def failing(p):
            produce(p)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, planned, failing, metadata)

    monkeypatch.setattr(convert_module, "write_streaming", full)
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "modelopt", "--cpu",
                 "--no-progress", names=["No space left on device"])


@pytest.mark.parametrize("flags, names", [
    (["--shard-index", "3", "--num-shards", "2"], ["--shard-index 3"]),
    (["--devices", "0,x"], ["--devices"]),
    (["--devices", "0", "--cpu"], ["--devices", "--cpu"]),
])
def test_bad_flags(capsys, tmp_path, model_dir, flags, names):
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "modelopt", *flags, names=names)


def test_dequantize_and_inspect_errors(capsys, tmp_path, model_dir):
    expect_error(capsys, tmp_path, "inspect", tmp_path / "nope", names=["no such directory"])
    expect_error(capsys, tmp_path, "inspect", model_dir, names=["no NVFP4 checkpoint"])
    expect_error(capsys, tmp_path, "dequantize-checkpoint", model_dir, tmp_path / "o", names=["no NVFP4 checkpoint"])


# -- activation calibration: input scales -----------------------------------

CALIBRATION_SAMPLES = [[1, 5, 9, 42, 7, 300], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [511, 0, 17, 256], [99] * 5]


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# one sample per line\n" + "\n".join(" ".join(map(str, s)) for s in CALIBRATION_SAMPLES) + "\n\n")
    return path


@pytest.fixture(scope="module")
def calibrated(model_dir, tokens_file, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for fmt in ("modelopt", "compressed-tensors"):
        out[fmt] = tmp_path_factory.mktemp("calibrated") / fmt
        report = convert(model_dir, out[fmt], fmt, cpu=True, progress=False, calibration_tokens=tokens_file)
        assert report.calibration is not None and report.calibration.samples == 4 and not report.calibration_reused
    return out


@pytest.fixture(scope="module")
def hooked_amax(model_dir) -> dict[str, np.float32]:
    """Each projection's input amax, measured here independently of the package:
    forward hooks that keep every input, one max over all of them at the end."""
    model = _load(model_dir)
    inputs: dict[str, list] = {}
    for name, module in model.named_modules():
        if name.endswith(PROJ):
            module.register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for sample in CALIBRATION_SAMPLES:
            model(torch.tensor([sample]))
    return {name: np.float32(torch.cat([x.flatten() for x in xs]).abs().max().float().item()) for name, xs in inputs.items()}


def _group_amax(amax: dict[str, np.float32], module: str) -> np.float32:
    parent, _, leaf = module.rpartition(".")
    for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        if leaf in members:
            return max(amax[f"{parent}.{m}"] for m in members)
    return amax[module]


def _modelopt_input_scale(amax) -> torch.Tensor:
    """ModelOpt's own export of an NVFP4 input quantizer (the W4A4 preset's
    dynamic E2M1 block quantizer with E4M3 scales) whose calibrated amax is `amax`."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    quantizer = TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}))
    quantizer.amax = torch.tensor(float(amax), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about a zero amax
        return NVFP4QTensor.get_activation_scaling_factor(quantizer)


def _ct_input_global_scale(amax) -> torch.Tensor:
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    a = torch.tensor([float(amax)], dtype=torch.float32)
    return generate_gparam(-a, a)


def test_input_scale_rules_equal_the_libraries():
    """Our two formulas against each library's own function, bit for bit,
    including a zero amax (ModelOpt: maxbound 6 instead; compressed-tensors: 1.0)."""
    pytest.importorskip("modelopt")
    random = (np.random.default_rng(5).random(200) * 2.0 ** np.arange(-100, 100)).astype(np.float32)
    values = [float(v) for v in random] + [0.0, 1e-40, float(np.finfo(np.float32).tiny), 1e-30, 0.0078125, 1.0,
                                           3.5, 3.609375, 6.0, 1e30, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)]
    for amax in values:
        theirs = _modelopt_input_scale(amax)
        assert theirs.dim() == 0 and theirs.dtype == torch.float32
        assert mo_fmt.input_scale(amax).tobytes() == theirs.numpy().tobytes(), amax
        theirs = _ct_input_global_scale(amax)
        assert tuple(theirs.shape) == (1,) and theirs.dtype == torch.float32
        assert ct_fmt.input_global_scale(amax).tobytes() == theirs.numpy()[0].tobytes(), amax


def test_calibrated_input_scales_equal_independent_amax(calibrated, hooked_amax):
    pytest.importorskip("modelopt")
    assert len(hooked_amax) == 14
    saved = json.loads((calibrated["modelopt"] / "nvfp4_cupy_calibration.json").read_text())
    assert {m: np.float32(a) for m, a in saved["input_amax"].items()} == hooked_amax  # as measured, exactly
    assert saved["device"].startswith("cpu") and saved["samples"] == 4 and saved["tokens"] == 25
    mo, ct = _all_tensors(calibrated["modelopt"]), _all_tensors(calibrated["compressed-tensors"])
    for module in hooked_amax:
        amax = _group_amax(hooked_amax, module)  # fused projections share the largest
        scale, global_scale = mo[f"{module}.input_scale"], ct[f"{module}.input_global_scale"]
        assert scale.dtype == torch.float32 and scale.dim() == 0  # ModelOpt: 0-dim decode scale
        assert global_scale.dtype == torch.float32 and tuple(global_scale.shape) == (1,)  # encode scale, [1]
        assert torch.equal(scale, _modelopt_input_scale(amax)), module
        assert torch.equal(global_scale, _ct_input_global_scale(amax)), module
        assert scale.item() == np.float32(amax) / np.float32(6 * 448)
        assert global_scale.item() == (np.float32(1) / np.float32(amax)) * np.float32(6 * 448)


def test_calibrated_input_scales_shared_across_fused_projections(calibrated):
    for fmt, key in (("modelopt", "input_scale"), ("compressed-tensors", "input_global_scale")):
        tensors = _all_tensors(calibrated[fmt])
        for layer in range(2):
            qkv = {tensors[f"model.layers.{layer}.self_attn.{p}.{key}"].item() for p in ("q_proj", "k_proj", "v_proj")}
            gate_up = {tensors[f"model.layers.{layer}.mlp.{p}.{key}"].item() for p in ("gate_proj", "up_proj")}
            assert len(qkv) == 1 and len(gate_up) == 1, (fmt, layer, qkv, gate_up)


def test_calibration_changes_only_the_input_scales(converted, calibrated):
    for fmt in converted:
        weight_only, w4a4 = _all_tensors(converted[fmt]), _all_tensors(calibrated[fmt])
        extra = sorted(set(w4a4) - set(weight_only))
        assert len(extra) == 14 and all(n.endswith((".input_scale", ".input_global_scale")) for n in extra)
        for name, tensor in weight_only.items():
            assert tensor.dtype == w4a4[name].dtype and _raw(tensor) == _raw(w4a4[name]), name
        manifest = json.loads((calibrated[fmt] / MANIFEST_FILE).read_text())
        assert manifest["weight_only"] is False and manifest["complete"]


def test_calibrated_config_files(calibrated):
    pytest.importorskip("modelopt")
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf = json.loads((calibrated["modelopt"] / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4" and hf["quantization"]["group_size"] == 16
    config = json.loads((calibrated["modelopt"] / "config.json").read_text())["quantization_config"]
    assert config == convert_hf_quant_config_format(hf)
    assert config["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    config = json.loads((calibrated["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    assert scheme.input_activations == NVFP4["input_activations"]
    # the weights' observer (a calibration-time setting) is the default that validation fills in
    assert scheme.weights.model_dump(exclude={"observer"}) == NVFP4["weights"].model_dump(exclude={"observer"})


def test_calibrated_compressed_tensors_loads_with_its_activation_scheme(calibrated):
    """The default load (compressed; dequantize=True drops the activation
    scheme and reports input_global_scale unexpected) builds each Linear with
    the NVFP4 input_activations scheme and takes our input_global_scale into it.
    Whether transformers' own forward then quantizes the activations depends on
    its version (docs/checkpoints.md); the forward runs either way."""
    path = calibrated["compressed-tensors"]
    ours = _all_tensors(path)
    model = _load(path)
    for name, param in model.named_parameters():
        if name.endswith(".input_global_scale"):
            assert torch.equal(param.data, ours[name]), name
    assert sum(name.endswith(".input_global_scale") for name, _ in model.named_parameters()) == 14
    scheme = model.model.layers[0].self_attn.q_proj.quantization_scheme
    assert scheme.input_activations is not None and scheme.input_activations.dynamic == "local"
    _forward(model)


def test_calibrated_modelopt_loads_through_compressed_tensors_convert_checkpoint(calibrated, tmp_path):
    """With input_scale (W4A4) compressed-tensors' whole-directory ModelOpt
    conversion accepts our checkpoint. It keeps ModelOpt's 0-dim scalars
    (1 / weight_scale_2, 1 / input_scale), which the default transformers load
    rejects ([1] expected): reshaped here, then loaded and run."""
    from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter

    hf = json.loads((calibrated["modelopt"] / "hf_quant_config.json").read_text())
    converter = ModelOptNvfp4Converter(ignore=hf["quantization"]["exclude_modules"], targets=["re:.*_proj$"])
    out = tmp_path / "ct"
    convert_checkpoint(str(calibrated["modelopt"]), str(out), converter, device="cpu", max_workers=1)
    for shard in out.glob("*.safetensors"):
        tensors = {k: v.reshape(1) if k.endswith("_global_scale") and v.dim() == 0 else v
                   for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    ours = _all_tensors(calibrated["modelopt"])
    model = _load(out)
    params = dict(model.named_parameters())
    for module in _modules(ours):
        assert params[f"{module}.input_global_scale"].item() == (1 / ours[f"{module}.input_scale"]).item()
    _forward(model)


def test_read_tokens_formats(tmp_path):
    from nvfp4_cupy.checkpoint.calibrate import read_tokens

    samples = [[1, 2, 3, 4], [5, 6, 7, 8]]
    (tmp_path / "t.txt").write_text("1 2 3 4\n\n# comment\n5\t6 7  8\n")
    (tmp_path / "t.json").write_text(json.dumps(samples))
    (tmp_path / "one.json").write_text(json.dumps(samples[0]))
    np.save(tmp_path / "t.npy", np.array(samples, np.int32))
    np.save(tmp_path / "one.npy", np.array(samples[0], np.int64))
    assert read_tokens(tmp_path / "t.txt") == read_tokens(tmp_path / "t.json") == read_tokens(tmp_path / "t.npy") == samples
    assert read_tokens(tmp_path / "one.json") == read_tokens(tmp_path / "one.npy") == samples[:1]


def test_calibration_resume_and_amax_file(model_dir, tokens_file, calibrated, tmp_path, monkeypatch):
    calibrate_module = sys.modules["nvfp4_cupy.checkpoint.calibrate"]
    out = tmp_path / "o"
    convert(model_dir, out, "modelopt", cpu=True, progress=False, calibration_tokens=tokens_file)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(convert_module, "measure_input_amax", no_model)
    report = convert(model_dir, out, "modelopt", cpu=True, resume=True, progress=False, calibration_tokens=tokens_file)
    assert report.calibration_reused and report.written == [] and len(report.resumed) == 4
    again = tmp_path / "from_file"
    report = convert(model_dir, again, "modelopt", cpu=True, progress=False,
                     calibration_amax=out / calibrate_module.CALIBRATION_FILE)
    assert report.calibration_reused
    assert _shard_bytes(again) == _shard_bytes(out) == _shard_bytes(calibrated["modelopt"])


def test_calibration_cli(model_dir, tokens_file, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "o"), "--format", "modelopt", "--cpu", "--no-progress",
                 "--calibration-tokens", str(tokens_file)]) == 0
    out = capsys.readouterr().out
    assert "W4A4" in out and "4 samples, 25 tokens" in out and "quant_algo NVFP4" in out and "weight-only" not in out
    assert main(["inspect", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.count("activations model.layers.") == 14


@pytest.mark.parametrize("content, flags, names", [
    (None, [], ["no such file"]),
    ("1 2 x\n", [], ["line 1", "integer"]),
    ("1 2 512\n", [], ["512", "vocabulary size 512"]),
    ("1 -2\n", [], [">= 0"]),
    ("\n", [], ["no token ids"]),
    ("1 2\n", ["--calibration-amax", "{tokens}"], ["exclude each other"]),
])
def test_calibration_bad_tokens(capsys, tmp_path, model_dir, content, flags, names):
    tokens = tmp_path / "tokens.txt"
    if content is not None:
        tokens.write_text(content)
    flags = [f.format(tokens=tokens) for f in flags]
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "modelopt", "--cpu",
                 "--calibration-tokens", tokens, *flags, names=names)


def test_calibration_names_weights_the_model_does_not_run(tmp_path, model_dir, tokens_file):
    """A quantized weight that is no Linear of the model transformers builds:
    one error naming it, nothing written."""
    import shutil

    from nvfp4_cupy.checkpoint import CheckpointError

    extra = tmp_path / "extra"
    shutil.copytree(model_dir, extra)
    save_file({"model.extra_proj.weight": torch.randn(32, 64, dtype=torch.bfloat16)},
              extra / "model-extra.safetensors", metadata={"format": "pt"})
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra_proj.weight"] = "model-extra.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="model.extra_proj.*--exclude"):
        warnings.simplefilter("ignore")
        convert(extra, tmp_path / "o", "modelopt", cpu=True, progress=False, calibration_tokens=tokens_file)
    assert not (tmp_path / "o").exists()


def test_calibration_amax_file_missing_modules(capsys, tmp_path, model_dir, calibrated):
    saved = json.loads((calibrated["modelopt"] / "nvfp4_cupy_calibration.json").read_text())
    del saved["input_amax"]["model.layers.1.mlp.down_proj"]
    (tmp_path / "c.json").write_text(json.dumps(saved))
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "compressed-tensors", "--cpu",
                 "--calibration-amax", tmp_path / "c.json", names=["no input amax", "model.layers.1.mlp.down_proj"])
    (tmp_path / "c.json").write_text("[1, 2]")
    expect_error(capsys, tmp_path, "convert", model_dir, tmp_path / "o", "--format", "compressed-tensors", "--cpu",
                 "--calibration-amax", tmp_path / "c.json", names=["not a calibration file"])


# -- the GPU path (public GPU API): same bytes as the golden model ----------

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_gpu_convert_equals_golden(model_dir, converted, tmp_path, fmt):
    convert(model_dir, tmp_path / "gpu", fmt, progress=False)
    assert _shard_bytes(tmp_path / "gpu") == _shard_bytes(converted[fmt])


@pytest.mark.gpu
def test_two_workers_on_one_gpu_equal_one(model_dir, converted, tmp_path):
    """The multi-GPU code path (spawned workers, shards round-robin) with both on GPU 0."""
    convert(model_dir, tmp_path / "two", "compressed-tensors", devices=[0, 0], progress=False)
    convert(model_dir, tmp_path / "one", "compressed-tensors", devices=[0], progress=False)
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "one") == _shard_bytes(converted["compressed-tensors"])


@pytest.mark.gpu
def test_two_gpus_equal_one(model_dir, converted, tmp_path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    convert(model_dir, tmp_path / "two", "compressed-tensors", devices=[0, 1], progress=False)
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(converted["compressed-tensors"])


# The same bf16 forward on the GPU and on the CPU: matmuls and attention run other kernels (other
# summation orders, fused attention), so an activation can round to a neighbouring bfloat16
# (2^-8 relative) at each op; over the tiny model's two layers that stays within a few ulps.
# docs/checkpoints.md ("GPU and CPU calibration") explains it; weights are compared exactly.
GPU_AMAX_RTOL = 2.0 ** -4


@pytest.mark.gpu
def test_gpu_calibration_matches_cpu(model_dir, tokens_file, calibrated, tmp_path, torch_cuda):
    cpu_amax = {m: np.float32(a) for m, a in json.loads(
        (calibrated["modelopt"] / "nvfp4_cupy_calibration.json").read_text())["input_amax"].items()}
    for fmt, key, devices in (("modelopt", "input_scale", None), ("compressed-tensors", "input_global_scale", [0])):
        report = convert(model_dir, tmp_path / fmt, fmt, progress=False, devices=devices, calibration_tokens=tokens_file)
        assert report.calibration.device.startswith("cuda:0")
        gpu_amax = report.calibration.input_amax
        assert set(gpu_amax) == set(cpu_amax)
        worst = max(abs(float(gpu_amax[m]) - float(a)) / float(a) for m, a in cpu_amax.items())
        assert worst <= GPU_AMAX_RTOL, (fmt, worst, {m: (float(gpu_amax[m]), float(a)) for m, a in cpu_amax.items()})
        gpu, cpu = _all_tensors(tmp_path / fmt), _all_tensors(calibrated[fmt])
        assert set(gpu) == set(cpu)
        for name in cpu:
            if not name.endswith(f".{key}"):  # every weight byte and carried tensor: exactly the CPU's
                assert cpu[name].dtype == gpu[name].dtype and _raw(gpu[name]) == _raw(cpu[name]), name
        rule = mo_fmt.input_scale if fmt == "modelopt" else ct_fmt.input_global_scale
        for module in cpu_amax:  # and the input scales follow from the GPU's amax exactly
            stored = gpu[f"{module}.{key}"]
            assert _raw(stored) == np.float32(rule(_group_amax(gpu_amax, module))).tobytes(), module
