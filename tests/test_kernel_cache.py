"""The disk kernel cache and NVRTC errors, on the CPU (NVRTC needs no GPU):
entries are stored and served back, a corrupt entry or an unusable directory
falls back to compiling in memory with one warning, and a failing compile
shows NVRTC's log. tests/test_cache_gpu.py drives the same through launches,
threads and processes on a GPU."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

from nvfp4_cupy._format import LAYOUTS
from nvfp4_cupy._runtime import disk_cache as _disk_cache
from nvfp4_cupy._runtime.compile import GlobalScaleVariant, QuantizeVariant, compile_options, kernel_source, target_for

pytestmark = pytest.mark.nvrtc

VARIANT = GlobalScaleVariant("float32", False)  # the smallest program
TARGET = target_for(80, (80,))
ARCH = "sm_80"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "kernels"
    monkeypatch.setenv(_disk_cache.ENV_VAR, str(directory))
    return directory


def _kernels():
    """kernels.py imports CuPy: imported by the tests, not at collection, so
    that the nvrtc marker (conftest.py) skips them only where CuPy is absent
    and any other import error fails them."""
    from nvfp4_cupy._runtime import kernels

    return kernels


def build(variant=VARIANT):
    """Compile or load one program; return it and how it was obtained."""
    kernels = _kernels()
    before = kernels.builds.copy()
    program = kernels.compiled_program(variant, TARGET, ARCH)
    (origin,) = [origin for (_, origin) in (kernels.builds - before)]
    return program, origin


def test_first_build_compiles_and_stores_later_ones_load(cache_dir):
    first, origin = build()
    assert origin == "nvrtc"
    assert [p.name for p in _disk_cache.entries()] == [p.name for p in cache_dir.iterdir()]
    assert len(_disk_cache.entries()) == 1
    second, origin = build()
    assert origin == "disk"
    assert (second.image, second.lowered_names) == (first.image, first.lowered_names)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]


def test_entries_differ_by_variant_target_and_arch(cache_dir):
    build()
    _kernels().compiled_program(VARIANT, TARGET, "sm_90")
    _kernels().compiled_program(VARIANT, target_for(90, (90,)), "sm_90")
    _kernels().compiled_program(GlobalScaleVariant("float16", False), TARGET, ARCH)
    assert len(_disk_cache.entries()) == 4


def test_cache_dir_defaults_inside_cupys(monkeypatch, tmp_path):
    monkeypatch.delenv(_disk_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    assert _disk_cache.cache_dir() == tmp_path / "nvfp4_cupy"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: data[: len(data) // 2],  # a torn write
        lambda data: data[:-1] + bytes([data[-1] ^ 0x01]),  # one bit of the cubin
        lambda data: b"not a cache entry" + data,
    ],
    ids=["empty", "truncated", "bit-flip", "foreign"],
)
def test_corrupt_entry_is_compiled_again_and_replaced(cache_dir, damage):
    good, _ = build()
    (entry,) = _disk_cache.entries()
    entry.write_bytes(damage(entry.read_bytes()))
    with pytest.warns(_disk_cache.KernelCacheWarning, match="corrupt"):
        program, origin = build()
    assert origin == "nvrtc" and program.image == good.image
    assert build()[1] == "disk"  # replaced by a valid entry


def unusable_cache(cache_dir):
    """Say nothing twice: two builds in an unusable directory warn once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, origin = build()
        second, second_origin = build(GlobalScaleVariant("float16", False))
    assert (origin, second_origin) == ("nvrtc", "nvrtc")
    assert first.image and second.image
    messages = [str(w.message) for w in caught if issubclass(w.category, _disk_cache.KernelCacheWarning)]
    assert len(messages) == 1, messages
    assert str(cache_dir) in messages[0] and _disk_cache.ENV_VAR in messages[0]


def test_cache_path_that_is_a_file_falls_back_to_memory(cache_dir):
    cache_dir.write_bytes(b"a file where the cache directory should be")
    unusable_cache(cache_dir)


@contextlib.contextmanager
def unprivileged():
    """Root ignores directory permissions: run as nobody for the block."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions only")
def test_read_only_cache_dir_falls_back_to_memory(monkeypatch):
    parent = Path(tempfile.mkdtemp(prefix="nvfp4-read-only-"))  # outside pytest's private tmp
    cache_dir = parent / "kernels"
    cache_dir.mkdir()
    parent.chmod(0o755)
    cache_dir.chmod(0o555)
    monkeypatch.setenv(_disk_cache.ENV_VAR, str(cache_dir))
    try:
        with unprivileged():
            unusable_cache(cache_dir)
        assert not list(cache_dir.iterdir())
    finally:
        shutil.rmtree(parent)


def test_precompile_fills_the_cache_once(cache_dir):
    variants = [VARIANT, QuantizeVariant("float16", LAYOUTS["swizzled"], True)]
    assert _kernels().precompile(90, variants) == 2
    assert len(_disk_cache.entries()) == 2
    assert _kernels().precompile(90, variants) == 0


def test_failing_compile_shows_the_nvrtc_log():
    from nvfp4_cupy._runtime.nvrtc import KernelCompileError, compile_program

    variant = QuantizeVariant("float16", LAYOUTS["swizzled"], True)
    (real,) = variant.names
    name = real.replace("nvfp4::Float16Input", "nvfp4::NoSuchInput")
    assert name != real, f"no nvfp4::Float16Input to replace in {real}"
    with pytest.raises(KernelCompileError) as error:
        compile_program(kernel_source(variant.source), variant.source, (name,), compile_options(TARGET, ARCH))
    message = str(error.value)
    assert name in message and f"-arch={ARCH}" in message
    log = message.split("log:\n", 1)[1]
    assert "NoSuchInput" in log and "error" in log, message
