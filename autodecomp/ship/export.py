"""Export a trial: rebuild, fine-tune and evaluate its compressed model, then save it.

The default ``torch`` format is :mod:`autodecomp.ship.model_file`'s (read back by
:func:`autodecomp.load`). ``--format torch-export`` writes a ``torch.export`` program
(``.pt2``, the metadata as the extra file ``autodecomp.json``; load with
``torch.export.load(path).module()``); ``--format onnx`` an ONNX file with the metadata in
``metadata_props`` (needs ``onnx`` and ``onnxscript``).

Polish: the search fits CP / PDP factors at search precision (``docs/solvers.md``); with
``--finetune-epochs`` > 0 export refits each such layer at full precision first, from the
search's factors (:func:`polished_plan`), as ``--polish`` forces and ``--no-polish`` turns
off. Without extra epochs (and no ``--polish``) the file holds exactly the trial's model.

``--best`` picks the trial instead of ``--trial N``: the best one under ``--max-drop`` /
``--max-macs`` / ``--max-params``, as ``autodecomp report`` answers the same query
(:func:`autodecomp.results.queries.best_trial`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import DataLoader

from ..compress.plan import PlanEntry
from ..compress.surgery import apply_plan, data_init_layers
from ..config import load_config
from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..decompositions import get_method
from ..measure.cost import count_macs, count_params
from ..results.queries import first_ranked, query_text, ranked_trials
from ..results.study_view import read_study
from ..search.baseline import cache_paths, load_baseline
from ..search.objective import data_init_stats
from ..search.study import prepare
from ..workload import train
from ..workload.data import DataSplits, make_loader
from ..workload.proxy import ProxyResult, proxy_distill, proxy_finetune, proxy_loader
from .model_file import explicit_plan, jsonable, save_model, versions

__all__ = ["FORMATS", "Exported", "configure_parser", "export_trial", "pick_best", "polished_plan"]

FORMATS = {"torch": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}
_log = logging.getLogger(__name__)


# ---- other formats ---------------------------------------------------------------------------
def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if fmt == "onnx" and missing:
        raise ConfigError(
            f"--format onnx needs the packages {' and '.join(missing)} (pip install onnx "
            "onnxscript); use --format torch or torch-export without them"
        )


def _example(meta: Mapping[str, Any]) -> tuple[tuple[torch.Tensor], tuple[dict[int, Any]]]:
    """A batch of two inputs and a dynamic batch dimension (any batch size at run time)."""
    return (torch.zeros(2, *meta["input_shape"]),), ({0: torch.export.Dim.AUTO},)


def _save_torch_export(model: nn.Module, path: Path, meta: Mapping[str, Any]) -> Path:
    example, dynamic = _example(meta)
    program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic)
    extra = {"autodecomp.json": json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return path


def _save_onnx(model: nn.Module, path: Path, meta: Mapping[str, Any]) -> Path:
    import onnx

    example, dynamic = _example(meta)

    def write(tmp: str) -> None:
        torch.onnx.export(
            model.eval(), example, tmp, input_names=["input"], output_names=["logits"],
            dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "autodecomp", json.dumps(meta, sort_keys=True)
        onnx.save(proto, tmp)

    atomic_write(path, write)
    return path


def _check_output(path: Path) -> None:
    """The output file can be written, checked before any work (nothing is left behind).

    Raises:
        ConfigError: ``path`` is a directory, lies under a file, or its folder (or the
            nearest existing folder above it) cannot be written.
    """
    if path.is_dir():
        raise ConfigError(
            f"-o {str(path)!r} is a directory; give a file path, e.g. {str(path / 'model.pt')!r}"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # atomic_write creates the missing folders
    if not folder.is_dir():
        raise ConfigError(f"-o {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as err:
        raise ConfigError(
            f"-o {str(path)!r}: cannot write in {str(folder)!r} ({err.strerror or err})"
        ) from None
    os.close(fd)
    os.unlink(probe)


# ---- exporting a trial -------------------------------------------------------------------------
def polished_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """``plan`` with ``precision: "full"`` added to every entry of a method that has that
    setting (its class's ``precisions``) and names no precision of its own."""
    out = dict(plan)
    for layer, raw in plan.items():
        entry = PlanEntry.from_dict(raw, layer)
        if not entry.decomposes or "precision" in entry.options:
            continue
        if "full" in getattr(get_method(entry.method), "precisions", ()):
            out[layer] = entry.to_dict() | {"precision": "full"}
    return out


@dataclass(frozen=True)
class Exported:
    """What :func:`export_trial` wrote: the file, its metadata and the in-memory model (CPU)."""

    path: Path
    meta: dict[str, Any]
    model: nn.Module


def _trial(study: Any, number: int) -> Any:
    front = ", ".join(str(t.number) for t in sorted(study.best_trials, key=lambda t: t.number))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None or trial.state != TrialState.COMPLETE or not trial.user_attrs.get("plan"):
        what = "does not exist" if trial is None else f"is {trial.state.name}, not COMPLETE"
        raise ConfigError(
            f"trial {number} of study {study.study_name!r} {what}; Pareto-front trials: "
            f"{front or 'none yet'}"
        )
    return trial


_REPLAYED = ("model", "data", "baseline", "proxy", "objectives", "seed")


def _check_config(study: Any, cfg: Any) -> None:
    """The sections an export replays must be those the study was searched with."""
    stored, now = study.user_attrs.get("config") or {}, jsonable(cfg.to_dict())
    for key in _REPLAYED:
        if key in stored and stored[key] != now[key]:
            raise ConfigError(
                f"study {cfg.name!r} was searched with another {key!r} section than the config "
                "has now; export needs the config the search ran with"
            )


def _finetune(
    cfg: Any,
    model: nn.Module,
    teacher: nn.Module,
    splits: DataSplits,
    val: DataLoader,
    number: int,
    epochs: int,
    lr: float | None,
) -> tuple[dict[str, Any], ProxyResult]:
    """Replay the search's proxy fine-tune (:func:`proxy_finetune`, the trial's seeds), then
    distil for ``epochs`` more passes over the training split (loader seeded
    ``seed + number + 2``, a fresh cosine schedule warming up for a tenth of it).

    Returns:
        What was done (for the file's ``source.finetune``) and the proxy's accuracies.
    """
    p, workers = cfg.proxy, cfg.data.num_workers
    lr = p.lr if lr is None else lr
    proxy = proxy_finetune(
        model,
        teacher,
        splits.train,
        val,
        p,
        seed=cfg.seed,
        number=number,
        device=cfg.device,
        num_workers=workers,
    )
    extra = proxy_loader(splits.train, p, cfg.seed + number + 2, num_workers=workers)
    steps = epochs * len(extra)
    if steps > 0:
        proxy_distill(
            model, teacher, extra, p, steps=steps, lr=lr, warmup=steps // 10, device=cfg.device
        )
    done = {"bn_batches": p.bn_batches, "proxy_steps": p.steps, "proxy_lr": p.lr,
            "epochs": epochs, "steps": steps, "lr": lr}  # fmt: skip
    return done, proxy


@dataclass(frozen=True)
class _Source:
    """What every exported candidate of one study shares: its stored trials, data and baseline."""

    study: Any
    splits: DataSplits
    baseline: Any
    val: DataLoader
    test: DataLoader


def _open(cfg: Any) -> _Source:
    study = read_study(cfg.storage, cfg.name)
    _check_config(study, cfg)
    cached = cfg.baseline.checkpoint or cache_paths(cfg)[0]
    if not Path(cached).exists():
        raise ConfigError(
            f"baseline {str(cached)!r} is missing: export needs the baseline the search used"
        )
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits, may_train=False)
    evaluate = cfg.proxy.eval_batch_size
    val = make_loader(prepared.splits.val, batch_size=evaluate, shuffle=False)
    test = make_loader(prepared.splits.test, batch_size=evaluate, shuffle=False)
    return _Source(study, prepared.splits, baseline, val, test)


def _rebuild(
    cfg: Any, source: _Source, frozen: Any, finetune_epochs: int, lr: float | None, polish: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Trial ``frozen``'s model, fine-tuned and evaluated (CPU, eval mode), and its metadata."""
    trial, plan = frozen.number, frozen.user_attrs["plan"]
    if frozen.user_attrs.get("over_budget"):
        _log.info(f"note: trial {trial} is over the study's budget (the search did not train it)")
    data_init = data_init_layers(plan)
    baseline = source.baseline
    stats = data_init_stats(cfg, baseline.model, source.splits, data_init) if data_init else None
    built = polished_plan(plan) if polish else plan
    model = apply_plan(baseline.model, built, calibration=stats)
    _log.info(f"trial {trial}: replaying the proxy fine-tune, then {finetune_epochs} more epochs")
    finetune, proxy = _finetune(
        cfg, model, baseline.model, source.splits, source.val, trial, finetune_epochs, lr
    )
    if built != plan:
        finetune["polish"] = True  # recorded only when done: other files keep their form
    searched = frozen.values[cfg.objectives.index("accuracy")]
    if built != plan:
        _log.info(
            f"trial {trial}: factors polished at full precision; the replayed proxy reaches "
            f"{proxy.accuracy:.4f} (the search's factors: {searched:.4f})"
        )
    elif proxy.accuracy != searched and not frozen.user_attrs.get("over_budget"):
        _log.warning(
            f"warning: the replayed proxy fine-tune reaches validation accuracy "
            f"{proxy.accuracy:.4f}, the search recorded {searched:.4f} (another device, "
            "thread count or library version?)"
        )
    evaluated = finetune["steps"]
    metrics = {
        "val_accuracy": (
            train.evaluate(model, source.val, device=cfg.device) if evaluated else proxy.accuracy
        ),
        "test_accuracy": train.evaluate(model, source.test, device=cfg.device),
        "search_val_accuracy": searched,
        "proxy_val_accuracy": proxy.accuracy,
    }
    model = model.cpu().eval()
    shape = list(baseline.input_shape)
    metrics |= {"macs": count_macs(model, shape), "params": count_params(model)}
    stored = source.study.user_attrs["baseline"]
    metrics |= {"baseline": {k: stored[k] for k in ("accuracy", "macs", "params")}}
    if (metrics["macs"], metrics["params"]) != (frozen.user_attrs.get("macs"),
                                                frozen.user_attrs.get("params")):  # fmt: skip
        _log.warning("warning: the rebuilt model's MACs / params differ from the study's figures")
    meta = {
        "model": {
            "name": cfg.model.name,
            "kwargs": dict(cfg.model.kwargs),
            "num_classes": source.splits.num_classes,
            "in_channels": shape[0],
        },
        "plan": explicit_plan(model, built),
        "search_plan": plan,
        "input_shape": shape,
        "metrics": metrics,
        "source": {"study": cfg.name, "trial": trial, "finetune": finetune},
        "versions": versions(),
    }
    return model, meta


def _rank(meta: Mapping[str, Any]) -> tuple[float, int]:
    """A shortlisted candidate's rank: validation accuracy after the fine-tune, then fewer MACs."""
    return meta["metrics"]["val_accuracy"], -meta["metrics"]["macs"]


def _shortlisted(candidates: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"trial {c['trial']} {c['val_accuracy']:.4f} (search {c['search_val_accuracy']:.4f})"
        for c in candidates
    )


def export_trial(
    cfg: Any,
    trial: int | Sequence[int],
    output: str | os.PathLike[str] | None = None,
    *,
    finetune_epochs: int = 0,
    lr: float | None = None,
    fmt: str = "torch",
    polish: bool | None = None,
) -> Exported:
    """Rebuild trial ``trial`` of a study from its plan and cached baseline, fine-tune it by
    distillation, evaluate it on the validation and test splits, and save it.

    Given several trial numbers (a shortlist, e.g. :func:`pick_best`'s), each is rebuilt and
    fine-tuned the same way and the one most accurate on the validation split afterwards is
    saved (ties: fewer MACs, then the earlier in the list); the file's ``source.shortlist``
    lists every candidate's validation accuracy, after the fine-tune and in the search.

    Args:
        cfg: the study's :class:`~autodecomp.config.StudyConfig` (storage, name, data, ...).
        trial: a COMPLETE trial's number, or several.
        output: the file (default ``<study folder>/export/trial-<N>`` + format suffix, N the
            first trial given).
        finetune_epochs: after replaying the search's proxy fine-tune (BN recalibration and
            ``proxy.steps`` distillation steps with the trial's seeds, which reproduces the
            study's validation accuracy on the same device), distil for this many more passes
            over the training split (a fresh cosine schedule).
        lr: peak learning rate of those epochs (default ``proxy.lr``).
        fmt: ``"torch"``, ``"torch-export"`` or ``"onnx"``.
        polish: refit the search-precision factors at full precision before the fine-tune
            (:func:`polished_plan`); ``None``: when ``finetune_epochs`` > 0. Without it the
            model is exactly the trial's.

    Returns:
        The file, its metadata (everything but the state dict) and the model.

    Raises:
        ConfigError: unknown trial or format, missing ONNX packages, no cached baseline, no
            trial given.
    """
    _check_format(fmt)
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    numbers = [trial] if isinstance(trial, int) else list(dict.fromkeys(trial))
    if not numbers:
        raise ConfigError("export needs a trial number; got an empty shortlist")
    path = Path(output) if output else cfg.folder / "export" / f"trial-{numbers[0]}{FORMATS[fmt]}"
    _check_output(path)
    source = _open(cfg)
    frozen = [_trial(source.study, n) for n in numbers]  # every number checked before work
    polish = finetune_epochs > 0 if polish is None else polish
    best: tuple[nn.Module, dict[str, Any]] | None = None
    candidates = []
    for one in frozen:
        model, meta = _rebuild(cfg, source, one, finetune_epochs, lr, polish)
        metrics = meta["metrics"]
        candidates.append({"trial": one.number, "val_accuracy": metrics["val_accuracy"],
                           "search_val_accuracy": metrics["search_val_accuracy"]})  # fmt: skip
        if best is None or _rank(meta) > _rank(best[1]):
            best = model, meta
    assert best is not None
    model, meta = best
    if len(numbers) > 1:
        meta["source"]["shortlist"] = candidates
        _log.info(f"shortlist: {_shortlisted(candidates)}; kept trial {meta['source']['trial']}")
    meta = jsonable(meta)
    if fmt == "torch":
        save_model(model, path, meta)
    elif fmt == "torch-export":
        _save_torch_export(model, path, meta)
    else:
        _save_onnx(model, path, meta)
    metrics = meta["metrics"]
    _log.info(
        f"wrote {path}: test accuracy {metrics['test_accuracy']:.4f} (val "
        f"{metrics['val_accuracy']:.4f}), {metrics['macs']:,} MACs, {metrics['params']:,} params"
    )
    return Exported(path, meta, model)


def pick_best(
    cfg: Any,
    *,
    max_drop: float | str | None = None,
    max_macs: float | str | None = None,
    max_params: float | str | None = None,
    shortlist: int = 1,
) -> list[int]:
    """The numbers of the study's best trials within the limits (those of ``autodecomp
    report``: :func:`~autodecomp.results.queries.best_trial` first), at most ``shortlist`` of
    them; says which it picked.

    Raises:
        ConfigError: a malformed limit, no trial within them, a shortlist below 1, or a
            shortlist with ``max_drop`` (that query ranks by size, a shortlist by accuracy).
    """
    if shortlist < 1:
        raise ConfigError(f"--shortlist must be >= 1, got {shortlist}")
    if shortlist > 1 and max_drop is not None:
        raise ConfigError(
            "--shortlist ranks by accuracy under --max-macs / --max-params; it does not go "
            "with --max-drop (which picks the smallest trial within the drop)"
        )
    query = {"max_macs": max_macs, "max_params": max_params, "max_drop": max_drop}  # as report
    study = read_study(cfg.storage, cfg.name)
    ranked = ranked_trials(study, **query)
    row = first_ranked(study, ranked)
    asked = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in query.items() if v is not None)
    if row is None:
        raise ConfigError(
            f"no trial of study {cfg.name!r} meets {asked or 'no limit'}; see the Pareto front "
            "with autodecomp report, or loosen the limits"
        )
    text = query_text(query, row)
    _log.info(f"--best picked {text if asked else 'the most accurate' + text}")
    numbers = [int(n) for n in ranked["number"][:shortlist]]
    if shortlist > 1:
        _log.info(f"--shortlist {shortlist}: trials {', '.join(map(str, numbers))}")
    return numbers


# ---- command line ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``autodecomp export`` arguments to ``parser``; returns the handler."""
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="the trial number to export")
    which.add_argument(
        "--best",
        action="store_true",
        help="export the best trial under --max-drop / --max-macs / --max-params (as report)",
    )
    parser.add_argument("--max-drop", help="with --best: within this accuracy drop (0.01, 1%%)")
    parser.add_argument("--max-macs", help="with --best: MACs <= this (0.5, 50%%, 0.5x, 300k)")
    parser.add_argument("--max-params", help="with --best: params <= this")
    parser.add_argument(
        "--shortlist",
        type=int,
        default=1,
        metavar="K",
        help="with --best: fine-tune the K most accurate trials within the limits and keep the "
        "one most accurate on validation afterwards (default 1; needs --finetune-epochs)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="E",
        help="after replaying the search's proxy fine-tune, distil E more epochs (default 0)",
    )
    parser.add_argument("--lr", type=float, help="peak fine-tune learning rate (default proxy.lr)")
    parser.add_argument(
        "--polish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refit CP / PDP factors at full precision before fine-tuning (default: when "
        "--finetune-epochs > 0; --no-polish keeps the trial's factors)",
    )
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        default="torch",
        dest="fmt",
        help="torch: for autodecomp.load (default); torch-export: .pt2; onnx: needs onnx",
    )
    parser.add_argument("-o", "--output", help="output file (default: <study>/export/trial-N.pt)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's)")
    parser.add_argument("--device", help="device for fine-tuning (default: the study's)")

    def run(args: argparse.Namespace) -> int:
        overrides = []
        if args.storage is not None:
            overrides.append(f"storage={json.dumps(args.storage)}")
        if args.device is not None:
            overrides.append(f"device={json.dumps(args.device)}")
        limits = {"max_drop": args.max_drop, "max_macs": args.max_macs,
                  "max_params": args.max_params}  # fmt: skip
        if not args.best and any(v is not None for v in limits.values()):
            raise ConfigError("--max-drop, --max-macs and --max-params go with --best, not --trial")
        if args.shortlist != 1 and not args.best:
            raise ConfigError("--shortlist goes with --best, not --trial")
        if args.shortlist > 1 and args.finetune_epochs < 1:
            raise ConfigError(
                "--shortlist needs --finetune-epochs >= 1: without more epochs every "
                "candidate's validation accuracy is the search's, so --best already picks"
            )
        cfg = load_config(args.study, overrides)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        export_trial(
            cfg,
            pick_best(cfg, **limits, shortlist=args.shortlist) if args.best else args.trial,
            args.output,
            finetune_epochs=args.finetune_epochs,
            lr=args.lr,
            fmt=args.fmt,
            polish=args.polish,
        )
        return 0

    return run
