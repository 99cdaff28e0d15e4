from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autodecomp import conv_layers, count_params
from autodecomp.measure.cost import macs_by_module
from autodecomp.workload.models import get_model, model_names
from autodecomp.workload.models.resnet_cifar import (
    BasicBlock,
    ResNet,
    ZeroPadShortcut,
    make_shortcut,
)


def test_builtin_names_registered():
    names = set(model_names())
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "digits_cnn"} <= names


def test_resnet20_exact_parameter_counts():
    # convs 267,696 + BN 1,376 + linear 650; option B adds 1x1 projections 16*32 + 32*64
    # and their BN 2*(32 + 64).
    assert count_params(get_model("resnet20")) == 269_722
    assert count_params(get_model("resnet20", shortcut="B")) == 272_474


@pytest.mark.parametrize(
    ("name", "shortcut", "millions"),
    [
        ("resnet20", "A", 0.27),
        ("resnet32", "A", 0.46),
        ("resnet44", "A", 0.66),
        ("resnet56", "A", 0.85),
        ("resnet56", "B", 0.86),
        ("resnet110", "A", 1.73),
    ],
)
def test_resnet_parameter_counts_published(name, shortcut, millions):
    assert round(count_params(get_model(name, shortcut=shortcut)) / 1e6, 2) == millions


@pytest.mark.parametrize(("in_channels", "num_classes"), [(3, 10), (1, 100)])
def test_resnet_forward_shape(in_channels, num_classes):
    model = get_model("resnet20", num_classes=num_classes, in_channels=in_channels).eval()
    assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, num_classes)
    assert model(torch.randn(2, in_channels, 16, 16)).shape == (2, num_classes)


def test_resnet_layer_names_and_convs():
    assert len(conv_layers(get_model("resnet20"))) == 19
    names = conv_layers(get_model("resnet20", shortcut="B"))
    assert len(names) == 21
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert "layer2.0.shortcut.0" in names and "layer3.0.shortcut.0" in names


def test_zero_pad_shortcut_subsamples_and_pads():
    x = torch.randn(2, 16, 8, 8)
    out = make_shortcut(16, 32, 2, "A")(x)
    assert isinstance(make_shortcut(16, 32, 2, "A"), ZeroPadShortcut)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert isinstance(make_shortcut(16, 16, 1, "B"), nn.Identity)


def test_bad_shortcut_rejected():
    with pytest.raises(ValueError, match="shortcut"):
        get_model("resnet20", shortcut="C")


def test_resnet_skeleton_takes_other_blocks():
    seen = []

    class Block(BasicBlock):
        def __init__(self, in_planes, planes, stride=1, shortcut="A", expansion=1):
            super().__init__(in_planes, planes, stride, shortcut)
            seen.append((in_planes, planes, stride, shortcut, expansion))

    model = ResNet(Block, (1, 2, 1), num_classes=5, shortcut="B", expansion=3)
    assert seen == [
        (16, 16, 1, "B", 3),
        (16, 32, 2, "B", 3),
        (32, 32, 1, "B", 3),
        (32, 64, 2, "B", 3),
    ]
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_digits_cnn_shape_and_cost():
    model = get_model("digits_cnn", in_channels=1).eval()
    assert model(torch.randn(4, 1, 16, 16)).shape == (4, 10)
    assert count_params(model) == 33_338
    macs = macs_by_module(model, (1, 16, 16))
    # 3x3 convs at 16x16, 8x8, 8x8, 4x4 output and the 64 -> 10 classifier.
    expected = {
        "conv1": 16 * 16 * 9 * 1 * 16,
        "conv2": 8 * 8 * 9 * 16 * 32,
        "conv3": 8 * 8 * 9 * 32 * 32,
        "conv4": 4 * 4 * 9 * 32 * 64,
        "classifier": 64 * 10,
    }
    assert {k: macs[k] for k in expected} == expected
    assert macs[""] < 1.3e6


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "squeezenet1_1"])
def test_torchvision_single_channel(name):
    model = get_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)


def test_torchvision_stem_keeps_initialisation_scale():
    torch.manual_seed(0)
    rgb = get_model("resnet18", num_classes=7)
    torch.manual_seed(0)
    gray = get_model("resnet18", num_classes=7, in_channels=1)
    assert gray.conv1.in_channels == 1 and gray.conv1.stride == (2, 2)
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight[:, :1] * math.sqrt(3))
    assert torch.equal(gray.fc.weight, rgb.fc.weight)


def test_torchvision_aux_heads_off_and_no_weights():
    model = get_model("googlenet", num_classes=3).train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    from autodecomp.workload.models._torchvision import build_torchvision

    with pytest.raises(ValueError, match="weights"):
        build_torchvision("resnet18", weights="DEFAULT")
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
        build_torchvision("resnet19")
