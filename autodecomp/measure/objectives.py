"""The search objectives, each registered once: name, direction, labels, unit, where it is stored.

A study's objectives are names from :data:`OBJECTIVES` (``accuracy`` plus any of ``macs``,
``params``, ``latency``). Tables, plots, reports and the hypervolume read everything they
need about an objective from here, so adding one is adding a :func:`_objective` call.

The hypervolume is taken in a normalised space where each objective is a loss in
``[0, 1)`` for a useful trial: ``1 - accuracy`` for accuracy, ``value / baseline`` for a
cost; the reference point is the loss 1 on every axis (accuracy 0, the baseline's cost).

Where a value is stored: every objective's value is in ``trial.values`` when it is one of
the study's objectives. Besides, a trial records some in user attributes whatever the
objectives (``attr``): MACs and parameters as numbers, latency as ``{device kind: ms}``
(``device``: the measured value is the one on the device the stored config names). The
baseline's value is in the study's ``baseline`` record, or for a measured objective in the
study attribute ``baseline_<attr>`` (``{device kind: value}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.registry import Registry

__all__ = ["OBJECTIVES", "ObjectiveSpec", "objective", "registered"]

_DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of the search.

    Attributes:
        name: the config name (``objectives: [accuracy, macs]``) and the table column.
        direction: ``"maximize"`` or ``"minimize"`` (Optuna's words).
        label: axis label of static plots.
        unit: unit shown after a value (``"ms"``), or ``""`` for a count / fraction.
        decimals: decimals shown in reports (0 for counts).
        short: name in interactive plots (default: ``label``).
        attr: the trial user attribute recording the value whatever the objectives, or
            ``None`` when it is only in ``trial.values``.
        device: the stored config setting (dotted, ``"latency.device"``) naming the device
            the value is measured on; ``attr`` then maps device kinds to values.
    """

    name: str
    direction: str
    label: str
    unit: str = ""
    decimals: int = 0
    short: str = ""
    attr: str | None = None
    device: str | None = None

    @property
    def is_cost(self) -> bool:
        """A cost (minimised, normalised by the baseline's value) rather than accuracy."""
        return self.direction == "minimize"

    @property
    def title(self) -> str:
        """The name shown in interactive plots."""
        return self.short or self.label

    def reference(self, baseline: Mapping[str, float]) -> float:
        """The hypervolume reference in the objective's own units: accuracy 0, baseline cost."""
        return float(baseline[self.name]) if self.is_cost else 0.0

    def loss(self, value: float, baseline: Mapping[str, float]) -> float:
        """The normalised loss (1 at the reference point, 0 at a perfect trial)."""
        return value / float(baseline[self.name]) if self.is_cost else 1.0 - value

    def loss_text(self) -> str:
        """The loss in words, ``"1 - accuracy"`` or ``"macs / baseline macs"``."""
        return f"{self.name} / baseline {self.name}" if self.is_cost else f"1 - {self.name}"

    def format(self, value: float) -> str:
        """``value`` as reports print it (``1,234,567`` or ``0.812 ms``)."""
        text = f"{value:,.{self.decimals}f}"
        return f"{text} {self.unit}" if self.unit else text

    def format_reference(self, baseline: Mapping[str, float]) -> str:
        """The reference point's coordinate as reports print it (``0``, ``1,000``, ``2.000 ms``)."""
        value = self.reference(baseline)
        return self.format(value) if self.is_cost else f"{value:g}"

    @property
    def baseline_attr(self) -> str:
        """The study user attribute holding the baseline's value."""
        return f"baseline_{self.attr}" if self.device else "baseline"

    def measured_on(self, config: Mapping[str, Any]) -> str:
        """The device kind a measured value is taken on, from a study's stored config."""
        node: Any = config
        for key in (self.device or "").split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        return node if isinstance(node, str) else _DEFAULT_DEVICE

    def baseline_value(self, study_attrs: Mapping[str, Any]) -> float | None:
        """The baseline's value from a study's user attributes, ``None`` when not recorded."""
        record = study_attrs.get(self.baseline_attr)
        if not isinstance(record, Mapping):
            return None
        key = self.measured_on(study_attrs.get("config") or {}) if self.device else self.name
        return float(record[key]) if record.get(key) is not None else None

    def column(self, kind: str) -> str:
        """The table column of a value measured on device ``kind`` (``latency_cpu_ms``)."""
        return f"{self.name}_{kind}_{self.unit}" if self.unit else f"{self.name}_{kind}"

    def header(self, column: str) -> str:
        """A measured column's header (``latency cpu ms``)."""
        return column.replace("_", " ")

    def cells(self, values: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The table cells of one trial: ``{name: value}``, or one per device measured on.

        Args:
            values: the trial's objective values by name (empty when it has none).
            attrs: the trial's user attributes.
        """
        if self.device:
            return {self.column(kind): v for kind, v in (attrs.get(self.attr) or {}).items()}
        return {self.name: values.get(self.name) if self.attr is None else attrs.get(self.attr)}

    def measured_columns(self, columns: list[str]) -> list[str]:
        """The columns among ``columns`` that hold this objective per device."""
        if not self.device:
            return []
        head, tail = f"{self.name}_", f"_{self.unit}" if self.unit else ""
        return [c for c in columns if c.startswith(head) and c.endswith(tail) and c != head]


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective")


def _objective(spec: ObjectiveSpec) -> None:
    OBJECTIVES.add(spec.name, spec)


def objective(name: str) -> ObjectiveSpec:
    """The registered objective ``name``; unknown names list the valid ones."""
    return OBJECTIVES.get(name)


def registered() -> list[ObjectiveSpec]:
    """Every objective in registration order (the order of table columns)."""
    return [spec for _, spec in OBJECTIVES.in_order()]


_objective(
    ObjectiveSpec(
        "accuracy", "maximize", "validation accuracy (search proxy)", "", 4, short="accuracy"
    )
)
_objective(ObjectiveSpec("macs", "minimize", "MACs", attr="macs"))
_objective(ObjectiveSpec("params", "minimize", "parameters", attr="params"))
_objective(
    ObjectiveSpec(
        "latency", "minimize", "latency (ms)", "ms", 3, attr="latency_ms", device="latency.device"
    )
)
