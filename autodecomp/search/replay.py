"""``autodecomp replay``: re-run one stored trial and set its figures beside the stored ones.

The trial is rebuilt from what the study stored: its config (``config`` user attribute, the
study folder being where ``study.yaml`` is now), the cached baseline (trained again by the
stored recipe if the cache is missing), and the trial's parameters, which the search's own
:class:`~autodecomp.search.objective.Objective` turns into a plan, a compressed model, its
MACs and parameters and the proxy fine-tune, with the trial's number (every per-trial seed
derives from it, :mod:`autodecomp.search.seeds`). Factorisations are computed afresh (the
study's factor cache is not read). Nothing is written to the study.

On the machine, device, thread count and library versions that ran the trial the figures
are equal bit for bit; elsewhere the accuracy may differ (floating-point sums in another
order), and :func:`format_replay` shows where the environment differs from the one the
study recorded when it was created.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import optuna
import torch
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from ..config import StudyConfig, config_from_dict
from ..core.errors import ConfigError
from ..workload.runtime import environment
from .baseline import load_baseline
from .objective import CATCH, Objective
from .storage import open_storage_readonly, shown
from .study import flat_config, prepare, quiet_optuna

__all__ = ["FIGURES", "Replayed", "environment_changes", "format_replay", "replay_trial"]

_log = logging.getLogger(__name__)

FIGURES = ("accuracy", "macs", "params")  # compared between the study and the replay


@dataclass(frozen=True)
class Replayed:
    """One trial's stored and replayed figures (``FIGURES``), and where each ran."""

    study: str
    number: int
    stored: dict[str, float]
    replayed: dict[str, float]
    baseline: tuple[float, float]  # stored, replayed validation accuracy of the baseline
    stored_environment: dict[str, Any] | None  # None: the study recorded none (older version)
    environment: dict[str, Any]
    outcome: str | None = None  # why the replay did not complete (pruned, failed), if it did not

    @property
    def equal(self) -> bool:
        """Whether the replay completed with exactly the stored figures."""
        return self.outcome is None and all(self.stored[k] == self.replayed.get(k) for k in FIGURES)


def _load_study(url: str, name: str) -> optuna.Study:
    storage = open_storage_readonly(url)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise ConfigError(
            f"storage {shown(url)} has no study {name!r} (studies there: "
            f"{', '.join(names) or 'none'})"
        )
    return optuna.load_study(study_name=name, storage=storage)


def _complete_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None or trial.state != TrialState.COMPLETE:
        done = [n for n, t in sorted(trials.items()) if t.state == TrialState.COMPLETE]
        what = "does not exist" if trial is None else f"is {trial.state.name}, not COMPLETE"
        shown_done = ", ".join(map(str, done[:20])) + (", ..." if len(done) > 20 else "")
        raise ConfigError(
            f"trial {number} of study {study.study_name!r} {what}; COMPLETE trials: "
            f"{shown_done or 'none'}"
        )
    return trial


def _stored_config(study: optuna.Study, cfg: StudyConfig, device: str | None) -> StudyConfig:
    """The config the study stored (in ``cfg``'s folder and storage), on ``device``."""
    stored = study.user_attrs.get("config") or cfg.to_dict()
    out = replace(config_from_dict(stored, cfg.folder, device=device), storage=cfg.storage)
    if device is None and out.device.startswith("cuda") and not torch.cuda.is_available():
        out = replace(out, device="cpu")  # a GPU study checked on a machine without one
    return out


def _stored_figures(cfg: StudyConfig, trial: FrozenTrial) -> dict[str, float]:
    attrs = trial.user_attrs
    return {
        "accuracy": trial.values[cfg.objectives.index("accuracy")],
        "macs": attrs.get("macs", math.nan),
        "params": attrs.get("params", math.nan),
    }


def replay_trial(
    cfg: StudyConfig,
    number: int,
    *,
    device: str | None = None,
) -> Replayed:
    """Re-run trial ``number`` of the study ``cfg`` names, from what the study stored.

    Args:
        cfg: the study's config as ``study.yaml`` has it now (its name, folder and storage
            are used; the rest comes from the config stored on the study).
        number: a COMPLETE trial's number.
        device: run on this device (default: the stored one; the CPU when that is a GPU
            this machine lacks).

    Raises:
        ConfigError: no such study or trial, or the trial is not COMPLETE.
    """
    with quiet_optuna():
        study = _load_study(cfg.storage, cfg.name)
        frozen = _complete_trial(study, number)
    run_cfg = _stored_config(study, cfg, device)
    prepared = prepare(run_cfg)
    baseline = load_baseline(run_cfg, prepared.model, prepared.splits)
    objective = Objective(run_cfg, prepared.space, baseline, prepared.splits)
    trial = FixedTrial(dict(frozen.params), number)
    threads = torch.get_num_threads()
    plural = "" if threads == 1 else "s"
    _log.info(f"trial {number}: replaying on {run_cfg.device} ({threads} thread{plural})")
    outcome = None
    replayed: dict[str, float] = {}
    try:
        values = objective(trial)  # type: ignore[arg-type]
        replayed["accuracy"] = values[run_cfg.objectives.index("accuracy")]
    except optuna.TrialPruned as err:
        outcome = f"pruned: {err}"
    except CATCH as err:
        outcome = f"failed: {type(err).__name__}: {err}"
    for key in ("macs", "params"):
        if key in trial.user_attrs:
            replayed[key] = trial.user_attrs[key]
    stored_baseline = (study.user_attrs.get("baseline") or {}).get("accuracy", math.nan)
    return Replayed(
        study=cfg.name,
        number=number,
        stored=_stored_figures(run_cfg, frozen),
        replayed=replayed,
        baseline=(stored_baseline, baseline.accuracy),
        stored_environment=study.user_attrs.get("environment"),
        environment=environment(run_cfg.device),
        outcome=outcome,
    )


def environment_changes(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: stored -> now`` for every recorded detail (versions, device, threads, ...) that
    differs; seeds are left out (the replay uses the stored ones)."""
    old = flat_config({k: v for k, v in stored.items() if k != "seeds"})
    new = flat_config(now)
    return [
        f"{key}: {old.get(key, '-')} -> {new.get(key, '-')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def _shown(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return repr(float(value)) if key == "accuracy" else f"{int(value):,}"


def format_replay(result: Replayed) -> str:
    """The stored and replayed figures side by side, then what differs and why it may."""
    rows = [("", "stored", "replayed", "")]
    for key in FIGURES:
        old, new = result.stored.get(key), result.replayed.get(key)
        mark = "equal" if old == new else ("DIFFERS" if new is not None else "-")
        rows.append((key, _shown(key, old), _shown(key, new), mark))
    old, new = result.baseline
    rows.append(("baseline accuracy", _shown("accuracy", old), _shown("accuracy", new),
                 "equal" if old == new else "DIFFERS"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"study {result.study!r}, trial {result.number}:"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  " + "  ".join([*cells, row[3]]))
    if result.outcome is not None:
        lines.append(f"the replay did not complete: {result.outcome}")
    if result.stored_environment is None:
        lines.append("the study recorded no environment (created by an older autodecomp)")
    else:
        changes = environment_changes(result.stored_environment, result.environment)
        if changes:
            lines.append("environment differs from the study's creation:")
            lines += [f"  {change}" for change in changes]
        else:
            lines.append("environment: as recorded when the study was created")
    verdict = "reproduced exactly" if result.equal else "NOT reproduced exactly"
    lines.append(verdict)
    return "\n".join(lines).rstrip()
