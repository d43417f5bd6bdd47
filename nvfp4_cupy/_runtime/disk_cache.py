"""The on-disk kernel cache: one file per compiled program, named by a hash of
everything that changes the binary (source with its headers inlined, options,
kernel names, NVRTC version).

Entries are written to a temporary file and renamed into place, so processes
sharing a directory never read half an entry, and are checked (SHA-256) when
read. The cache can only make a call faster, never fail it: a directory that
cannot be created, read or written, or an entry that fails its check, means
compiling in memory, and a KernelCacheWarning says so once per directory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

ENV_VAR = "NVFP4_CUPY_CACHE_DIR"
_MAGIC = b"nvfp4-cupy kernel cache 1\n"
_DIGEST_SIZE = hashlib.sha256().digest_size


class KernelCacheWarning(RuntimeWarning):
    """The disk cache could not be used; kernels still compile and run."""


def cache_dir() -> Path:
    """$NVFP4_CUPY_CACHE_DIR, else nvfp4_cupy/ inside CuPy's kernel cache
    directory ($CUPY_CACHE_DIR, default ~/.cupy/kernel_cache). Read on every
    compile, so a test or a process can point it elsewhere at any time."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit)
    cupy_dir = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
    return Path(cupy_dir) / "nvfp4_cupy"


def entry_name(*key_parts: str) -> str:
    return hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:40] + ".bin"


def load(name: str) -> tuple[tuple[str, ...], bytes] | None:
    """(lowered names, image) of a valid entry, else None."""
    path = cache_dir() / name
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # not cached; store() says if it cannot be
        return None
    except OSError as exc:
        _warn_once(path.parent, f"cannot read kernel cache entry {path} ({exc}); compiling in memory")
        return None
    entry = _decode(data)
    if entry is None:
        _warn_once(path.parent, f"kernel cache entry {path} is corrupt; compiling again and replacing it")
    return entry


def store(name: str, lowered_names: tuple[str, ...], image: bytes) -> None:
    directory = cache_dir()
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tmp-", delete=False) as file:
            temporary = file.name
            file.write(_encode(lowered_names, image))
        os.replace(temporary, directory / name)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        _warn_once(
            directory,
            f"cannot write the kernel cache directory {directory} ({exc}); kernels are compiled in "
            f"memory and again in every process. Set {ENV_VAR} to a writable directory to keep them.",
        )


def entries() -> list[Path]:
    directory = cache_dir()
    return sorted(directory.glob("*.bin")) if directory.is_dir() else []


def _encode(lowered_names: tuple[str, ...], image: bytes) -> bytes:
    body = json.dumps(list(lowered_names)).encode() + b"\n" + image
    return _MAGIC + hashlib.sha256(body).digest() + body


def _decode(data: bytes) -> tuple[tuple[str, ...], bytes] | None:
    if not data.startswith(_MAGIC):
        return None
    digest = data[len(_MAGIC) : len(_MAGIC) + _DIGEST_SIZE]
    body = data[len(_MAGIC) + _DIGEST_SIZE :]
    if hashlib.sha256(body).digest() != digest:
        return None
    names, _, image = body.partition(b"\n")
    return tuple(json.loads(names)), image


_warned: set[Path] = set()
_warned_lock = threading.Lock()


def _warn_once(directory: Path, message: str) -> None:
    with _warned_lock:
        if directory in _warned:
            return
        _warned.add(directory)
    warnings.warn(f"nvfp4_cupy: {message}", KernelCacheWarning, stacklevel=4)
