"""Command line: ``autodecomp <command> ...``.

Each subcommand is one function decorated with :func:`command`: it adds its arguments to
its parser and returns the handler ``run(args) -> exit status``. Invalid input ends with
one line ``autodecomp: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .config import ConfigError

__all__ = ["command", "main"]

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``fn(parser) -> handler`` as the subcommand ``name``."""

    def decorate(fn: Callable[[argparse.ArgumentParser], Handler]):
        if name in _COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        _COMMANDS[name] = (help, fn)
        return fn

    return decorate


@command("search", help="run or resume a search study and write its Pareto tables")
def _search(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    parser.add_argument("--trials", type=int, help="total trial count (overrides 'trials')")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in the folder)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set proxy.steps=50 (value parsed as YAML)",
    )

    def run(args: argparse.Namespace) -> int:
        from .config import load_config
        from .study import run_search

        overrides = list(args.overrides)
        if args.trials is not None:
            if args.trials < 1:
                raise ConfigError(f"--trials must be >= 1, got {args.trials}")
            overrides.append(f"trials={args.trials}")
        if args.storage is not None:
            overrides.append(f"storage={json.dumps(args.storage)}")
        result = run_search(load_config(args.study, overrides))
        return 130 if result.interrupted else 0

    return run


@command("report", help="Pareto tables, hypervolume, best-trial queries and plots of a study")
def _report(parser: argparse.ArgumentParser) -> Handler:
    from .report import configure_parser

    return configure_parser(parser)


@command("export", help="rebuild, fine-tune, evaluate and save one trial's compressed model")
def _export(parser: argparse.ArgumentParser) -> Handler:
    from .export import configure_parser

    return configure_parser(parser)


_TYPICAL_LAYERS = {  # label: ConvSpec.create arguments
    "3x3": ((64, 64, 3), {"padding": 1}),
    "3x3/2 stem": ((3, 16, 3), {"stride": 2, "padding": 1}),
    "1x1": ((64, 256, 1), {}),
    "7x7/2": ((3, 64, 7), {"stride": 2, "padding": 3}),
    "3x3 prime ch": ((13, 17, 3), {"padding": 1}),
    "3x3 dw": ((32, 32, 3), {"padding": 1, "groups": 32}),
}


@command("methods", help="list the decomposition methods, their rank specs and typical support")
def _methods(parser: argparse.ArgumentParser) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from .decompositions import ConvSpec, get_method, methods

        specs = {k: ConvSpec.create(*a, **kw) for k, (a, kw) in _TYPICAL_LAYERS.items()}
        header = ["method", *specs, "rank spec"]
        rows = []
        for name in methods():
            cls = get_method(name)
            marks = ["yes" if cls.unsupported_reason(s) is None else "-" for s in specs.values()]
            rows.append([name, *marks, cls.rank_help or "-"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[-1]]))
        print("\nEvery method also accepts ratio= (a fraction of the dense layer's parameters).")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="autodecomp",
        description="Per-layer search over tensor decompositions for trained PyTorch CNNs.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, fn) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=text, description=text)
        sub.set_defaults(run=fn(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autodecomp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"autodecomp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autodecomp: interrupted", file=sys.stderr)
        return 130
