"""Building blocks shared by the decomposed layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ConvSpec

__all__ = ["SpatialConv", "pointwise"]


def pointwise(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, 1, bias=bias)


class SpatialConv(nn.Conv2d):
    """The stage of a decomposed layer that carries the dense layer's spatial geometry.

    Applies the dense layer's stride, dilation and padding; asymmetric padding (torch's
    ``'same'`` with an even effective kernel) is applied with ``F.pad`` first so the output
    size equals the dense layer's exactly.
    """

    def __init__(
        self,
        spec: ConvSpec,
        in_channels: int,
        out_channels: int,
        *,
        axes: str = "hw",
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        kh, kw = spec.kernel_size
        sh, sw = spec.stride
        dh, dw = spec.dilation
        top, bottom, left, right = spec.padding
        use_h, use_w = "h" in axes, "w" in axes
        kernel = (kh if use_h else 1, kw if use_w else 1)
        stride = (sh if use_h else 1, sw if use_w else 1)
        dilation = (dh if use_h else 1, dw if use_w else 1)
        pads = (
            top if use_h else 0,
            bottom if use_h else 0,
            left if use_w else 0,
            right if use_w else 0,
        )
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=(pads[0], pads[2]) if symmetric else 0,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.pre_pad = None if symmetric else (pads[2], pads[3], pads[0], pads[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        return super().forward(x)
