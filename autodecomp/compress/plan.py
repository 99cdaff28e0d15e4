"""Plans: which layer gets which method at which ratio or rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["plan_summary"]


def plan_summary(plan: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Method counts of a plan, e.g. ``"keep:1 tucker:3"``, and the mean shift-pruning ratio
    of its pruned entries, e.g. ``"prune:9 tucker:3 mean_prune:0.31"``."""
    counts: dict[str, int] = {}
    pruned = []
    for entry in (plan or {}).values():
        counts[entry["method"]] = counts.get(entry["method"], 0) + 1
        if entry.get("prune") is not None:
            pruned.append(entry["prune"])
    parts = [f"{m}:{n}" for m, n in sorted(counts.items())]
    if pruned:
        parts.append(f"mean_prune:{sum(pruned) / len(pruned):.2f}")
    return " ".join(parts)
