"""Multi-fidelity pruning of the proxy fine-tune: Optuna's pruner, one MAC band at a time.

With ``sampler.pruner`` set, the objective measures the validation accuracy at each rung
step of the distillation (:func:`~autodecomp.config.samplers.rung_steps`) and asks the
pruner (:func:`~autodecomp.config.samplers.make_pruner`) whether the trial goes on, so that
many candidates get a short fine-tune and the promising few the full one.

Two things differ from Optuna's single-objective recipe (``trial.report`` /
``trial.should_prune``, which Optuna refuses in multi-objective studies):

- the intermediate accuracies are kept in the user attribute ``rung_accuracy``
  (``{step: accuracy}``) and handed to the pruner on a copy of the trial, so Optuna never
  takes one of them for the value of a pruned trial of a study with several objectives;
- a candidate competes only with the candidates of its MAC band (``macs_ratio`` in
  ``(2**-(k+1), 2**-k]``): a cheaper plan is less accurate, and comparing it with dearer
  ones would prune the whole cheap end of the front.

The pruner keeps its per-rung records in the study's storage (system attributes), so
workers and a resumed study share them. Which trials get pruned depends on what ran before
them: a completed trial's accuracy does not (the intermediate evaluations change neither
the model nor the random streams).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Container
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ..core.optuna_compat import trial_id

__all__ = ["RUNG_ACCURACY", "mac_band", "rung_pruned"]

RUNG_ACCURACY = "rung_accuracy"  # user attribute: {step: validation accuracy at that rung}


def mac_band(macs_ratio: float) -> int:
    """The octave of ``macs_ratio`` (compressed / baseline MACs): band ``k`` holds
    ``(2**-(k+1), 2**-k]``; 0 also holds everything above 1."""
    return max(0, math.floor(-math.log2(max(macs_ratio, 1e-12))))


class _BandView:
    """What a pruner reads of a study: one maximised value and the trials of one MAC band."""

    direction = StudyDirection.MAXIMIZE

    def __init__(self, study: optuna.Study, storage: Any, band: int) -> None:
        self._study, self._storage, self.band = study, storage, band

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [
            t
            for t in self._study.get_trials(deepcopy=deepcopy, states=states)
            if "macs_ratio" in t.user_attrs and mac_band(t.user_attrs["macs_ratio"]) == self.band
        ]


def rung_pruned(
    pruner: optuna.pruners.BasePruner, trial: optuna.Trial, step: int, accuracy: float
) -> bool:
    """Record ``accuracy`` at ``step`` in the trial's ``rung_accuracy`` and ask ``pruner``
    whether the trial stops there (against the trials of its MAC band)."""
    frozen = trial.storage.get_trial(trial_id(trial))
    curve = {int(k): v for k, v in frozen.user_attrs.get(RUNG_ACCURACY, {}).items()}
    curve[step] = accuracy
    trial.set_user_attr(RUNG_ACCURACY, {str(k): v for k, v in sorted(curve.items())})
    view = copy.copy(frozen)
    view.intermediate_values = curve
    band = mac_band(frozen.user_attrs["macs_ratio"])
    return bool(pruner.prune(_BandView(trial.study, trial.storage, band), view))  # type: ignore[arg-type]
