"""Uniform sweeps as arms of a search, and the search-quality bench's per-budget summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import optuna
import pandas as pd

from autodecomp.search.allocate import Rung
from autodecomp.search.uniform_arms import uniform_arms

CANDIDATES = {
    "a": [Rung(0.05, {"r": "a5"}, "a"), Rung(0.08, {"r": "a8"}, "a"),
          Rung(0.15, {"r": "a15"}, "a"), Rung(0.3, {"r": "a30"}, "a")],
    "b": [Rung(0.12, {"r": "b12"}, "b"), Rung(0.35, {"r": "b35"}, "b")],
}  # fmt: skip


def _picked(arms):
    return [params["r"] for _, params in arms]


def test_round_one_is_each_methods_dearest_plan_under_each_level():
    arms = uniform_arms(CANDIDATES, [0.4, 0.1])
    assert _picked(arms) == ["a8", "a30", "b35"]  # b has nothing under 0.1
    assert [label for label, _ in arms] == [
        "uniform a @0.080", "uniform a @0.300", "uniform b @0.350",
    ]  # fmt: skip


def test_all_rounds_sweep_every_plan_under_the_levels_once():
    # round 2: a5 (under 0.1), a15 and b12 (under 0.4); a8 is already in; nothing is above 0.4
    assert _picked(uniform_arms(CANDIDATES, [0.1, 0.4], None)) == [
        "a8", "a30", "b35", "a5", "a15", "b12",
    ]  # fmt: skip
    assert _picked(uniform_arms(CANDIDATES, [0.2], 2)) == ["a15", "b12", "a8"]
    assert uniform_arms(CANDIDATES, [0.01], None) == []
    assert uniform_arms({}, [0.5], None) == []


def _bench():
    """bench/search_quality.py as a module (registered: its dataclasses look themselves up)."""
    if "search_quality" not in sys.modules:
        path = Path(__file__).parents[1] / "bench" / "search_quality.py"
        spec = importlib.util.spec_from_file_location("search_quality", path)
        sys.modules["search_quality"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["search_quality"])
    return sys.modules["search_quality"]


def test_summary_counts_ties_as_wins_and_a_missing_model_as_a_loss():
    nan = float("nan")
    rows = pd.DataFrame({
        "seed": [1, 2, 3, 1, 2, 3, 1, 2, 3],
        "budget": [0.1, 0.1, 0.1, 0.4, 0.4, 0.4, 0.05, 0.05, 0.05],
        "search_test": [0.90, 0.80, 0.70, 0.95, nan, 0.93, nan, 0.60, nan],
        "uniform_test": [0.90, 0.85, 0.60, 0.94, 0.90, 0.95, nan, nan, 0.55],
        "search_s": [60.0] * 9, "uniform_s": [58.0] * 9,
        "search_hv": [0.8] * 9, "uniform_hv": [0.7] * 9,
    })  # fmt: skip
    rows["margin"] = rows.search_test - rows.uniform_test
    table = _bench().summary(rows).set_index("budget")
    assert table.loc["10%", "seeds"] == 3 and table.loc["40%", "seeds"] == 3
    assert table.loc["10%", "search >= uniform"] == "67%"  # 0.90 = 0.90 counts
    assert table.loc["10%", "mean margin"] == "+0.0167"  # (0 - 0.05 + 0.10) / 3
    assert table.loc["10%", "no model (search/uniform)"] == "0/0"
    assert table.loc["40%", "search >= uniform"] == "33%"  # no search model: a loss
    assert table.loc["40%", "mean margin"] == "-0.0050"  # where both have a model
    assert table.loc["40%", "no model (search/uniform)"] == "1/0"
    assert table.loc["5%", "seeds"] == 2  # seed 1: neither arm has a model, left out
    assert table.loc["5%", "search >= uniform"] == "50%"  # a model against none wins
    assert table.loc["5%", "no model (search/uniform)"] == "1/1"
    assert table.loc["40%", "search s"] == "60" and table.loc["40%", "uniform s"] == "58"


def test_summary_compares_the_first_pick_alone_when_there_is_a_shortlist():
    rows = pd.DataFrame({
        "seed": [1, 2], "budget": [0.1, 0.1],
        "search_test": [0.92, 0.90], "uniform_test": [0.91, 0.90], "top1_test": [0.89, 0.92],
        "search_s": [60.0] * 2, "uniform_s": [60.0] * 2,
        "search_hv": [0.8] * 2, "uniform_hv": [0.7] * 2,
    })  # fmt: skip
    rows["margin"] = rows.search_test - rows.uniform_test
    table = _bench().summary(rows).set_index("budget")
    assert table.loc["10%", "mean margin"] == "+0.0050"
    assert table.loc["10%", "no shortlist >= uniform"] == "50%"  # 0.89 < 0.91, 0.92 >= 0.90
    assert table.loc["10%", "no shortlist margin"] == "+0.0000"  # (-0.02 + 0.02) / 2


def test_the_bench_ranks_trials_under_a_budget_as_export_best_does():
    """Most accurate first, then fewer MACs, then the earlier trial; over-budget and
    dearer trials left out."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy, macs, ratio, over in [
        (0.9, 50, 0.05, False), (0.95, 90, 0.09, False), (0.95, 80, 0.08, False),
        (0.99, 150, 0.15, False), (0.97, 60, 0.06, True), (0.95, 80, 0.08, False),
    ]:  # fmt: skip
        trial = optuna.trial.create_trial(
            values=[accuracy, macs],
            user_attrs={"macs": macs, "macs_ratio": ratio, "over_budget": over},
        )
        study.add_trial(trial)
    cfg = type("Cfg", (), {"objectives": ["accuracy", "macs"]})()
    ranked = _bench()._ranked_under(study, cfg, 0.1)
    assert [t.number for t in ranked] == [2, 5, 1, 0]
