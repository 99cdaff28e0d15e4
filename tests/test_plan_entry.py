"""Plan entries: one parser and serialiser (``PlanEntry``), the skeleton builder, capability
flags and the methods registry."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.compress.calibration import collect_input_stats
from autodecomp.compress.plan import KEEP, PRUNE, PlanEntry, plan_summary
from autodecomp.compress.prune import prunable_methods
from autodecomp.compress.surgery import data_init_layers, skeleton
from autodecomp.config import parse_space
from autodecomp.decompositions import ConvSpec, DecomposedConv, get_method, methods
from autodecomp.search.space import data_init_supported, resolve_space, suggest_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

# every shape of entry today's plans hold: drawn by the search, written by an export, or
# written by hand (a method option, a bare method name aside)
SHAPES = [
    {"method": "keep"},
    {"method": "tucker", "ratio": 0.3},
    {"method": "tucker", "ratio": 0.3, "rank_multiple": 8},
    {"method": "tucker", "ratio": 0.3, "init": "data"},
    {"method": "pdp", "ratio": 0.25, "rank_multiple": 8, "init": "data"},
    {"method": "tucker", "rank": [6, 4]},
    {"method": "cp", "rank": 3},
    {"method": "tt", "rank": [4, 5]},
    {"method": "gkpd", "rank": {"rank": 2, "a_shape": [4, 2, 1, 3]}},
    {"method": "shift", "rank": [1, 0, 2, 1, 3, 1, 0, 1, 1]},
    {"method": "shift", "ratio": 0.4, "prune": 0.2},
    {"method": "shift", "ratio": 0.4, "prune": 0.2, "init": "data"},
    {"method": "shift", "rank": {"channels": 12}, "prune": 0.1},
    {"method": "prune", "prune": 0.3},
    {"method": "prune", "rank": [2, 1, 0, 3]},
    {"method": "tucker", "ratio": 0.3, "hooi_iters": 5},
]


@pytest.mark.parametrize("entry", SHAPES, ids=[json.dumps(e) for e in SHAPES])
def test_every_entry_shape_round_trips_to_the_same_json(entry):
    parsed = PlanEntry.from_dict(entry)
    assert json.dumps(parsed.to_dict()) == json.dumps(entry)  # same keys, same order
    assert PlanEntry.from_dict(parsed.to_dict()) == parsed
    assert PlanEntry.from_dict(parsed) is parsed


def test_fields_and_defaults():
    entry = PlanEntry.from_dict({"method": "tucker", "ratio": 0.3, "hooi_iters": 5})
    assert (entry.method, entry.ratio, entry.rank, entry.prune) == ("tucker", 0.3, None, None)
    assert (entry.init, entry.rank_multiple, dict(entry.options)) == (None, None, {"hooi_iters": 5})
    assert entry.decomposes and not PlanEntry(KEEP).decomposes
    assert not PlanEntry(PRUNE, prune=0.2).decomposes
    assert PlanEntry.from_dict("keep") == PlanEntry(KEEP)
    # keys holding None are absent, as apply_plan always read them
    assert PlanEntry.from_dict({"method": "cp", "rank": 3, "ratio": None}).to_dict() == {
        "method": "cp",
        "rank": 3,
    }
    with pytest.raises(AttributeError):
        entry.ratio = 0.5  # frozen
    with pytest.raises(TypeError):
        entry.options["hooi_iters"] = 6  # read-only


BAD = [
    ({"method": "svd9", "ratio": 0.5}, ValueError, r"unknown decomposition method 'svd9'.*tucker"),
    ({"method": "tucker"}, ValueError, r"give exactly one of ratio= or rank= \(got ratio=None"),
    ({"method": "tucker", "ratio": 0.3, "rank": [2, 2]}, ValueError, "give exactly one"),
    ({"method": "tucker", "ratio": 0}, ValueError, r"number in \(0, 1\] .*, got 0$"),
    ({"method": "cp", "ratio": float("nan")}, ValueError, r"ratio must be a number in \(0, 1\]"),
    ({"method": "cp", "ratio": 1.5}, ValueError, r"number in \(0, 1\] .*, got 1\.5"),
    (
        {"method": "cp", "ratio": 0.3, "rank_multiple": 0},
        ValueError,
        "rank_multiple must be an integer >= 1, got 0",
    ),
    ({"method": "tucker", "ratio": 0.3, "init": "svd"}, ValueError, "unknown init 'svd'; valid"),
    ({"method": "shift", "ratio": 0.3, "prune": 1.0}, ValueError, r"ratio must be .* \[0, 1\)"),
    ({"method": "keep", "prune": 0.3}, ValueError, "'prune' needs a decomposition method"),
    ({"method": "prune"}, ValueError, "exactly one of 'prune' \\(ratio\\) or 'rank'"),
    ({"method": "prune", "prune": 0.2, "rank": [1, 1]}, ValueError, "no other key"),
    ({"method": "prune", "prune": 0.2, "scope": "global"}, ValueError, "no other key"),
    ({"method": "prune", "prune": -0.1}, ValueError, r"shift_prune ratio must be .* \[0, 1\)"),
    ({"ratio": 0.3}, ValueError, "must be a mapping with a 'method'"),
    (["tucker"], ValueError, "must be a mapping with a 'method'"),
]


@pytest.mark.parametrize(("entry", "error", "message"), BAD)
def test_bad_entries_are_refused_with_one_line(entry, error, message):
    with pytest.raises(error, match=message) as caught:
        PlanEntry.from_dict(entry)
    assert "\n" not in str(caught.value)
    with pytest.raises(error, match=message) as caught:
        PlanEntry.from_dict(entry, "layer1.0.conv1")
    assert str(caught.value).startswith(("layer 'layer1.0.conv1': ", "plan entry for 'layer1"))


def test_apply_plan_reports_entry_errors_with_the_layer_and_takes_plan_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with pytest.raises(ValueError, match=r"^layer '2': unknown decomposition method 'svd9'"):
        ad.apply_plan(model, {"2": {"method": "svd9", "ratio": 0.5}})
    with pytest.raises(ValueError, match=r"^layer '2': give exactly one of ratio= or rank="):
        ad.apply_plan(model, {"2": {"method": "tucker"}})
    with pytest.raises(ValueError, match=r"^plan entry for '2' must be a mapping"):
        ad.apply_plan(model, {"2": 3})
    plan = {"0": {"method": "tucker", "rank": [2, 4]}, "2": {"method": "cp", "ratio": 0.3}}
    typed = {name: PlanEntry.from_dict(entry) for name, entry in plan.items()}
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(ad.apply_plan(model, typed)(x), ad.apply_plan(model, plan)(x))
    assert data_init_layers({"0": PlanEntry("tucker", ratio=0.3, init="data"), "2": "keep"}) == [
        "0"
    ]
    assert plan_summary({**plan, "1": "keep"}) == "cp:1 keep:1 tucker:1"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c = nn.Conv2d(24, 12, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


SPACES = [
    {"methods": ["tucker", "cp"], "keep": True},
    {"methods": ["tucker", "pdp"], "keep": False, "rank_multiple": 8},
    {"methods": ["tucker", "shift"], "shift_prune": [0.0, 0.5], "init": "data"},
    {"methods": ["tucker", "cp"], "ranks": {"tucker": [[2, 4], [3, 8]], "cp": [3, 6]}},
]


@pytest.mark.parametrize("cfg", SPACES, ids=range(len(SPACES)))
def test_the_plans_the_search_stores_are_todays_json(cfg):
    space = resolve_space(_Net(), parse_space(cfg))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        plan = suggest_plan(trial, space)
        for layer in space.layers:
            method = trial.params[f"{layer.name}/method"]
            expected = {"method": method}
            if method in layer.ranks:
                rank = trial.params[f"{layer.name}/{method}/rank"]
                expected["rank"] = json.loads(rank) if isinstance(rank, str) else rank
            elif method != KEEP:
                expected["ratio"] = trial.params[f"{layer.name}/{method}/ratio"]
                if cfg.get("rank_multiple", 1) > 1:
                    expected["rank_multiple"] = cfg["rank_multiple"]
            if method == "shift":
                expected["prune"] = trial.params[f"{layer.name}/shift/prune"]
            if method != KEEP and cfg.get("init") == "data":
                expected["init"] = "data"
            assert json.dumps(plan[layer.name]) == json.dumps(expected)
            entry = PlanEntry.from_dict(plan[layer.name])
            assert json.dumps(entry.to_dict()) == json.dumps(plan[layer.name])
        json.dumps(plan)  # JSON-serialisable as stored


def test_skeleton_has_the_structure_of_the_applied_plan():
    torch.manual_seed(0)
    model = _Net().eval()
    plan = {
        "a": {"method": "shift", "ratio": 0.5, "prune": 0.3},  # pruned: fitted for real
        "b": {"method": "tucker", "ratio": 0.3, "rank_multiple": 8, "init": "data"},
        "c": {"method": "keep"},
    }
    stats = collect_input_stats(model, ["b"], [torch.randn(4, 3, 8, 8)])
    applied = ad.apply_plan(model, plan, calibration=stats)
    shell = skeleton(model, plan)
    shapes = {k: v.shape for k, v in applied.state_dict().items()}
    assert {k: v.shape for k, v in shell.state_dict().items()} == shapes
    assert shell.b.rank == applied.b.rank and shell.a.rank == applied.a.rank
    assert ad.count_macs(shell, (3, 8, 8)) == ad.count_macs(applied, (3, 8, 8))
    assert isinstance(model.b, nn.Conv2d)  # the model is untouched
    with pytest.raises(ValueError, match=r"layer 'b': .*ratio must be a number in \(0, 1\]"):
        skeleton(model, {"b": {"method": "tucker", "ratio": -1}})


def test_capabilities_are_flags_on_the_method_classes():
    flagged = [m for m in methods() if get_method(m).builds_shift_block]
    assert flagged == prunable_methods() == ["shift"]
    assert not DecomposedConv.builds_shift_block and DecomposedConv.supports_data_init
    plain = ConvSpec.from_conv(nn.Conv2d(8, 8, 3))
    grouped = ConvSpec.from_conv(nn.Conv2d(8, 8, 3, groups=2))
    circular = ConvSpec.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"))
    for name in methods():
        assert get_method(name).data_init_reason(plain) is None
        assert "groups=1" in get_method(name).data_init_reason(grouped)
        assert "zero padding" in get_method(name).data_init_reason(circular)
    space = resolve_space(_Net(), parse_space({"methods": ["tucker"], "keep": True}))
    assert all(data_init_supported(layer) for layer in space.layers)
    assert all(data_init_supported(layer, "tucker") for layer in space.layers)
    assert not any(data_init_supported(layer, KEEP) for layer in space.layers)


def test_rank_within_is_rank_for_ratio_over_the_default_path():
    spec = ConvSpec.from_conv(nn.Conv2d(32, 48, 3))
    for name in ("tucker", "cp", "pdp", "tt", "tr", "shift"):
        cls = get_method(name)
        for ratio in (0.0001, 0.05, 0.3, 0.9, 1.0):
            within = cls.rank_within(spec, ratio, cls.rank_candidates(spec))
            assert cls.rank_for_ratio(spec, ratio) == within
            cheapest = next(iter(cls.rank_candidates(spec)))
            assert (
                within == cheapest or cls.param_count(spec, within) <= ratio * spec.dense_params()
            )
    tucker = get_method("tucker")
    ranks = [(2, 2), (4, 4), (8, 8)]  # listed in non-decreasing parameter count
    assert tucker.rank_within(spec, 0.0001, ranks) == (2, 2)  # none within: the first
    assert tucker.rank_within(spec, 0.3, ranks) == (8, 8)
    assert tucker.rank_within(spec, 0.3, []) is None


def test_methods_registry():
    assert methods() == sorted(methods()) and "tucker" in methods()
    with pytest.raises(ValueError, match="decomposition method 'tucker' is already registered"):
        ad.decompositions.register("tucker")(get_method("cp"))
    assert get_method("cp").name == "cp"  # a refused registration renames nothing
    with pytest.raises(TypeError, match="not a DecomposedConv subclass"):
        ad.decompositions.register("plain")(nn.Conv2d)
    with pytest.raises(ValueError, match=r"unknown decomposition method 'nope'; valid .*: cp, "):
        get_method("nope")
    assert "plain" not in methods()
