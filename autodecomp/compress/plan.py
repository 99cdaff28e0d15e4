"""Plans: which layer gets which method at which ratio or rank.

A plan maps layer names to entries. Stored plans (a study's trials, an export's metadata)
are JSON; in code each entry is a :class:`PlanEntry`, parsed and checked once by
:meth:`PlanEntry.from_dict` and written back by :meth:`PlanEntry.to_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..decompositions import get_method
from ..decompositions.base import check_rank_multiple, check_rank_request, check_ratio

__all__ = ["INITS", "KEEP", "PRUNE", "PlanEntry", "check_prune_ratio", "plan_summary"]

KEEP = "keep"  # the plan method of a layer left dense
PRUNE = "prune"  # the plan method of a pruned shift block
INITS = ("weight", "data")  # "init": fit the kernel, or the output on calibration data
_FIELDS = ("method", "rank", "ratio", "rank_multiple", "prune", "init")  # to_dict's key order


def check_prune_ratio(ratio: Any) -> None:
    """A shift-pruning ratio (fraction of intermediate channels removed) is in ``[0, 1)``."""
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and 0 <= ratio < 1):
        raise ValueError(f"shift_prune ratio must be a number in [0, 1), got {ratio!r}")


@dataclass(frozen=True)
class PlanEntry:
    """One layer's plan entry; ``None`` fields are absent from its JSON.

    Attributes:
        method: a registered method, ``"keep"`` (the layer stays dense) or ``"prune"`` (a
            shift block pruned by ``prune`` or to the direction-group sizes ``rank``).
        ratio: target fraction of the dense layer's parameters (a method picks the rank).
        rank: the method's own rank spec (JSON: lists, not tuples).
        prune: shift-pruning ratio of a ``prune`` block or of a layer decomposed into one.
        init: ``"weight"`` (default) or ``"data"`` (fit the output on calibration inputs).
        rank_multiple: with ``ratio``, round channel widths down to multiples of it (1).
        options: the method's own options (e.g. ``hooi_iters``, or ``solver``: ``"tensorly"``
            to fit by tensorly's solver, so an export rebuilds the layer the same way), any
            other key.
    """

    method: str
    ratio: float | None = None
    rank: Any = None
    prune: float | None = None
    init: str | None = None
    rank_multiple: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.method == PRUNE:
            if self.to_dict().keys() - {"method", "prune", "rank"} or (
                (self.prune is None) == (self.rank is None)
            ):
                raise ValueError(
                    "a pruning entry needs exactly one of 'prune' (ratio) or 'rank' (group "
                    f"sizes) and no other key, got {self.to_dict()!r}"
                )
        elif self.method == KEEP:
            if self.prune is not None:
                raise ValueError("'prune' needs a decomposition method, not 'keep'")
            return
        else:
            cls = get_method(self.method)
            if "solver" in self.options:
                cls.check_solver(self.options["solver"])
            check_rank_request(self.rank, self.ratio)
            if self.ratio is not None:
                check_ratio(self.ratio)
                if self.rank_multiple is not None:
                    check_rank_multiple(self.rank_multiple)
            if self.init is not None and self.init not in INITS:
                raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if self.prune is not None:
            check_prune_ratio(self.prune)

    @classmethod
    def from_dict(cls, entry: Any, layer: str | None = None) -> PlanEntry:
        """Parse and check one entry: a mapping with a ``"method"``, a bare method name, or
        a :class:`PlanEntry`; keys of value ``None`` count as absent.

        Args:
            entry: the entry.
            layer: its layer's name, to prefix error messages with.

        Raises:
            ValueError: not such an entry, an unknown method or init, both or neither of
                ``ratio`` and ``rank``, a bad ratio, ``rank_multiple`` or ``prune``, or a
                pruning entry with other keys.
        """
        if isinstance(entry, PlanEntry):
            return entry
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, Mapping) or "method" not in entry:
            where = "plan entry" if layer is None else f"plan entry for {layer!r}"
            raise ValueError(f"{where} must be a mapping with a 'method', got {entry!r}")
        known = {k: entry[k] for k in _FIELDS[1:] if entry.get(k) is not None}
        options = {k: v for k, v in entry.items() if k not in _FIELDS}
        try:
            return cls(entry["method"], **known, options=options)
        except ValueError as err:
            if layer is None:
                raise
            raise type(err)(f"layer {layer!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The entry's JSON: ``method``, then the fields that are set, then ``options``."""
        out = {k: getattr(self, k) for k in _FIELDS if getattr(self, k) is not None}
        return out | dict(self.options)

    @property
    def decomposes(self) -> bool:
        """Whether the layer is replaced by a decomposed one (neither kept nor a pruned block)."""
        return self.method not in (KEEP, PRUNE)


def plan_summary(plan: Mapping[str, Any] | None) -> str:
    """Method counts of a plan, e.g. ``"keep:1 tucker:3"``, and the mean shift-pruning ratio
    of its pruned entries, e.g. ``"prune:9 tucker:3 mean_prune:0.31"``."""
    counts: dict[str, int] = {}
    pruned = []
    for name, raw in (plan or {}).items():
        entry = PlanEntry.from_dict(raw, name)
        counts[entry.method] = counts.get(entry.method, 0) + 1
        if entry.prune is not None:
            pruned.append(entry.prune)
    parts = [f"{m}:{n}" for m, n in sorted(counts.items())]
    if pruned:
        parts.append(f"mean_prune:{sum(pruned) / len(pruned):.2f}")
    return " ".join(parts)
