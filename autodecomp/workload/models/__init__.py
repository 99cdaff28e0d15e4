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
from ...core.user_code import call_user, import_callable
from ._torchvision import build_torchvision

__all__ = ["MODELS", "get_model", "is_builtin_model", "model_names", "register_model"]

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


def is_builtin_model(name: str) -> bool:
    """Whether ``name`` is a registered model or a torchvision classification model: one that
    :func:`get_model` builds without importing code named by the caller."""
    return isinstance(name, str) and (name in MODELS or name in _torchvision_names())


def _user_model(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``"package.module:callable"``; any failure is a one-line ``ValueError`` naming it."""
    fn = import_callable(name, "model")
    try:
        if "in_channels" in inspect.signature(fn).parameters:
            kwargs = {**kwargs, "in_channels": in_channels}
    except (TypeError, ValueError):  # no introspectable signature (some builtins)
        pass
    model = call_user(fn, name, "model", num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not a torch nn.Module")
    return model


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

    Raises:
        ValueError: an unknown name, or a ``"package.module:callable"`` that cannot be
            imported, raises, or returns no ``nn.Module`` (one line naming it).
    """
    if name in MODELS:
        return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if ":" in name:
        return _user_model(name, num_classes, in_channels, kwargs)
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
