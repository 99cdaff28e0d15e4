"""A small 4-conv CNN for the 16x16 scikit-learn digits (about 1.2 MMACs, 33k parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model

__all__ = ["DigitsCNN"]

# (out_channels, stride) of conv1..conv4; every conv is 3x3 with padding 1, then BN + ReLU.
_LAYERS = ((16, 1), (32, 2), (32, 1), (64, 2))


class DigitsCNN(nn.Module):
    """conv1..conv4 (3x3: in->16, 16->32 stride 2, 32->32, 32->64 stride 2), each BN+ReLU,
    global average pooling and a linear classifier.

    Any input size works (global average pooling); 16x16 is the intended one.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        channels = in_channels
        for index, (out_channels, stride) in enumerate(_LAYERS, start=1):
            conv = nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            setattr(self, f"conv{index}", conv)
            setattr(self, f"bn{index}", nn.BatchNorm2d(out_channels))
            channels = out_channels
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, len(_LAYERS) + 1):
            x = F.relu(getattr(self, f"bn{index}")(getattr(self, f"conv{index}")(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model("digits_cnn")
def digits_cnn(*, num_classes: int = 10, in_channels: int = 3) -> DigitsCNN:
    """The 4-conv digits CNN (pass ``in_channels=1`` for the default 1-channel digits data)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels)
