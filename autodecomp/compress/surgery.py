"""Layer surgery: decompose one conv, or apply a whole plan to a copy of a model (fitted, or
as an unfitted skeleton of the plan's structure)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..decompositions import (
    ConvSpec,
    DecomposedConv,
    DecompositionError,
    UnsupportedLayerError,
    get_method,
    supporting_methods,
)
from ..decompositions.base import Rank, check_rank_request
from .plan import INITS, KEEP, PRUNE, PlanEntry
from .prune import is_shift_block, prunable_methods, prune_entry, shift_blocks
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
    "on_device",
    "plan_entries",
    "skeleton",
]


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
    cls, spec, rank = _resolved(conv, method, ratio, rank, rank_multiple)
    if calibration is not None and not calibration.matches(spec):
        raise ValueError(
            f"calibration statistics were taken for a conv of geometry {calibration.spec}, "
            f"not for this one ({spec})"
        )
    with on_device(conv.weight.device):
        if calibration is None:
            module = cls.from_weight(conv.weight, conv.bias, spec, rank, **opts)
        else:
            module = cls.from_calibration(conv.weight, conv.bias, spec, rank, calibration, **opts)
    return module.to(device=conv.weight.device).train(conv.training)


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """``device`` as torch's default device while a layer is factorised, so the tensors and
    modules a solver makes without naming a device (and factor-cache entries read from
    disk) land where the conv's weight lives, never on the CPU and back; a no-op when it
    already is the default."""
    return nullcontext() if device == torch.get_default_device() else torch.device(device)


def _resolved(
    conv: nn.Module, method: str, ratio: float | None, rank: Any, rank_multiple: int
) -> tuple[type[DecomposedConv], ConvSpec, Rank]:
    """The method class, spec and checked rank of decomposing ``conv`` (:func:`decompose_conv`)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"decompose_conv needs an nn.Conv2d, got {type(conv).__name__}")
    cls = get_method(method)
    check_rank_request(rank, ratio)
    spec = ConvSpec.from_conv(conv)
    reason = cls.unsupported_reason(spec)
    if reason is not None:
        valid = ", ".join(supporting_methods(spec)) or "none"
        raise UnsupportedLayerError(
            f"method {method!r} cannot decompose this layer: {reason}; methods that can: {valid}"
        )
    return cls, spec, cls.resolve_rank(spec, rank=rank, ratio=ratio, rank_multiple=rank_multiple)


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


def data_init_layers(plan: Mapping[str, Any]) -> list[str]:
    """Layers whose plan entry asks for ``"init": "data"`` (they need calibration statistics)."""
    return [n for n, e in plan.items() if PlanEntry.from_dict(e, n).init == "data"]


def plan_entries(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, PlanEntry]:
    """``plan``'s entries parsed (:meth:`PlanEntry.from_dict`) and checked against ``model``:
    each names a conv or a shift block, and a shift block is pruned or kept."""
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
    entries = {name: PlanEntry.from_dict(raw, name) for name, raw in plan.items()}
    for name, entry in entries.items():
        if name in blocks and entry.decomposes:
            raise ValueError(
                f"layer {name!r} is a shift block: its method must be 'prune' or 'keep', "
                f"got {entry.method!r}"
            )
    return entries


def _stats_for(
    name: str, entry: PlanEntry, calibration: Mapping[str, InputStats] | None
) -> InputStats | None:
    if entry.init != "data":
        return None
    if calibration is None or name not in calibration:
        raise ValueError(
            f"layer {name!r}: init 'data' needs its calibration statistics "
            "(apply_plan(..., calibration=collect_input_stats(...)), from "
            "autodecomp.compress.calibration)"
        )
    return calibration[name]


def _on_layer(name: str, err: Exception) -> Exception:
    """``err`` (same type) with its message prefixed by the layer's name."""
    return type(err)(f"layer {name!r}: {err}")


def _pruned(name: str, module: nn.Module, entry: PlanEntry) -> nn.Module:
    """``module`` pruned by a plan entry (:func:`autodecomp.compress.prune.prune_entry`)."""
    if not is_shift_block(module):
        raise ValueError(
            f"layer {name!r}: pruning needs a shift block, got {type(module).__name__} "
            f"(methods that build one: {', '.join(prunable_methods()) or 'none'})"
        )
    try:
        return prune_entry(module, entry)
    except ValueError as err:
        raise _on_layer(name, err) from None


def _decomposed(
    name: str, conv: nn.Module, entry: PlanEntry, stats: InputStats | None
) -> nn.Module:
    """``conv`` decomposed (fitted) as ``entry`` says, then pruned if it says so."""
    try:
        layer = decompose_conv(
            conv,
            entry.method,
            ratio=entry.ratio,
            rank=entry.rank,
            rank_multiple=entry.rank_multiple or 1,
            calibration=stats,
            **entry.options,
        )
    except (ValueError, DecompositionError) as err:  # e.g. a non-finite kernel
        raise _on_layer(name, err) from None
    return layer if entry.prune is None else _pruned(name, layer, entry)


def _prune_blocks(model: nn.Module, entries: Mapping[str, PlanEntry]) -> None:
    """Prune ``model``'s planned shift blocks in place (before any layer is decomposed, so
    a layer inside one sees its pruned shape)."""
    for name, entry in entries.items():
        if entry.method == PRUNE:
            replace_module(model, name, _pruned(name, model.get_submodule(name), entry))


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
            pruned by an extra ``"prune": p``. Entries may also be :class:`PlanEntry` values.
        calibration: ``{layer_name: InputStats}`` of the dense model, needed by the entries
            with ``"init": "data"``.
    """
    entries = plan_entries(model, plan)
    new = copy.deepcopy(model)
    _prune_blocks(new, entries)
    for name, entry in entries.items():
        if entry.decomposes:
            stats = _stats_for(name, entry, calibration)
            replace_module(new, name, _decomposed(name, new.get_submodule(name), entry, stats))
    return new


def skeleton(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """A copy of ``model`` with ``plan``'s structure and unfitted layers: enough to count its
    cost, or to load a compressed model's state dict into.

    Each decomposed layer is built empty at its rank (``empty_like``; a ratio resolves to
    the method's weight-free rank, :meth:`DecomposedConv.resolve_rank`), so nothing is
    factorised. Shift blocks are pruned as :func:`apply_plan` prunes them (to explicit
    group sizes, or by a ratio on the channels' saliency), and a layer decomposed then
    pruned by a ratio above 0 is fitted to its kernel: its pruned structure depends on the
    weights (a ratio of 0 prunes nothing).
    """
    entries = plan_entries(model, plan)
    new = copy.deepcopy(model)
    _prune_blocks(new, entries)
    for name, entry in entries.items():
        if not entry.decomposes:
            continue
        conv = new.get_submodule(name)
        if entry.prune:  # pruned by saliency: fit, then prune
            layer = _decomposed(name, conv, entry, None)
        else:
            try:
                cls, spec, rank = _resolved(
                    conv, entry.method, entry.ratio, entry.rank, entry.rank_multiple or 1
                )
            except ValueError as err:
                raise _on_layer(name, err) from None
            layer = cls.empty_like(spec, rank, conv.weight)
        replace_module(new, name, layer)
    return new
