"""Factorisations and calibration scores run on the device of the layer they are given.

No GPU in CI: the layers are built on every device torch has here, and the ``meta`` device
stands in for a foreign default device (a tensor made there by mistake breaks the fit).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

import autodecomp as ad
from autodecomp.compress.surgery import decompose_conv, on_device
from autodecomp.core.spec import ConvSpec
from autodecomp.decompositions import get_method, methods
from autodecomp.factorize.cache import FactorCache
from autodecomp.search.proxies import Calibration, default_images_per_forward, relative_error

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _conv(dtype: torch.dtype = torch.float32, device: str = "cpu", out: int = 24) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(16, out, 3, padding=1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", methods())
def test_layer_on_the_conv_device_and_dtype(method, dtype, device):
    conv = _conv(dtype, device)
    layer = decompose_conv(conv, method, ratio=0.3)
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert {t.device.type for t in tensors} == {torch.device(device).type}
    assert {p.dtype for p in layer.parameters()} == {dtype}
    x = torch.randn(2, 16, 8, 8, device=device, dtype=dtype)
    assert layer(x).dtype == dtype


class _GeneratorDevice(TorchFunctionMode):
    """Fails a factory call whose seeded generator lives on another device than the tensor
    it makes (a CPU generator drawing a CUDA tensor raises on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None:
            made = torch.device(kwargs.get("device") or torch.get_default_device())
            assert gen.device.type == made.type, f"{resolve_name(func)}: {gen.device} -> {made}"
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", methods())
def test_solver_makes_nothing_on_the_default_device(method):
    """Called directly (without decompose_conv's device context) under a foreign default
    device, a method's fit still runs where its weight is and gives the same layer."""
    conv = _conv(out=16)
    spec, cls = ConvSpec.from_conv(conv), get_method(method)
    ranks = [cls.resolve_rank(spec, ratio=r) for r in (0.1, 0.3)]  # the second may warm-start

    def fit(cache: FactorCache) -> list[nn.Module]:
        return [cls.from_weight(conv.weight, conv.bias, spec, r, cache=cache) for r in ranks]

    plain = fit(FactorCache())
    with torch.device("meta"), _GeneratorDevice():
        foreign = fit(FactorCache())
    for layer, expected in zip(foreign, plain, strict=True):
        assert {p.device.type for p in layer.parameters()} == {"cpu"}
        torch.testing.assert_close(layer.dense_weight(), expected.dense_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("method", methods())
def test_decompose_conv_sets_the_conv_device_as_default(method):
    """decompose_conv makes the conv's device the default while it fits: the same layer
    whatever the caller's default device."""
    conv = _conv()
    expected = decompose_conv(conv, method, ratio=0.3).dense_weight()
    with torch.device("meta"):
        layer = decompose_conv(conv, method, ratio=0.3)
    assert {p.device.type for p in layer.parameters()} == {"cpu"}
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=0, atol=0)


def test_on_device_is_a_no_op_on_the_default_device():
    assert torch.get_default_device() == torch.device("cpu")
    with on_device(torch.device("cpu")):
        assert torch.empty(1).device.type == "cpu"
    with on_device(torch.device("meta")):
        assert torch.empty(1).device.type == "meta"
    assert torch.empty(1).device.type == "cpu"


def test_cache_entries_from_disk_load_on_the_default_device(tmp_path):
    writer = FactorCache(directory=tmp_path)
    writer.get_or_compute("k", lambda: (torch.arange(3.0), torch.ones(2, 2)))
    reader = FactorCache(directory=tmp_path)
    with torch.device("meta"):
        loaded = reader.get_or_compute("k", lambda: pytest.fail("recomputed a stored entry"))
    assert [t.device.type for t in loaded] == ["meta", "meta"]
    assert reader.misses == 0
    on_cpu = FactorCache(directory=tmp_path).get_or_compute("k", lambda: None)
    assert on_cpu[0].tolist() == [0.0, 1.0, 2.0] and on_cpu[0].device.type == "cpu"


def _resnet_and_plan():
    torch.manual_seed(0)
    model = ad.get_model("resnet20", num_classes=10, in_channels=3).eval()
    plan = {
        "layer1.0.conv1": {"method": "tucker", "ratio": 0.3},
        "layer1.2.conv2": {"method": "cp", "ratio": 0.3},
        "layer2.0.conv1": {"method": "pdp", "ratio": 0.3},
        "layer2.1.conv2": {"method": "tucker", "ratio": 0.2},
        "layer3.0.conv2": {"method": "tucker", "ratio": 0.2},
        "layer3.2.conv1": {"method": "keep"},
    }
    return model, plan, ad.apply_plan(model, plan)


def _one_at_a_time(model, compressed, inputs, names):
    """The network errors the way they were defined: one forward per replaced layer."""
    exact = model(inputs)
    errors = {}
    for name in names:
        swap = compressed.get_submodule(name)
        if not isinstance(swap, ad.DecomposedConv):
            continue
        hook = model.get_submodule(name).register_forward_hook(lambda m, a, o, s=swap: s(a[0]))
        errors[name] = relative_error(model(inputs), exact)
        hook.remove()
    return errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("images_per_forward", [8, 24, 512])  # 1, 3 and all 5 layers at once
def test_batched_network_errors_equal_one_forward_per_layer(images_per_forward, device):
    model, plan, compressed = _resnet_and_plan()
    model, compressed = model.to(device), compressed.to(device)
    inputs = torch.randn(8, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = _one_at_a_time(model, compressed, inputs, plan)
    calibration = Calibration(model, inputs, device, images_per_forward=images_per_forward)
    errors = calibration.network_errors(compressed, plan)
    assert list(errors) == list(expected) and len(errors) == 5
    assert all(0.0 < e < 2.0 for e in errors.values())
    for name, error in errors.items():
        assert error == pytest.approx(expected[name], rel=1e-5), name
    # the teacher is left as it was: no hooks, eval mode, same logits
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(calibration.logits, model(inputs))


def test_layer_output_errors_one_forward():
    model, plan, compressed = _resnet_and_plan()
    inputs = torch.randn(4, 3, 32, 32)
    calibration = Calibration(model, inputs, "cpu")
    seen = {}

    def keep(name):
        def hook(_module, args, output):
            seen[name] = (args[0], output)

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in plan]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    errors = calibration.layer_output_errors(compressed, plan)
    assert set(errors) == set(plan) - {"layer3.2.conv1"}
    for name, error in errors.items():
        x, out = seen[name]
        with torch.no_grad():
            expected = relative_error(compressed.get_submodule(name)(x), out)
        assert error == pytest.approx(expected, rel=1e-9)


def test_images_per_forward_must_be_positive():
    model, _, _ = _resnet_and_plan()
    with pytest.raises(ValueError, match="images_per_forward must be >= 1, got 0"):
        Calibration(model, torch.randn(2, 3, 32, 32), "cpu", images_per_forward=0)


def test_images_per_forward_defaults_by_device_type():
    model, _, _ = _resnet_and_plan()
    inputs = torch.randn(2, 3, 32, 32)
    assert Calibration(model, inputs, "cpu").images_per_forward == 256
    assert default_images_per_forward("cuda:1") == 512
    assert default_images_per_forward(torch.device("mps")) == 512  # a type not listed
    assert Calibration(model, inputs, "cpu", images_per_forward=8).images_per_forward == 8


def test_network_errors_leave_the_model_unchanged():
    model, plan, compressed = _resnet_and_plan()
    before = copy.deepcopy(compressed.state_dict())
    Calibration(model, torch.randn(4, 3, 32, 32), "cpu").network_errors(compressed, plan)
    after = compressed.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
