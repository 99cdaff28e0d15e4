"""Shift layers (Wu et al. 2018, "Shift: A Zero FLOP, Zero Parameter Alternative to Spatial
Convolutions") and the 1x1 -> BN -> ReLU -> shift -> 1x1 block built on them.

A shift moves every channel by one spatial offset and fills the border with zeros; it has no
parameters and does no multiply-adds. Channels are split into contiguous *direction groups*,
one per kernel position ``(a, b)`` in row-major order, so a 3x3 shift has nine groups with
offsets ``(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)``:

    out[n, c, i, j] = x[n, c, i + dy, j + dx]    (zero outside x)

for a channel ``c`` of the group with offset ``(dy, dx)``. ``Shift(channels)`` gives each group
``channels // (kh * kw)`` channels and the remainder to the centre group (position
``((kh - 1) // 2, (kw - 1) // 2)``, offset ``(0, 0)`` for 3x3); ``Shift(group_sizes=[...])``
takes any per-group sizes (zero allowed), as left by shift-layer pruning.

More generally a shift is a zero-parameter convolution geometry: channel group ``p = (a, b)``
of the output reads ``x_padded[s * i + d * a, s * j + d * b]``, with the padding, stride and
dilation of a dense convolution. With the defaults (``'same'`` padding, stride 1) this is the
ShiftNet shift above; with a dense layer's geometry it is the shift stage of a slice-wise
decomposition of that layer (``autodecomp.decompositions.shift``).

Implementation: one strided copy per non-empty group into a zero output (forward) and the
adjoint copy (backward), so the cost is that of one tensor copy, on CPU and CUDA alike. Under
``torch.jit.trace`` (fvcore) the same result is built from pad + slices + cat, which fvcore
counts as zero MACs without any shape arithmetic in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .spec import ConvSpec

__all__ = ["Shift", "ShiftBlock", "equal_groups"]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _centre(kernel_size: tuple[int, int]) -> int:
    kh, kw = kernel_size
    return ((kh - 1) // 2) * kw + (kw - 1) // 2


def equal_groups(channels: int, kernel_size: int | Sequence[int] = 3) -> list[int]:
    """Direction-group sizes of ``Shift(channels)``: equal groups, remainder to the centre."""
    kernel = _pair(kernel_size)
    area = kernel[0] * kernel[1]
    sizes = [channels // area] * area
    sizes[_centre(kernel)] += channels % area
    return sizes


class Shift(nn.Module):
    """Shift each channel group by its own spatial offset (zero fill, no parameters, no MACs).

    Args:
        channels: number of channels, split into equal direction groups (remainder to the
            centre group). Give either this or ``group_sizes``.
        kernel_size: shift kernel ``k`` or ``(kh, kw)``; one direction group per position.
        dilation: offset step (a 3x3 shift with dilation 2 moves by -2, 0 or 2).
        group_sizes: channels per direction group, in row-major kernel-position order.
        stride: output subsampling, as in a convolution.
        padding: zero padding like a convolution's (int, pair, ``(top, bottom, left, right)``
            or ``'same'``); ``None`` means ``'same'``, i.e. offsets centred on zero.
    """

    def __init__(
        self,
        channels: int | None = None,
        kernel_size: int | Sequence[int] = 3,
        dilation: int | Sequence[int] = 1,
        *,
        group_sizes: Sequence[int] | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str | None = None,
    ) -> None:
        super().__init__()
        kernel = _pair(kernel_size)
        area = kernel[0] * kernel[1]
        if (channels is None) == (group_sizes is None):
            raise ValueError("give exactly one of channels= or group_sizes=")
        if group_sizes is None:
            if not (isinstance(channels, int) and channels >= 1):
                raise ValueError(f"channels must be an int >= 1, got {channels!r}")
            group_sizes = equal_groups(channels, kernel)
        sizes = [int(s) for s in group_sizes]
        if len(sizes) != area or min(sizes) < 0 or sum(sizes) < 1:
            raise ValueError(
                f"group_sizes must be {area} non-negative ints with a positive sum for kernel "
                f"{kernel}, got {list(group_sizes)!r}"
            )
        self.group_sizes = sizes
        pads = "same" if padding is None else padding
        four = not isinstance(pads, str | int) and len(pads) == 4
        geometry = ConvSpec.create(
            sum(sizes),
            sum(sizes),
            kernel,
            stride=_pair(stride),
            padding=0 if four else pads,
            dilation=_pair(dilation),
            bias=False,
        )
        self.geometry = replace(geometry, padding=tuple(int(p) for p in pads)) if four else geometry
        self._windows = self._group_windows()

    @property
    def channels(self) -> int:
        return sum(self.group_sizes)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """``(dy, dx)`` of every direction group: output ``(i, j)`` reads ``x[s*i+dy, s*j+dx]``."""
        g = self.geometry
        (kh, kw), (dh, dw), (top, _, left, _) = g.kernel_size, g.dilation, g.padding
        return [(dh * a - top, dw * b - left) for a in range(kh) for b in range(kw)]

    def _group_windows(self) -> list[tuple[int, int, slice, slice]]:
        """Channel range and (row, column) slices of the padded input for every non-empty group.

        Slice ends are counted from the far border, so no index depends on the input size
        (the traced forward does no shape arithmetic, which fvcore would record).
        """
        g = self.geometry
        (kh, kw), (dh, dw), (sh, sw) = g.kernel_size, g.dilation, g.stride
        windows, start = [], 0
        for p, size in enumerate(self.group_sizes):
            if size:
                a, b = divmod(p, kw)
                rows = slice(dh * a, (dh * (a - kh + 1)) or None, sh)
                cols = slice(dw * b, (dw * (b - kw + 1)) or None, sw)
                windows.append((start, start + size, rows, cols))
            start += size
        return windows

    def _copies(self, h: int, w: int) -> list[tuple[slice, slice, slice, slice, slice]]:
        """For an ``h x w`` input: (channels, output rows, output cols, input rows, input cols)
        of the in-range part of every non-empty group (the rest of the output is zero)."""
        g = self.geometry
        ho, wo = g.output_size(h, w)
        (sh, sw), copies, start = g.stride, [], 0
        for (dy, dx), size in zip(self.offsets, self.group_sizes, strict=True):
            rows, cols = _span(dy, sh, h, ho), _span(dx, sw, w, wo)
            if size and rows and cols:
                copies.append((slice(start, start + size), rows[0], cols[0], rows[1], cols[1]))
            start += size
        return copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # pad + slice + cat: cost counters see only data movement
            padded = self.geometry.pad(x)
            parts = [padded[:, c0:c1, rows, cols] for c0, c1, rows, cols in self._windows]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Shift expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return _ShiftFunction.apply(x, self)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"group_sizes={self.group_sizes}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}"
        )


def _span(offset: int, stride: int, size: int, out_size: int) -> tuple[slice, slice] | None:
    """Output positions ``i`` with ``0 <= stride * i + offset < size``, and what they read."""
    lo = max(0, -(offset // stride))
    hi = min(out_size - 1, (size - 1 - offset) // stride)
    if hi < lo:
        return None
    return slice(lo, hi + 1), slice(stride * lo + offset, stride * hi + offset + 1, stride)


class _ShiftFunction(torch.autograd.Function):
    """One copy per group into a zero output; the backward is the adjoint copy (autograd
    through per-group slices would build a full-size zero gradient for every group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        n, _, h, w = x.shape
        copies = shift._copies(h, w)
        out = x.new_zeros(n, shift.channels, *shift.geometry.output_size(h, w))
        for chans, out_rows, out_cols, in_rows, in_cols in copies:
            out[:, chans, out_rows, out_cols] = x[:, chans, in_rows, in_cols]
        ctx.copies, ctx.input_shape = copies, x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_x = grad.new_zeros(ctx.input_shape)
        for chans, out_rows, out_cols, in_rows, in_cols in ctx.copies:
            grad_x[:, chans, in_rows, in_cols] = grad[:, chans, out_rows, out_cols]
        return grad_x, None


class ShiftBlock(nn.Module):
    """ShiftNet's replacement for a 3x3 conv: 1x1 (C -> E), BN, ReLU, shift, 1x1 (E -> F).

    The stride is applied by the last 1x1 convolution. ``E`` intermediate channels are split
    into shift direction groups (equal groups, or ``group_sizes`` after pruning).

    Args:
        in_channels: ``C``.
        out_channels: ``F``.
        mid_channels: ``E`` (give this or ``group_sizes``).
        stride: stride of the last 1x1 convolution.
        group_sizes: explicit direction-group sizes (``E = sum(group_sizes)``).
        kernel_size: shift kernel.
        dilation: shift dilation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        *,
        stride: int = 1,
        group_sizes: Sequence[int] | None = None,
        kernel_size: int | Sequence[int] = 3,
        dilation: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        shift = Shift(mid_channels, kernel_size, dilation, group_sizes=group_sizes)
        mid = shift.channels
        self.first = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.shift = shift
        self.last = nn.Conv2d(mid, out_channels, 1, stride=stride, bias=False)

    @property
    def mid_channels(self) -> int:
        return self.shift.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.shift(F.relu(self.bn(self.first(x)))))
