"""`autodecomp export --best`: the trial `autodecomp report` names for the same limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_study import SHORT_PROXY, make_study, tiny_config

from autodecomp.cli import main
from autodecomp.config import load_config
from autodecomp.core.errors import ConfigError
from autodecomp.results.queries import best_trial, ranked_trials
from autodecomp.results.study_view import read_study
from autodecomp.ship import model_file
from autodecomp.ship.export import export_trial

STUDY = tiny_config(
    baseline={"epochs": 3},
    space={"methods": ["tucker"]},
    proxy=SHORT_PROXY,
    budgets={"max_macs": 0.9},
    trials=3,
    warm_start=[
        {"method": "tucker", "ratio": 0.15},
        {"method": "tucker", "ratio": 0.4},
        {"method": "tucker", "ratio": 0.8},
    ],
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A finished tiny study: three uniform Tucker trials, cheapest first."""
    return make_study(tmp_path_factory.mktemp("best"), STUDY, search=True)


LIMITS = [
    ["--max-drop", "100%", "--max-macs", "0.9x"],  # the smallest within the drop
    ["--max-macs", "0.9x"],  # the most accurate within the MACs
    ["--max-drop", "12%", "--max-macs", "0.9x", "--max-params", "0.99x"],
]


@pytest.mark.parametrize("limits", LIMITS)
def test_best_exports_the_trial_report_names(searched, tmp_path, capsys, limits):
    assert main(["report", str(searched), "--out", str(tmp_path / "r"), "--no-plots", *limits]) == 0
    answer = next(
        line[len("best with ") :]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("best with ")
    )
    number = int(re.search(r": trial (\d+), accuracy", answer).group(1))
    query = dict(zip(limits[::2], limits[1::2], strict=True))
    kwargs = {k[2:].replace("-", "_"): v for k, v in query.items()}
    cfg = load_config(searched)
    assert int(best_trial(read_study(cfg.storage, cfg.name), **kwargs)["number"]) == number
    out = tmp_path / "model.pt"
    assert main(["export", str(searched), "--best", *limits, "-o", str(out)]) == 0
    assert f"--best picked {answer}" in capsys.readouterr().out.splitlines()
    assert model_file.read_metadata(out)["source"]["trial"] == number


def test_the_smallest_and_the_most_accurate_differ(searched):
    """The first two queries above pick different trials (else that test proves little)."""
    cfg = load_config(searched)
    study = read_study(cfg.storage, cfg.name)
    smallest = best_trial(study, max_drop="100%", max_macs="0.9x")
    accurate = best_trial(study, max_macs="0.9x")
    assert int(smallest["number"]) == 0  # the cheapest warm start
    assert int(accurate["number"]) != 0 and accurate["accuracy"] > smallest["accuracy"]


def test_best_without_any_limit_takes_the_most_accurate(searched, tmp_path, capsys):
    cfg = load_config(searched)
    number = int(best_trial(read_study(cfg.storage, cfg.name))["number"])
    out = tmp_path / "m.pt"
    assert main(["export", str(searched), "--best", "-o", str(out)]) == 0
    assert f"--best picked the most accurate: trial {number}," in capsys.readouterr().out
    assert model_file.read_metadata(out)["source"]["trial"] == number


def test_nothing_within_the_limits_is_one_line_and_no_file(searched, tmp_path, capsys):
    out = tmp_path / "model.pt"
    argv = ["export", str(searched), "--best", "--max-drop", "1%", "--max-macs", "10"]
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "autodecomp: error: no trial of study 'tiny' meets --max-macs 10, --max-drop 1%; see "
        "the Pareto front with autodecomp report, or loosen the limits"
    )
    assert not out.exists() and not (searched.parent / "export").exists()
    # a malformed limit: one line too
    assert main(["export", str(searched), "--best", "--max-macs", "lots", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("autodecomp: error: max_macs")


def test_best_and_trial_exclude_each_other(searched, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(searched), "--best", "--trial", "0"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(searched)])  # one of them is needed
    assert exit_.value.code == 2
    assert "one of the arguments --trial --best is required" in capsys.readouterr().err
    assert main(["export", str(searched), "--trial", "0", "--max-drop", "1%"]) == 2
    assert capsys.readouterr().err.strip() == (
        "autodecomp: error: --max-drop, --max-macs and --max-params go with --best, not --trial"
    )


def test_shortlist_keeps_the_candidate_best_on_validation_after_the_finetune(searched, tmp_path):
    """Each candidate is fine-tuned exactly as a lone export of it; the kept one is the most
    accurate on validation afterwards, and the file lists all of them in the query's order."""
    cfg = load_config(searched)
    ranked = [
        int(n) for n in ranked_trials(read_study(cfg.storage, cfg.name), max_macs="0.9x")["number"]
    ]
    assert len(ranked) == 3
    out = tmp_path / "short.pt"
    argv = ["export", str(searched), "--best", "--max-macs", "0.9x", "--shortlist", "3"]
    assert main([*argv, "--finetune-epochs", "1", "-o", str(out)]) == 0
    meta = model_file.read_metadata(out)
    listed = meta["source"]["shortlist"]
    assert [c["trial"] for c in listed] == ranked
    alone = {n: export_trial(cfg, n, tmp_path / f"{n}.pt", finetune_epochs=1).meta for n in ranked}
    for candidate in listed:
        metrics = alone[candidate["trial"]]["metrics"]
        assert candidate["val_accuracy"] == metrics["val_accuracy"]
        assert candidate["search_val_accuracy"] == metrics["search_val_accuracy"]

    def rank(n: int) -> tuple[float, int]:
        return alone[n]["metrics"]["val_accuracy"], -alone[n]["metrics"]["macs"]

    kept = max(ranked, key=rank)
    assert meta["source"]["trial"] == kept
    assert meta["metrics"] == alone[kept]["metrics"]
    assert model_file.read_metadata(tmp_path / f"{kept}.pt")["plan"] == meta["plan"]
    worst_first = sorted(ranked, key=rank)  # the kept one is last: not simply the first given
    again = export_trial(cfg, worst_first, tmp_path / "again.pt", finetune_epochs=1).meta
    assert again["source"]["trial"] == kept
    assert [c["trial"] for c in again["source"]["shortlist"]] == worst_first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trial", "0", "--shortlist", "2"], "--shortlist goes with --best, not --trial"),
        (
            ["--best", "--shortlist", "2"],
            "--shortlist needs --finetune-epochs >= 1: without more epochs every candidate's "
            "validation accuracy is the search's, so --best already picks",
        ),
        (
            ["--best", "--shortlist", "0", "--finetune-epochs", "1"],
            "--shortlist must be >= 1, got 0",
        ),
        (
            ["--best", "--max-drop", "1%", "--shortlist", "2", "--finetune-epochs", "1"],
            "--shortlist ranks by accuracy under --max-macs / --max-params; it does not go with "
            "--max-drop (which picks the smallest trial within the drop)",
        ),
    ],
)
def test_shortlist_misuse_is_one_line(searched, tmp_path, capsys, extra, message):
    out = tmp_path / "model.pt"
    assert main(["export", str(searched), *extra, "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"autodecomp: error: {message}"
    assert not out.exists()


def test_an_empty_shortlist_is_refused(searched, tmp_path):
    with pytest.raises(ConfigError, match="export needs a trial number; got an empty shortlist"):
        export_trial(load_config(searched), [], tmp_path / "m.pt")
