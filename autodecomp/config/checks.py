"""The small validators of configuration values, and settings declared with their check.

Every validator returns the checked (possibly converted) value or raises a one-line
:class:`ConfigError` naming the bad value, where it is (its dotted key) and what is valid.
A dataclass field declared with :func:`setting` carries its :data:`Check`; :func:`section`
builds such a dataclass from a raw mapping, so each setting is declared once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..core.budget import parse_budget
from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = [
    "DEVICE_AUTO",
    "Check",
    "at_least",
    "boolean",
    "budget",
    "budgets",
    "choice",
    "device",
    "existing_path",
    "flag",
    "integer",
    "known",
    "local_path",
    "mapping",
    "number",
    "one_of",
    "optional",
    "positive",
    "registered",
    "section",
    "setting",
    "show",
    "string",
    "strings",
    "table",
    "text",
    "within",
]

DEVICE_AUTO = "auto"
_T = TypeVar("_T")

Check = Callable[[Any, str, Path | None], Any]
"""A setting's check: ``check(value, where, folder) -> value to store``.

``where`` is the dotted key shown in messages; ``folder`` is the study folder that relative
paths start from (``None`` outside a study file).
"""


# ---- validators ------------------------------------------------------------------------------
def show(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def one_of(value: Any, where: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a one-line error naming them."""
    if value not in choices:
        raise ConfigError(f"unknown {where} {show(value)}; valid: {', '.join(choices)}")
    return value


def registered(value: Any, registry: Registry[Any]) -> str:
    """``value`` if it is a name in ``registry``; else an error listing them as registered."""
    if not (isinstance(value, str) and value in registry):
        names = ", ".join(name for name, _ in registry.in_order())
        raise ConfigError(f"unknown {registry.kind} {show(value)}; valid {registry.kind}s: {names}")
    return value


def mapping(raw: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """``raw`` as a mapping (``None``: empty) whose keys are all in ``allowed``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {show(raw)}")
    allowed = list(allowed)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: {', '.join(allowed)}")
    return raw


def integer(value: Any, where: str, minimum: int = 0) -> int:
    """An ``int`` (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {show(value)}")
    return value


def number(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A number (not a bool) in ``[lo, hi]``, as a float."""
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not (lo <= out <= hi):
        raise ConfigError(f"{where} must be a number in [{lo}, {hi}], got {show(value)}")
    return out


def boolean(value: Any, where: str) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {show(value)}")
    return value


def string(value: Any, where: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {show(value)}")
    return value


def strings(value: Any, where: str) -> tuple[str, ...]:
    """A string or a list of strings, as a tuple."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where} must be a string or a list of strings, got {show(value)}")
    return tuple(string(v, where) for v in value)


def local_path(value: Any, where: str, folder: Path, *, must_exist: bool = True) -> Path:
    """A path (``~`` expanded, relative to ``folder``), normalised; it must exist by default."""
    path = Path(os.path.expanduser(string(value, where)))
    path = path if path.is_absolute() else (folder / path)
    path = Path(os.path.normpath(path))
    if must_exist and not path.exists():
        raise ConfigError(f"{where}: path {str(path)!r} does not exist")
    return path


def device(raw: Any) -> str:
    """A torch device name the machine has; ``auto`` picks ``cuda`` when available."""
    name = string(raw, "device")
    if name == DEVICE_AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    return name


# ---- settings: a dataclass field with its check ----------------------------------------------
def setting(
    default: Any = MISSING, *, check: Check, factory: Callable[[], Any] | None = None
) -> Any:
    """A dataclass field whose value, read from a config file, goes through ``check``.

    Args:
        default: the default value (none: the key is required).
        check: the field's :data:`Check`.
        factory: a default factory instead of ``default`` (mutable defaults).
    """
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _required(item: Field) -> bool:
    return item.default is MISSING and item.default_factory is MISSING


def section(cls: type[_T], raw: Any, where: str, folder: Path | None = None) -> _T:
    """Build the dataclass ``cls`` (fields declared with :func:`setting`) from ``raw``.

    Unknown keys are refused; each given value goes through its field's check, and a
    required key that is missing is checked as ``None`` (so its message names it).
    """
    checks = {item.name: item.metadata["check"] for item in fields(cls)}
    raw = mapping(raw, where, checks)
    missing = {item.name: None for item in fields(cls) if _required(item) and item.name not in raw}
    values = {**raw, **missing}
    return cls(
        **{key: checks[key](value, f"{where}.{key}", folder) for key, value in values.items()}
    )


# ---- checks of settings ----------------------------------------------------------------------
def at_least(minimum: int) -> Check:
    """An integer >= ``minimum``."""
    return lambda value, where, _: integer(value, where, minimum)


def within(lo: float = -math.inf, hi: float = math.inf) -> Check:
    """A number in ``[lo, hi]``."""
    return lambda value, where, _: number(value, where, lo, hi)


def choice(choices: Sequence[str]) -> Check:
    """One of ``choices``."""
    return lambda value, where, _: one_of(value, where, choices)


def known(registry: Registry[Any]) -> Check:
    """A name registered in ``registry``."""
    return lambda value, where, _: registered(value, registry)


def optional(check: Check) -> Check:
    """``None``, or a value passing ``check``."""
    return lambda value, where, folder: None if value is None else check(value, where, folder)


def positive(value: Any, where: str, folder: Path | None = None) -> float:
    """A number > 0."""
    return number(value, where, lo=1e-12)


def text(value: Any, where: str, folder: Path | None = None) -> str:
    """A non-empty string."""
    return string(value, where)


def flag(value: Any, where: str, folder: Path | None = None) -> bool:
    """``true`` or ``false``."""
    return boolean(value, where)


def table(value: Any, where: str, folder: Path | None = None) -> dict[str, Any]:
    """Free keyword arguments: a mapping (``None``: empty), stored as a ``dict``."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {show(value)}")
    return dict(value)


def budget(value: Any, where: str, folder: Path | None = None) -> float | None:
    """A MAC / parameter budget (:func:`autodecomp.core.budget.parse_budget`), or ``None``."""
    return parse_budget(value, where)


def budgets(value: Any, where: str, folder: Path | None = None) -> tuple[float, ...]:
    """A list of MAC / parameter budgets (:func:`budget`; ``None``: empty), ascending, each once."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        value = [value]
    return tuple(sorted({parse_budget(v, where) for v in value}))


def existing_path(value: Any, where: str, folder: Path | None = None) -> Path:
    """An existing path, relative to the study folder (the working directory without one)."""
    return local_path(value, where, Path.cwd() if folder is None else folder)
