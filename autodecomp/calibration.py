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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decompositions.base import DecompositionError
from .decompositions.spec import ConvSpec
from .factorize.cache import weight_key

__all__ = ["InputStats", "collect_input_stats"]

_CHUNK = 16  # images unfolded at a time


@dataclass(frozen=True, eq=False)
class InputStats:
    """The second moment ``Σ`` (D x D, float64) of one conv's input patches.

    Attributes:
        moment: ``Σ = (1/N) sum_n sum_p p p^T`` over the ``N`` calibration images.
        samples: ``N``.
        spec: the geometry of the conv the patches were taken for.
    """

    moment: torch.Tensor
    samples: int
    spec: ConvSpec
    _factors: dict[tuple[str, float], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False
    )

    @cached_property
    def key(self) -> str:
        """A content hash of the statistics (for factor caches)."""
        return f"{weight_key(self.moment)}n{self.samples}"

    def matches(self, spec: ConvSpec) -> bool:
        """Whether these patches are the ones a conv of geometry ``spec`` reads."""
        fields = ("in_channels", "kernel_size", "stride", "padding", "dilation", "groups")
        return all(getattr(self.spec, f) == getattr(spec, f) for f in fields)

    def damped(self, damping: float) -> torch.Tensor:
        """``Σ + damping * mean(diag Σ) * I``: the output error plus a small weight-space term."""
        return _damped(self.moment, damping)

    def channel_moment(self) -> torch.Tensor:
        """``Σ_C`` (C x C): the mean over kernel positions of the per-position channel blocks.

        ``tr(E (Σ_C ⊗ I) E^T) = sum_s E_s Σ_C E_s^T`` (``E_s`` the F x C slice at kernel
        position ``s``) is the output error with the spatial correlation of the input dropped.
        """
        c, s = self.spec.in_channels, self.spec.kernel_area
        return self.moment.reshape(c, s, c, s).diagonal(dim1=1, dim2=3).mean(-1)

    def patch_factor(self, damping: float) -> torch.Tensor:
        """Lower Cholesky factor ``L`` of the damped ``Σ`` scaled to unit mean diagonal (D x D).

        ``tr(E Σ_λ E^T)`` is proportional to ``||E L||^2``; the scale-free form keeps factors
        mapped through it (whitened fits) at the kernel's scale.
        """
        if ("patch", damping) not in self._factors:
            self._factors["patch", damping] = _cholesky(self.moment, damping)
        return self._factors["patch", damping]

    def channel_factor(self, damping: float) -> torch.Tensor:
        """Lower Cholesky factor of the damped ``Σ_C`` scaled to unit mean diagonal (C x C)."""
        if ("channel", damping) not in self._factors:
            self._factors["channel", damping] = _cholesky(self.channel_moment(), damping)
        return self._factors["channel", damping]

    def output_error(self, delta: torch.Tensor, damping: float = 0.0) -> float:
        """``tr(E Σ E^T)``: the mean squared output change of a kernel change ``delta``."""
        e = delta.detach().to(self.moment).reshape(delta.shape[0], -1)
        return float(torch.einsum("fd,de,fe->", e, self.damped(damping), e))


def _damped(moment: torch.Tensor, damping: float) -> torch.Tensor:
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    if damping == 0:
        return moment
    scale = float(moment.diagonal().mean())
    scale = scale if scale > 0 else 1.0
    return moment + damping * scale * torch.eye(
        len(moment), dtype=moment.dtype, device=moment.device
    )


def _cholesky(moment: torch.Tensor, damping: float) -> torch.Tensor:
    matrix = _damped(moment, damping)
    scale = float(matrix.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(matrix / (scale if scale > 0 else 1.0))
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        raise DecompositionError(
            f"calibration second moment is singular at damping={damping:g}; "
            "use a damping > 0 or more calibration images"
        )
    return factor


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
        if spec.groups != 1 or spec.padding_mode != "zeros":
            raise ValueError(
                f"calibration layer {name!r}: only groups=1 convs with zero padding are supported"
            )
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
