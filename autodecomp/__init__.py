"""autodecomp: per-layer search over tensor decompositions for trained PyTorch CNNs."""

from __future__ import annotations

from .cost import count_macs, count_params
from .decompositions import (
    ConvSpec,
    DecomposedConv,
    DecompositionError,
    UnsupportedLayerError,
    get_method,
    methods,
    supporting_methods,
)
from .export import load
from .models import get_model, model_names, register_model
from .surgery import apply_plan, conv_layers, decompose_conv

__version__ = "0.1.0"

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
