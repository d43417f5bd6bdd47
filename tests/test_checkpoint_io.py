"""The checkpoint converter's I/O: parallel reads in pieces, the streaming
writer's sha256 computed beside the write, and the GPU path's pinned ring
(checkpoint.staging.DeviceReader), each against the plain bytes of the file."""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import pytest

from nvfp4_cupy import reference as ref
from nvfp4_cupy.checkpoint import safetensors_io
from nvfp4_cupy.checkpoint.safetensors_io import Planned, TensorInfo, read_tensor, sha256_file, write_streaming

PIECE = 4096  # small pieces, so that a test tensor spans many


def _file_with_tensor(tmp_path, array: np.ndarray, lead: int = 13):
    """A file holding `lead` odd bytes, then the array's bytes, then a tail:
    the tensor at an offset that is not a multiple of anything."""
    path = tmp_path / "t.bin"
    raw = array.tobytes()
    path.write_bytes(b"\x5a" * lead + raw + b"\xa5" * 7)
    name = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}[array.dtype]
    return path, TensorInfo("w", name, array.shape, lead, lead + len(raw))


def _bf16(rng, shape) -> np.ndarray:
    return (rng.standard_normal(shape, np.float32) * 3).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("shape", [(3, 5), (37, 800)])  # one read; 29 pieces on 8 threads
def test_read_tensor_in_pieces_equals_the_file(tmp_path, monkeypatch, rng, shape):
    monkeypatch.setattr(safetensors_io, "READ_PIECE", PIECE)
    want = _bf16(rng, shape)
    path, info = _file_with_tensor(tmp_path, want)
    got = read_tensor(path, info)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_read_of_a_truncated_file_says_so(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(safetensors_io, "READ_PIECE", PIECE)
    path, info = _file_with_tensor(tmp_path, _bf16(rng, (37, 800)))
    path.write_bytes(path.read_bytes()[: info.begin + info.nbytes // 2])
    with pytest.raises(OSError, match="the file ends before the tensor does"):
        read_tensor(path, info)


def test_streaming_writer_digest_is_the_files_sha256(tmp_path, rng):
    arrays = {"a": _bf16(rng, (64, 48)), "b": rng.integers(0, 256, (1000,), dtype=np.uint8),
              "c": rng.standard_normal((7, 3)).astype(np.float32)}
    planned = [Planned(n, safetensors_io.dtype_name(a), a.shape) for n, a in arrays.items()]
    path = tmp_path / "s.safetensors"
    digest = write_streaming(path, planned, lambda p: arrays[p.name], {"format": "pt"})
    assert digest == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    infos, _ = safetensors_io.read_header(path)
    for name, array in arrays.items():
        assert np.array_equal(read_tensor(path, infos[name]).view(np.uint8), array.view(np.uint8))


# -- the GPU path ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("half_bytes", [PIECE, 3 * PIECE + 4, 64 << 20])  # many waves, a ragged one, one
def test_device_reader_equals_the_file(tmp_path, monkeypatch, rng, half_bytes):
    import cupy as cp

    from nvfp4_cupy.checkpoint.staging import DeviceReader

    monkeypatch.setattr(safetensors_io, "READ_PIECE", PIECE)
    reader = DeviceReader(half_bytes)
    try:
        for shape in [(37, 800), (5, 16), (300, 256)]:  # the ring's state carries over between reads
            want = _bf16(rng, shape)
            path, info = _file_with_tensor(tmp_path, want, lead=int(rng.integers(1, 100)))
            got = reader.read(path, info)
            assert isinstance(got, cp.ndarray) and got.dtype == want.dtype and got.shape == want.shape
            host = cp.asnumpy(got).view(np.uint16)
            differ = np.flatnonzero(host != want.view(np.uint16))
            assert differ.size == 0, f"{differ.size} of {host.size} differ, first at {differ[:8]}"
    finally:
        reader.close()


@pytest.mark.gpu
def test_gpu_quantizer_from_the_file_equals_golden(tmp_path, rng):
    from nvfp4_cupy.checkpoint.convert import Quantizer

    w = _bf16(rng, (96, 512))
    path, info = _file_with_tensor(tmp_path, w)
    quantizer = Quantizer(cpu=False)
    try:
        packed, scales, gs = quantizer.quantize(quantizer.load(path, info), None)
    finally:
        quantizer.close()
    want_gs = np.float32(ref.compute_global_scale(w)[0])
    want_packed, want_scales = ref.scaled_fp4_quant(w, np.array([want_gs], np.float32), layout="linear")
    assert gs.view(np.uint32) == want_gs.view(np.uint32)
    assert np.array_equal(packed, want_packed) and np.array_equal(scales, want_scales)
