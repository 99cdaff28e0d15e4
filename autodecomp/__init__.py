"""autodecomp: per-layer search over tensor decompositions for trained PyTorch CNNs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

if TYPE_CHECKING:  # the names are loaded on first use (PEP 562): `autodecomp --help` needs none
    from .compress.surgery import apply_plan, conv_layers, decompose_conv
    from .decompositions import (
        ConvSpec,
        DecomposedConv,
        DecompositionError,
        UnsupportedLayerError,
        get_method,
        methods,
        supporting_methods,
    )
    from .measure.cost import count_macs, count_params
    from .ship.model_file import load
    from .workload.models import get_model, model_names, register_model

# public name -> the module that defines it (relative to this package)
_LAZY = {
    "apply_plan": ".compress.surgery",
    "conv_layers": ".compress.surgery",
    "decompose_conv": ".compress.surgery",
    "ConvSpec": ".decompositions",
    "DecomposedConv": ".decompositions",
    "DecompositionError": ".decompositions",
    "UnsupportedLayerError": ".decompositions",
    "get_method": ".decompositions",
    "methods": ".decompositions",
    "supporting_methods": ".decompositions",
    "count_macs": ".measure.cost",
    "count_params": ".measure.cost",
    "load": ".ship.model_file",
    "get_model": ".workload.models",
    "model_names": ".workload.models",
    "register_model": ".workload.models",
}

__all__ = [
    "ConvSpec",
    "DecomposedConv",
    "DecompositionError",
    "UnsupportedLayerError",
    "__version__",
    "apply_plan",
    "conv_layers",
    "count_macs",
    "count_params",
    "decompose_conv",
    "get_method",
    "get_model",
    "load",
    "methods",
    "model_names",
    "register_model",
    "supporting_methods",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and keep the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
