"""MACs and parameters of a planned model, counted by fvcore one layer at a time."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..compress.plan import PRUNE, PlanEntry
from ..decompositions import DecomposedConv
from .cost import count_macs, count_params

__all__ = ["PlanCost", "layer_input_shapes"]


def _rank_json(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def layer_input_shapes(
    model: nn.Module, input_shape: tuple[int, ...], names: list[str]
) -> dict[str, tuple[int, ...]]:
    """``(C, H, W)`` of the input each named module sees, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return record

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    param = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return shapes


def _final_rank(module: nn.Module, method: str) -> Any:
    """A decomposed layer's final rank, a pruned shift block's group sizes, else None."""
    if isinstance(module, DecomposedConv):
        return _rank_json(module.rank)
    if method == PRUNE:
        return list(module.shift.group_sizes)
    return None


class PlanCost:
    """MACs and parameters of a compressed model, counted by fvcore one layer at a time.

    The total is the baseline's fvcore count with each planned layer's dense count swapped
    for the count of its replacement, taken on that layer's input shape and cached by
    (layer, method, rank). A decomposed layer's count is its method's MAC formula
    (:meth:`DecomposedConv.macs`, equal to fvcore's trace of it: ``tests/test_conformance.py``
    checks every method), which costs nothing; a pruned shift block is traced by fvcore.
    A layer's structure is a function of its spec and its final rank
    (``DecomposedConv.__init__(spec, rank)``), and a pruned shift block's of its
    direction-group sizes (its "rank"), so the sum equals ``count_macs`` of the whole
    compressed model while tracing only layers not seen before.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], layers: list[str]):
        self.macs = count_macs(model, input_shape)
        self.shapes = layer_input_shapes(model, input_shape, layers)
        self._dense = {n: count_macs(model.get_submodule(n), self.shapes[n]) for n in layers}
        self._cache: dict[tuple[str, str, str], int] = {}

    def dense_macs(self, name: str) -> int:
        """MACs of the dense layer (or shift block) ``name`` in the baseline."""
        return self._dense[name]

    def _layer_macs(self, name: str, module: nn.Module, method: str, rank: Any) -> int:
        if rank is None:
            return self._dense[name]
        key = (name, method, json.dumps(rank, sort_keys=True))
        if key not in self._cache:
            self._cache[key] = (
                module.macs(*self.shapes[name][1:])
                if isinstance(module, DecomposedConv)
                else count_macs(module, self.shapes[name])
            )
        return self._cache[key]

    def __call__(
        self, compressed: nn.Module, plan: Mapping[str, Any]
    ) -> tuple[int, int, dict[str, dict[str, Any]]]:
        """``(macs, params, per-layer records)`` of ``compressed = apply_plan(model, plan)``."""
        macs, layers = self.macs, {}
        for name, raw in plan.items():
            entry = PlanEntry.from_dict(raw, name)
            module = compressed.get_submodule(name)
            rank = _final_rank(module, entry.method)
            layer_macs = self._layer_macs(name, module, entry.method, rank)
            macs += layer_macs - self._dense[name]
            layers[name] = {
                "method": entry.method,
                "rank": rank,
                "ratio": entry.ratio,
                "prune": entry.prune,
                "rel_error": 0.0,
                "macs": layer_macs,
                "params": count_params(module),
            }
        return macs, count_params(compressed), layers
