"""Reproducible studies ([L]): fresh runs of a tiny digits study in separate processes and
folders give the same baseline checkpoint (same SHA-256) and the same tables apart from
timing columns, a study resumed half-way gives what an uninterrupted one gives, and
``autodecomp replay`` re-runs a stored trial to exactly its stored figures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from tiny_study import tiny_config

from autodecomp.cli import main
from autodecomp.config import SamplerConfig, config_from_dict, load_config
from autodecomp.search.replay import Replayed, format_replay, replay_trial
from autodecomp.search.seeds import seed_each_trial
from autodecomp.search.study import make_sampler
from autodecomp.workload.runtime import DETERMINISTIC_THREADS

STUDY = tiny_config(
    space={
        "methods": ["tucker"],
        # cp (CP-ALS: seeded random starts) on one layer only: the ladder tries every option
        "overrides": [{"layers": ["conv2"], "methods": ["tucker", "cp"]}],
    },
    proxy={"steps": 10, "batch_size": 32, "bn_batches": 1, "calibration_size": 32},
    budgets={"max_macs": 0.75},
    initial_design={"plans": 2, "grid": 3},  # the ladder, then TPE's draws
    trials=4,
    threads=None,  # deterministic mode (on by default on the CPU) fixes the count
)
TIMING = ("seconds",)  # columns that measure time, not results


def _chain(folder: Path, runs: list[list[str]], threads: int) -> subprocess.Popen:
    """The commands one after the other (as one process chain, started at once)."""
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(STUDY))
    script = " && ".join(
        " ".join([sys.executable, "-m", "autodecomp", *run, str(folder / "study.yaml")])
        for run in runs
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two fresh folders run in separate processes at once, under other thread settings:
    ``straight`` (create, then search to 4 trials) and ``resumed`` (search to 2, resume to 4)."""
    root = tmp_path_factory.mktemp("reproducible")
    straight, resumed = root / "straight" / "tiny", root / "resumed" / "tiny"
    chains = [
        _chain(straight, [["create"], ["search"]], threads=1),
        _chain(resumed, [["search", "--trials", "2"], ["search", "--trials", "4"]], threads=2),
    ]
    for chain in chains:
        out, _ = chain.communicate(timeout=600)
        assert chain.returncode == 0, out
    return straight, resumed


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame.drop(columns=[c for c in frame.columns if c in TIMING])


def test_fresh_baselines_are_the_same_file(runs):
    (a,), (b,) = (sorted((f / "cache").glob("baseline-*.pt")) for f in runs)
    assert a.name == b.name and _sha256(a) == _sha256(b)
    meta_a, meta_b = (json.loads(p.with_suffix(".json").read_text()) for p in (a, b))
    assert meta_a["val_accuracy"] == meta_b["val_accuracy"]
    assert meta_a["test_accuracy"] == meta_b["test_accuracy"]


@pytest.mark.parametrize("name", ["trials.csv", "layers.csv", "pareto.csv"])
def test_resumed_study_has_the_tables_of_an_uninterrupted_one(runs, name):
    straight, resumed = (_table(folder / name) for folder in runs)
    if name == "trials.csv":
        assert len(straight) == 4 and set(straight.state) == {"COMPLETE"}
        assert straight.methods.str.contains("cp").any()  # a CP-ALS layer is compared too
    pd.testing.assert_frame_equal(straight, resumed, check_exact=True)


def test_study_records_its_seeds_versions_device_and_threads(runs):
    for folder in runs:
        env = _study(folder).user_attrs["environment"]
        assert env["device"] == "cpu" and env["deterministic"] is True
        assert env["threads"] == DETERMINISTIC_THREADS  # whatever OMP_NUM_THREADS said
        assert {"torch", "numpy", "optuna", "autodecomp", "python"} <= set(env["versions"])
        assert env["seeds"]["seed"] == 0 and env["seeds"]["sampler"] == 0
        assert _study(folder).user_attrs["config"]["deterministic"] is None  # as written


def test_replay_gives_the_stored_figures_exactly(runs):
    straight, _ = runs
    study = _study(straight)
    trained = [t for t in study.trials if not t.user_attrs["over_budget"]]
    trial = next(t for t in trained if "cp" in json.dumps(t.user_attrs["plan"]))
    result = replay_trial(load_config(straight / "study.yaml"), trial.number)
    assert result.outcome is None and result.equal
    assert result.replayed["accuracy"] == trial.values[0]
    assert result.replayed["macs"] == trial.user_attrs["macs"]
    assert result.replayed["params"] == trial.user_attrs["params"]
    assert result.baseline[0] == result.baseline[1]
    assert "reproduced exactly" in format_replay(result)


def test_replay_command_prints_both_columns(runs, capsys):
    straight, _ = runs
    number = next(t.number for t in _study(straight).trials if not t.user_attrs["over_budget"])
    assert main(["replay", str(straight), "--trial", str(number)]) == 0
    out = capsys.readouterr().out
    assert "stored" in out and "replayed" in out and "reproduced exactly" in out
    assert out.count("equal") >= 4


def test_replay_refuses_unknown_and_unfinished_trials(runs, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(runs[0], folder)
    assert main(["replay", str(folder), "--trial", "99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trial 99" in err and "does not exist" in err
    study = _study(folder)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    assert main(["replay", str(folder), "--trial", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is FAIL, not COMPLETE" in err


def test_replay_shows_what_differs():
    env = {"versions": {"torch": "2.5.0"}, "device": "cpu", "threads": 1}
    result = Replayed(
        study="s",
        number=3,
        stored={"accuracy": 0.5, "macs": 10, "params": 4},
        replayed={"accuracy": 0.51, "macs": 10, "params": 4},
        baseline=(0.9, 0.9),
        stored_environment={**env, "seeds": {"seed": 0}},
        environment={**env, "versions": {"torch": "2.6.0"}, "threads": 8},
    )
    text = format_replay(result)
    assert not result.equal and "DIFFERS" in text and "NOT reproduced" in text
    assert "versions.torch: 2.5.0 -> 2.6.0" in text and "threads: 1 -> 8" in text


# ---- pieces: the setting, old stored configs, the sampler's per-trial seeds ----------------
def test_deterministic_setting(tmp_path):
    path = tmp_path / "s" / "study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"model": "digits_cnn"}))
    cfg = load_config(path)
    assert cfg.deterministic is None and cfg.is_deterministic  # default: on for the CPU
    assert not load_config(path, ["deterministic=false"]).is_deterministic
    with pytest.raises(Exception, match="deterministic must be true or false"):
        load_config(path, ["deterministic=maybe"])
    stored = cfg.to_dict()
    del stored["deterministic"]  # a study made before the key existed
    assert config_from_dict(stored, path.parent) == cfg


TPE = SamplerConfig("tpe", 0, {"n_startup_trials": 3})


def _draws(sampler: optuna.samplers.BaseSampler, history: int, start: int) -> list[float]:
    """Parameters of trials ``start..history-1`` after ``start`` trials run by another sampler."""
    study = optuna.create_study(sampler=make_sampler(TPE))
    out = []
    for number in range(history):
        if number == start:
            study.sampler = sampler
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        study.tell(trial, (x - 0.3) ** 2)
        out.append(x)
    return out[start:]


def test_sampler_draws_depend_on_the_trial_not_the_process():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    straight = _draws(make_sampler(TPE), 8, 0)
    resumed = _draws(make_sampler(TPE, offset=4), 8, 4)  # a resume after 4 trials
    assert straight[4:] == resumed
    plain = optuna.samplers.TPESampler(seed=4, n_startup_trials=3)
    assert _draws(plain, 8, 4) != resumed  # a sampler seeded only once would not
    assert type(seed_each_trial(plain, 0)) is optuna.samplers.TPESampler
