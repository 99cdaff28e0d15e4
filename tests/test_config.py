"""Study / search-space configuration: shipped files load, bad input is a one-line ConfigError."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
import yaml

import autodecomp as ad
from autodecomp.config import (
    OBJECTIVES,
    SAMPLERS,
    BaselineConfig,
    Budgets,
    DataConfig,
    InitialDesign,
    LatencyConfig,
    ModelConfig,
    ProxyConfig,
    SamplerConfig,
    apply_overrides,
    load_config,
    load_space,
    parse_space,
)
from autodecomp.config.checks import section
from autodecomp.core.errors import ConfigError
from autodecomp.measure import objectives
from autodecomp.search.study import make_sampler, prepare
from autodecomp.workload.data import DATASETS, data_names, load_data
from autodecomp.workload.models import get_model

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*/study.yaml"))
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def _study(folder: Path, **changes) -> Path:
    raw = {
        "model": {"name": "digits_cnn"},
        "data": {"name": "digits", "image_size": 8},
        "space": {"methods": ["tucker"]},
        "trials": 3,
    }
    raw.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_files_exist():
    names = {p.parent.name for p in STUDIES}
    assert {"digits", "resnet20_digits"} <= names
    assert {"digits_default.yaml", "resnet_all_methods.yaml", "resnet_per_layer.yaml"} <= {
        p.name for p in SPACES
    }


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.parent.name)
def test_shipped_study_loads_and_resolves(path):
    cfg = load_config(path)
    assert cfg.folder == path.parent
    assert cfg.storage == f"sqlite:///{path.parent / 'study.db'}"
    json.dumps(cfg.to_dict())  # stored on the study: must be JSON
    db_existed = (path.parent / "study.db").exists()
    prepared = prepare(cfg)  # data, model, space, warm starts, sampler, storage check
    assert prepared.space.layers
    assert (path.parent / "study.db").exists() == db_existed  # validation writes nothing


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_loads_on_resnet20(path):
    from autodecomp.search.space import resolve_space

    space = resolve_space(get_model("resnet20"), load_space(path))
    assert space.layers
    for layer in space.layers:
        assert set(layer.choices) - {"keep"} <= set(ad.supporting_methods(layer.spec))


def test_resnet20_study_reaches_every_default_budget():
    """The all-method space reaches 5 % of the dense MACs (the smallest default budget of
    ``bench/search_quality.py``): its cheapest plan is 0.0335x, six methods have a uniform
    plan under 0.05 and a study with ``budgets.max_macs: 0.05`` passes the budget check."""
    from autodecomp.measure.cost import count_macs
    from autodecomp.measure.plan_cost import PlanCost
    from autodecomp.search.options import offered_methods
    from autodecomp.search.space import cheapest_cost, check_budgets, resolve_space
    from autodecomp.search.uniform_arms import uniform_tracks

    cfg = load_config(ROOT / "studies/resnet20_digits/study.yaml", ["budgets.max_macs=0.05"])
    shape = (3, 32, 32)
    model = get_model("resnet20")
    space = resolve_space(model, cfg.space, shape)
    dense = count_macs(model, shape)
    assert cheapest_cost(model, space, shape)["macs"] / dense == pytest.approx(0.03354, abs=1e-4)
    check_budgets(model, space, cfg.budgets, shape)
    cost = PlanCost(model, shape, space.names)
    limits = {"macs": 0.05 * dense, "params": float("inf")}
    tracks = uniform_tracks(model, space, cost, offered_methods(space), limits)
    assert sorted(tracks) == ["cp", "gkpd", "pdp", "shift", "tr", "tucker"]


def test_per_layer_overrides(tmp_path):
    from autodecomp.search.space import resolve_space

    space = resolve_space(
        get_model("resnet20"), load_space(ROOT / "search_spaces/resnet_per_layer.yaml")
    )
    layers = {layer.name: layer for layer in space.layers}
    assert "conv1" not in layers  # include: layer*
    assert layers["layer1.0.conv1"].choices == ("tucker", "keep")
    assert (layers["layer1.0.conv1"].ratio.lo, layers["layer1.0.conv1"].ratio.hi) == (0.3, 0.8)
    assert "keep" not in layers["layer3.1.conv2"].choices
    assert layers["layer3.1.conv2"].ratio.log
    assert layers["layer2.0.conv1"].ranks == {"tucker": ("[8, 8]", "[8, 16]", "[16, 16]")}
    assert layers["layer2.1.conv1"].ranks == {}


def test_defaults_and_paths(tmp_path):
    cfg = load_config(_study(tmp_path))
    assert cfg.name == tmp_path.name
    assert cfg.objectives == ("accuracy", "macs")
    assert cfg.directions == ["maximize", "minimize"]
    assert cfg.sampler.name == "tpe" and cfg.sampler.seed == 0
    assert cfg.space.keep is True and cfg.space.methods == ("tucker",)
    # a directory works too and yields the same config
    assert load_config(tmp_path) == cfg


def test_budgets(tmp_path):
    cfg = load_config(_study(tmp_path, budgets={"max_macs": "40%", "max_params": "2.5k"}))
    assert cfg.budgets.limits(1000, 10_000) == {"macs": 400.0, "params": 2500.0}
    cfg = load_config(_study(tmp_path, budgets={"max_macs": 0.5, "max_params": 3e6}))
    assert cfg.budgets.limits(1000, 10_000) == {"macs": 500.0, "params": 3e6}
    msg = _error(load_config, _study(tmp_path, budgets={"max_macs": "lots"}))
    assert "budgets.max_macs" in msg and "'lots'" in msg


def test_overrides(tmp_path):
    path = _study(tmp_path)
    cfg = load_config(path, ["proxy.steps=7", "sampler.name=nsga2", "budgets.max_macs=0.5"])
    assert cfg.proxy.steps == 7 and cfg.sampler.name == "nsga2"
    assert cfg.budgets.max_macs == 0.5
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d.e=x"])
    assert raw == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": "x"}}
    assert "key.sub=value" in _error(load_config, path, ["proxy.steps"])
    assert "proxy.stepz" in _error(load_config, path, ["proxy.stepz=3"])
    assert "not a mapping" in _error(apply_overrides, {"a": 1}, ["a.b=2"])


def test_unknown_key_names_valid_keys(tmp_path):
    msg = _error(load_config, _study(tmp_path, proxy={"stpes": 10}))
    assert "proxy.stpes" in msg and "steps" in msg
    msg = _error(load_config, _study(tmp_path, sampel="tpe"))
    assert "study.sampel" in msg and "sampler" in msg


def test_bad_method_lists_valid_methods(tmp_path):
    msg = _error(load_config, _study(tmp_path, space={"methods": ["tuker"]}))
    assert "'tuker'" in msg and all(m in msg for m in ad.methods())
    msg = _error(load_config, _study(tmp_path, warm_start=[{"method": "cpp", "ratio": 0.5}]))
    assert "'cpp'" in msg and "tucker" in msg


def test_bad_types_and_values(tmp_path):
    assert "trials" in _error(load_config, _study(tmp_path, trials="many"))
    assert "sampler 'bayes'" in _error(load_config, _study(tmp_path, sampler="bayes"))
    assert "objective 'energy'" in _error(
        load_config, _study(tmp_path, objectives=["accuracy", "energy"])
    )
    msg = _error(load_config, _study(tmp_path, proxy={"steps": 10, "accuracy_floor": 0.5}))
    assert "floor_step" in msg
    assert "range" in _error(parse_space, {"ratio": [0.5, 0.1]})
    both = {"range": [0.1, 0.5], "log": True, "step": 0.1}
    assert "'log' and 'step'" in _error(parse_space, {"ratio": both})
    assert "[0, 1)" in _error(parse_space, {"shift_prune": {"range": [0.0, 1.0]}})
    assert "rank" in _error(parse_space, {"ranks": {"tucker": ["big"]}})
    msg = _error(load_config, _study(tmp_path, initial_design={"score": "kl"}))
    assert "initial_design.score 'kl'" in msg and "valid: network, layer" in msg
    msg = _error(load_config, _study(tmp_path, initial_design={"tracks": -1}))
    assert msg == "initial_design.tracks must be an integer >= 0, got -1"


def test_shift_prune_range_is_stored():
    space = parse_space({"shift_prune": {"range": [0.1, 0.5]}})
    assert (space.shift_prune.lo, space.shift_prune.hi) == (0.1, 0.5)


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("model: {name: digits_cnn\ntrials: 3\n")
    msg = _error(load_config, path)
    assert "malformed YAML" in msg and "line" in msg


def test_missing_data_path(tmp_path):
    msg = _error(load_config, _study(tmp_path, data={"name": "cifar10", "root": "nowhere"}))
    assert "data.root" in msg and "nowhere" in msg
    assert "required" in _error(load_config, _study(tmp_path, data={"name": "cifar10"}))
    (tmp_path / "empty").mkdir()
    cfg = load_config(_study(tmp_path, data={"name": "cifar10", "root": "empty"}))
    assert "cifar-10-batches-py" in _error(prepare, cfg)  # folder exists, data does not


def test_bad_globs_and_ranks_found_on_the_model(tmp_path):
    cfg = load_config(_study(tmp_path, space={"layers": {"include": ["layer*"]}}))
    msg = _error(prepare, cfg)
    assert "'layer*'" in msg and "conv1" in msg
    cfg = load_config(_study(tmp_path, space={"overrides": [{"layers": "fc*", "keep": False}]}))
    assert "overrides[0]" in _error(prepare, cfg)
    cfg = load_config(_study(tmp_path, space={"ranks": {"tucker": [[2, 99]]}}))
    msg = _error(prepare, cfg)
    assert "layer 'conv1'" in msg and "out of range" in msg


def test_unknown_model_and_sampler_option(tmp_path):
    assert "resnet21" in _error(prepare, load_config(_study(tmp_path, model="resnet21")))
    cfg = load_config(_study(tmp_path, sampler={"name": "tpe", "options": {"n_startup": 3}}))
    assert "n_startup_trials" in _error(prepare, cfg)


# ---- each setting declared once (field + check); names from the shared registries ----
SECTIONS = (
    ModelConfig,
    DataConfig,
    BaselineConfig,
    ProxyConfig,
    Budgets,
    LatencyConfig,
    SamplerConfig,
    InitialDesign,
)


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_section_field_carries_its_check(cls):
    for item in dataclasses.fields(cls):
        assert callable(item.metadata.get("check")), f"{cls.__name__}.{item.name}"


@pytest.mark.parametrize("cls", SECTIONS[1:], ids=lambda c: c.__name__)
def test_empty_section_is_the_dataclass_default(cls):
    assert section(cls, None, "x", Path.cwd()) == cls()


def test_budget_forms_in_study_yaml(tmp_path):
    budgets = {"max_macs": "0.5x", "max_params": "700k", "max_latency_ms": 2}
    cfg = load_config(_study(tmp_path, budgets=budgets))
    assert (cfg.budgets.max_macs, cfg.budgets.max_params) == (0.5, 700_000.0)
    assert cfg.budgets.limits(1000, 10_000) == {"macs": 500.0, "params": 700_000.0, "latency": 2.0}
    cfg = load_config(_study(tmp_path), ["budgets.max_params=0.25x"])
    assert cfg.budgets.limits(1000, 10_000) == {"params": 2500.0}
    msg = _error(load_config, _study(tmp_path, budgets={"max_macs": "2x"}))
    assert "budgets.max_macs" in msg and "'2x'" in msg and "'0.5x'" in msg


def test_objectives_come_from_the_registry(tmp_path):
    assert OBJECTIVES is objectives.OBJECTIVES
    cfg = load_config(_study(tmp_path, objectives=["accuracy", "params", "latency"]))
    assert cfg.directions == [objectives.objective(o).direction for o in cfg.objectives]
    msg = _error(load_config, _study(tmp_path, objectives=["accuracy", "energy"]))
    assert "'energy'" in msg and all(name in msg for name in OBJECTIVES.names())


def test_samplers_come_from_one_registry(tmp_path):
    assert set(SAMPLERS.names()) == {"tpe", "nsga2", "random", "gp"}
    for name, cls in SAMPLERS.items():
        cfg = load_config(_study(tmp_path, sampler=name, seed=3))
        assert cfg.sampler.name == name and cfg.sampler.seed == 3
        assert issubclass(cls, optuna.samplers.BaseSampler)
        assert type(make_sampler(cfg.sampler)) is cls
    msg = _error(load_config, _study(tmp_path, sampler={"name": "bayes"}))
    assert "sampler 'bayes'" in msg and all(name in msg for name in SAMPLERS.names())
    assert "bayes" in _error(make_sampler, SamplerConfig("bayes"))


def test_data_sets_needing_a_root_come_from_the_registry(tmp_path):
    assert data_names() == ["digits", "cifar10", "cifar100", "imagefolder"]
    for name in data_names():
        if DATASETS.get(name).needs_root:
            msg = _error(load_config, _study(tmp_path, data={"name": name}))
            assert msg == f"data.root is required for data {name!r} (a local folder)"
            with pytest.raises(ValueError, match="needs root="):
                load_data(name)
        else:
            assert load_config(_study(tmp_path, data=name)).data.name == name
    # user data sets are not checked for a root
    assert load_config(_study(tmp_path, data="pkg.mod:fn")).data.root is None


def test_model_and_sampler_shorthands(tmp_path):
    cfg = load_config(_study(tmp_path, model="digits_cnn", sampler="random", seed=5))
    assert cfg.model == ModelConfig("digits_cnn")
    assert cfg.sampler == SamplerConfig("random", 5)
    cfg = load_config(_study(tmp_path, sampler={"name": "tpe", "seed": 1}, seed=5))
    assert cfg.sampler.seed == 1
    assert _error(load_config, _study(tmp_path, model={})) == (
        "model.name must be a non-empty string, got None"
    )


def test_set_reaches_into_a_space_given_as_a_file():
    study = Path(__file__).resolve().parent.parent / "studies" / "digits" / "study.yaml"
    plain = load_config(study)
    cfg = load_config(study, ["space.init=data", "space.ratio.range=[0.2, 0.4]"])
    assert plain.space.init != "data" and cfg.space.init == "data"
    assert (cfg.space.ratio.lo, cfg.space.ratio.hi) == (0.2, 0.4)
    same = ("include", "exclude", "methods", "keep", "shift_prune", "overrides")
    assert all(getattr(cfg.space, k) == getattr(plain.space, k) for k in same)
    assert load_config(study, ["seed=3"]).space == plain.space  # no space key: the file as is
