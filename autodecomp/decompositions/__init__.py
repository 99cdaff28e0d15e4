"""Decomposition methods: one module per method, each registered with ``@register``.

Every module in this package is imported here, so adding a method is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..core.errors import DecompositionError, UnsupportedLayerError
from ..core.spec import ConvSpec
from .base import SOLVERS, DecomposedConv, get_method, methods, register, supporting_methods

_INFRASTRUCTURE = {"base", "layers"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "SOLVERS",
    "ConvSpec",
    "DecomposedConv",
    "DecompositionError",
    "UnsupportedLayerError",
    "get_method",
    "methods",
    "register",
    "supporting_methods",
]
