"""Per-layer sensitivity: the ladder's option scores stored on the study, the report's table
and plot, and `autodecomp sensitivity` for a study made without a ladder."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
from matplotlib.image import imread
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial
from tiny_study import make_study, tiny_config

from autodecomp.cli import main
from autodecomp.config import load_config
from autodecomp.results.report import write_report
from autodecomp.results.sensitivity import COLUMNS, sensitivity_frame, stored_scores
from autodecomp.search.allocate import OPTION_SCORES, Ladder, allocation_ladder, score_options
from autodecomp.search.baseline import load_baseline
from autodecomp.search.study import prepare

# ---- a constructed study: exact table -----------------------------------------------------------
BASELINE = {"accuracy": 0.9, "macs": 3000, "params": 400, "input_shape": [1, 8, 8]}
SCORES = {
    "format": 1,
    "score": "network",
    "grid": 3,
    "dense": {"conv2": [1000, 200], "conv3": [500, 100]},
    "columns": ["layer", "method", "grid_ratio", "fixed", "rank", "macs", "params", "error"],
    "rows": [
        ["conv2", "tucker", 0.5, {"ratio": 0.5}, [3, 4], 600, 100, 0.1],
        ["conv2", "tucker", 0.1, {"ratio": 0.1}, [1, 1], 200, 20, 0.4],
        ["conv2", "tt", 0.3, {"rank": "2"}, [1, 2, 1], 300, 50, 0.2],  # explicit ranks
        ["conv3", "tucker", 0.1, {"ratio": 0.12}, 2, 100, 10, 0.3],  # clipped to the range
    ],
}
# (layer, method, ratio, rank, macs, params, macs_ratio, params_ratio, error, accuracy, trial)
EXPECTED = [
    ("conv2", "keep", 1.0, None, 1000, 200, 1.0, 1.0, 0.0, 0.9, None),
    ("conv2", "tucker", 0.1, "[1, 1]", 200, 20, 0.2, 0.1, 0.4, None, None),
    ("conv2", "tucker", 0.5, "[3, 4]", 600, 100, 0.6, 0.5, 0.1, 0.8, 0),  # trial 0 alone
    ("conv2", "tt", 0.3, "[1, 2, 1]", 300, 50, 0.3, 0.25, 0.2, None, None),
    ("conv3", "keep", 1.0, None, 500, 100, 1.0, 1.0, 0.0, 0.9, None),
    ("conv3", "tucker", 0.12, 2, 100, 10, 0.2, 0.1, 0.3, None, None),
]
_DISTRIBUTIONS = {
    "conv2/method": CategoricalDistribution(["keep", "tucker", "tt"]),
    "conv3/method": CategoricalDistribution(["keep", "tucker", "tt"]),
    "conv2/tucker/ratio": FloatDistribution(0.05, 0.9),
    "conv3/tucker/ratio": FloatDistribution(0.05, 0.9),
}


def _trial(acc: float, plan: dict[str, tuple[str, float | None]], over: bool = False):
    params = {f"{n}/method": m for n, (m, _) in plan.items()}
    params |= {f"{n}/{m}/ratio": r for n, (m, r) in plan.items() if r is not None}
    return create_trial(
        values=[acc, 1000.0],
        params=params,
        distributions={k: _DISTRIBUTIONS[k] for k in params},
        user_attrs={
            "plan": {n: {"method": m, **({"ratio": r} if r else {})} for n, (m, r) in plan.items()},
            "macs": 1000,
            "params": 100,
            "macs_ratio": 1 / 3,
            "params_ratio": 0.25,
            "over_budget": over,
        },
        constraints={"macs": -0.5},
    )


def _constructed(scores: dict | None = SCORES, storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(
        study_name="s", storage=storage, directions=["maximize", "minimize"]
    )
    study.set_user_attr("config", {"name": "s", "objectives": ["accuracy", "macs"]})
    study.set_user_attr("baseline", BASELINE)
    study.set_user_attr("limits", {"macs": 2000})
    if scores is not None:
        study.set_user_attr(OPTION_SCORES, scores)
    only_conv2 = {"conv2": ("tucker", 0.5), "conv3": ("keep", None)}
    study.add_trial(_trial(0.80, only_conv2))  # measures that option alone
    study.add_trial(_trial(0.70, {"conv2": ("tucker", 0.5), "conv3": ("tucker", 0.12)}))
    study.add_trial(_trial(0.75, only_conv2))  # the same option again: the first counts
    study.add_trial(_trial(0.0, {"conv2": ("keep", None), "conv3": ("tucker", 0.12)}, over=True))
    return study


def _rows(frame: pd.DataFrame) -> list[tuple]:
    out = []
    for row in frame.itertuples(index=False):
        values = [None if not isinstance(v, str) and pd.isna(v) else v for v in row]
        out.append(tuple(values))
    return out


def test_table_columns_and_values_equal_the_stored_scores():
    frame = sensitivity_frame(stored_scores(_constructed()), _constructed())
    assert tuple(frame.columns) == COLUMNS
    assert set(frame["score"]) == {"network"}
    rows = [r[:9] + r[10:] for r in _rows(frame)]  # "score" aside
    assert len(rows) == len(EXPECTED)
    for got, want in zip(rows, EXPECTED, strict=True):
        assert got[:4] == want[:4] and got[4:6] == want[4:6] and got[10] == want[10]
        for g, w in zip(got[6:10], want[6:10], strict=True):
            assert (g is None and w is None) or g == pytest.approx(w, abs=1e-12)
    # without a study nothing is measured
    bare = sensitivity_frame(SCORES)
    assert bare["accuracy"].isna().all() and bare["trial"].isna().all()
    assert bare["error"].tolist() == frame["error"].tolist()


def test_report_writes_the_table_and_plot(tmp_path):
    result = write_report(_constructed(), tmp_path)
    names = {p.name for p in result["paths"]}
    assert {"sensitivity.csv", "sensitivity.parquet", "sensitivity.png"} <= names
    assert imread(tmp_path / "sensitivity.png").shape[0] > 100
    for table in (
        pd.read_csv(tmp_path / "sensitivity.csv"),
        pd.read_parquet(tmp_path / "sensitivity.parquet"),
    ):
        assert tuple(table.columns) == COLUMNS
        assert table["error"].tolist() == [w[8] for w in EXPECTED]
        assert table["macs"].tolist() == [w[4] for w in EXPECTED]
        assert table["ratio"].tolist() == pytest.approx([w[2] for w in EXPECTED])
        assert table["trial"].fillna(-1).tolist() == [-1, -1, 0, -1, -1, -1]
    assert "sensitivity.csv" in (tmp_path / "report.md").read_text()


def test_an_old_study_reports_without_a_table_and_says_how(tmp_path, capsys):
    assert "sensitivity" not in write_report(_constructed(None), tmp_path / "a")["frames"]
    assert not (tmp_path / "a" / "sensitivity.csv").exists()
    assert stored_scores(_constructed({"format": 99})) is None
    db = tmp_path / "study.db"
    _constructed(None, f"sqlite:///{db}")
    assert main(["report", str(db), "--no-plots"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sensitivity" in line]
    assert lines == [
        "no sensitivity table (no ladder scores stored): autodecomp sensitivity "
        "studies/<name>/study.yaml"
    ]


# ---- real studies: the ladder stores its scores; `sensitivity` computes them -------------------
STUDY = tiny_config(
    space={"methods": ["tucker", "tt"]},
    proxy={"steps": 3, "batch_size": 32, "bn_batches": 1, "calibration_size": 32},
    trials=2,
    initial_design={"plans": 0, "grid": 3},  # no ladder
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("sens"), STUDY).parent


@pytest.fixture(scope="module")
def laddered(template, tmp_path_factory) -> Path:
    """The template created as a study (`autodecomp create`) whose ladder a worker built
    (`autodecomp worker --ladder-only`: no trial run)."""
    folder = tmp_path_factory.mktemp("laddered") / "tiny"
    shutil.copytree(template, folder)
    yaml = folder / "study.yaml"
    assert main(["create", str(yaml), "--set", "initial_design.plans=2"]) == 0
    url = f"sqlite:///{folder / 'study.db'}"
    assert main(["worker", "--study", "tiny", "--storage", url, "--ladder-only"]) == 0
    return yaml


def _stored(yaml: Path) -> dict:
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{yaml.parent / 'study.db'}")
    return study.user_attrs[OPTION_SCORES]


def test_the_ladder_stores_every_scored_option(laddered):
    stored = _stored(laddered)
    cfg = load_config(laddered)
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    scored = score_options(cfg, prepared.space, baseline, prepared.splits, 3)
    assert stored["score"] == "network" and stored["grid"] == 3
    assert stored["dense"] == {n: [d.macs, d.params_count] for n, d in scored.dense.items()}
    options = [(n, o) for n, opts in scored.options.items() for o in opts if o.ratio is not None]
    assert len(stored["rows"]) == len(options) >= 8
    for row, (name, option) in zip(stored["rows"], options, strict=True):
        layer, method, grid_ratio, fixed, rank, macs, params, error = row
        assert (layer, grid_ratio, macs, params) == (name, option.ratio, option.macs,
                                                     option.params_count)  # fmt: skip
        assert option.params == {f"{layer}/method": method} | {
            f"{layer}/{method}/{k}": v for k, v in fixed.items()
        }
        assert error == pytest.approx(option.error, rel=1e-9) and error > 0
        assert rank == option.rank or rank == list(option.rank)
    # the rungs carry the scores; a ladder without them (an older study) stores none
    rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 3)
    assert rungs.scores["rows"] == stored["rows"]
    plain = optuna.create_study(directions=["maximize", "minimize"])
    Ladder(list(rungs), 1, 0, 0.9).store(plain)
    assert OPTION_SCORES not in plain.user_attrs


def test_report_of_a_laddered_study_has_the_table(laddered, tmp_path):
    assert main(["report", str(laddered), "--out", str(tmp_path), "--no-plots"]) == 0
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    decomposed = table[table["method"] != "keep"]
    assert decomposed["error"].tolist() == pytest.approx(
        sorted_errors(_stored(laddered)), rel=1e-12
    )
    assert not (tmp_path / "sensitivity.png").exists()  # --no-plots


def sorted_errors(scores: dict) -> list[float]:
    """The stored errors in the table's order: layers, methods as first scored, ratio."""
    layers, methods = list(scores["dense"]), []
    for row in scores["rows"]:
        methods += [] if row[1] in methods else [row[1]]
    rows = sorted(
        scores["rows"],
        key=lambda r: (layers.index(r[0]), methods.index(r[1]), r[3].get("ratio", r[2])),
    )
    return [r[7] for r in rows]


def test_sensitivity_command_on_a_study_without_a_ladder(template, laddered, tmp_path, capsys):
    yaml = template / "study.yaml"
    out = tmp_path / "out"
    assert main(["sensitivity", str(yaml), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stored = _stored(laddered)
    assert (
        f"sensitivity of {len(stored['dense'])} layers: {len(stored['rows'])} options scored by "
        "network error; most sensitive: "
    ) in printed
    assert "wrote sensitivity.csv, sensitivity.parquet, sensitivity.png" in printed
    table = pd.read_csv(out / "sensitivity.csv")
    assert tuple(table.columns) == COLUMNS
    assert imread(out / "sensitivity.png").shape[0] > 100
    # the same options and scores as the ladder of the same study stored
    expected = sensitivity_frame(_stored(laddered))
    assert table["layer"].tolist() == expected["layer"].tolist()
    assert table["method"].tolist() == expected["method"].tolist()
    assert table["macs"].tolist() == expected["macs"].tolist()
    assert table["error"].tolist() == pytest.approx(expected["error"].tolist(), rel=1e-9)
    assert all(math.isnan(a) for a in table["accuracy"])  # no study yet: nothing measured
    # no cached baseline: one line, exit 2, nothing trained
    bare = tmp_path / "bare"
    shutil.copytree(template, bare, ignore=shutil.ignore_patterns("cache"))
    assert main(["sensitivity", str(bare / "study.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autodecomp: error: ") and "\n" not in err
    assert not (bare / "report").exists()
