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

import copy
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..decompositions import DecomposedConv

__all__ = [
    "Calibration",
    "calibration_batch",
    "default_images_per_forward",
    "kernel_errors",
    "mean_error",
    "relative_error",
]


# calibration images one batched forward of network_errors holds, by device type: a GPU
# gains from large batches; on the CPU 256 is within 4 % of the best of 64-1152 on both
# ResNet-20 (best at 64) and ResNet-18 (best at 512) at 32x32 (bench/calibration_batching.py)
IMAGES_PER_FORWARD = {"cpu": 256, "cuda": 512}


def default_images_per_forward(device: str | torch.device) -> int:
    """:data:`IMAGES_PER_FORWARD` of ``device``'s type (512 for a type it does not list)."""
    return IMAGES_PER_FORWARD.get(torch.device(device).type, 512)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (0 when both are zero)."""
    return float(_relative(approx, exact))


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """:func:`relative_error` as a 0-d tensor on the inputs' device (no host sync)."""
    approx, exact = approx.double(), exact.double()
    return (approx - exact).norm() / exact.norm().clamp_min(1e-30)


def _to_host(errors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """0-d error tensors as floats, copied to the host at once."""
    if not errors:
        return {}
    values = torch.stack(list(errors.values())).tolist()
    return dict(zip(errors, values, strict=True))


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
            errors[name] = _relative(module.dense_weight(), teacher.get_submodule(name).weight)
    return _to_host(errors)


def mean_error(errors: Mapping[str, float], names: Iterable[str]) -> float:
    """Mean of ``errors`` over ``names``; a name without an error (kept dense) counts 0."""
    names = list(names)
    return sum(errors.get(n, 0.0) for n in names) / max(1, len(names))


def _channels_last(images: torch.Tensor) -> torch.Tensor:
    """A batch of images in the channels-last layout (other tensors as they are)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class Calibration:
    """The baseline's behaviour on a fixed calibration batch, to score compressed models.

    Holds only the batch and the baseline's logits; the per-layer inputs are recomputed by
    baseline forward passes per scored model, so memory does not grow with the depth. Every
    forward runs on ``device`` and errors come back to the host once per forward.

    Args:
        teacher: the baseline (eval mode, not modified).
        inputs: the calibration batch (:func:`calibration_batch`).
        device: where to run.
        images_per_forward: how many images one forward of :meth:`network_errors` may hold:
            the calibration batch once per layer scored in it (at least one layer); by
            default :data:`IMAGES_PER_FORWARD` of the device's type (512 on other devices).

    :meth:`network_errors` forwards a channels-last copy of the teacher (made on first use),
    its reference logits from that copy too (faster on the CPU: docs/scale.md).
    """

    def __init__(
        self,
        teacher: nn.Module,
        inputs: torch.Tensor,
        device: str,
        images_per_forward: int | None = None,
    ) -> None:
        if images_per_forward is None:
            images_per_forward = default_images_per_forward(device)
        if images_per_forward < 1:
            raise ValueError(f"images_per_forward must be >= 1, got {images_per_forward!r}")
        self.teacher = teacher
        self.inputs = inputs.to(device)
        self.images_per_forward = images_per_forward
        self.logits = self._forward(teacher)

    @torch.no_grad()
    def _forward(self, model: nn.Module, inputs: torch.Tensor | None = None) -> torch.Tensor:
        was_training = model.training
        try:
            return model.eval()(self.inputs if inputs is None else inputs)
        finally:
            model.train(was_training)

    @staticmethod
    def _replacements(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the decomposed layers of ``model`` among ``names``."""
        found = ((name, model.get_submodule(name)) for name in names)
        return [(name, m) for name, m in found if isinstance(m, DecomposedConv)]

    @torch.no_grad()
    def layer_output_errors(self, model: nn.Module, names: Iterable[str]) -> dict[str, float]:
        """Layer output error of every decomposed layer of ``model`` among ``names`` (one
        baseline forward)."""
        errors: dict[str, torch.Tensor] = {}

        def hook(name: str, replacement: nn.Module):
            def score(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                errors[name] = _relative(replacement(args[0]), output)

            return score

        handles = [
            self.teacher.get_submodule(name).register_forward_hook(hook(name, replacement))
            for name, replacement in self._replacements(model, names)
        ]
        try:
            if handles:
                self._forward(self.teacher)
        finally:
            for handle in handles:
                handle.remove()
        return _to_host(errors)

    @torch.no_grad()
    def network_errors(self, model: nn.Module, names: Iterable[str]) -> dict[str, float]:
        """Relative logit error of the baseline with only that layer replaced, for every
        decomposed layer of ``model`` among ``names``: the layer's error as the network's
        output sees it.

        Batched: one forward holds the calibration batch once per layer of a group (as many
        as ``images_per_forward`` allows), copy ``i`` having only layer ``i`` replaced; the
        baseline is in eval mode, so the copies do not interact.
        """
        layers = self._replacements(model, names)
        per_forward = max(1, self.images_per_forward // len(self.inputs))
        errors: dict[str, torch.Tensor] = {}
        for start in range(0, len(layers), per_forward):
            errors |= self._one_replaced_each(layers[start : start + per_forward])
        return _to_host(errors)

    @cached_property
    def _nhwc_teacher(self) -> tuple[nn.Module, torch.Tensor]:
        """The teacher copied into the channels-last layout, and its logits."""
        model = copy.deepcopy(self.teacher).to(memory_format=torch.channels_last)
        return model, self._forward(model, _channels_last(self.inputs))

    def _one_replaced_each(self, layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
        n = len(self.inputs)
        teacher, teacher_logits = self._nhwc_teacher

        def swap(index: int, replacement: nn.Module):
            def replace(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor):
                part = slice(index * n, (index + 1) * n)
                output[part] = replacement(args[0][part])
                return output

            return replace

        handles = [
            teacher.get_submodule(name).register_forward_hook(swap(i, replacement))
            for i, (name, replacement) in enumerate(layers)
        ]
        try:
            inputs = self.inputs.repeat(len(layers), *[1] * (self.inputs.dim() - 1))
            logits = self._forward(teacher, _channels_last(inputs)).reshape(len(layers), n, -1)
        finally:
            for handle in handles:
                handle.remove()
        reference = teacher_logits.reshape(1, n, -1).double()
        diff = (logits.double() - reference).flatten(1).norm(dim=1)
        scores = diff / reference.norm().clamp_min(1e-30)
        return {name: scores[i] for i, (name, _) in enumerate(layers)}

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
