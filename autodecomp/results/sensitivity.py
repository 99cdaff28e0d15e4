"""Per-layer sensitivity: what each layer option costs in error, against its ratio and MACs.

Before a search with ``initial_design.plans`` the allocation ladder
(:mod:`autodecomp.search.allocate`) scores every layer option (layer x method x ratio)
without training and stores the scores on the study (user attribute
``layer_option_scores``, :func:`~autodecomp.search.allocate.option_scores`);
``autodecomp report`` turns them into ``sensitivity.csv`` / ``.parquet`` and
``sensitivity.png`` (:func:`sensitivity_frame`). For a study created without a ladder,
``autodecomp sensitivity`` scores the options the same way (:func:`compute_scores`: the
baseline as the search and export load it, then
:func:`~autodecomp.search.allocate.score_options`).

One row per (layer, option), the layer's dense figures first (method ``keep``, ratio 1,
error 0). Columns (:data:`COLUMNS`): ``layer``, ``method``, ``ratio`` (the option's ratio
parameter, the fraction of the dense layer's parameters asked for; with explicit ranks, the
grid ratio the rank was picked at), ``rank`` (the rank fitted), ``macs`` and ``params`` (of
the layer alone), ``macs_ratio`` and ``params_ratio`` (over the dense layer's), ``error``
(the ladder's zero-training score: relative logit error of the network with only that layer
replaced, ``network``; the layer's relative output error, ``layer``; the kernel's relative
error without a calibration batch, ``kernel``), ``score`` (which of them), ``accuracy`` and
``trial`` (where measured: the validation accuracy of a completed trial that compressed only
that layer with that option, the first such trial; the baseline's for ``keep``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import optuna
import pandas as pd

from ..config import StudyConfig
from ..core.errors import ConfigError
from ..search.allocate import OPTION_SCORES, option_scores, score_options
from ..search.baseline import load_baseline
from ..search.study import prepare
from .study_view import read_study, study_baseline, usable, value_names

__all__ = [
    "COLUMNS",
    "compute_scores",
    "most_sensitive",
    "sensitivity_frame",
    "stored_scores",
    "study_if_any",
]

COLUMNS = (
    "layer",
    "method",
    "ratio",
    "rank",
    "macs",
    "params",
    "macs_ratio",
    "params_ratio",
    "error",
    "score",
    "accuracy",
    "trial",
)
_FORMAT = 1  # the option_scores() layout this module reads
_log = logging.getLogger(__name__)


def stored_scores(study: optuna.Study) -> dict[str, Any] | None:
    """The ladder's option scores stored on ``study``, or None (a study made without a
    ladder, or by a version that did not store them)."""
    raw = study.user_attrs.get(OPTION_SCORES)
    if not isinstance(raw, Mapping) or raw.get("format") != _FORMAT:
        return None
    return dict(raw)


def compute_scores(cfg: StudyConfig) -> dict[str, Any]:
    """Score every layer option of ``cfg``'s search space on its cached baseline, without
    training, as the allocation ladder does (``initial_design.grid`` ratios,
    ``initial_design.score``): :func:`~autodecomp.search.allocate.option_scores`.

    Raises:
        ConfigError: an invalid config, or no cached baseline (nothing is trained here).
    """
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits, may_train=False)
    failed: list[str] = []
    grid = cfg.initial_design.grid
    scored = score_options(cfg, prepared.space, baseline, prepared.splits, grid, failed)
    if failed:
        _log.warning(f"sensitivity: {len(failed)} layer options left out, e.g. {failed[0]}")
    return option_scores(scored, grid)


def study_if_any(cfg: StudyConfig) -> optuna.Study | None:
    """``cfg``'s study read from its storage, or None when there is none yet."""
    try:
        return read_study(cfg.storage, cfg.name)
    except ConfigError:
        return None


def _key(layer: str, method: str, fixed: Mapping[str, Any]) -> tuple[str, str, str]:
    return layer, method, json.dumps(dict(fixed), sort_keys=True, default=str)


def _measured(study: optuna.Study) -> dict[tuple[str, str, str], tuple[float, int]]:
    """(layer, method, fixed parameters) -> (accuracy, trial number) of the first usable
    trial that compressed only that layer."""
    names = value_names(study)
    if "accuracy" not in names:
        return {}
    index = names.index("accuracy")
    found: dict[tuple[str, str, str], tuple[float, int]] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        plan = trial.user_attrs.get("plan")
        if not usable(trial) or not isinstance(plan, Mapping):
            continue
        changed = [n for n, entry in plan.items() if entry.get("method") != "keep"]
        if len(changed) != 1:
            continue
        layer = changed[0]
        method = trial.params.get(f"{layer}/method", plan[layer].get("method"))
        prefix = f"{layer}/{method}/"
        fixed = {k[len(prefix) :]: v for k, v in trial.params.items() if k.startswith(prefix)}
        found.setdefault(_key(layer, method, fixed), (float(trial.values[index]), trial.number))
    return found


def _baseline_accuracy(study: optuna.Study | None) -> float | None:
    if study is None:
        return None
    try:
        return float(study_baseline(study)["accuracy"])
    except ConfigError:
        return None


def sensitivity_frame(scores: Mapping[str, Any], study: optuna.Study | None = None) -> pd.DataFrame:
    """The sensitivity table (:data:`COLUMNS`, see the module doc) of ``scores``
    (:func:`stored_scores` or :func:`compute_scores`); ``study``'s trials fill ``accuracy``
    where one measured an option alone. Rows: layers in search order, ``keep`` first, then
    the methods in the order scored, ratios ascending."""
    measured = _measured(study) if study is not None else {}
    base = _baseline_accuracy(study)
    dense = {name: (int(m), int(p)) for name, (m, p) in scores["dense"].items()}
    rows: list[dict[str, Any]] = [
        {"layer": name, "method": "keep", "ratio": 1.0, "rank": None, "macs": macs,
         "params": params, "macs_ratio": 1.0, "params_ratio": 1.0, "error": 0.0,
         "accuracy": base, "trial": None}
        for name, (macs, params) in dense.items()
    ]  # fmt: skip
    methods: list[str] = []
    for layer, method, grid_ratio, fixed, rank, macs, params, error in scores["rows"]:
        methods += [] if method in methods else [method]
        accuracy, trial = measured.get(_key(layer, method, fixed), (None, None))
        rows.append({
            "layer": layer, "method": method, "ratio": float(fixed.get("ratio", grid_ratio)),
            "rank": json.dumps(rank) if isinstance(rank, list | dict) else rank,
            "macs": int(macs), "params": int(params),
            "macs_ratio": macs / max(dense[layer][0], 1),
            "params_ratio": params / max(dense[layer][1], 1),
            "error": float(error), "accuracy": accuracy, "trial": trial,
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "score"])
    frame.insert(COLUMNS.index("score"), "score", str(scores.get("score", "")))
    frame["accuracy"] = frame["accuracy"].astype(float)
    frame["trial"] = frame["trial"].astype("Int64")
    order = {"keep": -1, **{m: i for i, m in enumerate(methods)}}
    layers = {name: i for i, name in enumerate(dense)}
    frame = frame.sort_values(
        ["layer", "method", "ratio"],
        key=lambda c: c.map(layers) if c.name == "layer" else c.map(order)
        if c.name == "method" else c,
        kind="stable",
    )  # fmt: skip
    return frame.reset_index(drop=True)


def most_sensitive(frame: pd.DataFrame, count: int = 5) -> str:
    """The ``count`` layers with the highest mean option error, ``"conv3 0.41, conv2 0.22"``."""
    options = frame[frame["method"] != "keep"]
    if options.empty:
        return "no layer option was scored"
    mean = options.groupby("layer", sort=False)["error"].mean().sort_values(ascending=False)
    return ", ".join(f"{name} {value:.3g}" for name, value in mean.head(count).items())
