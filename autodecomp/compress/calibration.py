"""Calibration statistics for data-aware initialisation: second moments of conv input patches.

For a conv with kernel ``W (F, C, kh, kw)`` and a perturbation ``E`` of it, the output on an
input ``x`` changes by ``conv(x, E)`` (the bias cancels). With ``p`` one unfolded input patch
(length ``D = C*kh*kw``, in the column order of ``W.reshape(F, D)``, taken with the layer's
padding, stride and dilation) and ``E`` read as ``E.reshape(F, D)``,

    ||conv(x, E)||^2 = sum_p ||E p||^2 = tr(E (sum_p p p^T) E^T),

so the mean squared output error over the calibration images is exactly ``tr(E Σ E^T)`` with
``Σ = (1/N) sum_n sum_p p_np p_np^T``. :func:`collect_input_stats` accumulates ``Σ`` per
layer with forward pre-hooks (in float64, a few images at a time); no activations are kept.
Memory is ``D^2`` doubles per layer (0.17 GB for a 512-channel 3x3 conv).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.spec import ConvSpec
from ..decompositions import DecomposedConv
from ..factorize.input_stats import InputStats

__all__ = ["collect_input_stats"]

_CHUNK = 16  # images unfolded at a time


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    layers: Iterable[str],
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, InputStats]:
    """Second moments of the input patches of the named convs on calibration batches.

    Args:
        model: the dense model (run in eval mode; its mode is restored).
        layers: names of ``nn.Conv2d`` modules (``groups=1``, zero padding).
        batches: input tensors or ``(inputs, targets)`` pairs, e.g. a training loader.
        max_batches: stop after this many batches.
        device: where to run (default: the model's device).

    Returns:
        ``{layer: InputStats}``.

    Raises:
        ValueError: a name that is not a plain conv of the model, or no batch at all.
    """
    names = list(layers)
    specs = {}
    for name in names:
        conv = model.get_submodule(name) if name else None
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"calibration layer {name!r} is not an nn.Conv2d of the model")
        spec = ConvSpec.from_conv(conv)
        reason = DecomposedConv.data_init_reason(spec)
        if reason is not None:
            raise ValueError(f"calibration layer {name!r}: {reason}")
        specs[name] = spec
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        spec = specs[name]

        def accumulate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            for part in x.split(_CHUNK):
                patches = F.unfold(
                    spec.pad(part.to(torch.float64)),
                    spec.kernel_size,
                    dilation=spec.dilation,
                    stride=spec.stride,
                )
                flat = patches.transpose(1, 2).reshape(-1, patches.shape[1])
                gram = flat.T @ flat
                sums[name] = sums[name] + gram if name in sums else gram
            counts[name] += x.shape[0]

        return accumulate

    if device is None:
        device = next(itertools.chain(model.parameters(), [torch.empty(0)])).device
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        for batch in itertools.islice(batches, max_batches):
            model(_inputs(batch).to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"no calibration input reached layer(s) {missing} (no batches?)")
    return {n: InputStats(sums[n] / counts[n], counts[n], specs[n]) for n in names}
