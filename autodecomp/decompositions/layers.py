"""Building blocks shared by the decomposed layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.spec import ConvSpec

__all__ = ["SpatialConv", "pointwise", "pointwise_conv"]

_MIN_MATMUL_PIXELS = 64  # below this, oneDNN's conv (one GEMM over all images) is faster


def pointwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """A 1x1 convolution of ``x (N, C, H, W)`` with ``weight (F, C, 1, 1)``.

    On the CPU, for maps of at least 64 pixels, it runs as one batched matmul over the
    pixels, the weight broadcast over the batch, reading ``x`` in NCHW or channels-last
    memory without a copy: oneDNN's NCHW 1x1 convolution is up to 2x slower there
    (``bench/latency.py``). The result is NCHW, or channels-last with ``channels_last=True``
    (for a depthwise stage next, which oneDNN runs several times faster in that layout).
    Smaller maps, a single NCHW image going to NCHW, other devices and ``torch.jit.trace``
    (what fvcore counts) use ``F.conv2d``; all compute the same sums.
    """
    n, _, h, w = x.shape
    if h * w < _MIN_MATMUL_PIXELS or not x.is_cpu:  # the cheapest checks first: this is
        return F.conv2d(x, weight, bias)  # per call, and small layers are call-bound
    nchw = x.is_contiguous()
    if (
        (n == 1 and nchw and not channels_last)
        or not (nchw or x.is_contiguous(memory_format=torch.channels_last))
        or torch.jit.is_tracing()
    ):
        return F.conv2d(x, weight, bias)
    pixels = x.flatten(2) if nchw else x.permute(0, 2, 3, 1).flatten(1, 2).transpose(1, 2)
    weight = weight.flatten(1)
    if channels_last:  # (N, P, C) @ (C, F) -> (N, P, F), read as (N, F, H, W)
        rows, cols = pixels.transpose(1, 2), weight.t().expand(n, -1, -1)
        y = torch.bmm(rows, cols) if bias is None else torch.baddbmm(bias, rows, cols)
        return y.unflatten(1, (h, w)).permute(0, 3, 1, 2)
    rows = weight.expand(n, -1, -1)
    y = torch.bmm(rows, pixels) if bias is None else torch.baddbmm(bias[:, None], rows, pixels)
    return y.unflatten(2, (h, w))


def rank_sum_kernel(last: torch.Tensor, first: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """``sum_r last[:, r] (x) first[r, :] (x) spatial[r, ...]``: the dense kernel
    ``(F, C, *spatial dims)`` of a pointwise ``C -> R``, a per-rank spatial part and a pointwise
    ``R -> F`` (CP, PDP, shift), as one GEMM over the rank (a chained ``torch.einsum``
    contracts left to right here, through an ``F x R x C`` intermediate)."""
    right = first.reshape(*first.shape, *[1] * (spatial.dim() - 1)) * spatial[:, None]
    return (last @ right.flatten(1)).reshape(last.shape[0], *right.shape[1:])


def pointwise(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution (the decomposed layers run it with :func:`pointwise_conv`)."""
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
