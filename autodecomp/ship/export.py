"""Ship a trial: rebuild, fine-tune and evaluate its compressed model, save it, load it back.

The default format is one ``torch.save`` file of plain containers and tensors, so
:func:`load` reads it with ``torch.load(weights_only=True)`` (no arbitrary pickles)::

    {"format": "autodecomp-model", "format_version": 1,
     "model": {"name", "kwargs", "num_classes", "in_channels"},   # for get_model
     "plan": {layer: {"method", "rank"}},   # final explicit ranks (``module.rank``)
     "search_plan": {...},                  # the trial's plan as drawn (ratios)
     "input_shape": [C, H, W],
     "metrics": {"test_accuracy", "val_accuracy", "macs", "params", ...},
     "source": {"study", "trial", "finetune", ...},
     "versions": {"torch", "autodecomp", "python"},
     "state_dict": {...},
     "sha256": hex}

:func:`load` builds the dense skeleton with ``get_model`` and puts an uninitialised layer of
each planned method at its recorded rank in place (``empty_like``: the structure of a layer
is a function of its spec and final rank, so no original weight or factorisation is
needed), and shrinks each pruned shift block to its recorded direction-group sizes
(``{"method": "prune", "rank": sizes}``), then loads the state dict strictly. ``sha256``
covers the metadata and every tensor; a mismatch (an edited or corrupted file) is refused
before anything is built. It detects modification, it does not authenticate the author:
anyone can recompute it.

``--format torch-export`` writes a ``torch.export`` program (``.pt2``, the metadata as the
extra file ``autodecomp.json``; load with ``torch.export.load(path).module()``); ``--format
onnx`` an ONNX file with the metadata in ``metadata_props`` (needs ``onnx`` and
``onnxscript``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.prune import PRUNE, prune_to_sizes
from ..compress.replace import replace_module
from ..compress.surgery import KEEP
from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..decompositions import ConvSpec, DecomposedConv, get_method
from ..workload.models import get_model

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "Exported",
    "configure_parser",
    "explicit_plan",
    "export_trial",
    "load",
    "read_metadata",
    "rebuild",
    "save_model",
]

FORMAT = "autodecomp-model"
FORMAT_VERSION = 1
FORMATS = {"torch": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}


# ---- the file format -------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def explicit_plan(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{layer: {"method", "rank"}}`` with each planned layer's final rank (``module.rank``).

    Ratios resolve to ranks through the weights (e.g. ``shift`` spreads channels over slices
    by singular values, ``gkpd`` picks its factor shapes), so only the built layer knows
    the rank that reproduces its structure. A pruned shift block is recorded as
    ``{"method": "prune", "rank": its direction-group sizes}``; a pruned decomposed layer's
    rank already is its pruned structure.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, entry in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, DecomposedConv):
            out[name] = {"method": module.name, "rank": _jsonable(module.rank)}
        elif entry["method"] == PRUNE:
            out[name] = {"method": PRUNE, "rank": list(module.shift.group_sizes)}
        else:
            out[name] = {"method": KEEP}
    return out


def rebuild(meta: Mapping[str, Any]) -> nn.Module:
    """The model described by a file's metadata, with uninitialised weights.

    The global random state is left as it was (the skeleton's initialisation is discarded).
    """
    with torch.random.fork_rng(devices=[]):
        return _skeleton(meta)


def _skeleton(meta: Mapping[str, Any]) -> nn.Module:
    ref = meta["model"]
    model = get_model(
        ref["name"], num_classes=ref["num_classes"], in_channels=ref["in_channels"], **ref["kwargs"]
    )
    for name, entry in meta["plan"].items():  # blocks first, as apply_plan does
        if entry["method"] == PRUNE:
            replace_module(model, name, prune_to_sizes(model.get_submodule(name), entry["rank"]))
    for name, entry in meta["plan"].items():
        if entry["method"] in (KEEP, PRUNE):
            continue
        conv = model.get_submodule(name)
        cls, spec = get_method(entry["method"]), ConvSpec.from_conv(conv)
        layer = cls.empty_like(spec, cls.normalize_rank(spec, entry["rank"]), conv.weight)
        replace_module(model, name, layer)
    return model


def _digest(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (canonical JSON) and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from ..core.version import __version__

    return {"torch": str(torch.__version__), "autodecomp": __version__,
            "python": platform.python_version()}  # fmt: skip


def save_model(model: nn.Module, path: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
    """Write ``model`` in the ``torch`` format (atomically).

    Args:
        model: the compressed model; its state dict is saved from the CPU.
        path: the file to write.
        meta: ``model``, ``plan``, ``input_shape`` and optionally ``search_plan``,
            ``metrics``, ``source`` (JSON-serialisable); format and versions are added.
    """
    head = _jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    head.setdefault("versions", _versions())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    blob = {**head, "state_dict": state, "sha256": _digest(head, state)}
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return path


def _read(path: str | os.PathLike[str], map_location: Any) -> tuple[dict, dict]:
    path = Path(path)
    if path.suffix == ".pt2":
        raise ValueError(f"{path}: a torch.export program; load it with torch.export.load(path)")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: refusing to load: it holds Python objects beyond plain containers and "
            f"tensors, which weights_only=True forbids ({first})"
        ) from None
    except Exception as err:  # torch.load fails on foreign bytes with many exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{path}: not a model file written by autodecomp export ({first})"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a model file written by autodecomp export")
    if blob.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {blob.get('format_version')!r} is not supported "
            f"(this autodecomp reads version {FORMAT_VERSION})"
        )
    state, recorded = blob.pop("state_dict", None), blob.pop("sha256", None)
    if not isinstance(state, dict) or _digest(blob, state) != recorded:
        raise ValueError(
            f"{path}: integrity check failed: the SHA-256 of its metadata and weights does not "
            "match the one recorded at export (the file was modified or is corrupt); not loaded"
        )
    return blob, state


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified metadata of a ``torch``-format file (everything but the state dict)."""
    return _read(path, "cpu")[0]


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by ``autodecomp export`` (``torch`` format), in eval mode.

    Raises:
        ValueError: not such a file, an unsupported format version, a failed integrity
            check, or weights that do not fit the described model.
    """
    meta, state = _read(path, device)
    model = rebuild(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: weights do not fit the described model: {first}") from None
    return model.to(device).eval()


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


# ---- exporting a trial -------------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    """What :func:`export_trial` wrote: the file, its metadata and the in-memory model (CPU)."""

    path: Path
    meta: dict[str, Any]
    model: nn.Module


def _trial(study: Any, number: int) -> Any:
    from optuna.trial import TrialState

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
    stored, now = study.user_attrs.get("config") or {}, _jsonable(cfg.to_dict())
    for key in _REPLAYED:
        if key in stored and stored[key] != now[key]:
            raise ConfigError(
                f"study {cfg.name!r} was searched with another {key!r} section than the config "
                "has now; export needs the config the search ran with"
            )


def _finetune(cfg, model, teacher, splits, number: int, epochs: int, lr: float | None) -> dict:
    """Replay the search's proxy (BN recalibration and ``proxy.steps`` distillation steps with
    the trial's seeds), then distil for ``epochs`` more passes over the training split."""
    from ..workload import train
    from ..workload.data import make_loader

    p = cfg.proxy
    lr = p.lr if lr is None else lr

    def loader(seed: int):
        return make_loader(
            splits.train, batch_size=p.batch_size, shuffle=True, seed=seed,
            num_workers=cfg.data.num_workers, drop_last=len(splits.train) > p.batch_size,
        )  # fmt: skip

    def distill(batches, steps: int, lr: float, warmup: int) -> None:
        if steps > 0:
            train.distill(
                model, teacher, batches, steps=steps, lr=lr, temperature=p.temperature,
                alpha=p.alpha, weight_decay=p.weight_decay, device=cfg.device,
                warmup_steps=warmup,
            )  # fmt: skip

    train.set_seed(cfg.seed + number)
    if p.bn_batches > 0:
        train.recalibrate_bn(
            model, loader(cfg.seed + number), batches=p.bn_batches, device=cfg.device
        )
    distill(loader(cfg.seed + number + 1), p.steps, p.lr, p.warmup)
    extra = loader(cfg.seed + number + 2)
    steps = epochs * len(extra)
    distill(extra, steps, lr, steps // 10)
    return {"bn_batches": p.bn_batches, "proxy_steps": p.steps, "proxy_lr": p.lr,
            "epochs": epochs, "steps": steps, "lr": lr}  # fmt: skip


def export_trial(
    cfg: Any,
    trial: int,
    output: str | os.PathLike[str] | None = None,
    *,
    finetune_epochs: int = 0,
    lr: float | None = None,
    fmt: str = "torch",
    log: Callable[[str], Any] = print,
) -> Exported:
    """Rebuild trial ``trial`` of a study from its plan and cached baseline, fine-tune it by
    distillation, evaluate it on the validation and test splits, and save it.

    Args:
        cfg: the study's :class:`~autodecomp.config.StudyConfig` (storage, name, data, ...).
        trial: a COMPLETE trial's number.
        output: the file (default ``<study folder>/export/trial-<N>`` + format suffix).
        finetune_epochs: after replaying the search's proxy fine-tune (BN recalibration and
            ``proxy.steps`` distillation steps with the trial's seeds, which reproduces the
            study's validation accuracy on the same device), distil for this many more passes
            over the training split (a fresh cosine schedule).
        lr: peak learning rate of those epochs (default ``proxy.lr``).
        fmt: ``"torch"``, ``"torch-export"`` or ``"onnx"``.
        log: receives progress lines.

    Returns:
        The file, its metadata (everything but the state dict) and the model.

    Raises:
        ConfigError: unknown trial or format, missing ONNX packages, no cached baseline.
    """
    from ..compress.surgery import apply_plan, data_init_layers
    from ..measure.cost import count_macs, count_params
    from ..results.report import read_study
    from ..search.baseline import cache_paths, load_baseline
    from ..search.objective import data_init_stats
    from ..search.study import prepare
    from ..workload import train
    from ..workload.data import make_loader

    _check_format(fmt)
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    study = read_study(cfg.storage, cfg.name)
    frozen = _trial(study, trial)
    _check_config(study, cfg)
    cached = cfg.baseline.checkpoint or cache_paths(cfg)[0]
    if not Path(cached).exists():
        raise ConfigError(
            f"baseline {str(cached)!r} is missing: export needs the baseline the search used"
        )
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits, log=log)
    plan = frozen.user_attrs["plan"]
    if frozen.user_attrs.get("over_budget"):
        log(f"note: trial {trial} is over the study's budget (the search did not train it)")
    data_init = data_init_layers(plan)
    stats = data_init_stats(cfg, baseline.model, prepared.splits, data_init) if data_init else None
    model = apply_plan(baseline.model, plan, calibration=stats)
    log(f"trial {trial}: replaying the proxy fine-tune, then {finetune_epochs} more epochs")
    finetune = _finetune(cfg, model, baseline.model, prepared.splits, trial, finetune_epochs, lr)
    evaluate = cfg.proxy.eval_batch_size
    val = make_loader(prepared.splits.val, batch_size=evaluate, shuffle=False)
    test = make_loader(prepared.splits.test, batch_size=evaluate, shuffle=False)
    metrics = {
        "val_accuracy": train.evaluate(model, val, device=cfg.device),
        "test_accuracy": train.evaluate(model, test, device=cfg.device),
        "search_val_accuracy": frozen.values[cfg.objectives.index("accuracy")],
    }
    model = model.cpu().eval()
    shape = list(baseline.input_shape)
    metrics |= {"macs": count_macs(model, shape), "params": count_params(model)}
    stored = study.user_attrs["baseline"]
    metrics |= {"baseline": {k: stored[k] for k in ("accuracy", "macs", "params")}}
    if (metrics["macs"], metrics["params"]) != (frozen.user_attrs.get("macs"),
                                                frozen.user_attrs.get("params")):  # fmt: skip
        log("warning: the rebuilt model's MACs / params differ from the study's figures")
    meta = {
        "model": {
            "name": cfg.model.name,
            "kwargs": dict(cfg.model.kwargs),
            "num_classes": prepared.splits.num_classes,
            "in_channels": shape[0],
        },
        "plan": explicit_plan(model, plan),
        "search_plan": plan,
        "input_shape": shape,
        "metrics": metrics,
        "source": {"study": cfg.name, "trial": trial, "finetune": finetune},
        "versions": _versions(),
    }
    meta = _jsonable(meta)
    path = Path(output) if output else cfg.folder / "export" / f"trial-{trial}{FORMATS[fmt]}"
    if fmt == "torch":
        save_model(model, path, meta)
    elif fmt == "torch-export":
        _save_torch_export(model, path, meta)
    else:
        _save_onnx(model, path, meta)
    log(
        f"wrote {path}: test accuracy {metrics['test_accuracy']:.4f} (val "
        f"{metrics['val_accuracy']:.4f}), {metrics['macs']:,} MACs, {metrics['params']:,} params"
    )
    return Exported(path, meta, model)


# ---- command line ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``autodecomp export`` arguments to ``parser``; returns the handler."""
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    parser.add_argument("--trial", type=int, required=True, help="the trial number to export")
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="E",
        help="after replaying the search's proxy fine-tune, distil E more epochs (default 0)",
    )
    parser.add_argument("--lr", type=float, help="peak fine-tune learning rate (default proxy.lr)")
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
        from ..config import load_config

        overrides = []
        if args.storage is not None:
            overrides.append(f"storage={json.dumps(args.storage)}")
        if args.device is not None:
            overrides.append(f"device={json.dumps(args.device)}")
        cfg = load_config(args.study, overrides)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        export_trial(
            cfg,
            args.trial,
            args.output,
            finetune_epochs=args.finetune_epochs,
            lr=args.lr,
            fmt=args.fmt,
        )
        return 0

    return run
