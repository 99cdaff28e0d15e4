"""Zero-training quality scores of a compressed model, computed before any fine-tuning.

Three fidelities below the short distillation run of :mod:`autodecomp.search.objective`:

- kernel error of a decomposed layer: ``||W_approx - W|| / ||W||`` (weights only);
- layer output error: ``||f'(x) - f(x)|| / ||f(x)||`` where ``f`` is the dense layer,
  ``f'`` its replacement and ``x`` the baseline's input to that layer on a fixed
  calibration batch, so the error of one layer is measured without those before it;
- network output error on the same batch: the relative error of the logits
  ``||z' - z|| / ||z||`` and ``KL(softmax(z) || softmax(z'))`` (batch mean), with ``z``
  the baseline's logits; of the whole compressed model, or of the baseline with one layer
  replaced (that layer's error as the network's output sees it).

A trial's score for a per-layer error is its mean over the searched layers, a kept layer
counting 0 (:func:`mean_error`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..decompositions import DecomposedConv

__all__ = ["Calibration", "calibration_batch", "kernel_errors", "mean_error", "relative_error"]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (0 when both are zero)."""
    approx, exact = approx.double(), exact.double()
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def calibration_batch(dataset: Dataset, size: int, seed: int) -> torch.Tensor:
    """The inputs of ``size`` training examples drawn by a seeded permutation (all if fewer)."""
    if size < 1:
        raise ValueError(f"calibration size must be >= 1, got {size}")
    count = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return torch.stack([dataset[int(i)][0] for i in order[: min(size, count)]])


@torch.no_grad()
def kernel_errors(teacher: nn.Module, model: nn.Module, names: Iterable[str]) -> dict[str, float]:
    """Kernel error of every decomposed layer among ``names`` (kept layers are left out)."""
    errors = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DecomposedConv):
            errors[name] = relative_error(module.dense_weight(), teacher.get_submodule(name).weight)
    return errors


def mean_error(errors: Mapping[str, float], names: Iterable[str]) -> float:
    """Mean of ``errors`` over ``names``; a name without an error (kept dense) counts 0."""
    names = list(names)
    return sum(errors.get(n, 0.0) for n in names) / max(1, len(names))


class Calibration:
    """The baseline's behaviour on a fixed calibration batch, to score compressed models.

    Holds only the batch and the baseline's logits; the per-layer inputs are recomputed by
    one baseline forward pass per scored model, so memory does not grow with the depth.

    Args:
        teacher: the baseline (eval mode, not modified).
        inputs: the calibration batch (:func:`calibration_batch`).
        device: where to run.
    """

    def __init__(self, teacher: nn.Module, inputs: torch.Tensor, device: str) -> None:
        self.teacher = teacher
        self.inputs = inputs.to(device)
        self.logits = self._forward(teacher)

    @torch.no_grad()
    def _forward(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        try:
            return model.eval()(self.inputs)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def layer_output_errors(self, model: nn.Module, names: Iterable[str]) -> dict[str, float]:
        """Layer output error of every decomposed layer of ``model`` among ``names``."""
        errors: dict[str, float] = {}

        def hook(name: str, replacement: nn.Module):
            def score(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                errors[name] = relative_error(replacement(args[0]), output)

            return score

        handles = []
        for name in names:
            replacement = model.get_submodule(name)
            if isinstance(replacement, DecomposedConv):
                layer = self.teacher.get_submodule(name)
                handles.append(layer.register_forward_hook(hook(name, replacement)))
        try:
            if handles:
                self._forward(self.teacher)
        finally:
            for handle in handles:
                handle.remove()
        return errors

    @torch.no_grad()
    def network_errors(self, model: nn.Module, names: Iterable[str]) -> dict[str, float]:
        """Relative logit error of the baseline with only that layer replaced, for every
        decomposed layer of ``model`` among ``names``: the layer's error as the network's
        output sees it (one forward pass per layer)."""
        errors: dict[str, float] = {}
        for name in names:
            replacement = model.get_submodule(name)
            if not isinstance(replacement, DecomposedConv):
                continue
            layer = self.teacher.get_submodule(name)
            handle = layer.register_forward_hook(
                lambda _module, args, _output, swap=replacement: swap(args[0])
            )
            try:
                errors[name] = relative_error(self._forward(self.teacher), self.logits)
            finally:
                handle.remove()
        return errors

    @torch.no_grad()
    def output_errors(self, model: nn.Module) -> dict[str, float]:
        """``{"output_error": relative logit error, "output_kl": KL(baseline || model)}``."""
        logits = self._forward(model)
        kl = F.kl_div(
            F.log_softmax(logits.double(), dim=1),
            F.log_softmax(self.logits.double(), dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return {"output_error": relative_error(logits, self.logits), "output_kl": float(kl)}
