"""The search objectives, each registered once: name, direction, axis label, hypervolume terms.

A study's objectives are names from :data:`OBJECTIVES` (``accuracy`` plus any of ``macs``,
``params``, ``latency``). Tables, plots, reports and the hypervolume read everything they
need about an objective from here, so adding one is adding a :func:`_objective` call.

The hypervolume is taken in a normalised space where each objective is a loss in
``[0, 1)`` for a useful trial: ``1 - accuracy`` for accuracy, ``value / baseline`` for a
cost; the reference point is the loss 1 on every axis (accuracy 0, the baseline's cost).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core.registry import Registry

__all__ = ["OBJECTIVES", "ObjectiveSpec", "objective"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of the search.

    Attributes:
        name: the config name (``objectives: [accuracy, macs]``) and the table column.
        direction: ``"maximize"`` or ``"minimize"`` (Optuna's words).
        label: axis label of plots.
        unit: unit shown after a value (``"ms"``), or ``""`` for a count / fraction.
        decimals: decimals shown in reports (0 for counts).
    """

    name: str
    direction: str
    label: str
    unit: str = ""
    decimals: int = 0

    @property
    def is_cost(self) -> bool:
        """A cost (minimised, normalised by the baseline's value) rather than accuracy."""
        return self.direction == "minimize"

    def reference(self, baseline: Mapping[str, float]) -> float:
        """The hypervolume reference in the objective's own units: accuracy 0, baseline cost."""
        return float(baseline[self.name]) if self.is_cost else 0.0

    def loss(self, value: float, baseline: Mapping[str, float]) -> float:
        """The normalised loss (1 at the reference point, 0 at a perfect trial)."""
        return value / float(baseline[self.name]) if self.is_cost else 1.0 - value

    def format(self, value: float) -> str:
        """``value`` as reports print it (``1,234,567`` or ``0.812 ms``)."""
        text = f"{value:,.{self.decimals}f}"
        return f"{text} {self.unit}" if self.unit else text


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective")


def _objective(spec: ObjectiveSpec) -> None:
    OBJECTIVES.add(spec.name, spec)


def objective(name: str) -> ObjectiveSpec:
    """The registered objective ``name``; unknown names list the valid ones."""
    return OBJECTIVES.get(name)


_objective(ObjectiveSpec("accuracy", "maximize", "validation accuracy (search proxy)", "", 4))
_objective(ObjectiveSpec("macs", "minimize", "MACs"))
_objective(ObjectiveSpec("params", "minimize", "parameters"))
_objective(ObjectiveSpec("latency", "minimize", "latency (ms)", "ms", 3))
