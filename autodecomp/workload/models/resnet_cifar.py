"""CIFAR-style ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

Three stages of ``n`` residual blocks with 16, 32 and 64 channels (``depth = 6n + 2``), a 3x3
stem, global average pooling and a linear head. Where a block changes shape the shortcut is
either option ``"A"`` (parameter-free: subsample and zero-pad the new channels, the paper's
CIFAR choice) or ``"B"`` (1x1 conv + BN projection).

Reusing the skeleton with another block (e.g. a shift block)::

    class MyBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1, shortcut="A", **block_kwargs): ...
        # forward(x) -> (N, planes, H / stride, W / stride); use make_shortcut() for the skip

    model = ResNet(MyBlock, (3, 3, 3), num_classes=10, expansion=3)

``ResNet`` builds the stem, calls ``block(in_planes, planes, stride=s, shortcut=...,
**block_kwargs)`` for every block of every stage and adds the pooled linear head; extra
keyword arguments of ``ResNet`` go to the block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model

__all__ = ["BasicBlock", "ResNet", "ZeroPadShortcut", "make_shortcut"]

_SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: spatial subsampling by ``stride`` and zero channels split around x."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(
                f"zero-padding shortcut cannot shrink {in_planes} -> {planes} channels"
            )
        self.stride = stride
        self.before = (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.before}, {self.after})"


def make_shortcut(in_planes: int, planes: int, stride: int, kind: str = "A") -> nn.Module:
    """Identity when the shape is kept, else option ``"A"`` (zero-pad) or ``"B"`` (1x1 conv+BN)."""
    if kind not in _SHORTCUTS:
        raise ValueError(f"shortcut must be one of {_SHORTCUTS}, got {kind!r}")
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_planes, planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers (the first carries the stride) plus a shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (3x3 conv+BN+ReLU), stages of ``block``, global average pool, linear head.

    Args:
        block: block class, called as
            ``block(in_planes, planes, stride=s, shortcut=kind, **block_kwargs)``.
        num_blocks: blocks per stage.
        num_classes: classifier outputs.
        in_channels: image channels.
        widths: channels per stage; the stem has ``widths[0]``; stages after the first
            halve the resolution.
        shortcut: ``"A"`` or ``"B"`` (see :func:`make_shortcut`).
        **block_kwargs: extra block arguments (e.g. a shift block's expansion).
    """

    def __init__(
        self,
        block: type[nn.Module],
        num_blocks: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "A",
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(num_blocks) != len(widths):
            raise ValueError(f"num_blocks {tuple(num_blocks)} and widths {tuple(widths)} differ")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"shortcut must be one of {_SHORTCUTS}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self.num_stages = len(widths)
        for index, (count, planes) in enumerate(zip(num_blocks, widths, strict=True)):
            blocks = []
            for i in range(count):
                stride = 2 if index > 0 and i == 0 else 1
                blocks.append(
                    block(in_planes, planes, stride=stride, shortcut=shortcut, **block_kwargs)
                )
                in_planes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _cifar_resnet(depth: int) -> Callable[..., ResNet]:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6

    def build(*, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> ResNet:
        return ResNet(
            BasicBlock,
            (n, n, n),
            num_classes=num_classes,
            in_channels=in_channels,
            shortcut=shortcut,
        )

    build.__doc__ = f"ResNet-{depth} for 32x32 inputs ({n} basic blocks per stage)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_cifar_resnet(_depth))
