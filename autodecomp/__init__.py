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
    "methods",
    "supporting_methods",
]
