"""Every device of a host: inputs on any GPU are quantized there, with the
module loaded there; mixing devices is an error; threads and processes
driving different devices at once all get the golden bytes. Runs on any
number of GPUs: cases for devices that are not present skip, saying so."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bytes_check import POISONS, assert_bytes_equal
from conftest import import_cupy
from gpu_inputs import global_scale_for, make_input
from nvfp4_cupy import reference as ref

pytestmark = pytest.mark.gpu
cp = import_cupy()
ROOT = Path(__file__).resolve().parents[1]
MAX_DEVICES = 8


def device_count() -> int:
    return cp.cuda.runtime.getDeviceCount()


def need_devices(count: int) -> None:
    if device_count() < count:
        pytest.skip(f"needs {count} GPUs, this machine has {device_count()}")


def quantize_on(device: int, host: np.ndarray, gs, **kwargs):
    """Quantize from another current device (0, or 1 for device 0), into
    poisoned buffers on `device`; returns host bytes."""
    import nvfp4_cupy as nv

    other = 1 if device == 0 and device_count() > 1 else 0
    with cp.cuda.Device(device):
        x = cp.asarray(host)
        gs_arg = cp.asarray([gs], dtype=cp.float32) if kwargs.pop("device_scale", False) else gs
        out, out_scale = nv.create_fp4_output_tensors(host.shape[0], host.shape[1], **kwargs)
        out.fill(POISONS[0])
        out_scale.fill(POISONS[0])
    with cp.cuda.Device(other):
        packed, scales = nv.scaled_fp4_quant(x, gs_arg, out=out, out_scale=out_scale, **kwargs)
        assert cp.cuda.runtime.getDevice() == other, "the caller's current device must be left alone"
        fresh_packed, _ = nv.scaled_fp4_quant(x, gs_arg, **kwargs)
    assert fresh_packed.data.device_id == device
    with cp.cuda.Device(device):
        cp.cuda.Device(device).synchronize()
        return cp.asnumpy(packed), cp.asnumpy(scales), cp.asnumpy(fresh_packed)


@pytest.mark.parametrize("device", range(MAX_DEVICES))
def test_quantize_on_each_device(device):
    need_devices(device + 1)
    host = make_input("outliers", 150, 7152, seed=device).astype(np.float16)
    gs = global_scale_for(host.astype(np.float32))
    for device_scale in (False, True):
        packed, scales, fresh = quantize_on(device, host, gs, padded_n=7168, device_scale=device_scale)
        want = ref.scaled_fp4_quant(host, np.float32(gs), padded_n=7168)
        assert_bytes_equal(packed, want[0], f"device {device} packed")
        assert_bytes_equal(scales, want[1], f"device {device} scales")
        assert_bytes_equal(fresh, want[0], f"device {device} packed, fresh outputs")


def test_mixing_devices_is_an_error():
    need_devices(2)
    import nvfp4_cupy as nv

    with cp.cuda.Device(0):
        x = cp.ones((4, 64), cp.float16)
    with cp.cuda.Device(1):
        out, out_scale = nv.create_fp4_output_tensors(4, 64)
        out.fill(POISONS[0])
        gs = cp.ones(1, cp.float32)
        stream = cp.cuda.Stream()
    with pytest.raises(ValueError, match="out is on device 1 but x is on device 0"):
        nv.scaled_fp4_quant(x, 1.0, out=out)
    with pytest.raises(ValueError, match="out_scale is on device 1 but x is on device 0"):
        nv.scaled_fp4_quant(x, 1.0, out_scale=out_scale)
    with pytest.raises(ValueError, match="global_scale is on device 1 but x is on device 0"):
        nv.scaled_fp4_quant(x, gs)
    with pytest.raises(ValueError, match="stream belongs to device 1 but x is on device 0"):
        nv.scaled_fp4_quant(x, 1.0, stream=stream)
    with cp.cuda.Device(1):
        assert (out == POISONS[0]).all()


def test_mixing_devices_in_dequantize_and_global_scale_is_an_error():
    need_devices(2)
    import nvfp4_cupy as nv

    with cp.cuda.Device(0):
        x = cp.ones((4, 64), cp.float16)
        packed, scales = nv.scaled_fp4_quant(x, 1.0)
    with cp.cuda.Device(1):
        other_scales = cp.asarray(scales)
        out = cp.empty((4, 64), cp.float16)
        out.view(cp.uint16).fill(0xA5A5)
        gs = cp.ones(1, cp.float32)
        stream = cp.cuda.Stream()
        out_packed, out_scale = nv.create_fp4_output_tensors(4, 64)
        out_packed.fill(POISONS[0])
    with pytest.raises(ValueError, match="scales is on device 1 but packed is on device 0"):
        nv.dequantize_fp4(packed, other_scales, 1.0)
    with pytest.raises(ValueError, match="out is on device 1 but packed is on device 0"):
        nv.dequantize_fp4(packed, scales, 1.0, out=out, dtype=cp.float16)
    with pytest.raises(ValueError, match="global_scale is on device 1"):
        nv.dequantize_fp4(packed, scales, gs)
    with pytest.raises(ValueError, match="stream belongs to device 1"):
        nv.compute_global_scale(x, stream=stream)
    with pytest.raises(ValueError, match="out is on device 1 but x is on device 0"):
        nv.quantize(x, out=out_packed)
    with cp.cuda.Device(1):
        assert (out.view(cp.uint16) == 0xA5A5).all() and (out_packed == POISONS[0]).all()


@pytest.mark.parametrize("device", range(MAX_DEVICES))
def test_round_trip_on_each_device(device):
    """quantize() and dequantize_fp4 on `device` while another is current."""
    need_devices(device + 1)
    import nvfp4_cupy as nv

    host = make_input("outliers", 129, 7152, seed=device).astype(np.float16)
    other = 1 if device == 0 and device_count() > 1 else 0
    with cp.cuda.Device(device):
        x = cp.asarray(host)
    with cp.cuda.Device(other):
        packed, scales, gs = nv.quantize(x, padded_n=7168, per_row=True)
        back = nv.dequantize_fp4(packed, scales, gs, n=7152, dtype=cp.float16)
        assert cp.cuda.runtime.getDevice() == other
    assert {a.data.device_id for a in (packed, scales, gs, back)} == {device}
    with cp.cuda.Device(device):
        want_gs = ref.compute_global_scale(host, per_row=True)
        want = ref.scaled_fp4_quant(host, want_gs, padded_n=7168)
        assert_bytes_equal(cp.asnumpy(gs).view(np.uint8), want_gs.view(np.uint8), f"device {device} global scales")
        assert_bytes_equal(cp.asnumpy(packed), want[0], f"device {device} packed")
        assert_bytes_equal(cp.asnumpy(scales), want[1], f"device {device} scales")
        want_back = ref.dequantize(want[0], want[1], want_gs, n=7152, dtype=np.float16)
        assert_bytes_equal(cp.asnumpy(back).view(np.uint8), want_back.view(np.uint8), f"device {device} dequantized")


def test_threads_drive_every_device_at_once():
    """One thread per device, all starting with no kernel built: each device
    loads its own module, and every result is the golden bytes."""
    need_devices(2)
    from nvfp4_cupy._runtime import kernels as _kernels

    _kernels.forget()  # force first calls everywhere
    errors: list[str] = []
    start = threading.Barrier(device_count())

    def work(device: int) -> None:
        try:
            start.wait()
            for i, (m, n, layout) in enumerate([(31, 4096, "swizzled"), (129, 7152, "linear"), (8, 80, "8x4")] * 3):
                host = make_input("normal", m, n, seed=100 * device + i).astype(np.float16)
                gs = global_scale_for(host.astype(np.float32))
                packed, scales, _ = quantize_on(device, host, gs, layout=layout)
                want = ref.scaled_fp4_quant(host, np.float32(gs), layout=layout)
                assert_bytes_equal(packed, want[0], f"device {device} call {i} packed")
                assert_bytes_equal(scales, want[1], f"device {device} call {i} scales")
        except BaseException as exc:  # reported below, with the device
            errors.append(f"device {device}: {exc!r}")

    threads = [threading.Thread(target=work, args=(device,)) for device in range(device_count())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    built_devices = {key[0] for key in _kernels.compiled_variants()}
    assert built_devices == set(range(device_count()))


_ONE_DEVICE = """
import sys, numpy as np, cupy as cp
sys.path[:0] = [{root!r}, {tests!r}]
import nvfp4_cupy as nv
from nvfp4_cupy import reference as ref
from gpu_inputs import make_input
device = int(sys.argv[1])
cp.cuda.Device(device).use()
host = make_input("outliers", 257, 7152, seed=device).astype(np.float16)
packed, scales = nv.scaled_fp4_quant(cp.asarray(host), 40.0, padded_n=7168)
want = ref.scaled_fp4_quant(host, 40.0, padded_n=7168)
ok = np.array_equal(cp.asnumpy(packed), want[0]) and np.array_equal(cp.asnumpy(scales), want[1])
print("device", device, "bit-exact" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
"""


def test_one_process_per_device_at_once():
    need_devices(2)
    script = _ONE_DEVICE.format(root=str(ROOT), tests=str(ROOT / "tests"))
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(device)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for device in range(device_count())
    ]
    for device, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"device {device}: {stdout}{stderr}"
        assert f"device {device} bit-exact" in stdout
