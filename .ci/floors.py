"""Print ``name==floor`` for every runtime dependency in pyproject.toml, one a line.

The floor is the version the dependency's ``>=`` bound names: .ci/run installs these and runs
a fast subset of the tests on them, so a lower bound is never a guess. A dependency without
a ``>=`` bound is an error (every declared dependency has a tested floor).

Usage: ``python .ci/floors.py [--skip NAME ...]`` (skipped names: installed otherwise);
``--check``: print the version of each that this Python imports, and fail unless it is the floor.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

__all__ = ["check", "floors"]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floors(pyproject: Path = PYPROJECT, skip: frozenset[str] = frozenset()) -> list[str]:
    """``name==version`` per runtime dependency of ``pyproject``, except those in ``skip``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = []
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.name in skip:
            continue
        lower = [s.version for s in req.specifier if s.operator in (">=", "~=", "==")]
        if len(lower) != 1:
            raise SystemExit(f"{pyproject}: {text!r} needs one lower bound (>=) to test")
        pins.append(f"{req.name}=={lower[0]}")
    return pins


def check(pins: list[str]) -> list[str]:
    """The pins whose package this Python does not import at exactly that version."""
    wrong = []
    for pin in pins:
        name, floor = pin.split("==")
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "missing"
        ok = found != "missing" and found in SpecifierSet(f"=={floor}")
        print(f"{name:14s} floor {floor:22s} imported {found}{'' if ok else '  <- not the floor'}")
        wrong += [] if ok else [pin]
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], help="dependencies to leave out")
    parser.add_argument("--check", action="store_true", help="check the imported versions")
    args = parser.parse_args(argv)
    pins = floors(skip=frozenset(args.skip))
    if args.check:
        return 1 if check(pins) else 0
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
