"""The allocation ladder climbed one rung at a time (:class:`Ladder`): the zero-training
plans a study tries first (built by :mod:`autodecomp.search.allocate`)."""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["BALANCED", "FRONT", "OPTION_SCORES", "Ladder", "Rung"]

FRONT = "front"  # the track of the error front's plans
BALANCED = "balanced"  # the track of the minimax-error plans (initial_design.balanced)
OPTION_SCORES = "layer_option_scores"  # the study's user attribute holding option_scores()


class Rung(NamedTuple):
    """One plan of the allocation ladder: its MACs over the baseline's, its fixed trial
    parameters, and its track (``front`` or the method of a uniform plan)."""

    macs: float
    params: dict[str, Any]
    track: str = FRONT


class Ladder:
    """The allocation ladder tried one rung at a time: the cheapest first, then one probe
    per track, then always the rung that best fills the largest gap of the study's
    accuracy-vs-MACs staircase.

    Probes: with uniform tracks on the ladder, each track (the error front first, then the
    uniform methods by rank) is tried at its rung nearest the probe level
    (:meth:`probe_level`, a quarter of the way from the cheapest to the dearest front rung
    in log-MACs, where plans still differ after a fine-tune), so every track has a measured
    point; the gap filling then takes any track's rung.

    Gaps: between two neighbouring evaluated MAC positions ``m1 < m2`` (MACs ratio) whose
    best accuracies so far (at no more MACs) are ``b1 <= b2``, a new point can add at most
    ``(m2 - m1) * (b2 - b1)`` to the hypervolume, and a quarter of it at the midpoint if
    accuracy is linear in MACs there; a gap whose accuracy does not rise is closed. Above
    the dearest evaluated point the gap reaches the dearest rung and the baseline's
    accuracy (closed once that is reached: the plateau is left to the sampler). The next
    rung is the untried one nearest the midpoint of the largest gap that has one. A study
    enqueues ``plans`` rungs in all (as a callback of ``study.optimize``: one waiting at a
    time); then its sampler alone draws the trials.
    The ladder is stored on the study (``allocation_ladder``), so a resumed study or a
    worker continues it.
    """

    ATTR = "allocation_ladder"

    def __init__(
        self,
        rungs: list[Rung] | list[tuple[float, dict[str, Any]]],
        plans: int,
        accuracy_index: int,
        baseline_accuracy: float,
        scores: dict[str, Any] | None = None,
    ) -> None:
        self.rungs = [Rung(*rung) for rung in rungs]
        self.plans = plans
        self.accuracy_index, self.baseline_accuracy = accuracy_index, baseline_accuracy
        self.scores = scores if scores is not None else getattr(rungs, "scores", None)

    def store(self, study: optuna.Study) -> None:
        """Put the ladder (and its option scores, if any) on ``study`` and enqueue its
        cheapest rung."""
        if self.scores:
            study.set_user_attr(OPTION_SCORES, self.scores)
        study.set_user_attr(
            self.ATTR,
            {"rungs": [list(rung) for rung in self.rungs], "plans": self.plans,
             "baseline_accuracy": self.baseline_accuracy},
        )  # fmt: skip
        if self.plans > 0 and self.rungs:
            self._enqueue(study, self.next_rung([]))

    @classmethod
    def from_study(cls, study: optuna.Study, accuracy_index: int) -> Ladder | None:
        """The ladder stored on ``study`` (rungs without a track are ``front``), or None."""
        raw = study.user_attrs.get(cls.ATTR)
        if not raw:
            return None
        rungs = [Rung(float(r[0]), dict(r[1]), *r[2:]) for r in raw["rungs"]]
        return cls(rungs, int(raw["plans"]), accuracy_index, float(raw["baseline_accuracy"]))

    @staticmethod
    def probe_level(rungs: list[Rung]) -> float:
        """The MACs ratio where tracks are probed: a quarter of the way from the cheapest
        to the dearest ``front`` rung (all rungs without one) in log-MACs."""
        front = [r.macs for r in rungs if r.track == FRONT] or [r.macs for r in rungs]
        return min(front) ** 0.75 * max(front) ** 0.25

    def _probes(self) -> list[int]:
        """Each track's rung nearest the probe level, in track order (none for one track)."""
        tracks = list(dict.fromkeys(rung.track for rung in self.rungs))
        if len(tracks) < 2:
            return []
        level = self.probe_level(self.rungs)
        return [
            min(
                (i for i, rung in enumerate(self.rungs) if rung.track == track),
                key=lambda i: abs(math.log(self.rungs[i].macs / level)),
            )
            for track in tracks
        ]

    def _enqueue(self, study: optuna.Study, rung: int | None) -> None:
        if rung is None:
            return
        label = f"allocation {rung + 1}/{len(self.rungs)} {self.rungs[rung].track}"
        study.enqueue_trial(self.rungs[rung].params, user_attrs={"warm_start": label})

    @staticmethod
    def rung_of(trial: FrozenTrial) -> int | None:
        """The ladder rung ``trial`` was enqueued from (None: not from the ladder)."""
        label = str(trial.user_attrs.get("warm_start", ""))
        if not label.startswith("allocation "):
            return None
        return int(label.split()[1].split("/")[0]) - 1

    def _staircase(self, trials: list[FrozenTrial]) -> list[tuple[float, float]]:
        """``(MACs ratio, best accuracy at no more MACs)`` at every evaluated MAC position."""
        points = sorted(
            (t.user_attrs["macs_ratio"], t.values[self.accuracy_index])
            for t in trials
            if t.state == TrialState.COMPLETE
            and not t.user_attrs.get("over_budget")
            and "macs_ratio" in t.user_attrs
        )
        steps: list[tuple[float, float]] = []
        for macs, accuracy in points:
            best = max(accuracy, steps[-1][1]) if steps else accuracy
            if steps and steps[-1][0] == macs:
                steps[-1] = (macs, best)
            else:
                steps.append((macs, best))
        return steps

    def next_rung(self, trials: list[FrozenTrial]) -> int | None:
        """The rung to try next given the study's trials (None: none left to try)."""
        tried = {r for r in map(self.rung_of, trials) if r is not None}
        free = [i for i in range(len(self.rungs)) if i not in tried]
        if len(tried) >= self.plans or not free:
            return None
        cheapest = min(free, key=lambda i: self.rungs[i].macs)
        if not tried:
            return cheapest
        waiting = [i for i in self._probes() if i not in tried]
        if waiting:
            return waiting[0]
        steps = self._staircase(trials)
        if not steps:
            return cheapest
        top = max(rung.macs for rung in self.rungs)
        gaps = [(lo, hi, (hi - lo) * (b - a)) for (lo, a), (hi, b) in itertools.pairwise(steps)]
        if steps[-1][0] < top:  # above the dearest evaluated point: up to the baseline's accuracy
            rise = max(0.0, self.baseline_accuracy - steps[-1][1])
            gaps.append((steps[-1][0], top, (top - steps[-1][0]) * rise))
        for lo, hi, area in sorted(gaps, key=lambda gap: gap[2], reverse=True):
            inside = [
                i for i in free
                if lo < self.rungs[i].macs < hi or self.rungs[i].macs == hi == top
            ]  # fmt: skip
            if inside and area > 0:
                return min(inside, key=lambda i: abs(self.rungs[i].macs - (lo + hi) / 2))
        return None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """``study.optimize`` callback: enqueue the next rung unless one is waiting."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING and self.rung_of(t) is not None for t in trials):
            return
        self._enqueue(study, self.next_rung(trials))
