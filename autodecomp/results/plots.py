"""Report plots: Pareto front (PNG and interactive HTML), hypervolume history, method map,
per-layer sensitivity.

The PNGs are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas) without pyplot, so
writing a report never changes the backend of a notebook. The HTML comes from
:func:`optuna.visualization.plot_pareto_front` with plotly.js embedded: it opens offline.
Every plot is written even when nothing is on the front yet (it then says so).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..measure.objectives import ObjectiveSpec, objective

__all__ = [
    "plot_front",
    "plot_front_html",
    "plot_hypervolume",
    "plot_method_map",
    "plot_sensitivity",
]

_DPI = 120
_KEEP_COLOUR = "#d9d9d9"
_X, _Y = "macs", "accuracy"  # the axes of the static front (every trial records both)
_MAX_AXES = 3  # what an interactive Pareto-front plot can show


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_front(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    baseline: Mapping[str, Any],
    limits: Mapping[str, float],
    path: Path,
) -> Path:
    """Accuracy vs MACs: usable trials in grey, the front as a staircase, the baseline a star.

    The axes are labelled by their registry entries (:mod:`autodecomp.measure.objectives`).

    Args:
        trials: rows of COMPLETE, feasible, trained trials (``accuracy``, ``macs``).
        front: :func:`autodecomp.results.front.front_frame`.
        baseline: ``accuracy``, ``macs``.
        limits: absolute budgets (``macs`` drawn as a dashed line when present).
        path: the PNG to write.
    """
    fig = Figure(figsize=(7, 4.5), dpi=_DPI)
    ax = fig.subplots()
    scale = 1e6 if baseline[_X] >= 1e6 else 1e3
    unit = "M" if scale == 1e6 else "k"
    if len(trials):
        ax.scatter(trials[_X] / scale, trials[_Y], s=14, c="#b0b0b0", label="trials")
    if len(front):
        ax.step(front[_X] / scale, front[_Y], where="post", c="#1f77b4", lw=1)
        ax.scatter(front[_X] / scale, front[_Y], s=28, c="#1f77b4", label="front")
        for _, row in front.iterrows():
            ax.annotate(
                f"#{int(row['number'])}",
                (row[_X] / scale, row[_Y]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    else:
        _empty(ax, "no feasible completed trial yet")
    ax.scatter(
        [baseline[_X] / scale], [baseline[_Y]], marker="*", s=120, c="#d62728",
        label="baseline",
    )  # fmt: skip
    if _X in limits:
        ax.axvline(limits[_X] / scale, ls="--", c="#7f7f7f", lw=1, label="MAC budget")
    ax.set_xlabel(f"{objective(_X).label} ({unit})")
    ax.set_ylabel(objective(_Y).label)
    ax.set_title("Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_hypervolume(history: pd.DataFrame, path: Path) -> Path:
    """Hypervolume (normalised space, reference accuracy 0 and baseline cost) per trial."""
    fig = Figure(figsize=(6, 3.5), dpi=_DPI)
    ax = fig.subplots()
    if len(history):
        ax.step(history["number"], history["hypervolume"], where="post", c="#2ca02c")
    else:
        _empty(ax, "no trial yet")
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume")
    ax.set_title("Hypervolume history (reference: accuracy 0, baseline cost)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _cell_text(record: Mapping[str, Any]) -> str:
    if record["method"] == "keep":
        return ""
    if record.get("prune") is not None and record["method"] == "prune":
        return f"p{record['prune']:.2f}"
    if record.get("ratio") is not None:
        return f"{record['ratio']:.2f}"
    return json.dumps(record.get("rank"), separators=(",", ":"))


def plot_method_map(
    front: pd.DataFrame, plans: Mapping[int, Mapping[str, Any]], path: Path
) -> Path:
    """Rows: front trials by MACs; columns: layers; colour: method; text: the drawn ratio.

    Args:
        front: :func:`~autodecomp.results.front.front_frame` (``number``, ``accuracy``,
            ``macs_compression``).
        plans: trial number -> the trial's per-layer records (user attribute ``layers``;
            the text is the plan's ratio, or the rank when the space gave explicit ranks).
        path: the PNG to write.
    """
    numbers = [int(n) for n in front["number"]] if len(front) else []
    layers: list[str] = []
    for n in numbers:
        layers += [name for name in plans[n] if name not in layers]
    methods = sorted(
        {plans[n][name]["method"] for n in numbers for name in plans[n]},
        key=lambda m: (m == "keep", m),
    )
    fig = Figure(
        figsize=(max(5.0, 1.1 + 0.75 * len(layers)), max(2.5, 1.2 + 0.32 * len(numbers))),
        dpi=_DPI,
    )
    ax = fig.subplots()
    if not numbers:
        _empty(ax, "no feasible completed trial yet")
        ax.set_axis_off()
        fig.savefig(path)
        return path
    palette = _palette(len(methods))
    colours = [_KEEP_COLOUR if m == "keep" else palette[i] for i, m in enumerate(methods)]
    code = {m: i for i, m in enumerate(methods)}
    grid = [[code[plans[n][name]["method"]] if name in plans[n] else -1 for name in layers]
            for n in numbers]  # fmt: skip
    masked = pd.DataFrame(grid).where(lambda g: g >= 0)
    ax.imshow(masked.to_numpy(dtype=float), cmap=ListedColormap(colours), vmin=-0.5,
              vmax=len(methods) - 0.5, aspect="auto")  # fmt: skip
    for i, n in enumerate(numbers):
        for j, name in enumerate(layers):
            if name in plans[n]:
                ax.text(j, i, _cell_text(plans[n][name]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    labels = [
        f"#{n}  acc {acc:.3f}  MACs ÷ {c:.2f}"
        for n, acc, c in zip(numbers, front["accuracy"], front["macs_compression"], strict=True)
    ]
    ax.set_yticks(range(len(numbers)), labels, fontsize=8)
    ax.set_title("Method per layer on the Pareto front")
    ax.set_xlabel(
        "cell text: the ratio drawn (fraction of the layer's dense parameters)", fontsize=8
    )
    handles = [Patch(color=c, label=m) for m, c in zip(methods, colours, strict=True)]
    ax.legend(handles=handles, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _palette(n: int) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["Set2"]  # light colours: the black cell text stays readable
    return [cmap(i % cmap.N) for i in range(n)]


def plot_front_html(study: optuna.Study, objectives: Sequence[ObjectiveSpec], path: Path) -> Path:
    """Optuna's interactive Pareto-front plot (infeasible trials greyed), plotly embedded.

    Args:
        study: the study; its values are ``objectives``, in this order.
        objectives: the study's objectives (axis titles: their registry ``title``); a plot
            shows three at most, the first three.
        path: the HTML file to write.
    """
    titles = [spec.title for spec in objectives][:_MAX_AXES]
    targets = None
    if len(objectives) > _MAX_AXES:

        def targets(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
            return trial.values[:_MAX_AXES]

    figure = optuna.visualization.plot_pareto_front(study, targets=targets, target_names=titles)
    figure.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def plot_sensitivity(frame: pd.DataFrame, path: Path) -> Path:
    """One panel per layer: each method's zero-training error against the layer's MACs
    (over its dense MACs, log scale); the dense layer a black star at (1, 0); measured
    accuracies written beside their points.

    Args:
        frame: :func:`autodecomp.results.sensitivity.sensitivity_frame`.
        path: the PNG to write.
    """
    layers = list(dict.fromkeys(frame["layer"]))
    methods = [m for m in dict.fromkeys(frame["method"]) if m != "keep"]
    cols = min(4, max(1, len(layers)))
    rows = max(1, -(-len(layers) // cols))
    width = 3.2 * cols + 1.4  # 1.2 inches on the right for the legend
    fig = Figure(figsize=(width, 2.6 * rows + 0.6), dpi=_DPI)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = dict(zip(methods, _palette(len(methods)), strict=True))
    for ax, layer in zip(axes, layers, strict=False):
        own = frame[frame["layer"] == layer]
        for method in methods:
            points = own[own["method"] == method].sort_values("macs_ratio")
            if len(points):
                ax.plot(points["macs_ratio"], points["error"], marker="o", ms=3, lw=1,
                        c=colours[method], label=method)  # fmt: skip
            for _, row in points[points["accuracy"].notna()].iterrows():
                ax.annotate(f"{row['accuracy']:.3f}", (row["macs_ratio"], row["error"]),
                            textcoords="offset points", xytext=(3, 3), fontsize=6)  # fmt: skip
        ax.scatter([1.0], [0.0], marker="*", s=60, c="black", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(layer, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    if not layers:
        _empty(axes[0], "no layer was scored")
    score = str(frame["score"].iloc[0]) if len(frame) else ""
    fig.supxlabel("layer MACs / dense layer MACs", fontsize=9)
    fig.supylabel(f"{score} error (no training)", fontsize=9)
    fig.suptitle("Per-layer sensitivity (dense layer: star; text: measured accuracy)", fontsize=10)
    handles = [Patch(color=colours[m], label=m) for m in methods]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.2 / width, 1))
    fig.savefig(path)
    return path
