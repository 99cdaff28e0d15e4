"""``report.md``: a study's summary in Markdown (counts, baseline, front, queries, hypervolume).

Every objective and budget is named and formatted by its registry entry
(:mod:`autodecomp.measure.objectives`): ``macs <= 900``, ``latency <= 2.500 ms``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import optuna
import pandas as pd

from ..measure.objectives import ObjectiveSpec, objective
from .front import front_columns, last_hypervolume, reference
from .queries import query_text
from .study_view import limits, state_counts, study_baseline
from .tables import format_cell

__all__ = ["markdown_table", "summary_markdown"]

_PROXY_MD = {
    "label": ("proxy", ""),
    "n": ("trials", ""),
    "tau": ("Kendall tau", "+.3f"),
    "p_value": ("p", ".3g"),
}
_PRUNING_MD = {
    "label": ("stage", ""),
    "trials": ("trials", ""),
    "seconds_spent": ("seconds spent", ".1f"),
    "seconds_saved": ("seconds saved (est.)", ".1f"),
}


def markdown_table(frame: pd.DataFrame, columns: Mapping[str, tuple[str, str | None]]) -> str:
    """A Markdown table: ``columns`` maps a frame column to ``(header, format spec)``."""
    if frame.empty:
        return "(none yet)"
    lines = [
        "| " + " | ".join(h for h, _ in columns.values()) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in frame.iterrows():
        cells = [format_cell(row[c], spec).replace("|", "\\|") for c, (_, spec) in columns.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _budget_text(name: str, value: float, base: Mapping[str, Any]) -> str:
    text = f"{name} <= {objective(name).format(value)}"
    return text + (f" ({value / base[name]:.2f}x baseline)" if name in base else "")


def _proxy_md(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    """The "Proxy fidelity" section, when the trials record proxy scores."""
    if "proxy_correlation" not in frames:
        return []
    return [
        "## Proxy fidelity",
        "",
        "Kendall tau-b between each cheap proxy and the final proxy accuracy over the "
        "trained, completed trials (errors negated: +1 means the proxy orders candidates "
        "exactly as the fine-tune does). Pruned trials have no final accuracy and are left "
        "out. Tables: `proxy_correlation.csv`, `pruning.csv`.",
        "",
        markdown_table(frames["proxy_correlation"], _PROXY_MD),
        "",
        "Trials ended before the full fine-tune (time saved = their number x the mean time "
        "of a fully fine-tuned trial - the time they took):",
        "",
        markdown_table(frames["pruning"], _PRUNING_MD),
        "",
    ]


def _hypervolume_md(
    specs: Sequence[ObjectiveSpec], base: Mapping[str, Any], history: pd.DataFrame
) -> str:
    """The hypervolume, its normalised space and reference point in words."""
    losses = sorted(specs, key=lambda spec: spec.is_cost)  # the accuracy first
    counted = int(history["counted"].sum()) if len(history) else 0
    return (
        f"**{last_hypervolume(history):.4f}** over {counted} counted trials, in the normalised "
        f"space ({', '.join(s.loss_text() for s in losses)}) with reference point (1, ..., 1) = "
        + ", ".join(f"{s.name} {s.format_reference(base)}" for s in specs)
        + "; 1.0 would be accuracy 1 at no cost. History: `hypervolume.csv`, `hypervolume.png`."
    )


def summary_markdown(
    study: optuna.Study,
    frames: Mapping[str, pd.DataFrame],
    queries: Sequence[tuple[dict[str, Any], pd.Series | None]],
    files: Sequence[str],
    source: str,
) -> str:
    """The text of ``report.md``.

    Args:
        study: the snapshot reported on.
        frames: the report's tables by name (``pareto``, ``method_usage``, ``hypervolume``,
            and the proxy tables when there are any).
        queries: each query with its answer (:func:`~.queries.best_trial`).
        files: the names of the files written, ``report.md`` included.
        source: where the study was read from.
    """
    base, specs = study_baseline(study), list(reference(study))
    budget = ", ".join(_budget_text(k, v, base) for k, v in sorted(limits(study).items()))
    usage_columns = {
        c: (c, ".2f" if c == "mean_prune" else "") for c in frames["method_usage"].columns
    }
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Read from `{source}` at {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. "
        f"Trials: {state_counts(study)}. "
        f"Objectives: {', '.join(spec.name for spec in specs)}.",
        "",
        f"Baseline (validation split): accuracy {base['accuracy']:.4f}, {base['macs']:,} MACs, "
        f"{base['params']:,} parameters. Budgets: {budget or 'none'}.",
        "",
        "## Pareto front (feasible, non-dominated, sorted by MACs)",
        "",
        "`drop` = baseline accuracy - accuracy; `÷` = baseline / compressed (compression "
        "factor). Accuracies are the search's proxy (short distillation) on the validation split.",
        "",
        markdown_table(frames["pareto"], front_columns(frames["pareto"])),
        "",
        "## Queries",
        "",
        *[f"- {query_text(q, row)}" for q, row in queries],
        "",
        "## Method usage on the front (trials per layer and method)",
        "",
        markdown_table(frames["method_usage"], usage_columns),
        "",
        "## Hypervolume",
        "",
        _hypervolume_md(specs, base, frames["hypervolume"]),
        "",
        *_proxy_md(frames),
        "## Files",
        "",
        ", ".join(f"`{name}`" for name in files),
    ]
    if "pareto.png" in files:
        lines += ["", "![Pareto front](pareto.png)", "", "![Method map](method_map.png)", ""]
        lines += ["![Hypervolume history](hypervolume.png)"]
    return "\n".join(lines) + "\n"
