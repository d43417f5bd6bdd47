"""What the ops need from an array library, for CuPy and torch alike: an
input's pointer, shape, strides, dtype and device; the current stream's raw
handle; outputs allocated on the launch stream; the checks on caller-given
outputs and global scales. Ops never touch cupy.ndarray or torch.Tensor
directly, so one op serves both (and a torch caller's hot path holds no CuPy
object and no DLPack round trip)."""

from __future__ import annotations

import math

import numpy as np

import cupy as cp
from cupy.cuda import runtime

from .._format import (
    NUMPY_DTYPES,
    SUPPORTED_DTYPES,
    UINT8,
    check_dtype,
    dtype_name_of,
    global_scale_kind,
    host_global_scale,
    is_host_scalar,
)

# dtype names of every array this package reads or writes, with NumPy's dtypes
_ALL_DTYPES = SUPPORTED_DTYPES + ("uint8", "int32")
_NUMPY_DTYPES = {**NUMPY_DTYPES, "uint8": UINT8, "int32": np.dtype(np.int32)}


class Array:
    """An input's facts, read once per call: pointer, shape, strides in
    bytes, dtype (the library's own object, for cache keys), device."""

    __slots__ = ("obj", "pointer", "shape", "strides", "dtype", "device_id", "itemsize")

    def __init__(self, obj, pointer, shape, strides, dtype, device_id, itemsize):
        self.obj, self.pointer, self.shape, self.strides = obj, pointer, shape, strides
        self.dtype, self.device_id, self.itemsize = dtype, device_id, itemsize

    def byte_range(self) -> tuple[int, int]:
        """[first, last) addresses the array's elements can occupy."""
        if 0 in self.shape:
            return self.pointer, self.pointer
        low = self.pointer + sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s < 0)
        high = self.pointer + sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s > 0) + self.itemsize
        return low, high


class CupyFrontend:
    def array(self, obj, name: str) -> Array:
        if not isinstance(obj, cp.ndarray):
            obj = _from_dlpack(obj, name)
        return Array(obj, obj.data.ptr, obj.shape, obj.strides, obj.dtype, obj.data.device_id, obj.itemsize)

    @staticmethod
    def signature(obj):
        """(what a repeated call's checks depend on, pointer), or None where
        only the full checks can tell (not a plain CuPy array)."""
        if type(obj) is not cp.ndarray:
            return None
        data = obj.data
        return (obj.shape, obj.strides, obj.dtype, data.device_id), data.ptr

    @staticmethod
    def dtype_name(dtype) -> str:
        return check_dtype(dtype)

    @staticmethod
    def stream(device_id: int) -> int:
        return cp.cuda.get_current_stream(device_id).ptr

    @staticmethod
    def allocator(device_id: int, stream: int):
        """empty(shape, dtype name) for a call's outputs, allocated with
        `stream` current so that the memory pool orders each buffer's reuse
        after the launch on it."""
        if runtime.getDevice() == device_id and cp.cuda.get_current_stream().ptr == stream:
            return _cupy_empty  # the common case: no device or stream switch

        def empty(shape: tuple, dtype_name: str):
            with cp.cuda.Device(device_id), cp.cuda.ExternalStream(stream, device_id):
                return _cupy_empty(shape, dtype_name)

        return empty

    @staticmethod
    def outputs(device_id: int, stream: int, specs: tuple) -> list:
        """Uninitialized arrays of these (shape, dtype name) specs, a call's
        outputs, carved (each 256-byte aligned) from one allocation of the
        memory pool with `stream` current: one pool call instead of one an
        output, which is most of what a small call costs beyond its launch."""
        return CupyFrontend.fresh(device_id, stream, specs)[0]

    @staticmethod
    def fresh(device_id: int, stream: int, specs: tuple) -> tuple[list, list]:
        """(outputs, their device pointers): outputs() for the hot paths,
        which pass the pointers to the kernel without asking each array."""
        carve = _carves.get(specs) or _carve(specs)
        if runtime.getDevice() == device_id and cp.cuda.get_current_stream().ptr == stream:
            memory = cp.cuda.alloc(carve[0])
        else:
            with cp.cuda.Device(device_id), cp.cuda.ExternalStream(stream, device_id):
                memory = cp.cuda.alloc(carve[0])
        base = memory.ptr
        return ([cp.ndarray(shape, dtype, memory + offset if offset else memory) for shape, dtype, offset in carve[1]],
                [base + offset for _, _, offset in carve[1]])

    @staticmethod
    def pointer(array) -> int:
        return array.data.ptr

    @staticmethod
    def as_frontend(arrays: tuple) -> tuple:
        return tuple(a if isinstance(a, cp.ndarray) else cp.from_dlpack(a) for a in arrays)


# specs -> (bytes, [(shape, NumPy dtype, offset)]): CupyFrontend.outputs'
# carving, worked out once per set of output shapes.
_carves: dict = {}


def _carve(specs: tuple) -> tuple:
    pieces, total = [], 0
    for shape, dtype_name in specs:
        dtype = _NUMPY_DTYPES[dtype_name]
        pieces.append((shape, dtype, total))
        total += -(-math.prod(shape) * dtype.itemsize // 256) * 256
    carve = (total, pieces)
    if len(_carves) < 4096:
        _carves[specs] = carve
    return carve


class TorchFrontend:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.dtypes = {getattr(torch, name): name for name in _ALL_DTYPES}
        self.torch_dtypes = {name: dtype for dtype, name in self.dtypes.items()}
        self._raw_stream = torch._C._cuda_getCurrentRawStream  # an int, not a Stream object
        self._devices: dict[int, object] = {}
        self._strides: dict[tuple, tuple] = {}  # C-contiguous strides in elements, by shape

    def array(self, obj, name: str) -> Array:
        torch = self.torch
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"{name} must be a torch CUDA tensor, got {type(obj).__name__}")
        if not obj.is_cuda:
            raise TypeError(f"{name} is a {obj.device.type} tensor; pass a CUDA tensor")
        if obj.requires_grad and torch.is_grad_enabled():
            raise TypeError(f"{name} requires grad, but this op has no gradient; pass {name}.detach()")
        itemsize = obj.element_size()
        strides = tuple([s * itemsize for s in obj.stride()])
        return Array(obj, obj.data_ptr(), tuple(obj.shape), strides, obj.dtype, obj.get_device(), itemsize)

    def signature(self, obj):
        """As CupyFrontend.signature; a tensor that requires grad always
        takes the full checks (grad mode may have changed since)."""
        if type(obj) is not self.torch.Tensor or obj.requires_grad:
            return None
        return (obj.shape, obj.stride(), obj.dtype, obj.get_device()), obj.data_ptr()

    def dtype_name(self, dtype) -> str:
        name = self.dtypes.get(dtype)
        if name not in SUPPORTED_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32, got dtype {str(dtype).replace('torch.', '')}")
        return name

    def stream(self, device_id: int) -> int:
        return self._raw_stream(device_id)

    def allocator(self, device_id: int, stream: int):
        """empty(shape, dtype name) on the device. torch's caching allocator
        orders reuse by torch's current stream, the launch stream of every
        torch call."""
        device = self._device(device_id)
        empty_strided, dtypes, known = self.torch.empty_strided, self.torch_dtypes, self._strides

        def empty(shape: tuple, dtype_name: str):
            # empty_strided with known strides parses its arguments faster than empty (2.3 vs 3.3 us).
            return empty_strided(shape, known.get(shape) or self._strides_of(shape), dtype=dtypes[dtype_name],
                                 device=device)

        return empty

    def outputs(self, device_id: int, stream: int, specs: tuple) -> list:
        """Uninitialized tensors of these (shape, dtype name) specs, a call's
        outputs."""
        device = self._devices.get(device_id) or self._device(device_id)
        known, empty_strided, dtypes = self._strides, self.torch.empty_strided, self.torch_dtypes
        return [empty_strided(shape, known.get(shape) or self._strides_of(shape), dtype=dtypes[dtype_name],
                              device=device)
                for shape, dtype_name in specs]

    def fresh(self, device_id: int, stream: int, specs: tuple) -> tuple[list, list]:
        """(outputs, their device pointers), as CupyFrontend.fresh."""
        tensors = self.outputs(device_id, stream, specs)
        return tensors, [tensor.data_ptr() for tensor in tensors]

    def _device(self, device_id: int):
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = self.torch.device("cuda", device_id)
        return device

    def _strides_of(self, shape: tuple) -> tuple:
        """C-contiguous strides in elements, remembered: serving loops repeat
        a few shapes (the rest is bounded)."""
        strides = self._strides.get(shape)
        if strides is None:
            strides = c_strides(shape, 1)
            if len(self._strides) < 4096:
                self._strides[shape] = strides
        return strides

    @staticmethod
    def pointer(tensor) -> int:
        return tensor.data_ptr()

    def as_frontend(self, arrays: tuple) -> tuple:
        return tuple(a if isinstance(a, self.torch.Tensor) else self.torch.from_dlpack(a) for a in arrays)


def _cupy_empty(shape: tuple, dtype_name: str):
    return cp.empty(shape, dtype=_NUMPY_DTYPES[dtype_name])


CUPY = CupyFrontend()
_torch_frontend: TorchFrontend | None = None


def torch_frontend() -> TorchFrontend:
    global _torch_frontend
    if _torch_frontend is None:
        _torch_frontend = TorchFrontend()
    return _torch_frontend


def frontend_of(obj):
    """torch's for a torch tensor (read natively, no DLPack), else CuPy's
    (which takes CuPy arrays and other DLPack producers)."""
    frontend = _frontend_by_type.get(type(obj))
    if frontend is None:
        frontend = torch_frontend() if type(obj).__module__.startswith("torch") else CUPY
        if len(_frontend_by_type) < 64:
            _frontend_by_type[type(obj)] = frontend
    return frontend


# type -> frontend: a repeated call asks this for every array it is given.
_frontend_by_type: dict = {}


def output_frontend(like, input_frontend):
    """Where outputs are allocated: `like` ("cupy" or "torch"), by default
    CuPy for the CuPy API (torch input included, as it always was)."""
    if like is None or like == "cupy":
        return CUPY
    if like == "torch":
        return torch_frontend()
    raise ValueError(f"like must be None, 'cupy' or 'torch', got {like!r}")


def _from_dlpack(obj, name: str) -> cp.ndarray:
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a NumPy (host) array; pass a CuPy array or a CUDA tensor")
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{name} must be a CuPy array or a CUDA tensor, got {type(obj).__name__}")
    try:
        return cp.from_dlpack(obj)
    except Exception as exc:  # the producer's own error says why (CPU tensor, dtype, ...)
        raise TypeError(f"{name}: cannot use {type(obj).__name__} as a CUDA array: {exc}") from None


def resolve_stream(stream, device_id: int, input_frontend, source: str = "x") -> int:
    """The raw handle of the launch stream: `stream` (a CuPy stream or a
    torch.cuda.Stream), by default the current stream of the input's library
    (torch's for torch input, so work is ordered with the caller's, no sync)."""
    if stream is None:
        return input_frontend.stream(device_id)
    if isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        stream_device = stream.device_id
        handle = stream.ptr
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream, without importing torch here
        stream_device = getattr(getattr(stream, "device", None), "index", device_id)
        handle = stream.cuda_stream
    else:
        raise TypeError(f"stream must be a cupy.cuda.Stream, a torch.cuda.Stream or None, got {type(stream).__name__}")
    if stream_device not in (-1, device_id, None):
        raise ValueError(f"stream belongs to device {stream_device} but {source} is on device {device_id}")
    return handle


def check_output(buffer, name: str, shape: tuple, dtype_name: str, device_id: int, source: str) -> Array:
    """A caller-given output: the frontend's array, dtype, shape, C-contiguous,
    on the input's device."""
    array = frontend_of(buffer).array(buffer, name)
    got = dtype_name_of(array.dtype)
    if got != dtype_name:
        raise TypeError(f"{name} must have dtype {dtype_name}, got {got}")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(array.shape)}")
    if array.strides != c_strides(shape, array.itemsize):
        raise ValueError(f"{name} must be C-contiguous, got strides {array.strides}")
    if array.device_id != device_id:
        raise ValueError(f"{name} is on device {array.device_id} but {source} is on device {device_id}")
    return array


def c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def check_disjoint(reads: list, writes: list) -> None:
    """(name, (first, last)) address ranges: what a kernel writes must not
    overlap anything else it reads or writes, as threads run in no order."""
    ranges = [(name, span, i >= len(reads)) for i, (name, span) in enumerate(reads + writes) if span[0] < span[1]]
    for i, (name_a, (lo_a, hi_a), written_a) in enumerate(ranges):
        for name_b, (lo_b, hi_b), written_b in ranges[i + 1 :]:
            if (written_a or written_b) and lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{name_b} overlaps {name_a} in device memory; pass separate buffers")


class GlobalScale:
    """A global-scale argument as the kernels take it: a device pointer (0
    for none) and a host value, plus which blocks share a scale."""

    __slots__ = ("array", "pointer", "value", "kind")

    def __init__(self, array, pointer: int, value: float, kind: str):
        self.array, self.pointer, self.value, self.kind = array, pointer, value, kind


def global_scale_steps(kind: str, m: int) -> tuple[int, int]:
    """(expert step, row step) of a device global-scale array of this kind:
    row r of expert e (m rows an expert) reads element e * expert step +
    r * row step. The kernels take these, so that one indexing serves one
    scale, one per expert and one per row."""
    return {"one": (0, 0), "expert": (1, 0), "row": (m, 1)}[kind]


def global_scale_argument(global_scale, device_id: int, x_shape: tuple, source: str = "x") -> GlobalScale:
    """A host scalar is checked here (finite, > 0); a float32 device array is
    read by the kernel (no host sync, capturable in CUDA graphs), its shape
    deciding the kind (_format.global_scale_kind)."""
    if type(global_scale) is float or not hasattr(global_scale, "__dlpack__") or is_host_scalar(global_scale):
        # A host number; anything else that is no array gets the golden model's TypeError.
        return GlobalScale(None, 0, float(host_global_scale(global_scale)), "one")
    array = frontend_of(global_scale).array(global_scale, "global_scale")
    if dtype_name_of(array.dtype) != "float32":
        raise TypeError(f"global_scale as a device array must be float32, got {dtype_name_of(array.dtype)}")
    if array.device_id != device_id:
        raise ValueError(f"global_scale is on device {array.device_id} but {source} is on device {device_id}")
    kind = global_scale_kind(tuple(array.shape), tuple(x_shape))
    if kind != "one" and math.prod(array.shape) > 1 and array.strides != c_strides(array.shape, 4):
        raise ValueError(f"global_scale must be contiguous, got strides {array.strides}")
    return GlobalScale(array, array.pointer, 0.0, kind)
