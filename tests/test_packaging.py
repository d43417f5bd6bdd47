"""A wheel built from the tree ships the CUDA sources and works once
installed, away from the checkout. CPU only; needs hatchling (the build
backend, in the `test` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling", reason="hatchling (build backend) not installed: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("wheel")
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT))
    assert built.returncode == 0, built.stderr
    (built,) = out.glob("nvfp4_cupy-*.whl")
    return built


def test_wheel_contains_every_cuda_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "cuda_src").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources, "no CUDA sources in cuda_src/"
    missing = [name for name in sources if f"nvfp4_cupy/cuda_src/{name}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "nvfp4_cupy/reference/nvfp4.py" in names


def test_installed_wheel_imports_and_finds_its_sources(wheel, tmp_path):
    target = tmp_path / "site"
    installed = pip("install", "--no-deps", "-q", "--target", str(target), str(wheel))
    assert installed.returncode == 0, installed.stderr
    code = (
        "import numpy as np, nvfp4_cupy\n"
        "from nvfp4_cupy import reference\n"
        "from nvfp4_cupy._runtime import compile\n"
        "print(nvfp4_cupy.__file__)\n"
        "print(compile.source_dir())\n"
        "assert 'struct SwizzledScales' in compile.kernel_source('quantize.cu')\n"
        "p, s = reference.scaled_fp4_quant(np.ones((2, 32), np.float16), 1.0)\n"
        "assert p.shape == (2, 16)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module_file, source_dir = done.stdout.split()
    assert module_file.startswith(str(target)) and source_dir.startswith(str(target))


def test_cuda_extras_bring_cupy_and_nvrtc(wheel):
    """A machine with only the NVIDIA driver: `pip install nvfp4-cupy[cuda12]`
    must bring NVRTC too, through CuPy's own `ctk` extra (the CUDA toolkit
    wheels). .ci/run checks that the install works in a fresh venv."""
    metadata = zipfile.ZipFile(wheel).read("nvfp4_cupy-0.1.0.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for extra, cupy in (("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")):
        wanted = [r for r in requires if r.endswith(f"extra == '{extra}'") or r.endswith(f'extra == "{extra}"')]
        assert any(r.startswith(f"{cupy}[ctk]") for r in wanted), (extra, wanted)
    # The test extra relies on cuda12/cuda13 for NVRTC instead of naming a wheel of its own.
    assert not [r for r in requires if "nvrtc" in r], requires
