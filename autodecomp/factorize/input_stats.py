"""Second moments of a conv's input patches, as data-aware fits use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..core.errors import DecompositionError
from ..core.spec import ConvSpec
from .cache import weight_key

__all__ = ["InputStats"]


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
