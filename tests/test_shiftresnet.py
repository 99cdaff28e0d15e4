"""ShiftResNet models: published parameter counts, structure, cost and pruning."""

from __future__ import annotations

import pytest
import torch

import autodecomp as ad
from autodecomp.compress.prune import prune_model, shift_blocks
from autodecomp.core.shift import Shift, ShiftBlock
from autodecomp.measure.cost import macs_by_module, uncounted_ops
from autodecomp.workload.models import get_model, model_names

# (depth, expansion, exact parameters, published millions) for 10 classes
PUBLISHED = [
    (20, 1, 34_906, 0.03),
    (20, 3, 95_642, 0.10),
    (20, 6, 186_746, 0.19),
    (20, 9, 277_850, 0.28),
    (56, 3, 294_554, 0.29),
    (110, 6, 1_177_946, 1.18),
]


@pytest.mark.parametrize(("depth", "expansion", "exact", "millions"), PUBLISHED)
def test_published_parameter_counts(depth, expansion, exact, millions):
    model = get_model(f"shiftresnet{depth}", expansion=expansion)
    assert ad.count_params(model) == exact
    assert round(exact / 1e6, 2) == millions


def test_registered_depths():
    assert {f"shiftresnet{d}" for d in (20, 32, 44, 56, 110)} <= set(model_names())


def test_structure_forward_and_cost():
    model = get_model("shiftresnet20", expansion=3, num_classes=7, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    blocks = shift_blocks(model)
    assert blocks == [f"layer{s}.{i}.shiftconv" for s in (1, 2, 3) for i in range(3)]
    first = model.get_submodule("layer2.0.shiftconv")
    assert isinstance(first, ShiftBlock) and first.mid_channels == 96
    assert first.last.stride == (2, 2) and first.shift.group_sizes == [10] * 4 + [16] + [10] * 4
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut.0")]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    shifts = [n for n, m in model.named_modules() if isinstance(m, Shift)]
    by_module = macs_by_module(model, (1, 32, 32))
    assert len(shifts) == 9 and all(by_module[n] == 0 for n in shifts)
    # fvcore leaves only the nine residual additions uncounted (as for any ResNet)
    assert uncounted_ops(model, (1, 32, 32)) == {"aten::add": 9}


def test_pruning_a_shiftresnet_halves_its_blocks():
    model = get_model("shiftresnet20", expansion=6).eval()
    small = prune_model(model, {name: 0.5 for name in shift_blocks(model)})
    mids = [small.get_submodule(n).mid_channels for n in shift_blocks(small)]
    assert mids == [48] * 3 + [96] * 3 + [192] * 3
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert ad.count_macs(small, (3, 32, 32)) < ad.count_macs(model, (3, 32, 32))


def test_bad_expansion_is_rejected():
    with pytest.raises(ValueError, match="expansion"):
        get_model("shiftresnet20", expansion=0)
    with pytest.raises(ValueError, match="expansion"):
        get_model("shiftresnet20", expansion=0.01)
