"""``autodecomp report``: every table, ``report.md`` and the plots of a study, finished or running.

A study is read through any Optuna storage without writing to it
(:func:`~.study_view.read_study`), so a report can be made while workers still add trials:
RUNNING trials are listed in the trials table with their state and otherwise ignored.
:func:`write_report` writes:

- ``trials`` and ``layers`` (the tables of :mod:`autodecomp.results.tables`), ``pareto`` (the
  feasible front sorted by MACs, :func:`~.front.front_frame`), ``method_usage`` and
  ``hypervolume`` (history per trial, :mod:`autodecomp.results.front`), and, when the trials
  record proxy scores, ``proxy_correlation`` (Kendall tau of each cheap proxy against the
  final proxy accuracy) and ``pruning`` (trials dropped per stage and the time saved;
  :mod:`autodecomp.results.proxy_stats`), each as CSV and Parquet;
- ``report.md``: counts, baseline, the front, queries (:mod:`autodecomp.results.queries`),
  method usage, hypervolume (:mod:`autodecomp.results.markdown`);
- ``pareto.png``, ``pareto.html`` (interactive, plotly embedded so it opens offline),
  ``hypervolume.png`` and ``method_map.png`` (see :mod:`autodecomp.results.plots`);
- when the study stores its allocation ladder's option scores, ``sensitivity`` (CSV,
  Parquet) and ``sensitivity.png``: every layer option's zero-training error against its
  ratio and MACs (:mod:`autodecomp.results.sensitivity`; :func:`write_sensitivity`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from ..config import load_config
from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..search.storage import shown, storage_folder
from ..search.study import quiet_optuna
from . import plots
from .front import (
    front_columns,
    front_frame,
    hypervolume,
    hypervolume_frame,
    last_hypervolume,
    method_usage_frame,
)
from .markdown import summary_markdown
from .proxy_stats import proxy_correlation_frame, pruning_frame
from .queries import DEFAULT_QUERIES, best_trial, query_text
from .sensitivity import sensitivity_frame, stored_scores
from .study_view import (
    limits,
    read_study,
    snapshot,
    state_counts,
    study_baseline,
    study_objectives,
    usable,
)
from .tables import format_front, layers_frame, missing, trials_frame

# Also importable from here, as README documents them and earlier callers (tests, bench) use
# them: read_study (home: study_view), front_frame, method_usage_frame, hypervolume[_frame]
# (front), best_trial (queries), trials_frame (tables).
__all__ = [
    "best_trial",
    "configure_parser",
    "front_frame",
    "hypervolume",
    "hypervolume_frame",
    "method_usage_frame",
    "read_study",
    "trials_frame",
    "write_report",
    "write_sensitivity",
]

_log = logging.getLogger(__name__)
_TABLES = ("trials", "layers", "pareto", "method_usage", "hypervolume")
_PROXY_TABLES = ("proxy_correlation", "pruning")


# ---- writing -------------------------------------------------------------------------------
def _parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing strings with other values (int and list ranks) as JSON text."""
    out = frame.copy()
    for column in out.columns:
        values = [v for v in out[column] if not missing(v)]
        if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) for v in values):
            out[column] = [
                None if missing(v) else v if isinstance(v, str) else json.dumps(v)
                for v in out[column]
            ]
    return out


def _write_table(frame: pd.DataFrame, folder: Path, name: str) -> list[Path]:
    csv, parquet = folder / f"{name}.csv", folder / f"{name}.parquet"
    atomic_write(csv, lambda tmp: frame.to_csv(tmp, index=False))
    ready = _parquet_ready(frame)
    atomic_write(parquet, lambda tmp: ready.to_parquet(tmp, index=False))
    return [csv, parquet]


def _write_plots(
    study: optuna.Study, frames: Mapping[str, pd.DataFrame], folder: Path
) -> list[Path]:
    counted = {t.number: t for t in study.get_trials(deepcopy=False) if usable(t)}
    trials = frames["trials"]
    trials = trials[trials["number"].isin(list(counted))] if len(trials) else trials
    front = frames["pareto"]
    layers = {n: t.user_attrs.get("layers") or {} for n, t in counted.items()}
    return [
        plots.plot_front(
            trials, front, study_baseline(study), limits(study), folder / "pareto.png"
        ),
        plots.plot_front_html(study, study_objectives(study), folder / "pareto.html"),
        plots.plot_hypervolume(frames["hypervolume"], folder / "hypervolume.png"),
        plots.plot_method_map(front, layers, folder / "method_map.png"),
    ]


def write_sensitivity(frame: pd.DataFrame, folder: Path, *, plot: bool = True) -> list[Path]:
    """Write the sensitivity table (``sensitivity.csv`` / ``.parquet``) and, with ``plot``,
    ``sensitivity.png`` into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = _write_table(frame, folder, "sensitivity")
    if plot:
        paths.append(plots.plot_sensitivity(frame, folder / "sensitivity.png"))
    return paths


def write_report(
    study: optuna.Study,
    folder: str | os.PathLike[str],
    *,
    max_macs: float | str | None = None,
    max_params: float | str | None = None,
    max_drop: float | str | None = None,
    plots: bool = True,
    source: str = "",
) -> dict[str, Any]:
    """Write every table, ``report.md`` and the plots into ``folder``.

    Args:
        study: the study (any state; nothing is written to its storage).
        folder: output folder (created).
        max_macs, max_params, max_drop: one query (:func:`best_trial`); without any, the
            report answers three default ones (1% drop, 0.5x and 0.25x MACs).
        plots: also write the PNG and HTML plots.
        source: where the study was read from, shown in ``report.md``.

    Returns:
        ``{"study": the snapshot reported on, "frames": {name: DataFrame}, "queries":
        [(limits, row or None)], "paths": [Path, ...], "hypervolume": float}``.
    """
    study = snapshot(study)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = {
        "trials": trials_frame(study),
        "layers": layers_frame(study),
        "pareto": front_frame(study),
        "method_usage": method_usage_frame(study),
        "hypervolume": hypervolume_frame(study),
    }
    if any("kernel_error" in t.user_attrs for t in study.get_trials(deepcopy=False)):
        frames["proxy_correlation"] = proxy_correlation_frame(study)
        frames["pruning"] = pruning_frame(study)
    scores = stored_scores(study)
    if scores is not None:
        frames["sensitivity"] = sensitivity_frame(scores, study)
    asked = {"max_macs": max_macs, "max_params": max_params, "max_drop": max_drop}
    wanted = [asked] if any(v is not None for v in asked.values()) else list(DEFAULT_QUERIES)
    queries = [(q, best_trial(study, **q)) for q in wanted]
    paths: list[Path] = []
    for name in (*_TABLES, *_PROXY_TABLES):
        if name in frames:
            paths += _write_table(frames[name], folder, name)
    if plots:
        paths += _write_plots(study, frames, folder)
    if "sensitivity" in frames:
        paths += write_sensitivity(frames["sensitivity"], folder, plot=plots)
    report = folder / "report.md"
    text = summary_markdown(study, frames, queries, [p.name for p in [*paths, report]], source)
    atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    paths.append(report)
    return {
        "study": study,
        "frames": frames,
        "queries": queries,
        "paths": paths,
        "hypervolume": last_hypervolume(frames["hypervolume"]),
    }


def _locate(args: argparse.Namespace) -> tuple[str, str | None, Path]:
    """``(storage, study name, default output folder)`` from the command-line arguments."""
    source = Path(args.study)
    if source.is_dir() or source.suffix in (".yaml", ".yml"):
        # the report runs on no device (and reads the stored config, not this one)
        cfg = load_config(source, ["device=cpu", "latency.device=cpu"])
        return args.storage or cfg.storage, args.study_name or cfg.name, cfg.folder / "report"
    storage = args.storage or args.study
    folder = storage_folder(storage)
    return storage, args.study_name, (folder or Path.cwd()) / "report"


# ---- command line --------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``autodecomp report`` arguments to ``parser``; returns the handler."""
    parser.add_argument(
        "study",
        help="studies/<name>/study.yaml (or its folder), or a storage: SQLite or Optuna "
        "journal file, or database URL",
    )
    parser.add_argument("--storage", help="read this storage instead of the study's")
    parser.add_argument("--study-name", help="study in the storage (default: the config's)")
    parser.add_argument(
        "-o",
        "--output",
        "--out",
        metavar="DIR",
        help="output folder (default: <study folder>/report); the study is only read",
    )
    parser.add_argument(
        "--max-macs", help="query: best trial with MACs <= this (0.5, 50%%, 0.5x, 300k, 2.5M)"
    )
    parser.add_argument("--max-params", help="query: best trial with params <= this")
    parser.add_argument(
        "--max-drop", help="query: smallest trial within this accuracy drop (0.01 or 1%%)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write tables and report.md only")

    def run(args: argparse.Namespace) -> int:
        storage, name, default_folder = _locate(args)
        out = Path(args.output) if args.output else default_folder
        with quiet_optuna():
            study = read_study(storage, name)
            try:
                result = write_report(
                    study,
                    out,
                    max_macs=args.max_macs,
                    max_params=args.max_params,
                    max_drop=args.max_drop,
                    plots=not args.no_plots,
                    source=shown(storage),
                )
            except OSError as err:  # e.g. a read-only study folder
                raise ConfigError(
                    f"cannot write the report to {str(out)!r}: {err.strerror or err}; write it "
                    "elsewhere with --out DIR"
                ) from None
        study = result["study"]
        base = study_baseline(study)
        _log.info(
            f"study {study.study_name!r}: trials {state_counts(study)}; baseline accuracy "
            f"{base['accuracy']:.4f}, {base['macs']:,} MACs, {base['params']:,} params"
        )
        _log.info("Pareto front (feasible, non-dominated):")
        front = result["frames"]["pareto"]
        _log.info(format_front(front, front_columns(front)))
        _log.info(f"hypervolume {result['hypervolume']:.4f} (reference: accuracy 0, baseline cost)")
        for query, row in result["queries"]:
            _log.info(f"best with {query_text(query, row)}")
        if "sensitivity" not in result["frames"]:
            given = Path(args.study).is_dir() or Path(args.study).suffix in (".yaml", ".yml")
            yaml = args.study if given else "studies/<name>/study.yaml"
            _log.info(
                f"no sensitivity table (no ladder scores stored): autodecomp sensitivity {yaml}"
            )
        folder = result["paths"][0].parent
        _log.info(f"wrote {len(result['paths'])} files to {folder}")
        return 0

    return run
