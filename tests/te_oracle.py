"""TransformerEngine's own pure-Python NVFP4 reference
(transformer_engine/pytorch/custom_recipes/reference_nvfp4.py, from the
`transformer_engine` wheel on PyPI) as a test oracle, on a CPU, without TE's
compiled core.

The wheel's package __init__ refuses to import without the core library, so
its files are loaded directly, with the two framework classes the module
subclasses (Quantizer, QuantizedTensorStorage) and one helper (is_custom)
stubbed: the stubs carry no numerics, so every byte comes from TE's code.
Never copy TE's code into ours: this module only loads it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest

_STUBBED = "transformer_engine"


class _Quantizer:
    """Stand-in for transformer_engine.pytorch.quantized_tensor.Quantizer:
    only the usage flags the reference reads."""

    def __init__(self, rowwise: bool = True, columnwise: bool = True):
        self.rowwise_usage = rowwise
        self.columnwise_usage = columnwise
        self.internal = False


class _QuantizedTensorStorage:
    """Stand-in for the storage base class (no behaviour the reference uses)."""


def _package(name: str, path: list[str] | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = path or []
    return module


def load_reference_nvfp4():
    """The module reference_nvfp4, loaded from the installed wheel's files;
    skips the test where the wheel is not installed."""
    spec = importlib.util.find_spec(_STUBBED) if _STUBBED not in sys.modules else None
    if _STUBBED in sys.modules and hasattr(sys.modules[_STUBBED], "_nvfp4_cupy_oracle"):
        return sys.modules[f"{_STUBBED}.pytorch.custom_recipes.reference_nvfp4"]
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("transformer_engine (the py3-none-any wheel) is not installed: pip install -e '.[test]'")
    pytest.importorskip("torch", reason="TE's reference runs on torch")
    root = list(spec.submodule_search_locations)[0]
    top = _package(_STUBBED, [root])
    top._nvfp4_cupy_oracle = True
    pytorch = _package(f"{_STUBBED}.pytorch", [f"{root}/pytorch"])
    quantized_tensor = types.ModuleType(f"{_STUBBED}.pytorch.quantized_tensor")
    quantized_tensor.Quantizer = _Quantizer
    quantized_tensor.QuantizedTensorStorage = _QuantizedTensorStorage
    tensor = _package(f"{_STUBBED}.pytorch.tensor")
    tensor_utils = types.ModuleType(f"{_STUBBED}.pytorch.tensor.utils")
    tensor_utils.is_custom = lambda obj=None: True
    recipes = _package(f"{_STUBBED}.pytorch.custom_recipes", [f"{root}/pytorch/custom_recipes"])
    for module in (top, pytorch, quantized_tensor, tensor, tensor_utils, recipes):
        sys.modules[module.__name__] = module
    loaded = None
    for name in ("reference_utils", "gemm", "reference_nvfp4"):
        full = f"{_STUBBED}.pytorch.custom_recipes.{name}"
        loader = importlib.machinery.SourceFileLoader(full, f"{root}/pytorch/custom_recipes/{name}.py")
        module_spec = importlib.util.spec_from_loader(full, loader)
        loaded = importlib.util.module_from_spec(module_spec)
        sys.modules[full] = loaded
        loader.exec_module(loaded)
        setattr(recipes, name, loaded)
    return loaded
