"""Layer surgery: decompose one conv, or apply a whole plan to a copy of a model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from .decompositions import (
    ConvSpec,
    DecomposedConv,
    UnsupportedLayerError,
    get_method,
    supporting_methods,
)

__all__ = ["KEEP", "apply_plan", "conv_layers", "decompose_conv", "replace_module"]

KEEP = "keep"
_ENTRY_KEYS = {"method", "ratio", "rank"}


def decompose_conv(
    conv: nn.Conv2d,
    method: str,
    *,
    ratio: float | None = None,
    rank: Any = None,
    **opts: Any,
) -> DecomposedConv:
    """Replace a trained ``nn.Conv2d`` by a decomposed layer initialised from its weights.

    Args:
        conv: the dense convolution.
        method: a name from :func:`autodecomp.methods`.
        ratio: target fraction of the dense layer's parameters (> 0); the method picks the
            largest valid rank within it.
        rank: the method's own rank spec (see ``autodecomp methods``).
        **opts: method-specific options (e.g. ``hooi_iters`` for Tucker).

    Returns:
        A module whose forward approximates ``conv(x)``, with ``dense_weight()`` and ``macs()``.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"decompose_conv needs an nn.Conv2d, got {type(conv).__name__}")
    cls = get_method(method)
    if (ratio is None) == (rank is None):
        raise ValueError(
            f"give exactly one of ratio= or rank= (got ratio={ratio!r}, rank={rank!r})"
        )
    spec = ConvSpec.from_conv(conv)
    reason = cls.unsupported_reason(spec)
    if reason is not None:
        valid = ", ".join(supporting_methods(spec)) or "none"
        raise UnsupportedLayerError(
            f"method {method!r} cannot decompose this layer: {reason}; methods that can: {valid}"
        )
    rank = cls.normalize_rank(spec, rank) if rank is not None else cls.rank_for_ratio(spec, ratio)
    module = cls.from_weight(conv.weight, conv.bias, spec, rank, **opts)
    return module.to(device=conv.weight.device).train(conv.training)


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the dense convolutions some registered method can decompose."""
    names = []
    inside_decomposed: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DecomposedConv):
            inside_decomposed.append(name + ".")
            continue
        if not isinstance(module, nn.Conv2d) or type(module) is not nn.Conv2d:
            continue
        if any(name.startswith(prefix) for prefix in inside_decomposed):
            continue
        if supporting_methods(ConvSpec.from_conv(module)):
            names.append(name)
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``model`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_entry(name: str, entry: Any) -> dict[str, Any]:
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, Mapping) or "method" not in entry:
        raise ValueError(
            f"plan entry for {name!r} must be a mapping with a 'method', got {entry!r}"
        )
    return dict(entry)


def apply_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Return a copy of ``model`` with each planned layer decomposed; ``model`` is untouched.

    Args:
        model: the dense model.
        plan: ``{layer_name: {"method": "tucker", "ratio": 0.3}}`` or with ``"rank"``;
            method ``"keep"`` leaves a layer dense. Other keys are passed to the method.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(
            f"plan must be a mapping of layer name -> entry, got {type(plan).__name__}"
        )
    modules = dict(model.named_modules())
    valid = conv_layers(model)
    for name in plan:
        if name not in modules or not isinstance(modules[name], nn.Conv2d):
            shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
            raise ValueError(
                f"plan names layer {name!r}, not a conv of the model; valid layers: {shown}"
            )
    new = copy.deepcopy(model)
    for name, raw in plan.items():
        entry = _check_entry(name, raw)
        method = entry.pop("method")
        if method == KEEP:
            continue
        ratio, rank = entry.pop("ratio", None), entry.pop("rank", None)
        try:
            layer = decompose_conv(new.get_submodule(name), method, ratio=ratio, rank=rank, **entry)
        except ValueError as err:
            raise type(err)(f"layer {name!r}: {err}") from None
        replace_module(new, name, layer)
    return new
