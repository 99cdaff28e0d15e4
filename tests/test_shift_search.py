"""Shift pruning in the search: per-block ``shift_prune`` parameters, plans, costs, export."""

from __future__ import annotations

import json
import math

import optuna
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import autodecomp as ad
from autodecomp.cli import main
from autodecomp.compress.prune import shift_blocks
from autodecomp.config import load_config, parse_space
from autodecomp.core.errors import ConfigError
from autodecomp.results import report
from autodecomp.search.space import resolve_space, suggest_plan, uniform_params
from autodecomp.ship.export import export_trial
from autodecomp.ship.model_file import explicit_plan, read_metadata
from autodecomp.workload.models import get_model

optuna.logging.set_verbosity(optuna.logging.WARNING)

BLOCKS = [f"layer{s}.{i}.shiftconv" for s in (1, 2, 3) for i in range(3)]


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random weights and BatchNorm statistics (no BN is identity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def shiftnet() -> nn.Module:
    return trained_like(get_model("shiftresnet20", expansion=1))


class _Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 12, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _trials(space, n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda t: (t.set_user_attr("plan", suggest_plan(t, space)), 0.0)[1], n)
    return study.trials


def test_params_exist_exactly_for_shift_blocks(shiftnet):
    prune = {"range": [0.1, 0.6], "step": 0.1}
    space = resolve_space(shiftnet, parse_space({"methods": ["tucker"], "shift_prune": prune}))
    assert [b.name for b in space.blocks] == BLOCKS == shift_blocks(shiftnet)
    # the 1x1 convs inside pruned blocks are no decomposition targets
    assert [layer.name for layer in space.layers] == [
        "conv1",
        "layer2.0.shortcut.0",
        "layer3.0.shortcut.0",
    ]
    assert space.names == [layer.name for layer in space.layers] + BLOCKS
    for trial in _trials(space, 6):
        pruned = {k for k in trial.params if k.endswith("/shift_prune")}
        assert pruned == {f"{b}/shift_prune" for b in BLOCKS}
        plan = trial.user_attrs["plan"]
        for block in BLOCKS:
            ratio = trial.params[f"{block}/shift_prune"]
            assert plan[block] == {"method": "prune", "prune": ratio}
            assert round(ratio * 10, 9) in {1, 2, 3, 4, 5, 6}
        assert not any("/prune" in k for k in trial.params)  # tucker is never pruned

    # globs select blocks too: an excluded block is not pruned, its 1x1 convs are searched
    space = resolve_space(
        shiftnet,
        parse_space(
            {
                "methods": ["tucker"],
                "shift_prune": [0, 0.5],
                "layers": {"exclude": ["layer3.*.shiftconv"]},
            }
        ),
    )
    assert [b.name for b in space.blocks] == BLOCKS[:6]
    inner = [f"layer3.{i}.shiftconv.{part}" for i in range(3) for part in ("first", "last")]
    assert [layer.name for layer in space.layers] == [
        "conv1",
        "layer2.0.shortcut.0",
        *inner[:2],
        "layer3.0.shortcut.0",
        *inner[2:],
    ]
    # without shift_prune: no block parameter, the inner 1x1 convs are searched as before
    plain = resolve_space(shiftnet, parse_space({"methods": ["tucker"]}))
    assert plain.blocks == () and plain.names == ad.conv_layers(shiftnet)


def test_converted_layers_draw_a_prune_ratio_with_the_shift_method():
    cfg = parse_space({"methods": ["shift", "tucker"], "shift_prune": [0.0, 0.5]})
    space = resolve_space(_Cnn(), cfg)
    assert space.blocks == ()
    layers = {layer.name: layer for layer in space.layers}
    names = ["a/method", "a/shift/ratio", "a/shift/prune", "a/tucker/ratio"]
    assert layers["a"].param_names() == names
    assert layers["c"].prunable == ()  # 1x1: no shift method
    methods = set()
    for trial in _trials(space, 30):
        plan = trial.user_attrs["plan"]
        for name in ("a", "b"):
            method = trial.params[f"{name}/method"]
            methods.add(method)
            has_prune = f"{name}/shift/prune" in trial.params
            assert has_prune == (method == "shift")
            if has_prune:
                assert plan[name]["prune"] == trial.params[f"{name}/shift/prune"]
            else:
                assert "prune" not in plan[name]
    assert methods == {"shift", "tucker", "keep"}
    params = uniform_params(space, "shift", 0.4)
    assert params["a/shift/prune"] == params["b/shift/prune"] == 0.0  # the range's low end
    assert params["c/method"] == "keep"


def test_prune_ratio_zero_equals_the_unpruned_model(shiftnet):
    x = torch.randn(2, 3, 32, 32)
    zero = ad.apply_plan(shiftnet, {b: {"method": "prune", "prune": 0.0} for b in BLOCKS})
    assert torch.equal(zero(x), shiftnet(x))
    torch.manual_seed(3)
    cnn = _Cnn().eval()
    x = torch.randn(2, 3, 9, 9)
    entry = {"method": "shift", "ratio": 0.4}
    unpruned = ad.apply_plan(cnn, {"b": entry})
    assert torch.equal(ad.apply_plan(cnn, {"b": {**entry, "prune": 0.0}})(x), unpruned(x))
    pruned = ad.apply_plan(cnn, {"b": {**entry, "prune": 0.5}})
    total, groups = sum(unpruned.b.rank), sum(1 for r in unpruned.b.rank if r)
    assert sum(pruned.b.rank) == total - min(math.floor(0.5 * total + 0.5), total - groups)
    assert sum(pruned.b.rank) < total


def test_explicit_group_sizes_reproduce_the_pruned_model(shiftnet):
    plan = {b: {"method": "prune", "prune": 0.1 * (i % 6)} for i, b in enumerate(BLOCKS)}
    plan["layer3.0.shortcut.0"] = {"method": "tucker", "ratio": 0.3}
    pruned = ad.apply_plan(shiftnet, plan)
    explicit = explicit_plan(pruned, plan)
    assert explicit["layer1.1.shiftconv"] == {
        "method": "prune",
        "rank": pruned.get_submodule("layer1.1.shiftconv").shift.group_sizes,
    }
    assert sum(explicit["layer1.1.shiftconv"]["rank"]) == 16 - 2  # round(0.1 * 16)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ad.apply_plan(shiftnet, explicit)(x), pruned(x))


def test_bad_pruning_entries_are_refused(shiftnet):
    cases = [
        ({"conv1": {"method": "prune", "prune": 0.3}}, "pruning needs a shift block, got Conv2d"),
        ({BLOCKS[0]: {"method": "tucker", "ratio": 0.3}}, "is a shift block: its method"),
        ({"conv1": {"method": "keep", "prune": 0.3}}, "'prune' needs a decomposition method"),
        ({"conv1": {"method": "tucker", "ratio": 0.3, "prune": 0.3}}, "pruning needs a shift"),
        ({BLOCKS[0]: {"method": "prune", "prune": 1.0}}, r"ratio must be a number in \[0, 1\)"),
        ({BLOCKS[0]: {"method": "prune"}}, "exactly one of 'prune'"),
        ({BLOCKS[0]: {"method": "prune", "rank": [9] * 9}}, "each in"),
        ({"layer1.0": {"method": "prune", "prune": 0.3}}, "not a conv or shift block"),
    ]
    for plan, message in cases:
        with pytest.raises(ValueError, match=message):
            ad.apply_plan(shiftnet, plan)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"range": [0.2, 1.0]}, r"space.shift_prune.range must lie in \[0, 1\)"),
        ([0.5, 0.2], r"space.shift_prune.range must satisfy 0.0 <= lo <= hi"),
        ({"range": [0.0, 0.5], "log": True}, r"space.shift_prune: 'log' needs range\[0\] > 0"),
        ([-0.1, 0.5], r"space.shift_prune.range\[0\]"),
        ({"range": [0.1, 0.5], "ratio": 2}, "unknown key space.shift_prune.ratio"),
    ],
)
def test_bad_shift_prune_range_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_space({"shift_prune": value})


# ---- end to end: search, tables, export -> load ----------------------------------------------
STUDY = {
    "model": {"name": "shiftresnet20", "kwargs": {"expansion": 1}},
    "data": {"name": "digits", "image_size": 8, "channels": 3},
    "baseline": {"epochs": 1, "batch_size": 64},
    "space": {"methods": ["tucker"], "keep": True, "shift_prune": [0.2, 0.6]},
    "proxy": {"steps": 2, "batch_size": 32, "bn_batches": 1},
    "objectives": ["accuracy", "params"],
    "trials": 3,
    "threads": 1,
    "sampler": {"name": "random"},
    "warm_start": [{"method": "keep"}],
}


def test_tiny_search_then_export_and_load_a_pruned_trial(tmp_path, capsys):
    folder = tmp_path / "shifty"
    folder.mkdir()
    (folder / "study.yaml").write_text(yaml.safe_dump(STUDY))
    assert main(["search", str(folder / "study.yaml")]) == 0
    assert "prune:9" in capsys.readouterr().out
    cfg = load_config(folder / "study.yaml")
    study = optuna.load_study(study_name="shifty", storage=cfg.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    warm = done[0]  # every block at the range's low end
    assert all(warm.params[f"{b}/shift_prune"] == 0.2 for b in BLOCKS)

    layers = pd.read_csv(folder / "layers.csv")
    blocks = layers[layers.method == "prune"]
    assert len(blocks) == 9 * 3
    for trial in done:
        rows = blocks[blocks.trial == trial.number].set_index("layer")
        for block in BLOCKS:
            assert rows.loc[block, "prune"] == trial.params[f"{block}/shift_prune"]
            mid = 16 * 2 ** (int(block[5]) - 1)  # expansion 1: the stage's width
            removed = min(math.floor(trial.params[f"{block}/shift_prune"] * mid + 0.5), mid - 9)
            assert sum(json.loads(rows.loc[block, "rank"])) == mid - removed
    assert "mean_prune" in report.method_usage_frame(study).columns
    assert "mean_prune:0.20" in pd.read_csv(folder / "trials.csv").methods[0]

    number = done[-1].number
    out = tmp_path / "pruned.pt"
    exported = export_trial(cfg, number, out)
    meta = read_metadata(out)
    assert {meta["plan"][b]["method"] for b in BLOCKS} == {"prune"}
    loaded = ad.load(out)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported.model.eval()(x))
    assert ad.count_params(loaded) == done[-1].user_attrs["params"]
    assert ad.count_params(loaded) < study.user_attrs["baseline"]["params"]
