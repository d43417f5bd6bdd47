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


# -- the GPU path (public GPU API): same bytes as the golden model ----------

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_gpu_convert_equals_golden(model_dir, converted, tmp_path, fmt):
    convert(model_dir, tmp_path / "gpu", fmt, progress=False)
    assert _shard_bytes(tmp_path / "gpu") == _shard_bytes(converted[fmt])


@pytest.mark.gpu
def test_two_gpu_workers_equal_one(model_dir, converted, tmp_path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    convert(model_dir, tmp_path / "two", "compressed-tensors", devices=[0, 1], progress=False)
    convert(model_dir, tmp_path / "one", "compressed-tensors", devices=[0], progress=False)
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "one") == _shard_bytes(converted["compressed-tensors"])
