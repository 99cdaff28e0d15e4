"""A study written by autodecomp 0.1.0 (commit 4df4ef5, before the subpackage layout) opens,
reports and resumes with today's code.

The fixture `tests/fixtures/study_0_1_0/legacy` is the shipped digits study shrunk to 3 trials
(baseline 4 epochs, proxy 20 steps, 2 ladder plans), its SQLite database and its cached
baseline, exactly as the old version left them.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from autodecomp.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "study_0_1_0"
# The old run's Pareto front (trial 2 was over the MACs budget).
FRONT = [
    (0, 0.35555555555555557, 119_744, 2_492),
    (1, 0.43333333333333335, 435_840, 7_770),
]


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "study_0_1_0")
    return tmp_path / "study_0_1_0" / "legacy"


def _front(folder: Path) -> list[tuple]:
    front = pd.read_csv(folder / "report" / "pareto.csv", float_precision="round_trip")
    return [
        (int(r.number), float(r.accuracy), int(r.macs), int(r.params)) for r in front.itertuples()
    ]


def _trial_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT t.number, t.state, v.objective, v.value FROM trials t "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id ORDER BY t.number, v.objective"
        ).fetchall()


def test_legacy_study_reports_its_front(legacy, capsys):
    assert main(["report", str(legacy), "--no-plots"]) == 0
    assert _front(legacy) == FRONT
    out = capsys.readouterr().out
    assert "trials 3 COMPLETE; baseline accuracy 0.9111, 1,236,608 MACs, 33,338 params" in out


def test_legacy_study_resumes_keeping_its_trials(legacy):
    before = _trial_rows(legacy / "study.db")
    baseline = legacy / "cache" / "baseline-00f8045802.pt"
    stamp = baseline.stat().st_mtime_ns
    assert main(["search", str(legacy / "study.yaml"), "--trials", "4"]) == 0
    after = _trial_rows(legacy / "study.db")
    assert after[: len(before)] == before  # the old trials are untouched
    assert {row[0] for row in after} == {0, 1, 2, 3}
    assert baseline.stat().st_mtime_ns == stamp  # the cached baseline is reused, not retrained
    assert main(["report", str(legacy), "--no-plots"]) == 0
    old_on_front = [row for row in _front(legacy) if row[0] < 3]
    assert old_on_front and set(old_on_front) <= set(FRONT)
