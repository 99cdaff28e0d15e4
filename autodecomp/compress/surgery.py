"""Layer surgery: decompose one conv, or apply a whole plan to a copy of a model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..decompositions import (
    ConvSpec,
    DecomposedConv,
    UnsupportedLayerError,
    get_method,
    supporting_methods,
)
from .prune import PRUNE, is_shift_block, prunable_methods, prune_entry, shift_blocks
from .replace import replace_module

if TYPE_CHECKING:
    from ..factorize.input_stats import InputStats

__all__ = [
    "INITS",
    "KEEP",
    "apply_plan",
    "conv_layers",
    "data_init_layers",
    "decompose_conv",
]

KEEP = "keep"
INITS = ("weight", "data")  # plan entry "init": fit the kernel, or the output on calibration data


def decompose_conv(
    conv: nn.Conv2d,
    method: str,
    *,
    ratio: float | None = None,
    rank: Any = None,
    rank_multiple: int = 1,
    calibration: InputStats | None = None,
    **opts: Any,
) -> DecomposedConv:
    """Replace a trained ``nn.Conv2d`` by a decomposed layer initialised from its weights.

    Args:
        conv: the dense convolution.
        method: a name from :func:`autodecomp.methods`.
        ratio: target fraction of the dense layer's parameters (> 0); the method picks the
            largest valid rank within it.
        rank: the method's own rank spec (see ``autodecomp methods``).
        rank_multiple: with ``ratio``, round the chosen rank's channel widths that are at
            least this down to a multiple of it (:meth:`DecomposedConv.align_rank`; 8 suits
            CPU kernels that work in 8-float vectors).
        calibration: this layer's input statistics
            (:func:`autodecomp.compress.calibration.collect_input_stats`): fit the layer's output on
            the calibration inputs instead of the kernel
            (:meth:`~autodecomp.decompositions.DecomposedConv.from_calibration`; options
            ``damping`` and ``refine_steps``).
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
    rank = cls.resolve_rank(spec, rank=rank, ratio=ratio, rank_multiple=rank_multiple)
    if calibration is None:
        module = cls.from_weight(conv.weight, conv.bias, spec, rank, **opts)
    else:
        if not calibration.matches(spec):
            raise ValueError(
                f"calibration statistics were taken for a conv of geometry {calibration.spec}, "
                f"not for this one ({spec})"
            )
        module = cls.from_calibration(conv.weight, conv.bias, spec, rank, calibration, **opts)
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


def _check_entry(name: str, entry: Any) -> dict[str, Any]:
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, Mapping) or "method" not in entry:
        raise ValueError(
            f"plan entry for {name!r} must be a mapping with a 'method', got {entry!r}"
        )
    return dict(entry)


def data_init_layers(plan: Mapping[str, Any]) -> list[str]:
    """Layers whose plan entry asks for ``"init": "data"`` (they need calibration statistics)."""
    return [n for n, e in plan.items() if isinstance(e, Mapping) and e.get("init") == "data"]


def _stats_for(
    name: str, init: Any, calibration: Mapping[str, InputStats] | None
) -> InputStats | None:
    if init not in INITS:
        raise ValueError(f"layer {name!r}: unknown init {init!r}; valid: {', '.join(INITS)}")
    if init == "weight":
        return None
    if calibration is None or name not in calibration:
        raise ValueError(
            f"layer {name!r}: init 'data' needs its calibration statistics "
            "(apply_plan(..., calibration=collect_input_stats(...)), from "
            "autodecomp.compress.calibration)"
        )
    return calibration[name]


def _pruned(name: str, module: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
    """``module`` pruned by a plan entry (:func:`autodecomp.compress.prune.prune_entry`)."""

    if not is_shift_block(module):
        raise ValueError(
            f"layer {name!r}: pruning needs a shift block, got {type(module).__name__} "
            f"(methods that build one: {', '.join(prunable_methods()) or 'none'})"
        )
    try:
        return prune_entry(module, entry)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None


def apply_plan(
    model: nn.Module,
    plan: Mapping[str, Any],
    *,
    calibration: Mapping[str, InputStats] | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with each planned layer decomposed; ``model`` is untouched.

    Args:
        model: the dense model.
        plan: ``{layer_name: {"method": "tucker", "ratio": 0.3}}`` or with ``"rank"``;
            method ``"keep"`` leaves a layer dense; ``"init": "data"`` fits the layer's
            output on calibration inputs (default ``"weight"``: the kernel). Other keys are
            passed to the method. A shift block (:func:`autodecomp.compress.prune.shift_blocks`) is
            pruned by ``{"method": "prune", "prune": p}`` (``p``: fraction of its intermediate
            channels removed) or ``{"method": "prune", "rank": group_sizes}``, before any
            layer is decomposed; a layer decomposed into a shift block (``shift``) is then
            pruned by an extra ``"prune": p``.
        calibration: ``{layer_name: InputStats}`` of the dense model, needed by the entries
            with ``"init": "data"``.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(
            f"plan must be a mapping of layer name -> entry, got {type(plan).__name__}"
        )

    modules = dict(model.named_modules())
    blocks = shift_blocks(model)
    for name in plan:
        if name not in blocks and not isinstance(modules.get(name), nn.Conv2d):
            valid = conv_layers(model) + blocks
            shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
            raise ValueError(
                f"plan names layer {name!r}, not a conv or shift block of the model; "
                f"valid layers: {shown}"
            )
    new = copy.deepcopy(model)
    entries = {name: _check_entry(name, raw) for name, raw in plan.items()}
    for name, entry in entries.items():  # blocks first: a layer inside sees its pruned shape
        if entry["method"] == PRUNE:
            replace_module(new, name, _pruned(name, new.get_submodule(name), entry))
    for name, entry in entries.items():
        method = entry.pop("method")
        prune = entry.pop("prune", None)
        if method == PRUNE or (method == KEEP and prune is None):
            continue
        if name in blocks:
            raise ValueError(
                f"layer {name!r} is a shift block: its method must be 'prune' or 'keep', "
                f"got {method!r}"
            )
        if method == KEEP:
            raise ValueError(f"layer {name!r}: 'prune' needs a decomposition method, not 'keep'")
        ratio, rank = entry.pop("ratio", None), entry.pop("rank", None)
        multiple = entry.pop("rank_multiple", 1)
        stats = _stats_for(name, entry.pop("init", "weight"), calibration)
        try:
            layer = decompose_conv(
                new.get_submodule(name),
                method,
                ratio=ratio,
                rank=rank,
                rank_multiple=multiple,
                calibration=stats,
                **entry,
            )
        except ValueError as err:
            raise type(err)(f"layer {name!r}: {err}") from None
        if prune is not None:
            layer = _pruned(name, layer, {"prune": prune})
        replace_module(new, name, layer)
    return new
