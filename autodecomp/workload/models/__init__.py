"""Model zoo: built-in CIFAR-style ResNets, shift networks, a digits CNN, any torchvision
classification model, and ``package.module:callable`` for user models.

Each module in this package registers its builders with :func:`register_model`; adding a
model family is adding a file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from ...core.registry import Registry
from ._torchvision import build_torchvision

__all__ = ["MODELS", "get_model", "model_names", "register_model"]

Builder = Callable[..., nn.Module]
MODELS: Registry[Builder] = Registry("model")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(*, num_classes, in_channels, **kwargs) -> nn.Module``."""
    return MODELS.register(name)


def model_names() -> list[str]:
    """Names of the built-in models (torchvision names and import paths also work)."""
    return MODELS.names()


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def get_model(
    name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Build a model by name with random weights.

    Args:
        name: a built-in name (:func:`model_names`), a torchvision classification model name
            (e.g. ``"resnet18"``), or ``"package.module:callable"``.
        num_classes: size of the classifier output.
        in_channels: image channels (built-ins and torchvision ResNets adapt their stem).
        **kwargs: passed to the builder (e.g. ``expansion`` for shift ResNets).
    """
    if name in MODELS:
        return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import model {name!r}: {err}") from None
        if "in_channels" in inspect.signature(fn).parameters:
            kwargs["in_channels"] = in_channels
        return fn(num_classes=num_classes, **kwargs)
    tv = _torchvision_names()
    if name in tv:
        return build_torchvision(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    raise ValueError(
        f"unknown model {name!r}; built-in models: {', '.join(model_names())}; "
        "or a torchvision classification model (e.g. resnet18), or 'package.module:callable'"
    )


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
