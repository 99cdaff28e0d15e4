"""`initial_design.uniform_at`: a new study enqueues every offered method's dearest uniform
plan under each budget before anything else, and `autodecomp search` runs them first."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tiny_study import make_study, tiny_config

from autodecomp.config import load_config
from autodecomp.core.errors import ConfigError
from autodecomp.measure.plan_cost import PlanCost
from autodecomp.search.allocate import uniform_candidates
from autodecomp.search.study import prepare_baseline, run_search, setup_study
from autodecomp.search.uniform_arms import budget_arms

STUDY = tiny_config(
    name="tiny",
    space={
        "methods": ["tucker", "tt"],
        "keep": False,
        "ratio": {"range": [0.05, 0.9], "log": True},
    },
    proxy={"steps": 10, "batch_size": 32, "bn_batches": 1},
    budgets={"max_macs": 0.6},
    initial_design={"uniform_at": ["40%", 0.2, 0.9]},
    warm_start=[{"method": "tucker", "ratio": 0.05}],
    trials=20,
)

pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.fixture(scope="module")
def study_yaml(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("uniform_at"), STUDY)


def _waiting(study: optuna.Study) -> list[str]:
    return [t.user_attrs["warm_start"] for t in study.get_trials(states=(TrialState.WAITING,))]


def test_the_budgets_are_read_sorted_and_once(study_yaml):
    cfg = load_config(study_yaml, ["initial_design.uniform_at=[0.4, 20%, 0.4, 0.1x]"])
    assert cfg.initial_design.uniform_at == (0.1, 0.2, 0.4)
    for given, read in (("0.3", (0.3,)), ("null", ())):
        cfg = load_config(study_yaml, [f"initial_design.uniform_at={given}"])
        assert cfg.initial_design.uniform_at == read
    with pytest.raises(ConfigError, match=r"^initial_design.uniform_at must be a .*'lots'$"):
        load_config(study_yaml, ["initial_design.uniform_at=[0.2, lots]"])
    with pytest.raises(ConfigError, match=r"^initial_design.uniform_at must be .*got -0.1$"):
        load_config(study_yaml, ["initial_design.uniform_at=[-0.1]"])


def test_each_method_s_dearest_uniform_plan_under_each_budget_is_enqueued(study_yaml):
    cfg = load_config(study_yaml)
    prepared, baseline = prepare_baseline(cfg)
    cost = PlanCost(baseline.model, baseline.input_shape, prepared.space.names)
    limits = {"macs": 0.6 * baseline.macs}
    expected = []
    for level in (0.2, 0.4, 0.9):  # 0.9 is above max_macs: the study's limit decides there
        for method in ("tucker", "tt"):
            found = uniform_candidates(baseline.model, prepared.space, cost, method, limits)
            within = [macs for macs, _ in found if macs <= level]
            if within:  # Tensor-Train has no plan under 0.44 here
                expected.append(f"uniform {method} @{max(within):.3f}")
    assert [label.split()[1] for label in expected] == ["tucker", "tucker", "tucker", "tt"]
    assert 0.4 < float(expected[-1].split("@")[1]) <= 0.6

    study = setup_study(cfg)
    assert _waiting(study) == ["tucker@0.05", *expected]  # warm starts first
    setup_study(cfg)  # resuming enqueues nothing more
    assert _waiting(study) == ["tucker@0.05", *expected]


def test_a_plan_given_as_a_warm_start_runs_once(study_yaml, tmp_path):
    cfg = load_config(study_yaml)
    prepared, baseline = prepare_baseline(cfg)
    limits = cfg.budgets.limits(baseline.macs, baseline.params)
    cost = PlanCost(baseline.model, baseline.input_shape, prepared.space.names)
    arms = budget_arms(baseline.model, prepared.space, cost, (0.2, 0.9), limits)
    ratio = next(v for k, v in arms[0][1].items() if k.endswith("/ratio"))
    assert arms[0][0].startswith("uniform tucker @")  # the Tucker-2 plan at 0.2 ...
    cfg = load_config(
        study_yaml,
        [
            f"storage=sqlite:///{tmp_path / 'once.db'}",
            f"warm_start=[{{method: tucker, ratio: {ratio}}}]",  # ... given as a warm start
            "initial_design.uniform_at=[0.2, 0.9]",
        ],
    )
    waiting = _waiting(setup_study(cfg))
    assert len(arms) == 3
    assert waiting == [f"tucker@{ratio}", arms[1][0], arms[2][0]]


def test_the_search_runs_the_arms_first_each_within_its_budget(study_yaml, tmp_path):
    overrides = [f"storage=sqlite:///{tmp_path / 'run.db'}", "warm_start=[]", "trials=4"]
    cfg = load_config(study_yaml, [*overrides, "initial_design.uniform_at=[0.2, 0.4, 0.6]"])
    study = run_search(cfg).study
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in done] == [0, 1, 2, 3]
    for trial in done:  # the label's MACs are what the objective measured (fvcore)
        label = trial.user_attrs["warm_start"]
        assert label.startswith("uniform ")
        assert label.endswith(f"@{trial.user_attrs['macs_ratio']:.3f}")
        assert not trial.user_attrs.get("over_budget")
    ratios = [t.user_attrs["macs_ratio"] for t in done]
    assert ratios[0] <= 0.2 < ratios[1] <= 0.4 < min(ratios[2:]) <= max(ratios[2:]) <= 0.6
