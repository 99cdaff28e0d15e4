"""autodecomp: per-layer search over tensor decompositions for trained PyTorch CNNs."""

from __future__ import annotations

from .compress.surgery import apply_plan, conv_layers, decompose_conv
from .core.version import __version__
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
