"""The multi-fidelity pruner: built from the config, fed the rung accuracies, per MAC band."""

from __future__ import annotations

import shutil

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial
from test_proxies import TINY

from autodecomp.cli import main
from autodecomp.config import load_config
from autodecomp.config.samplers import make_pruner, rung_steps
from autodecomp.core.errors import ConfigError
from autodecomp.search.baseline import load_baseline
from autodecomp.search.fidelity import mac_band
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.study import prepare

HALVING = ["proxy.steps=9", "sampler.pruner=successive_halving", "sampler.pruner_min_steps=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruner") / "tiny"
    folder.mkdir()
    (folder / "study.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(folder / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    return folder / "study.yaml", prepared, baseline


PLAN = {f"conv{i}/method": "tucker" for i in (2, 3, 4)} | {
    f"conv{i}/tucker/ratio": 0.2 for i in (2, 3, 4)
}


def _run(tiny, overrides, *, rivals=(), label=None) -> optuna.Study:
    """One trial of :data:`PLAN` (enqueued as ``warm_start`` ``label`` when given) after
    ``rivals``: the MACs ratios of finished trials that reached rung 0 with accuracy 1.0."""
    path, prepared, baseline = tiny
    cfg = load_config(path, overrides)
    study = optuna.create_study(directions=cfg.directions)
    for ratio in rivals:
        study.add_trial(
            create_trial(
                values=[1.0, 1.0],
                user_attrs={"macs_ratio": ratio},
                system_attrs={"completed_rung_0": 1.0},
            )
        )
    study.enqueue_trial(PLAN, user_attrs={} if label is None else {"warm_start": label})
    study.optimize(Objective(cfg, prepared.space, baseline, prepared.splits), 1, catch=CATCH)
    return study


# ---- configuration ------------------------------------------------------------------------------
def test_pruner_and_its_rungs_come_from_the_config(tiny):
    cfg = load_config(tiny[0], ["sampler.pruner=successive_halving"]).sampler
    assert rung_steps(cfg, 80) == [8, 24, 72]  # 80 // 3**2, then x3 while below 80
    assert rung_steps(cfg, 200) == [22, 66, 198]
    pruner = make_pruner(cfg, 80)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert (pruner._min_resource, pruner._reduction_factor) == (8, 3)
    custom = load_config(
        tiny[0],
        ["sampler.pruner=successive_halving", "sampler.pruner_min_steps=5",
         "sampler.pruner_reduction=2"],
    ).sampler  # fmt: skip
    assert rung_steps(custom, 40) == [5, 10, 20]
    plain = load_config(tiny[0]).sampler
    assert plain.pruner == "none" and rung_steps(plain, 80) == []
    assert isinstance(make_pruner(plain, 80), optuna.pruners.NopPruner)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.pruner=hyperbandish", "unknown pruner 'hyperbandish'; valid pruners: none, "
         "successive_halving"),
        ("sampler.pruner_reduction=1", "sampler.pruner_reduction"),
        ("sampler.pruner_min_steps=0", "sampler.pruner_min_steps"),
    ],
)  # fmt: skip
def test_bad_pruner_settings_are_one_line_errors(tiny, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(tiny[0], [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_first_rung_beyond_the_fine_tune_is_refused(tiny):
    cfg = load_config(tiny[0], ["sampler.pruner=successive_halving", "sampler.pruner_min_steps=9"])
    with pytest.raises(ConfigError, match=r"pruner_min_steps=9 leaves no pruning rung below "
                       r"proxy.steps=3; choose a value below 3"):  # fmt: skip
        make_pruner(cfg.sampler, cfg.proxy.steps)


def test_mac_bands_are_octaves():
    assert [mac_band(r) for r in (2.0, 1.0, 0.75, 0.5, 0.3, 0.25, 0.2, 0.05)] == [
        0, 0, 0, 1, 1, 2, 2, 4,
    ]  # fmt: skip


# ---- inside the objective -----------------------------------------------------------------------
def test_rung_accuracies_are_recorded_and_leave_the_result_unchanged(tiny):
    pruned = _run(tiny, HALVING).trials[0]
    plain = _run(tiny, ["proxy.steps=9"]).trials[0]
    assert pruned.state == plain.state == TrialState.COMPLETE
    assert list(pruned.user_attrs["rung_accuracy"]) == ["1", "3"]  # rungs 1, 3 (9 is the end)
    assert all(0.0 <= a <= 1.0 for a in pruned.user_attrs["rung_accuracy"].values())
    assert pruned.values == plain.values  # evaluating at the rungs changes nothing
    assert pruned.system_attrs["completed_rung_0"] == pruned.user_attrs["rung_accuracy"]["1"]
    assert "rung_accuracy" not in plain.user_attrs
    assert pruned.intermediate_values == {}  # never Optuna's value of a multi-objective trial


def test_a_trial_trailing_its_band_is_pruned_with_its_reason(tiny):
    study = _run(tiny, HALVING, rivals=[0.75 * 2.0**-k for k in range(12)])
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED and trial.values is None
    attrs = trial.user_attrs
    assert attrs["pruned_at"] == "rung" and list(attrs["rung_accuracy"]) == ["1"]
    accuracy = attrs["rung_accuracy"]["1"]
    assert attrs["pruned"] == (
        f"accuracy {accuracy:.3f} at step 1 trails its MAC band (successive_halving)"
    )
    assert "eval" not in attrs["seconds"]  # stopped before the final evaluation


def test_a_trial_competes_only_within_its_mac_band(tiny):
    study = _run(tiny, HALVING, rivals=[2.0**-20])  # a rival in a far cheaper band
    assert study.trials[-1].state == TrialState.COMPLETE


def test_enqueued_trials_are_measured_but_never_pruned(tiny):
    rivals = [0.75 * 2.0**-k for k in range(12)]
    study = _run(tiny, HALVING, rivals=rivals, label="uniform tucker")
    trial = study.trials[-1]
    assert trial.state == TrialState.COMPLETE
    assert list(trial.user_attrs["rung_accuracy"]) == ["1", "3"]


def test_resume_keeps_the_pruner_and_its_rung_records(tiny, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny[0].parent, folder)
    search = ["search", str(folder / "study.yaml")]
    for item in HALVING:
        search += ["--set", item]
    assert main([*search, "--trials", "3"]) == 0
    assert main([*search, "--trials", "5"]) == 0
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.number for t in study.trials] == list(range(5))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert all("completed_rung_0" in t.system_attrs for t in study.trials)
    for t in study.trials:
        assert (t.state == TrialState.PRUNED) == (t.user_attrs.get("pruned_at") == "rung")
