"""One study, many processes: workers on PostgreSQL and journal storages, a worker killed
mid-trial, the exact total, the shared baseline and factor cache, and the errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState
from processes import kill_if_still
from tiny_study import make_study, tiny_config

from autodecomp.cli import main
from autodecomp.config import config_from_dict, load_config
from autodecomp.core.errors import ConfigError
from autodecomp.factorize.cache import FactorCache
from autodecomp.search import baseline as baseline_module
from autodecomp.search import storage as storage_module
from autodecomp.search.baseline import cache_paths, load_baseline
from autodecomp.search.loop import sigterm_as_interrupt
from autodecomp.search.storage import Heartbeat, open_storage, trial_start_lock
from autodecomp.search.study import COUNTED, prepare
from autodecomp.search.worker import TooManyFailures, run_trials
from autodecomp.workload.models import get_model

ROOT = Path(__file__).resolve().parents[1]
STUDY = tiny_config(
    name="tiny",
    space={"methods": ["tucker"], "keep": False},
    proxy={"steps": 10, "batch_size": 32, "bn_batches": 1},  # every trial trains
    trials=4,
)


pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A study folder with its baseline trained and cached."""
    return make_study(tmp_path_factory.mktemp("cluster"), STUDY).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _storage_url(kind: str, request, folder: Path) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres").create_database()
    if kind == "journal":
        return f"journal:///{folder / 'study.journal'}"
    return f"sqlite:///{folder / 'study.db'}"


# ---- several processes, one killed -----------------------------------------------------------
def _worker(url: str, index: int, log: Path) -> subprocess.Popen:
    argv = ["worker", "--study", "tiny", "--storage", url, "--index", str(index)]
    argv += ["--heartbeat", "1", "--grace", "5"]
    return subprocess.Popen(
        [sys.executable, "-m", "autodecomp", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )


def _training_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """A running trial whose parameters are all drawn (it has a plan): it is training."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "plan" in trial.user_attrs and "worker" in trial.user_attrs:
            return trial
    return None


def _still_running(
    study: optuna.Study, trial: optuna.trial.FrozenTrial
) -> optuna.trial.FrozenTrial | None:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return trial if trial.number in {t.number for t in running} else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal"])
def test_three_workers_one_killed_mid_trial(kind, request, template, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    url = _storage_url(kind, request, folder)
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0
    assert "start workers with: autodecomp worker --study tiny" in capsys.readouterr().out

    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [_worker(url, i, logs[i]) for i in range(3)]
    by_pid = {w.pid: (w, log) for w, log in zip(workers, logs, strict=True)}
    reader = optuna.load_study(study_name="tiny", storage=open_storage(url))
    deadline = time.monotonic() + 120
    trial = None
    try:
        while trial is None:  # kill the first worker seen training a trial, mid-trial
            assert time.monotonic() < deadline, "\n".join(log.read_text() for log in logs)
            seen = _training_trial(reader)
            if seen is None:
                time.sleep(0.05)
                continue
            victim, _ = by_pid[seen.user_attrs["worker"]["pid"]]
            trial = kill_if_still(victim, lambda seen=seen: _still_running(reader, seen))
        killed_number = trial.number
        for worker, log in by_pid.values():
            if worker is not victim:
                assert worker.wait(timeout=150) == 0, log.read_text()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    trials = {t.number: t for t in reader.get_trials(deepcopy=False)}
    counted = [t for t in trials.values() if t.state in COUNTED]
    assert len(counted) == STUDY["trials"], [(t.number, t.state) for t in trials.values()]
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["worker"]["pid"] == victim.pid
    retried = [t for t in counted if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].user_attrs["worker"]["pid"] != victim.pid
    # every failed trial (only the killed one, unless the machine stalled a heartbeat) was
    # re-run exactly once, and nothing is left running or waiting
    for trial in trials.values():
        assert trial.state in (*COUNTED, TrialState.FAIL)
        if trial.state == TrialState.FAIL:
            reruns = [t for t in counted if t.system_attrs.get("failed_trial") == trial.number]
            assert len(reruns) == 1
    seeds = {t.user_attrs["worker"]["index"]: t.user_attrs["worker"]["seed"] for t in counted}
    assert len(set(seeds.values())) == len(seeds) >= 1

    out = tmp_path / "report"
    assert main(["report", url, "--study-name", "tiny", "-o", str(out), "--no-plots"]) == 0
    table = pd.read_csv(out / "trials.csv")
    assert sorted(table.number) == sorted(trials)
    assert (table.state.isin(["COMPLETE", "PRUNED"])).sum() == STUDY["trials"]


# ---- the run-until-total rule, in one process with threads -----------------------------------
def _trivial_study(url: str) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    storage = open_storage(url, Heartbeat(interval=1))
    return storage, optuna.create_study(study_name="t", storage=storage)


def _trivial(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("plan", {"x": x})
    time.sleep(0.02)
    return x


@pytest.mark.parametrize(
    "kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal", "sqlite"]
)
def test_concurrent_workers_stop_at_exactly_the_total(kind, request, tmp_path):
    url = _storage_url(kind, request, tmp_path)
    _trivial_study(url)
    ran, errors = [], []

    def work() -> None:
        try:
            storage = open_storage(url, Heartbeat(interval=1))
            study = optuna.load_study(study_name="t", storage=storage)
            lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731
            ran.append(run_trials(study, _trivial, 12, lock, poll_s=0.05))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    study = optuna.load_study(study_name="t", storage=open_storage(url))
    assert len(study.trials) == 12 and sum(ran) == 12
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_interrupted_trial_is_requeued_and_failures_stop_a_worker(tmp_path):
    url = f"journal:///{tmp_path / 'j.journal'}"
    storage, study = _trivial_study(url)
    heartbeat = Heartbeat(interval=1)

    def interrupted(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise KeyboardInterrupt

    lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, interrupted, 3, lock, retry=heartbeat.retry_callback())
    failed, waiting = study.trials
    assert failed.state == TrialState.FAIL and waiting.state == TrialState.WAITING
    assert waiting.params == failed.params and waiting.system_attrs["failed_trial"] == 0

    # a signal whose KeyboardInterrupt a finaliser swallowed still fails and re-queues the
    # trial that was running (the handler remembered it)
    url = f"journal:///{tmp_path / 'k.journal'}"
    storage, study = _trivial_study(url)
    lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731

    def swallowed(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in here and raises ...
        except KeyboardInterrupt:
            pass  # ... and the exception is lost, as in a weakref callback
        return x

    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        run_trials(study, swallowed, 3, lock, retry=heartbeat.retry_callback())
    failed, waiting = study.trials
    assert failed.state == TrialState.FAIL and waiting.state == TrialState.WAITING
    assert waiting.params == failed.params

    def broken(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise ValueError("always")

    with pytest.raises(TooManyFailures, match="last 2 trials"):
        run_trials(study, broken, 3, lock, catch=(ValueError,), max_failures=2)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL] * 3  # the re-queued trial ran first, then one new


def test_a_trial_failed_as_stale_meanwhile_is_dropped_and_its_worker_goes_on(tmp_path, caplog):
    url = f"journal:///{tmp_path / 'j.journal'}"
    storage, study = _trivial_study(url)
    lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731

    def late(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 0:  # another worker fails it as stale and re-queues it meanwhile
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            Heartbeat(interval=1).retry_callback()(study, study.trials[0])
        return x

    with caplog.at_level("WARNING", logger="autodecomp.search.loop"):
        assert run_trials(study, late, 2, lock, poll_s=0.05) == 2
    failed, rerun, new = study.trials
    assert [failed.state, rerun.state, new.state] == [TrialState.FAIL, *[TrialState.COMPLETE] * 2]
    assert rerun.params == failed.params and rerun.system_attrs["failed_trial"] == 0
    assert "trial 0 was failed as stale by another process" in caplog.text

    def broken(trial: optuna.Trial) -> float:  # the trial's own ValueError still stops it
        trial.suggest_float("x", 0.0, 1.0)
        raise ValueError("own")

    with pytest.raises(ValueError, match="own"):
        run_trials(study, broken, 3, lock)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::UserWarning:optuna")
def test_journal_heartbeat_fails_and_requeues_a_silent_trial(tmp_path, monkeypatch):
    storage = open_storage(f"journal:///{tmp_path / 'j.journal'}", Heartbeat(1, grace=3))
    study = optuna.create_study(study_name="t", storage=storage)
    silent, beating = study.ask(), study.ask()
    silent.suggest_int("n", 0, 9)
    beating.suggest_int("n", 0, 9)
    now = time.time()
    monkeypatch.setattr(storage_module.time, "time", lambda: now + 10)
    storage.record_heartbeat(beating._trial_id)  # beats at now + 10: alive
    optuna.storages.fail_stale_trials(study)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].params == trials[0].params and trials[2].system_attrs["failed_trial"] == 0
    storage.record_heartbeat(silent._trial_id)  # a late beat of the failed trial is ignored
    assert study.trials[0].state == TrialState.FAIL


def test_grpc_proxy_storage_has_a_heartbeat(tmp_path, monkeypatch):
    pytest.importorskip("grpc")  # optional: pip install grpcio protobuf
    from optuna.storages import run_grpc_proxy_server

    backend = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'proxy.db'}")
    port = _free_port()
    threading.Thread(
        target=run_grpc_proxy_server,
        args=(backend,),
        kwargs={"host": "127.0.0.1", "port": port},
        daemon=True,
    ).start()
    url = f"grpc://127.0.0.1:{port}"
    storage = open_storage(url, Heartbeat(1, grace=3))
    study = optuna.create_study(study_name="t", storage=storage)
    lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731
    assert run_trials(study, _trivial, 3, lock, poll_s=0.05) == 3
    silent = study.ask()
    silent.suggest_int("n", 0, 9)
    now = time.time()
    monkeypatch.setattr(storage_module.time, "time", lambda: now + 10)
    optuna.storages.fail_stale_trials(study)
    last = study.trials[-2:]
    assert [t.state for t in last] == [TrialState.FAIL, TrialState.WAITING]
    assert last[1].params == last[0].params and last[1].system_attrs["failed_trial"] == 3


# ---- shared baseline and factor cache -------------------------------------------------------
def test_baseline_is_trained_once_by_concurrent_processes(tmp_path, monkeypatch):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**STUDY, "baseline": {"epochs": 1}}))
    cfg = load_config(tmp_path / "study.yaml")
    prepared = prepare(cfg)
    trained = []
    real = baseline_module._train

    def slow_train(*args, **kwargs):
        trained.append(threading.get_ident())
        time.sleep(0.3)  # the other process arrives while this one trains
        return real(*args, **kwargs)

    monkeypatch.setattr(baseline_module, "_train", slow_train)
    results = []

    def load() -> None:
        model = get_model("digits_cnn", num_classes=10, in_channels=1)  # a fresh one each
        results.append(load_baseline(cfg, model, prepared.splits))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1 and len(results) == 2
    a, b = (r.model.state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0].accuracy == results[1].accuracy
    assert json.loads(cache_paths(cfg)[1].read_text())["val_accuracy"] == results[0].accuracy


def test_factor_cache_entry_is_computed_once_across_processes(tmp_path):
    caches = [FactorCache(directory=tmp_path) for _ in range(2)]  # one per "process"
    computed, values = [], []

    def compute() -> torch.Tensor:
        computed.append(1)
        time.sleep(0.2)
        return torch.arange(6.0)

    threads = [
        threading.Thread(target=lambda c=c: values.append(c.get_or_compute("k", compute)))
        for c in caches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(computed) == 1
    assert all(torch.equal(v, torch.arange(6.0)) for v in values) and len(values) == 2
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".pt"]


# ---- config and errors ----------------------------------------------------------------------
def test_stored_config_rebuilds_the_study_config(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    raw = {
        **STUDY,
        "model": "resnet20",
        "space": str(ROOT / "search_spaces" / "resnet_per_layer.yaml"),
        "baseline": {"checkpoint": "ckpt.pt"},
        "data": {"name": "imagefolder", "root": str(tmp_path)},
        "warm_start": [{"method": "keep"}, {"method": "tucker", "ratio": 0.3}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "study.yaml")
    assert any(rule.ranks for rule in cfg.space.overrides)
    stored = json.loads(json.dumps(cfg.to_dict()))  # as read back from a storage
    assert config_from_dict(stored, tmp_path) == cfg
    assert config_from_dict(stored, tmp_path, device="cpu").device == "cpu"
    moved = config_from_dict(stored, tmp_path / "elsewhere")
    assert moved.baseline.checkpoint == tmp_path / "elsewhere" / "ckpt.pt"
    with pytest.raises(ConfigError, match=r"unknown key stored config\.proxy\.stepz"):
        config_from_dict({**stored, "proxy": {"stepz": 1}}, tmp_path)


def _fails(capsys, argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("autodecomp: error: "), err
    for text in expected:
        assert text in err, err


def test_worker_bad_storage_or_study_exits_2_and_leaves_the_study(template, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    journal = folder / "study.journal"
    url = f"journal:///{journal}"
    worker = ["worker", "--study", "tiny", "--storage"]
    _fails(capsys, [*worker, url], "no journal file")
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0
    capsys.readouterr()
    before = journal.read_bytes()
    _fails(capsys, ["worker", "--study", "other", "--storage", url], "no study 'other'", "tiny")
    _fails(capsys, [*worker, url, "--folder", str(tmp_path / "nope")], "--folder")
    _fails(capsys, [*worker, url, "--trials-total", "0"], "--trials-total")
    _fails(capsys, [*worker, url, "--heartbeat", "5", "--grace", "5"], "--grace")
    _fails(capsys, [*worker, "journal://host/x"], "journal:////absolute/path")
    _fails(capsys, [*worker, "grpc://host/x"], "grpc://host:port")
    _fails(capsys, [*worker, "postgresql+psycopg2://u:secret@127.0.0.1:9/x"], "cannot reach")
    assert journal.read_bytes() == before
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    for path in (moved / "cache").glob("baseline-*.pt"):
        path.unlink()
    _fails(capsys, [*worker, url, "--folder", str(moved)], "baseline file", "--folder")


def test_worker_lines_carry_time_and_index_as_text_or_json_and_quiet_hides_them(
    template, tmp_path, capsys
):
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    url = f"journal:///{folder / 'study.journal'}"
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0
    capsys.readouterr()
    worker = ["worker", "--study", "tiny", "--storage", url, "--index", "7", "--trials-total", "1"]
    assert main(worker) == 0  # joins, runs one trial, says the study's count
    lines = capsys.readouterr().out.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d worker 7: "
    assert len(lines) >= 3 and all(re.match(stamp, line) for line in lines), lines
    assert any(re.match(stamp + r"trial +\d+ .*MACs ÷ [\d.]+ params ÷ ", line) for line in lines)
    assert main(["--log-json", *worker]) == 0  # the total is reached: joins and leaves
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) >= 2
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record) and record["worker"] == 7
    assert main([*worker, "--quiet"]) == 0
    assert capsys.readouterr().out == ""
