"""`autodecomp report` on constructed studies with a known front, and on real storages."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import optuna
import pandas as pd
import pytest
from matplotlib.image import imread
from optuna.distributions import CategoricalDistribution
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from autodecomp.core.errors import ConfigError
from autodecomp.core.logs import console_logging
from autodecomp.results.front import (
    front_frame,
    hypervolume,
    hypervolume_frame,
    method_usage_frame,
)
from autodecomp.results.queries import best_trial
from autodecomp.results.report import configure_parser, write_report
from autodecomp.results.study_view import read_study, snapshot
from autodecomp.results.tables import trials_frame

BASELINE = {"accuracy": 0.9, "macs": 1000, "params": 100, "input_shape": [1, 8, 8]}
LIMIT = 900  # MACs budget


def _trial(number_hint: str, acc, macs, params, plan, *, state=TrialState.COMPLETE, **extra):
    """A trial as the search records it (user attributes of autodecomp.search.objective)."""
    layers = {
        name: {
            "method": method,
            "rank": None if method == "keep" else [2, 3],
            "ratio": None if method == "keep" else ratio,
            "rel_error": 0.0,
            "macs": 1,
            "params": 1,
        }
        for name, (method, ratio) in plan.items()
    }
    attrs = {
        "plan": {
            n: {"method": m} if m == "keep" else {"method": m, "ratio": r}
            for n, (m, r) in plan.items()
        },
        "layers": layers,
        "macs": macs,
        "params": params,
        "macs_ratio": macs / BASELINE["macs"],
        "params_ratio": params / BASELINE["params"],
        "over_budget": macs > LIMIT,
        "pre_ft_accuracy": None if acc is None else acc / 2,
        "label": number_hint,
        **extra,
    }
    done = state == TrialState.COMPLETE
    return create_trial(
        state=state,
        values=[acc, float(macs)] if done else None,
        params={"conv1/method": plan["conv1"][0]},
        distributions={"conv1/method": CategoricalDistribution(["tucker", "cp", "keep"])},
        user_attrs=attrs,
        constraints={"macs": macs / LIMIT - 1.0},
    )


# number: (label, accuracy, MACs, params, plan)
TRIALS = [
    ("A", 0.80, 200, 20, {"conv1": ("tucker", 0.2), "conv2": ("keep", None)}),
    ("B", 0.85, 500, 60, {"conv1": ("tucker", 0.5), "conv2": ("cp", 0.4)}),
    ("C", 0.70, 600, 10, {"conv1": ("cp", 0.1), "conv2": ("cp", 0.1)}),  # dominated by A
    ("D", 0.88, 880, 90, {"conv1": ("keep", None), "conv2": ("cp", 0.7)}),
    ("E", 0.00, 950, 95, {"conv1": ("keep", None), "conv2": ("keep", None)}),  # over budget
]
# losses (1 - acc, macs / 1000) of A, B, D: (0.2, 0.2), (0.15, 0.5), (0.12, 0.88); reference (1, 1)
HV_A = 0.8 * 0.8
HV_AB = HV_A + (0.20 - 0.15) * (1 - 0.5)
HV_ABD = HV_AB + (0.15 - 0.12) * (1 - 0.88)


def _fill(study: optuna.Study, objectives=("accuracy", "macs")) -> optuna.Study:
    study.set_user_attr("config", {"name": study.study_name, "objectives": list(objectives)})
    study.set_user_attr("baseline", BASELINE)
    study.set_user_attr("limits", {"macs": LIMIT})
    for label, acc, macs, params, plan in TRIALS:
        study.add_trial(_trial(label, acc, macs, params, plan))
    pruned = {"conv1": ("tucker", 0.05), "conv2": ("keep", None)}
    study.add_trial(_trial("F", None, 100, 5, pruned, state=TrialState.PRUNED, pruned="floor"))
    study.add_trial(_trial("G", None, 300, 30, pruned, state=TrialState.RUNNING))
    return study


@pytest.fixture
def study() -> optuna.Study:
    made = optuna.create_study(study_name="known", directions=["maximize", "minimize"])
    return _fill(made)


def test_front_membership_order_and_ratios(study):
    front = front_frame(study)
    assert list(front.number) == [0, 1, 3]  # A, B, D sorted by MACs; C dominated, E infeasible
    assert list(front.macs) == [200, 500, 880]
    assert front.accuracy_drop.tolist() == pytest.approx([0.10, 0.05, 0.02], abs=1e-12)
    assert front.macs_compression.tolist() == pytest.approx([5.0, 2.0, 1000 / 880])
    assert front.params_compression.tolist() == pytest.approx([5.0, 100 / 60, 100 / 90])
    assert front.macs_ratio.tolist() == pytest.approx([0.2, 0.5, 0.88])
    assert front.plan_layers[1] == "conv1:tucker[2,3] conv2:cp[2,3]"
    assert front.plan_layers[2] == "conv1:keep conv2:cp[2,3]"
    assert list(front.columns[:4]) == ["number", "accuracy", "accuracy_drop", "macs"]


def test_trials_frame_keeps_running_and_pruned_trials(study):
    trials = trials_frame(study)
    assert list(trials.state) == ["COMPLETE"] * 5 + ["PRUNED", "RUNNING"]


def test_method_usage_counts_the_front(study):
    usage = method_usage_frame(study)
    assert list(usage.columns) == ["layer", "cp", "tucker", "keep", "front_trials"]
    assert usage.set_index("layer").loc["conv1"].tolist() == [0, 2, 1, 3]
    assert usage.set_index("layer").loc["conv2"].tolist() == [2, 0, 1, 3]


def test_hypervolume_equals_hand_computed_value(study):
    assert hypervolume(study) == pytest.approx(HV_ABD, abs=1e-12)
    assert pytest.approx(0.6686) == HV_ABD
    history = hypervolume_frame(study)
    assert list(history.number) == list(range(7))
    assert list(history.counted) == [True, True, True, True, False, False, False]
    expected = [HV_A, HV_AB, HV_AB, HV_ABD, HV_ABD, HV_ABD, HV_ABD]
    assert history.hypervolume.tolist() == pytest.approx(expected, abs=1e-12)


def test_hypervolume_in_three_objectives():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("config", {"objectives": ["accuracy", "macs", "params"]})
    study.set_user_attr("baseline", BASELINE)
    plan = {"conv1": ("tucker", 0.5)}
    for acc, macs, params in [(0.8, 500, 50), (0.9, 800, 90)]:
        trial = _trial("", acc, macs, params, plan)
        study.add_trial(
            create_trial(
                values=[acc, float(macs), float(params)],
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=trial.user_attrs,
            )
        )
    # boxes (0.2..1)x(0.5..1)x(0.5..1) = 0.2 and (0.1..1)x(0.8..1)x(0.9..1) = 0.018 overlap in
    # (0.2..1)x(0.8..1)x(0.9..1) = 0.016
    assert hypervolume(study) == pytest.approx(0.2 + 0.018 - 0.016, abs=1e-12)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({}, 3),  # most accurate usable trial: D
        ({"max_macs": "0.5x"}, 1),  # <= 500 MACs, inclusive: B
        ({"max_macs": 0.5}, 1),  # a number <= 1 is a fraction of the baseline
        ({"max_macs": "50%"}, 1),
        ({"max_macs": 499}, 0),  # absolute
        ({"max_macs": "0.3k"}, 0),
        ({"max_params": 15}, 2),  # C: dominated in (accuracy, MACs) but the only one <= 15
        ({"max_drop": 0.05}, 1),  # smallest within 5 points: B (drop 0.05 exactly)
        ({"max_drop": "10%"}, 0),
        ({"max_drop": 0.05, "max_params": 59}, None),
        ({"max_drop": "1%"}, None),
        ({"max_macs": 100}, None),  # F (100 MACs) is pruned, E over budget: never candidates
    ],
)
def test_best_trial_queries(study, limits, expected):
    row = best_trial(study, **limits)
    if expected is None:
        assert row is None
    else:
        assert int(row["number"]) == expected
        assert row["on_front"] == (expected != 2)
        assert '"conv1"' in row["plan"]


@pytest.mark.parametrize("bad", ["abc", 0, -1, "0x", "-5%", "nan", True])
def test_bad_limits_are_refused(study, bad):
    with pytest.raises(ConfigError, match="max_macs"):
        best_trial(study, max_macs=bad)


def test_bad_drop_is_refused(study):
    with pytest.raises(ConfigError, match="max_drop"):
        best_trial(study, max_drop="one point")


def test_write_report_files(study, tmp_path):
    out = write_report(study, tmp_path / "r", max_macs="0.5x")
    names = sorted(p.name for p in out["paths"])
    tables = ["trials", "layers", "pareto", "method_usage", "hypervolume"]
    plots = ["pareto.png", "pareto.html", "hypervolume.png", "method_map.png"]
    assert names == sorted(
        [f"{t}.{e}" for t in tables for e in ("csv", "parquet")] + plots + ["report.md"]
    )
    folder = tmp_path / "r"
    for table in tables:
        csv = pd.read_csv(folder / f"{table}.csv")
        parquet = pd.read_parquet(folder / f"{table}.parquet")
        assert list(csv.columns) == list(parquet.columns) and len(csv) == len(parquet)
    assert list(pd.read_parquet(folder / "pareto.parquet").number) == [0, 1, 3]
    for png in ("pareto.png", "hypervolume.png", "method_map.png"):
        image = imread(folder / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas
    html = (folder / "pareto.html").read_text()
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html  # plotly.js embedded: offline
    text = (folder / "report.md").read_text()
    assert f"**{HV_ABD:.4f}**" in text
    assert "max-macs 0.5x: trial 1, accuracy 0.8500" in text
    assert "| 3 | 0.8800 | +0.0200 | 880 |" in text


def test_empty_study_still_reports(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("config", {"objectives": ["accuracy", "macs"]})
    study.set_user_attr("baseline", BASELINE)
    out = write_report(study, tmp_path)
    assert out["hypervolume"] == 0.0
    assert front_frame(study).empty
    assert all(p.stat().st_size > 0 for p in out["paths"])
    assert "(none yet)" in (tmp_path / "report.md").read_text()


def test_foreign_study_is_refused(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(ConfigError, match="autodecomp search"):
        front_frame(study)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sqlite_read_only_while_running(tmp_path):
    db = tmp_path / "study.db"
    live = _fill(optuna.create_study(study_name="s", storage=f"sqlite:///{db}",
                                     directions=["maximize", "minimize"]))  # fmt: skip
    running = live.ask()  # a worker's trial in flight
    before = _digest(db)
    for source in (str(db), f"sqlite:///{db}"):
        study = read_study(source)  # the only study: no name needed
        assert list(front_frame(study).number) == [0, 1, 3]
        assert trials_frame(study).state.iloc[-1] == "RUNNING"
    written = write_report(read_study(str(db)), tmp_path / "r", plots=False)
    assert pd.read_parquet(tmp_path / "r" / "trials.parquet").state.iloc[-1] == "RUNNING"
    assert written["hypervolume"] == pytest.approx(HV_ABD, abs=1e-12)
    assert _digest(db) == before
    live.tell(running, [0.99, 100.0])  # the worker finishes: the next read sees it
    assert list(front_frame(read_study(str(db), "s")).number) == [7]


def test_snapshot_is_frozen(study):
    frozen = snapshot(study)
    study.add_trial(_trial("H", 0.99, 100, 10, TRIALS[0][4]))  # dominates everything
    assert list(front_frame(study).number) == [7]
    assert list(front_frame(frozen).number) == [0, 1, 3]
    assert frozen.user_attrs == study.user_attrs


def test_journal_file_storage(tmp_path):
    log = tmp_path / "journal.log"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(log)))
    _fill(optuna.create_study(study_name="j", storage=storage,
                              directions=["maximize", "minimize"]))  # fmt: skip
    before = _digest(log)
    study = read_study(str(log), "j")
    assert hypervolume(study) == pytest.approx(HV_ABD, abs=1e-12)
    assert _digest(log) == before


def test_missing_storage_is_not_created(tmp_path):
    for source in (str(tmp_path / "nope.db"), f"sqlite:///{tmp_path / 'nope.db'}"):
        with pytest.raises(ConfigError, match=r"nope\.db"):
            read_study(source)
    assert list(tmp_path.iterdir()) == []


def test_unknown_study_name_lists_the_valid_ones(tmp_path):
    db = tmp_path / "study.db"
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=f"sqlite:///{db}")
    with pytest.raises(ConfigError, match="studies there: a, b"):
        read_study(str(db))
    with pytest.raises(ConfigError, match="no study 'c'"):
        read_study(str(db), "c")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    with console_logging():  # the lines `autodecomp report` prints
        return configure_parser(parser)(parser.parse_args(argv))


def test_cli_on_a_storage_file(tmp_path, capsys):
    db = tmp_path / "study.db"
    _fill(optuna.create_study(study_name="s", storage=f"sqlite:///{db}",
                              directions=["maximize", "minimize"]))  # fmt: skip
    assert _cli([str(db), "--max-drop", "5%", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "best with max-drop 5%: trial 1, accuracy 0.8500" in out
    assert f"hypervolume {HV_ABD:.4f}" in out
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert "report.md" in written and "pareto.parquet" in written and "pareto.png" not in written
