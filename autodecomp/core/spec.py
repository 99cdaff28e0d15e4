"""Geometry of a dense convolution: the one place padding, stride and output sizes are resolved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvSpec"]


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvSpec:
    """Shape and geometry of a 2D convolution.

    ``padding`` is resolved to explicit ``(top, bottom, left, right)`` so that every
    decomposed layer reproduces the dense output size exactly, including the asymmetric
    padding torch uses for ``padding='same'`` with an even effective kernel.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvSpec:
        """Read the geometry of an ``nn.Conv2d``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        return cls.create(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        """Build a spec from torch's argument conventions (ints, pairs, ``'same'``, ``'valid'``)."""
        kernel, stride_, dilation_ = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                pads = []
                for k, d in zip(kernel, dilation_, strict=True):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                pads = tuple(pads)
            else:
                raise ValueError(f"padding {padding!r} is not one of 'same', 'valid', int, pair")
        else:
            ph, pw = _pair(padding)
            pads = (ph, ph, pw, pw)
        return cls(
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            kernel_size=kernel,
            stride=stride_,
            padding=pads,
            dilation=dilation_,
            groups=int(groups),
            bias=bool(bias),
            padding_mode=padding_mode,
        )

    # --- derived sizes -------------------------------------------------------------------
    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, kh, kw)

    @property
    def symmetric_padding(self) -> tuple[int, int] | None:
        """``(ph, pw)`` when padding is symmetric per axis, else ``None``."""
        top, bottom, left, right = self.padding
        if top == bottom and left == right:
            return (top, left)
        return None

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        return h + top + bottom, w + left + right

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size of the dense convolution for an ``h x w`` input."""
        hp, wp = self.padded_size(h, w)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1

    def dense_params(self) -> int:
        f, c, kh, kw = self.weight_shape
        return f * c * kh * kw + (f if self.bias else 0)

    def dense_macs(self, h: int, w: int) -> int:
        ho, wo = self.output_size(h, w)
        f, c, kh, kw = self.weight_shape
        return f * c * kh * kw * ho * wo

    # --- helpers for forward passes --------------------------------------------------------
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``x`` by this spec's padding (no-op when there is none)."""
        top, bottom, left, right = self.padding
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The reference dense convolution with this geometry."""
        return F.conv2d(self.pad(x), weight, bias, self.stride, 0, self.dilation, self.groups)
