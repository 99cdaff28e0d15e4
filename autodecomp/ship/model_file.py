"""The model file: what `autodecomp export` writes and :func:`load` reads back.

The ``torch`` format is one ``torch.save`` file of plain containers and tensors, so
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
before anything is built. It detects corruption, it does not authenticate the author: anyone
can rewrite a file and recompute it. So the model a file names is only built when it is a
registered or torchvision model; a ``"package.module:callable"`` (which imports and runs that
code) needs ``trust_code=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.plan import KEEP, PRUNE, PlanEntry
from ..compress.surgery import skeleton
from ..core.files import atomic_write
from ..core.version import __version__
from ..decompositions import DecomposedConv
from ..workload.models import get_model, is_builtin_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "check_trusted",
    "explicit_plan",
    "jsonable",
    "load",
    "read_metadata",
    "rebuild",
    "save_model",
    "versions",
]

FORMAT = "autodecomp-model"
FORMAT_VERSION = 1


def jsonable(value: Any) -> Any:
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
    for name, raw in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, DecomposedConv):
            entry = PlanEntry(module.name, rank=jsonable(module.rank))
        elif PlanEntry.from_dict(raw, name).method == PRUNE:
            entry = PlanEntry(PRUNE, rank=list(module.shift.group_sizes))
        else:
            entry = PlanEntry(KEEP)
        out[name] = entry.to_dict()
    return out


def check_trusted(
    meta: Mapping[str, Any], *, trust_code: bool = False, where: str = "model file"
) -> None:
    """Refuse metadata naming a model that building would run code for, unless trusted.

    Registered and torchvision models are built by this package's own code; anything else
    (``"package.module:callable"``) imports and calls what the file names.

    Raises:
        ValueError: such a model without ``trust_code``.
    """
    name = meta["model"]["name"]
    if trust_code or is_builtin_model(name):
        return
    raise ValueError(
        f"{where}: refusing to build model {name!r}: it is not a registered or torchvision "
        "model, so building it would import and run code named by the file (whose SHA-256 "
        "detects corruption, not who wrote it); pass trust_code=True only for a file from a "
        "source you trust"
    )


def rebuild(meta: Mapping[str, Any], *, trust_code: bool = False) -> nn.Module:
    """The model described by a file's metadata, with uninitialised weights.

    The global random state is left as it was (the skeleton's initialisation is discarded).

    Args:
        meta: a file's metadata (:func:`read_metadata`).
        trust_code: build a ``"package.module:callable"`` model too (see :func:`check_trusted`).
    """
    check_trusted(meta, trust_code=trust_code)
    with torch.random.fork_rng(devices=[]):
        return _skeleton(meta)


def _skeleton(meta: Mapping[str, Any]) -> nn.Module:
    """The dense model of ``meta`` with its explicit plan's structure, unfitted
    (:func:`~autodecomp.compress.surgery.skeleton`)."""
    ref = meta["model"]
    model = get_model(
        ref["name"], num_classes=ref["num_classes"], in_channels=ref["in_channels"], **ref["kwargs"]
    )
    return skeleton(model, meta["plan"])


def _digest(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (canonical JSON) and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
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
    head = jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    head.setdefault("versions", versions())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    blob = {**head, "state_dict": state, "sha256": _digest(head, state)}
    path = Path(path)
    atomic_write(path, lambda tmp: _save(blob, tmp))
    return path


def _save(blob: dict[str, Any], tmp: str) -> None:
    """``torch.save`` through a file object: the archive's inner folder is then the fixed
    ``archive``, not the temporary file's random name, so equal models give equal bytes."""
    with open(tmp, "wb") as handle:
        torch.save(blob, handle)


def _read(path: str | os.PathLike[str], map_location: Any) -> tuple[dict, dict]:
    path = Path(path)
    if path.suffix == ".pt2":
        raise ValueError(f"{path}: a torch.export program; load it with torch.export.load(path)")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise ValueError(
                f"{path}: not a model file written by autodecomp export (unreadable pickle data)"
            ) from None
        raise ValueError(
            f"{path}: refusing to load: it holds a pickled {found[1]}, and Python objects beyond "
            "plain containers and tensors are never unpickled (weights_only)"
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
    _check_fields(blob, path)
    return blob, state


_MODEL_FIELDS = {"name": str, "kwargs": dict, "num_classes": int, "in_channels": int}


def _check_fields(meta: Mapping[str, Any], path: Path) -> None:
    """The fields :func:`rebuild` reads have the types it expects."""
    ref = meta.get("model")
    bad = (
        ["model"]
        if not isinstance(ref, dict)
        else [f"model.{k}" for k, kind in _MODEL_FIELDS.items() if not isinstance(ref.get(k), kind)]
    )
    bad += [] if isinstance(meta.get("plan"), dict) else ["plan"]
    if bad:
        raise ValueError(f"{path}: not a valid model file (bad or missing {', '.join(bad)})")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified metadata of a ``torch``-format file (everything but the state dict)."""
    return _read(path, "cpu")[0]


def load(
    path: str | os.PathLike[str],
    *,
    trust_code: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model written by ``autodecomp export`` (``torch`` format), in eval mode.

    Args:
        path: the file.
        trust_code: also build a model the file names as ``"package.module:callable"``,
            which imports and runs that code. Off by default: the file's SHA-256 detects
            corruption but anyone can recompute it, so only registered and torchvision
            models are built unless you trust the file's source.
        device: where to put the model.

    Raises:
        ValueError: not such a file, an unsupported format version, a failed integrity
            check, a model needing ``trust_code``, or weights that do not fit the model.
    """
    meta, state = _read(path, device)
    check_trusted(meta, trust_code=trust_code, where=str(path))
    try:
        model = rebuild(meta, trust_code=True)
    except (ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: cannot build the described model: {first}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: weights do not fit the described model: {first}") from None
    return model.to(device).eval()
