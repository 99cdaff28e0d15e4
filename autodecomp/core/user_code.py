"""User code named ``"package.module:callable"`` (models, data sets): found and called with
every failure turned into one line that names it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["call_user", "import_callable", "one_line"]


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def import_callable(name: str, what: str) -> Callable[..., Any]:
    """The callable ``"package.module:callable"``; ``what`` names it in errors ("model").

    Raises:
        ValueError: the import fails (it runs the module: anything may raise) or the
            attribute is missing or not callable.
    """
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as err:
        raise ValueError(f"cannot import {what} {name!r}: {one_line(err)}") from None
    if not callable(fn):
        raise ValueError(f"{what} {name!r} is a {type(fn).__name__}, not a callable")
    return fn


def call_user(fn: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """``fn(**kwargs)``; whatever it raises becomes a one-line ``ValueError`` naming it."""
    try:
        return fn(**kwargs)
    except Exception as err:
        raise ValueError(f"{what} {name!r} raised {one_line(err)}") from None
