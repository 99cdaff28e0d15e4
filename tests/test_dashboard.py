"""optuna-dashboard reads a study that `autodecomp search` made: the values' names and the
budget constraints of an over-budget trial, through the dashboard's own JSON API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points
from typing import Any

import pytest
from tiny_study import make_study, tiny_config

pytest.importorskip("optuna_dashboard")

STUDY = tiny_config(
    baseline={"epochs": 1},
    space={"methods": ["tucker"], "ratio": {"range": [0.1, 0.9]}},
    proxy={"steps": 2, "batch_size": 32, "bn_batches": 1},
    budgets={"max_macs": 0.5, "max_params": 0.9},
    trials=2,
    warm_start=[{"method": "keep"}, {"method": "tucker", "ratio": 0.15}],  # over, under
)
WAIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _dashboard_command() -> list[str]:
    """optuna-dashboard's console script, run by this Python (so on the Optuna under test)."""
    if not entry_points(group="console_scripts", name="optuna-dashboard"):
        pytest.skip("optuna-dashboard's command is not installed")
    start = (
        "from importlib.metadata import entry_points\n"
        "(main,) = entry_points(group='console_scripts', name='optuna-dashboard')\n"
        "raise SystemExit(main.load()())\n"
    )
    return [sys.executable, "-c", start]


def test_dashboard_shows_metric_names_and_constraints(tmp_path):
    command = _dashboard_command()
    study_yaml = make_study(tmp_path, STUDY, search=True)
    storage = f"sqlite:///{study_yaml.parent / 'study.db'}"
    port = _free_port()
    server = subprocess.Popen(
        [*command, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not answer: {server.stderr.read()!r}")
                time.sleep(0.2)
        (study,) = [s for s in studies if s["study_name"] == "tiny"]
        detail = _get(f"{base}/api/studies/{study['study_id']}")
    finally:
        server.kill()
        server.wait(timeout=10)
        server.stderr.close()

    assert detail["objective_names"] == ["accuracy", "macs"]
    over, under = sorted(detail["trials"], key=lambda t: t["number"])
    attrs = {a["key"]: a["value"] for a in over["user_attrs"]}
    assert attrs["over_budget"] == "True"
    macs, params = over["constraints"]  # the dense model: budgets in the order of the config
    assert macs == pytest.approx(1.0) and params == pytest.approx(1 / 0.9 - 1)
    assert len(under["constraints"]) == 2 and max(under["constraints"]) <= 0
    assert [t["number"] for t in detail["best_trials"]] == [under["number"]]
