"""First calls under concurrency, through real launches: threads racing on a
cold process compile each variant once; processes sharing a fresh cache
directory all get the golden bytes and leave entries a later process loads;
corrupt entries and an unusable directory cost a compile and one warning,
never a wrong byte. tests/test_kernel_cache.py covers the cache on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from gpu_inputs import global_scale_for, make_input
from nvfp4_cupy import reference as ref

pytestmark = pytest.mark.gpu
cp = import_cupy()
ROOT = Path(__file__).resolve().parents[1]
# (host dtype, layout): three different kernel variants
CALLS = ((np.float16, "swizzled"), (ml_dtypes.bfloat16, "linear"), (np.float32, "8x4"))


@pytest.fixture
def cold_process(tmp_path, monkeypatch):
    """An empty cache directory and no kernel loaded in this process."""
    from nvfp4_cupy._runtime import disk_cache as _disk_cache
    from nvfp4_cupy._runtime import kernels as _kernels

    monkeypatch.setenv(_disk_cache.ENV_VAR, str(tmp_path / "kernels"))
    monkeypatch.setattr(_kernels, "_functions", {})
    monkeypatch.setattr(_kernels, "builds", type(_kernels.builds)())
    return tmp_path / "kernels"


def quantize_and_check(index: int, dtype, layout: str) -> None:
    import nvfp4_cupy as nv

    host = make_input("outliers", 129, 7152, seed=index).astype(dtype)
    gs = global_scale_for(host.astype(np.float32))
    want = ref.scaled_fp4_quant(host, np.float32(gs), padded_n=7168, layout=layout)
    out, out_scale = nv.create_fp4_output_tensors(129, 7152, layout=layout, padded_n=7168)
    out.fill(POISONS[index % 2])
    out_scale.fill(POISONS[index % 2])
    nv.scaled_fp4_quant(cp.asarray(host), gs, padded_n=7168, layout=layout, out=out, out_scale=out_scale)
    assert_bytes_equal(cp.asnumpy(out), want[0], f"call {index} {layout} packed")
    assert_bytes_equal(cp.asnumpy(out_scale), want[1], f"call {index} {layout} scales")


def test_racing_threads_compile_each_variant_once(cold_process):
    from nvfp4_cupy._runtime import disk_cache as _disk_cache
    from nvfp4_cupy._runtime import kernels as _kernels

    threads_count = 16
    start = threading.Barrier(threads_count)
    errors: list[str] = []

    def work(thread: int) -> None:
        try:
            start.wait()
            for k in range(len(CALLS)):
                dtype, layout = CALLS[(thread + k) % len(CALLS)]  # threads start on different variants
                quantize_and_check(thread * 10 + k, dtype, layout)
        except BaseException as exc:
            errors.append(f"thread {thread}: {exc!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert sorted(_kernels.builds.values()) == [1] * len(CALLS), _kernels.builds
    assert {origin for _, origin in _kernels.builds} == {"nvrtc"}
    assert len(_disk_cache.entries()) == len(CALLS)


_PROCESS = """
import sys, warnings
sys.path[:0] = [{root!r}, {tests!r}]
warnings.simplefilter("always")
import numpy as np, ml_dtypes
from test_cache_gpu import CALLS, quantize_and_check
from nvfp4_cupy._runtime import kernels as _kernels
for k, (dtype, layout) in enumerate(CALLS):
    quantize_and_check(int(sys.argv[1]) + k, dtype, layout)
print("bit-exact", sorted(origin for _, origin in _kernels.builds))
"""


def run_processes(count: int, cache_dir: Path) -> list[subprocess.CompletedProcess]:
    from nvfp4_cupy._runtime import disk_cache as _disk_cache

    env = {**os.environ, _disk_cache.ENV_VAR: str(cache_dir)}
    script = _PROCESS.format(root=str(ROOT), tests=str(ROOT / "tests"))
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(100 * i)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(count)
    ]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout + stderr
        assert "bit-exact" in stdout, stdout + stderr
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def test_processes_share_a_fresh_cache_directory(tmp_path):
    cache_dir = tmp_path / "kernels"
    racing = run_processes(4, cache_dir)
    assert all("KernelCacheWarning" not in p.stderr for p in racing), [p.stderr for p in racing]
    entries = sorted(cache_dir.glob("*.bin"))
    assert len(entries) == len(CALLS), entries
    assert not list(cache_dir.glob(".tmp-*"))
    (later,) = run_processes(1, cache_dir)
    assert f"bit-exact {['disk'] * len(CALLS)}" in later.stdout, later.stdout
    # Damage every entry: the next process compiles again, says so once, and repairs them.
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:-7])
    (repaired,) = run_processes(1, cache_dir)
    assert f"bit-exact {['nvrtc'] * len(CALLS)}" in repaired.stdout
    assert repaired.stderr.count("KernelCacheWarning") == 1 and "corrupt" in repaired.stderr, repaired.stderr
    (after,) = run_processes(1, cache_dir)
    assert f"bit-exact {['disk'] * len(CALLS)}" in after.stdout


def test_unusable_cache_directory_still_quantizes(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    (process,) = run_processes(1, blocked / "kernels")
    assert f"bit-exact {['nvrtc'] * len(CALLS)}" in process.stdout
    assert process.stderr.count("KernelCacheWarning") == 1 and "cannot write" in process.stderr, process.stderr
