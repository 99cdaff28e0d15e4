"""Any torchvision classification model by name, with random weights (nothing is downloaded)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["build_torchvision"]

# Models whose auxiliary heads would make training-mode outputs tuples; off unless asked.
_AUX_LOGITS = ("googlenet", "inception_v3")


def _first_image_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module
    raise ValueError(
        f"cannot adapt {type(model).__name__} to other input channels: no 3-channel conv"
    )


def _adapt_stem(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel conv by one with ``in_channels`` inputs (same geometry).

    The new kernel cycles through the random RGB kernel's input slices, scaled by
    ``sqrt(3 / in_channels)`` so the model's own initialisation scale is kept.
    """
    name, conv = _first_image_conv(model)
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        index = torch.arange(in_channels) % 3
        new.weight.copy_(conv.weight[:, index] * math.sqrt(3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_torchvision(
    name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Build ``torchvision.models.<name>`` with random weights (``weights=None``).

    Args:
        name: a torchvision classification model name (e.g. ``"resnet18"``).
        num_classes: classifier outputs.
        in_channels: image channels; for values other than 3 the first 3-channel conv is
            replaced by a conv of the same geometry (random kernel at the same scale).
        **kwargs: passed to the torchvision builder (e.g. ``dropout``); ``weights`` must be
            None. GoogLeNet and Inception-v3 default to ``aux_logits=False``.
    """
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise ValueError(f"unknown torchvision model {name!r}; valid: {', '.join(sorted(valid))}")
    if kwargs.pop("weights", None) is not None:
        raise ValueError("pretrained weights cannot be downloaded here; pass weights=None")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name in _AUX_LOGITS:
        kwargs.setdefault("aux_logits", False)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_stem(model, in_channels)
    return model
