"""`autodecomp report` for every documented objective setting, read from the objective registry.

Each study is built by hand (an Optuna study with the trials and user attributes the search
records), so the fronts, hypervolumes and query answers below are known exactly.
"""

from __future__ import annotations

import argparse
import itertools

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from autodecomp.core.errors import ConfigError
from autodecomp.core.logs import console_logging
from autodecomp.measure.objectives import OBJECTIVES, objective, registered
from autodecomp.results.front import hypervolume, reference
from autodecomp.results.queries import best_trial
from autodecomp.results.report import configure_parser, write_report
from autodecomp.results.study_view import study_baseline

BASELINE = {"accuracy": 0.9, "macs": 1_000_000, "params": 10_000, "input_shape": [1, 8, 8]}
BASELINE_MS = 2.0  # on the cpu
MAX_MACS = 900_000
MAX_MS = 2.0
# number: (accuracy, MACs, params, latency ms on the cpu)
TRIALS = [
    (0.80, 200_000, 2_000, 0.6),
    (0.85, 500_000, 6_000, 1.0),
    (0.70, 600_000, 1_000, 0.8),  # dominated by 0 unless params is an objective
    (0.88, 850_000, 9_000, 1.6),
    (0.86, 700_000, 5_000, 2.4),  # over the latency budget when there is one
]


def _attrs(macs: int, params: int, ms: float | None) -> dict:
    attrs = {
        "plan": {"conv1": {"method": "tucker", "ratio": 0.5}, "conv2": {"method": "keep"}},
        "layers": {
            "conv1": {
                "method": "tucker",
                "rank": [2, 3],
                "ratio": 0.5,
                "rel_error": 0.1,
                "macs": macs,
                "params": params,
            },
            "conv2": {
                "method": "keep",
                "rank": None,
                "ratio": None,
                "rel_error": 0.0,
                "macs": 0,
                "params": 0,
            },
        },
        "macs": macs,
        "params": params,
        "macs_ratio": macs / BASELINE["macs"],
        "params_ratio": params / BASELINE["params"],
        "over_budget": False,
        "pre_ft_accuracy": 0.5,
    }
    if ms is not None:
        attrs["latency_ms"] = {"cpu": ms}
    return attrs


def make_study(objectives: list[str], *, max_ms: float | None = None, storage=None) -> optuna.Study:
    """A study as ``autodecomp search`` leaves it, with objectives ``objectives`` (and a
    latency budget ``max_ms``); latency is measured when it is an objective or a budget."""
    measured = "latency" in objectives or max_ms is not None
    study = optuna.create_study(
        study_name="objectives",
        storage=storage,
        directions=[objective(n).direction for n in objectives],
    )
    config = {"name": "objectives", "objectives": objectives, "latency": {"device": "cpu"}}
    study.set_user_attr("config", config)
    study.set_user_attr("baseline", BASELINE)
    limits = {"macs": MAX_MACS} | ({} if max_ms is None else {"latency": max_ms})
    study.set_user_attr("limits", limits)
    if measured:
        study.set_user_attr("baseline_latency_ms", {"cpu": BASELINE_MS})
    for accuracy, macs, params, ms in TRIALS:
        measure = {
            "accuracy": accuracy,
            "macs": float(macs),
            "params": float(params),
            "latency": ms,
        }
        constraints = {"macs": macs / MAX_MACS - 1.0}
        if max_ms is not None:
            constraints["latency"] = ms / max_ms - 1.0
        study.add_trial(
            create_trial(
                values=[measure[n] for n in objectives],
                params={"conv1/method": "tucker"},
                distributions={"conv1/method": CategoricalDistribution(["tucker", "keep"])},
                user_attrs=_attrs(macs, params, ms if measured else None),
                constraints=constraints,
            )
        )
    return study


def _losses(numbers: list[int], objectives: list[str]) -> list[tuple[float, ...]]:
    base = {"accuracy": 0.0, "macs": BASELINE["macs"], "params": BASELINE["params"],
            "latency": BASELINE_MS}  # fmt: skip
    rows = []
    for n in numbers:
        acc, macs, params, ms = TRIALS[n]
        value = {"accuracy": 1 - acc, "macs": macs, "params": params, "latency": ms}
        rows.append(tuple(value[o] if o == "accuracy" else value[o] / base[o] for o in objectives))
    return rows


def _union_volume(points: list[tuple[float, ...]]) -> float:
    """Volume of the union of the boxes [p, 1]^d inside the unit cube, cell by cell."""
    points = [p for p in points if all(c < 1 for c in p)]
    if not points:
        return 0.0
    axes = [sorted({p[i] for p in points} | {1.0}) for i in range(len(points[0]))]
    volume = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        low = [axes[i][j] for i, j in enumerate(cell)]
        if any(all(p[i] <= low[i] for i in range(len(low))) for p in points):
            size = 1.0
            for i, j in enumerate(cell):
                size *= axes[i][j + 1] - axes[i][j]
            volume += size
    return volume


# objectives, latency budget, front (by MACs), usable trials counted in the hypervolume,
# expected text of report.md
CASES = {
    "accuracy-macs": (
        ["accuracy", "macs"], None, [0, 1, 4, 3], [0, 1, 2, 3, 4],
        ["Objectives: accuracy, macs.", "Budgets: macs <= 900,000 (0.90x baseline).",
         "(1 - accuracy, macs / baseline macs) with reference point (1, ..., 1) = accuracy 0, "
         "macs 1,000,000;"],
    ),
    "accuracy-macs-params": (
        ["accuracy", "macs", "params"], None, [0, 1, 2, 4, 3], [0, 1, 2, 3, 4],
        ["Objectives: accuracy, macs, params.",
         "(1 - accuracy, macs / baseline macs, params / baseline params) with reference "
         "point (1, ..., 1) = accuracy 0, macs 1,000,000, params 10,000;"],
    ),
    "accuracy-macs-latency": (
        ["accuracy", "macs", "latency"], None, [0, 1, 4, 3], [0, 1, 2, 3, 4],
        ["Objectives: accuracy, macs, latency.",
         "(1 - accuracy, macs / baseline macs, latency / baseline latency) with reference "
         "point (1, ..., 1) = accuracy 0, macs 1,000,000, latency 2.000 ms;",
         "| latency cpu ms |", "| 0.600 |"],
    ),
    "latency-budget": (
        ["accuracy", "macs"], MAX_MS, [0, 1, 3], [0, 1, 2, 3],
        ["Objectives: accuracy, macs.",
         "Budgets: latency <= 2.000 ms (1.00x baseline), macs <= 900,000 (0.90x baseline).",
         "| latency cpu ms |"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_report_for_each_documented_setting(case, tmp_path):
    objectives, max_ms, front, counted, texts = CASES[case]
    study = make_study(objectives, max_ms=max_ms)
    out = write_report(study, tmp_path, max_macs="0.75x")
    measured = "latency" in objectives or max_ms is not None

    trials = pd.read_csv(tmp_path / "trials.csv")
    first = ["number", "state", "accuracy", "macs", "params"]
    first += ["latency_cpu_ms"] if measured else []
    assert list(trials.columns[: len(first)]) == first
    assert "latency" not in trials.columns  # a measured objective is a column per device
    assert trials.accuracy.tolist() == [t[0] for t in TRIALS]
    assert trials.macs.tolist() == [t[1] for t in TRIALS]
    if measured:
        assert trials.latency_cpu_ms.tolist() == [t[3] for t in TRIALS]
    if max_ms is not None:
        assert trials.constraint_latency.tolist() == pytest.approx([t[3] / 2 - 1 for t in TRIALS])
        assert trials.feasible.tolist() == [True, True, True, True, False]
    pareto = pd.read_csv(tmp_path / "pareto.csv")
    assert pareto.number.tolist() == front
    assert ("latency_cpu_ms" in pareto.columns) == measured
    expected = _union_volume(_losses(counted, objectives))
    assert out["hypervolume"] == pytest.approx(expected, abs=1e-12)
    assert hypervolume(study) == pytest.approx(expected, abs=1e-12)

    for name in ("pareto.png", "hypervolume.png", "method_map.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "pareto.html").read_text()
    assert "Plotly.newPlot" in html
    assert all(f'"text":"{objective(n).title}"' in html for n in objectives)

    text = (tmp_path / "report.md").read_text()
    for line in texts:
        assert line in text
    # <= 750k MACs: trial 4 (0.86) unless the latency budget rules it out, then 1 (0.85)
    answer = 1 if max_ms is not None else 4
    assert [int(row["number"]) for _, row in out["queries"]] == [answer]
    assert f"- max-macs 0.75x: trial {answer}, accuracy {TRIALS[answer][0]:.4f}" in text


def test_hand_volume_matches_a_known_case():
    # boxes (0.2..1)x(0.5..1) and (0.5..1)x(0.2..1) overlap in (0.5..1)x(0.5..1)
    assert _union_volume([(0.2, 0.5), (0.5, 0.2)]) == pytest.approx(0.4 + 0.4 - 0.25)
    assert _union_volume(_losses([0, 1, 3, 4], ["accuracy", "macs"])) == pytest.approx(0.671)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_macs": "0.5x"}, 1),
        ({"max_macs": "50%"}, 1),
        ({"max_macs": 0.5}, 1),
        ({"max_macs": "700k"}, 4),
        ({"max_macs": 700_000}, 4),
        ({"max_macs": "0.7M"}, 4),
        ({"max_macs": "199999"}, None),
        ({"max_params": "5k"}, 4),
        ({"max_params": "10%"}, 2),  # only trial 2 has <= 1,000 parameters
        ({"max_drop": "3%"}, 3),
        ({"max_drop": 0.05}, 1),  # smallest within 5 points
        ({"max_drop": "5%", "max_macs": "0.4x"}, None),
    ],
)
def test_best_under_budget_reads_the_shared_budget_forms(limits, expected):
    row = best_trial(make_study(["accuracy", "macs"]), **limits)
    assert (None if row is None else int(row["number"])) == expected


def test_latency_budget_rules_out_its_trials_in_queries():
    plain, budget = make_study(["accuracy", "macs"]), make_study(["accuracy", "macs"], max_ms=2)
    assert int(best_trial(plain, max_macs="700k")["number"]) == 4
    assert int(best_trial(budget, max_macs="700k")["number"]) == 1


@pytest.mark.parametrize("bad", ["2x", "150%", "-1", "0", "abc", "1q", True])
def test_budget_forms_outside_the_shared_parser_are_refused(bad):
    with pytest.raises(ConfigError, match="max_macs must be a fraction of the baseline"):
        best_trial(make_study(["accuracy", "macs"]), max_macs=bad)


def test_cli_prints_the_latency_objective(tmp_path, capsys):
    db = tmp_path / "study.db"
    make_study(["accuracy", "macs", "latency"], storage=f"sqlite:///{db}")
    parser = argparse.ArgumentParser()
    run = configure_parser(parser)
    with console_logging():  # the lines `autodecomp report` prints
        assert run(parser.parse_args([str(db), "--max-macs", "50%"])) == 0
    out = capsys.readouterr().out
    assert "latency cpu ms" in out and "0.600" in out
    assert "best with max-macs 50%: trial 1, accuracy 0.8500 (drop +0.0500), 500,000 MACs" in out
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"pareto.png", "pareto.html", "report.md", "trials.parquet"} <= written


def test_four_objectives_plot_the_first_three(tmp_path):
    study = make_study(["accuracy", "macs", "params", "latency"])
    write_report(study, tmp_path)
    html = (tmp_path / "pareto.html").read_text()
    assert '"text":"MACs"' in html and '"text":"parameters"' in html
    assert '"text":"latency (ms)"' not in html


def test_latency_objective_without_a_baseline_latency_is_explained():
    study = make_study(["accuracy", "macs", "latency"])
    study.set_user_attr("baseline_latency_ms", {"cuda": 1.0})  # not on the config's device
    assert "latency" not in study_baseline(study)
    with pytest.raises(ConfigError, match=r"no baseline latency .*'baseline_latency_ms'"):
        reference(study)


# ---- the registry ------------------------------------------------------------------------------
def test_every_objective_is_registered_once_in_column_order():
    assert [s.name for s in registered()] == ["accuracy", "macs", "params", "latency"]
    assert sorted(OBJECTIVES.names()) == sorted(s.name for s in registered())


def test_objective_terms():
    accuracy, macs, latency = objective("accuracy"), objective("macs"), objective("latency")
    base = {"accuracy": 0.9, "macs": 1000, "latency": 2.0}
    assert (accuracy.reference(base), accuracy.loss(0.8, base)) == (0.0, pytest.approx(0.2))
    assert (macs.reference(base), macs.loss(250, base)) == (1000.0, 0.25)
    assert latency.loss(1.0, base) == 0.5
    assert [s.format_reference(base) for s in (accuracy, macs, latency)] == [
        "0",
        "1,000",
        "2.000 ms",
    ]
    assert macs.format(1234567) == "1,234,567" and latency.format(0.8125) == "0.812 ms"
    assert accuracy.loss_text() == "1 - accuracy"
    assert latency.loss_text() == "latency / baseline latency"


def test_where_each_objective_is_stored():
    attrs = {"macs": 10, "params": 3, "latency_ms": {"cpu": 1.5, "cuda": 0.2}}
    cells: dict = {}
    for spec in registered():
        cells |= spec.cells({"accuracy": 0.7, "macs": 10.0}, attrs)
    assert cells == {
        "accuracy": 0.7,
        "macs": 10,
        "params": 3,
        "latency_cpu_ms": 1.5,
        "latency_cuda_ms": 0.2,
    }
    study_attrs = {
        "baseline": {"accuracy": 0.9, "macs": 100, "params": 5},
        "baseline_latency_ms": {"cpu": 3.0, "cuda": 0.5},
        "config": {"latency": {"device": "cuda"}},
    }
    values = {s.name: s.baseline_value(study_attrs) for s in registered()}
    assert values == {"accuracy": 0.9, "macs": 100.0, "params": 5.0, "latency": 0.5}
    assert objective("latency").baseline_value({"baseline_latency_ms": {"cpu": 3.0}}) == 3.0
    assert objective("latency").measured_columns(["latency_cpu_ms", "macs", "x_ms"]) == [
        "latency_cpu_ms"
    ]
