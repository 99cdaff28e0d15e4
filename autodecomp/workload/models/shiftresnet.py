"""ShiftResNets for CIFAR-size input (Wu et al. 2018, as in alvinwan/shiftresnet-cifar).

The CIFAR ResNet skeleton of :mod:`.resnet_cifar` (3x3 conv stem with BN and ReLU; three
stages of ``n`` blocks with 16, 32 and 64 channels; average pool; linear head) with every
basic block (two 3x3 convs) replaced by one shift residual block::

    out = relu(bn(shiftconv(x)) + shortcut(x))
    shiftconv = 1x1 (C -> E) -> BN -> ReLU -> shift 3x3 -> 1x1 (E -> F, stride)

with ``E = int(expansion * F)`` (expansion relative to the block's *output* channels) and a
1x1-conv + BN projection shortcut where the shape changes (option ``"B"``). The depth in the
name is that of the ResNet it is derived from (``n = (depth - 2) / 6``), so ShiftResNet-20 has
nine shift blocks. Parameters for 10 classes: ShiftResNet-20 with expansion 1/3/6/9: 34,906 /
95,642 / 186,746 / 277,850; ShiftResNet-56 (expansion 3): 294,554; ShiftResNet-110
(expansion 6): 1,177,946 (the published 0.03M/0.10M/0.19M/0.28M, 0.29M and 1.18M; taking
``E`` relative to the input channels instead gives 0.08M for ShiftResNet-20 expansion 3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.shift import ShiftBlock
from . import register_model
from .resnet_cifar import ResNet, make_shortcut

__all__ = ["ShiftResidualBlock"]


class ShiftResidualBlock(nn.Module):
    """A shift block (:class:`~autodecomp.core.shift.ShiftBlock`) + BN, a shortcut and a ReLU."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "B",
        expansion: float = 1.0,
    ) -> None:
        super().__init__()
        mid = int(planes * expansion)
        if mid < 1:
            raise ValueError(f"expansion {expansion!r} leaves no intermediate channel")
        self.shiftconv = ShiftBlock(in_planes, planes, mid, stride=stride)
        self.bn = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.shiftconv(x)) + self.shortcut(x))


def _shiftresnet(depth: int) -> Callable[..., ResNet]:
    n = (depth - 2) // 6

    def build(
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        expansion: float = 1.0,
        shortcut: str = "B",
    ) -> ResNet:
        if not (isinstance(expansion, int | float) and expansion > 0):
            raise ValueError(f"expansion must be a number > 0, got {expansion!r}")
        return ResNet(
            ShiftResidualBlock,
            (n, n, n),
            num_classes=num_classes,
            in_channels=in_channels,
            shortcut=shortcut,
            expansion=expansion,
        )

    build.__doc__ = f"ShiftResNet-{depth} for 32x32 inputs ({n} shift blocks per stage)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model(f"shiftresnet{_depth}")(_shiftresnet(_depth))
