"""The config stored on a study (``StudyConfig.to_dict()``) back as a :class:`StudyConfig`.

Stored values were validated when the study was created; they are rebuilt by the type
annotations of the dataclasses, paths relative to the study folder. Studies written by
earlier versions load as long as their keys still exist.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..core.errors import ConfigError
from .checks import device as check_device
from .checks import mapping
from .schema import StudyConfig

__all__ = ["config_from_dict"]


def _rebuild(kind: Any, value: Any, folder: Path, where: str) -> Any:
    """Inverse of ``to_dict`` (``asdict`` made JSON-able) for a value annotated ``kind``."""
    origin, args = get_origin(kind), get_args(kind)
    if value is None:
        return None
    if origin in (Union, types.UnionType):  # X | None
        return _rebuild(next(a for a in args if a is not type(None)), value, folder, where)
    if kind is Path:
        return Path(os.path.normpath(folder / value))
    if is_dataclass(kind):
        hints = get_type_hints(kind)
        mapping(value, where, [f.name for f in fields(kind)])
        return kind(**{k: _rebuild(hints[k], v, folder, f"{where}.{k}") for k, v in value.items()})
    if origin is tuple:
        return tuple(_rebuild(args[0], item, folder, where) for item in value)
    if origin is dict:
        return {k: _rebuild(args[1], item, folder, f"{where}.{k}") for k, item in value.items()}
    return value


def config_from_dict(
    stored: Mapping[str, Any], folder: str | os.PathLike[str], *, device: str | None = None
) -> StudyConfig:
    """Rebuild the :class:`StudyConfig` stored on a study (the inverse of ``to_dict``).

    Args:
        stored: ``StudyConfig.to_dict()`` output, e.g. a study's ``config`` user attribute.
        folder: the study folder; the stored paths are relative to it.
        device: replaces the stored device (validated like ``device`` in ``study.yaml``).
    """
    folder = Path(folder).expanduser().resolve()
    try:
        cfg = _rebuild(StudyConfig, {**stored, "folder": "."}, folder, "stored config")
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"stored config does not fit this version of autodecomp: {err}") from None
    return cfg if device is None else replace(cfg, device=check_device(device))
