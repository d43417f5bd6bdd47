"""Every user mistake the CLI knows ends as exactly one line on stderr,
`nvfp4-cupy COMMAND: error: ...` naming the flag or file at fault, exit 1,
no warning, and no file written. In-process (nvfp4_cupy._cli.main), except
where a fresh process is the point."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy._cli import main

from conftest import gpu_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def expect_error(capsys, tmp_path, *args, names=()):
    """Runs the CLI, checks the one error line names each of `names`, and
    that tmp_path holds the same files as before. Returns the line."""
    before = sorted(tmp_path.rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning on the way is a failure
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 1, (args, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"nvfp4-cupy {args[0]}: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert sorted(tmp_path.rglob("*")) == before, "an output was written"
    return lines[0]


@pytest.fixture
def x_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32))
    return path


@pytest.fixture
def quantized(tmp_path, x_file, capsys):
    """A valid PREFIX.* from quantize, and its json as a dict."""
    assert main(["quantize", str(x_file), str(tmp_path / "q"), "--cpu"]) == 0
    capsys.readouterr()
    return tmp_path / "q", json.loads((tmp_path / "q.json").read_text())


# -- quantize ---------------------------------------------------------------

@pytest.mark.parametrize("flags, names", [
    (["--fmt", "mxfp4", "--global-scale", "2"], ["--global-scale", "--fmt mxfp4"]),
    (["--fmt", "mxfp4", "--per-row"], ["--per-row", "--fmt mxfp4"]),
    (["--per-row", "--global-scale", "2"], ["--per-row", "--global-scale"]),
    (["--global-scale", "1e40"], ["--global-scale"]),  # inf in float32: no RuntimeWarning, no source line
    (["--global-scale", "0"], ["--global-scale"]),
    (["--global-scale", "nan"], ["--global-scale"]),
    (["--global-scale", "-2"], ["--global-scale"]),
    (["--padded-n", "24"], ["--padded-n", "multiple of 16"]),
    (["--padded-n", "32"], ["--padded-n", "n=40"]),
    (["--fmt", "mxfp4", "--padded-n", "48"], ["--padded-n", "multiple of 32"]),
])
def test_quantize_bad_flags(capsys, tmp_path, x_file, flags, names):
    line = expect_error(capsys, tmp_path, "quantize", x_file, tmp_path / "q", "--cpu", *flags, names=names)
    assert "padded_n" not in line and "global_scale" not in line and "per_row" not in line


def test_quantize_bad_input_files(capsys, tmp_path):
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "ints.npy", np.ones((2, 16), np.int32))
    np.save(tmp_path / "v4.npy", np.zeros((2, 16), "V4"))  # void, but not bfloat16's 2 bytes
    np.save(tmp_path / "scalar.npy", np.float32(3))
    np.save(tmp_path / "no_columns.npy", np.zeros((2, 0), np.float32))
    for name in ("missing.npy", "text.npy", "ints.npy", "v4.npy", "scalar.npy", "no_columns.npy"):
        expect_error(capsys, tmp_path, "quantize", tmp_path / name, tmp_path / "q", "--cpu", names=[name])


def test_quantize_into_a_missing_directory_writes_nothing(capsys, tmp_path, x_file):
    expect_error(capsys, tmp_path, "quantize", x_file, "/nonexistent/dir/q", names=["/nonexistent/dir"])
    expect_error(capsys, tmp_path, "quantize", x_file, x_file / "q", names=[x_file])  # a file, not a folder
    (tmp_path / "q.json").mkdir()
    expect_error(capsys, tmp_path, "quantize", x_file, tmp_path / "q", "--cpu", names=[tmp_path / "q.json"])


def test_quantize_failing_mid_write_leaves_no_file(capsys, tmp_path, x_file, monkeypatch):
    """The second of three outputs fails (disk full, say): none is left."""
    real_save, calls = np.save, []

    def save(file, array):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(file, array)

    monkeypatch.setattr(np, "save", save)
    expect_error(capsys, tmp_path, "quantize", x_file, tmp_path / "q", "--cpu", names=["No space left"])


# -- dequantize -------------------------------------------------------------

def test_dequantize_into_a_missing_directory_writes_nothing(capsys, tmp_path, quantized):
    prefix, _ = quantized
    expect_error(capsys, tmp_path, "dequantize", prefix, "/nonexistent/y.npy", names=["/nonexistent"])


@pytest.mark.parametrize("edit, names", [
    (lambda meta: meta.pop("n"), ['"n"']),
    (lambda meta: meta.update(n="40"), ['"n"', "integer"]),
    (lambda meta: meta.update(n=True), ['"n"']),
    (lambda meta: meta.update(n=100), ["q.packed.npy", "n=100"]),  # more than packed holds
    (lambda meta: meta.pop("global_scale"), ['"global_scale"']),
    (lambda meta: meta.update(global_scale="big"), ['"global_scale"']),
    (lambda meta: meta.update(layout="diagonal"), ['"layout"']),
    (lambda meta: meta.update(format="nvfp8"), ['"format"']),
    (lambda meta: meta.update(dtype="int8"), ['"dtype"']),
    (lambda meta: meta.update(shape=[4, 40]), ['"shape"', "q.packed.npy"]),
    (lambda meta: meta.update(shape="3x40"), ['"shape"']),
    (lambda meta: meta.update(format="mxfp4"), ["multiple of 32"]),  # NVFP4 bytes read as MXFP4
])
def test_dequantize_bad_json(capsys, tmp_path, quantized, edit, names):
    prefix, meta = quantized
    edit(meta)
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    expect_error(capsys, tmp_path, "dequantize", prefix, tmp_path / "y.npy", names=[f"{prefix}", *names])


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"q"', "{not json"])
def test_dequantize_json_that_is_no_object(capsys, tmp_path, quantized, text):
    prefix, _ = quantized
    Path(f"{prefix}.json").write_text(text)
    expect_error(capsys, tmp_path, "dequantize", prefix, tmp_path / "y.npy", names=[f"{prefix}.json"])


def test_dequantize_missing_files(capsys, tmp_path, quantized):
    prefix, _ = quantized
    expect_error(capsys, tmp_path, "dequantize", tmp_path / "nothing", tmp_path / "y.npy", names=["nothing.json"])
    Path(f"{prefix}.scales.npy").unlink()
    expect_error(capsys, tmp_path, "dequantize", prefix, tmp_path / "y.npy", names=["q.scales.npy"])


# -- warm, info, bench ------------------------------------------------------

def test_warm_refuses_old_architectures(capsys, tmp_path):
    expect_error(capsys, tmp_path, "warm", "--arch", "75", names=["--arch 75", "sm_80"])


def test_warm_without_a_gpu_needs_arch(capsys, tmp_path):
    if not gpu_unavailable_reason():
        pytest.skip("a GPU is here: warm compiles for it")
    expect_error(capsys, tmp_path, "warm", names=["--arch"])


_WITHOUT_CUPY = (
    "import sys\n"
    "sys.modules.update(cupy=None, cupy_backends=None)  # as after `pip install -e .`: import cupy fails\n"
    "from nvfp4_cupy._cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("args, names", [
    (["warm", "--arch", "90"], ["cupy", "pip install"]),
    (["bench"], ["CUDA GPU and CuPy", "cupy"]),
    (["bench", "--quick"], ["CUDA GPU and CuPy", "cupy"]),
    (["info"], None),
])
def test_without_cupy(args, names):
    """A fresh process that cannot import CuPy: warm and bench say what is
    missing in one line; info reports it and succeeds."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_CUPY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    if names is None:
        assert done.returncode == 0 and "cupy: not installed" in done.stdout, done.stdout + done.stderr
        return
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(f"nvfp4-cupy {args[0]}: error: ") and done.stderr.count("\n") == 1, done.stderr
    for name in names:
        assert name in done.stderr


def test_without_libnvrtc(capsys, tmp_path, monkeypatch):
    """CuPy without NVRTC (the cuda12 extra used to bring none): warm says so
    in one line, info reports it."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy")

    def missing():
        raise RuntimeError("libnvrtc.so.13 or libnvrtc.so.12 not found")

    monkeypatch.setattr(nvrtc, "getVersion", missing)
    expect_error(capsys, tmp_path, "warm", "--arch", "90", names=["NVRTC", "libnvrtc", "pip install"])
    assert main(["info"]) == 0
    assert "NVRTC is not usable" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["bench"], ["bench", "--quick"]])
def test_bench_without_a_gpu(capsys, tmp_path, args):
    if not gpu_unavailable_reason():
        pytest.skip("a GPU is here: the benchmark would run")
    expect_error(capsys, tmp_path, *args, names=["CUDA GPU"])


def test_bench_parses_its_flags_without_importing_cupy():
    code = (
        "import sys\n"
        "from nvfp4_cupy._cli import main\n"
        "try:\n"
        "    main(['bench', '--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "print('cupy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and done.stdout.split()[-1] == "False"


def test_bfloat16_file_without_the_convention_is_refused(capsys, tmp_path):
    """A raw 2-byte integer file is not mistaken for bfloat16: only void."""
    np.save(tmp_path / "u16.npy", np.zeros((2, 16), np.uint16))
    expect_error(capsys, tmp_path, "quantize", tmp_path / "u16.npy", tmp_path / "q", names=["u16.npy", "uint16"])
    assert np.load(tmp_path / "u16.npy").dtype != ml_dtypes.bfloat16
