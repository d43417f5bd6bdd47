"""A minimal safetensors reader and streaming writer over NumPy (ml_dtypes
for BF16 and F8_E4M3): no torch needed to convert a checkpoint.

The format (https://github.com/huggingface/safetensors, README "Format"):
8 bytes little-endian u64 N, then N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
padded with spaces to a multiple of 8, then the raw little-endian tensor
bytes, offsets relative to the end of the header. The writer here knows
every tensor's dtype and shape before it writes a byte, so it writes the
header first and then streams the tensors one at a time (a shard is never
held in memory), into a temporary file renamed only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype string -> NumPy dtype (safetensors/src/tensor.rs, enum Dtype)
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_DTYPES = ("F16", "BF16", "F32")  # what a quantizable weight may be stored as


class FormatError(Exception):
    """A file that is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """{name: TensorInfo} in file order, and the __metadata__ dict."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise FormatError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read as safetensors ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dtype}, which this tool does not read")
        if e - b != math.prod(shape) * DTYPES[dtype].itemsize or 8 + n + e > size:
            raise FormatError(f"{path}: tensor {name!r} does not fit its data_offsets")
        infos.append(TensorInfo(name, dtype, shape, 8 + n + b, 8 + n + e))
    infos.sort(key=lambda t: t.begin)
    return {t.name: t for t in infos}, meta


READ_PIECE = 8 << 20  # one preadv of one reading thread
READ_THREADS = 8  # page-cache reads scale to about 8 threads (H200 machine: 5 GB/s with one, 27 GB/s with 8)


def read_exactly(fd: int, buffer: memoryview, offset: int, what) -> None:
    """preadv until `buffer` is full (a short read is legal and is retried)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise OSError(f"{what}: the file ends before the tensor does")
        done += got


def read_pieces(fd: int, buffer: memoryview, offset: int, what, pool: ThreadPoolExecutor | None) -> None:
    """Fills `buffer` from `offset` in READ_PIECE pieces on `pool`'s threads."""
    pieces = range(0, len(buffer), READ_PIECE)
    if pool is None or len(pieces) < 2:
        read_exactly(fd, buffer, offset, what)
        return
    list(pool.map(lambda o: read_exactly(fd, buffer[o:o + READ_PIECE], offset + o, what), pieces))


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor from disk (only its bytes are read; a large one by several
    threads, as one thread is page-fault bound at about 1.4 GB/s there)."""
    data = np.empty(info.nbytes, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if info.nbytes > 2 * READ_PIECE:
            with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="nvfp4-read") as pool:
                read_pieces(fd, memoryview(data), info.begin, path, pool)
        else:
            read_exactly(fd, memoryview(data), info.begin, path)
    finally:
        os.close(fd)
    return data.view(DTYPES[info.dtype]).reshape(info.shape)


def dtype_name(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"no safetensors dtype for {array.dtype}")


@dataclass(frozen=True)
class Planned:
    """An output tensor known before it is computed."""

    name: str
    dtype: str
    shape: tuple


def _header_bytes(planned: list[Planned], metadata: dict | None) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for p in planned:
        nbytes = math.prod(p.shape) * DTYPES[p.dtype].itemsize
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_streaming(path: Path, planned: list[Planned], produce, metadata: dict | None = None) -> str:
    """Writes `planned` tensors (header first) into a temporary file beside
    `path`, each from `produce(planned_tensor)` in order, then renames it.
    Returns the file's sha256. A failure removes the temporary file."""
    temp = temp_name(path)
    digest = hashlib.sha256()
    # The hash runs on its own thread beside the write (both release the GIL):
    # sha256 and write + fsync run at about the same rate (1.2 and 1.4 GB/s on
    # the H200 machine), so one after the other would halve the writer's rate.
    hashing = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-sha256")
    hashed = None
    try:
        with open(temp, "wb") as f:
            head = _header_bytes(planned, metadata)
            f.write(head)
            digest.update(head)
            for p in planned:
                array = np.asarray(produce(p))
                if dtype_name(array) != p.dtype or tuple(array.shape) != tuple(p.shape):
                    raise AssertionError(f"{p.name}: produced {array.dtype}{array.shape}, planned {p.dtype}{p.shape}")
                # The array's own bytes (a C-contiguous uint8 view), not a copy.
                data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                if hashed is not None:
                    hashed.result()  # in order, and at most two arrays held
                hashed = hashing.submit(digest.update, data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())  # beside the last array's hash
            if hashed is not None:
                hashed.result()
        os.replace(temp, path)
    finally:
        hashing.shutdown(wait=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
