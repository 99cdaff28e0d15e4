"""Command line: ``autodecomp <command> ...``.

Each subcommand is one function decorated with :func:`command`: it adds its arguments to
its parser and returns the handler ``run(args) -> exit status``. Invalid input ends with
one line ``autodecomp: error: ...`` on stderr and exit status 2.

Progress goes through :mod:`logging` (``autodecomp.*`` loggers): INFO lines on stdout,
warnings and errors on stderr, ``--quiet`` / ``--verbose`` / ``--log-json`` set the level and
format (:func:`~autodecomp.core.logs.console_logging`). Only the chosen subcommand's
arguments are set up, so ``autodecomp --help`` imports neither torch nor pandas.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .core.errors import ConfigError
from .core.logs import console_logging
from .core.registry import Registry
from .core.version import __version__

__all__ = ["command", "main"]

Handler = Callable[[argparse.Namespace], int]
Command = tuple[str, Callable[[argparse.ArgumentParser], Handler]]
# Subcommands import what they run when they run (the top floor: nothing is dodged), so that
# `autodecomp --help` loads no more than it must.
_COMMANDS: Registry[Command] = Registry("command")
_log = logging.getLogger(__name__)


def command(name: str, help: str) -> Callable:
    """Register ``fn(parser) -> handler`` as the subcommand ``name``."""

    def decorate(fn: Callable[[argparse.ArgumentParser], Handler]):
        _COMMANDS.add(name, (help, fn))
        return fn

    return decorate


def _study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    parser.add_argument("--trials", type=int, help="total trial count (overrides 'trials')")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite in the folder); journal:///path for "
        "several processes on one node, postgresql+psycopg2://... for many nodes",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set proxy.steps=50 (value parsed as YAML)",
    )


def _heartbeat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        metavar="SECONDS",
        help="seconds between heartbeats of a running trial (default: 60)",
    )
    parser.add_argument(
        "--grace",
        type=int,
        metavar="SECONDS",
        help="a running trial silent this long is failed and re-queued (default: 2x heartbeat)",
    )


def _heartbeat(args: argparse.Namespace):
    from .search.storage import Heartbeat

    if args.heartbeat < 1 or (args.grace is not None and args.grace <= args.heartbeat):
        raise ConfigError(
            f"need --heartbeat >= 1 and --grace > --heartbeat, got {args.heartbeat} and "
            f"{args.grace}"
        )
    return Heartbeat(interval=args.heartbeat, grace=args.grace)


def _study_config(args: argparse.Namespace):
    from .config import load_config

    overrides = list(args.overrides)
    if args.trials is not None:
        if args.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {args.trials}")
        overrides.append(f"trials={args.trials}")
    if args.storage is not None:
        overrides.append(f"storage={json.dumps(args.storage)}")
    return load_config(args.study, overrides)


@command("search", help="run or resume a search study and write its Pareto tables")
def _search(parser: argparse.ArgumentParser) -> Handler:
    _study_arguments(parser)
    _heartbeat_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from .results.tables import summarise_search
        from .search.study import run_search

        heartbeat = _heartbeat(args)
        cfg = _study_config(args)
        result = run_search(cfg, heartbeat=heartbeat)
        summarise_search(result.study, cfg)
        return 130 if result.interrupted else 1 if result.stopped else 0

    return run


@command("create", help="create a study and its baseline, run no trial (then start workers)")
def _create(parser: argparse.ArgumentParser) -> Handler:
    _study_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from .search.study import setup_study

        setup_study(_study_config(args))
        return 0

    return run


@command("worker", help="join a study in a shared storage and run trials until it has its total")
def _worker(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--study", required=True, help="the study's name")
    parser.add_argument(
        "--storage",
        required=True,
        help="postgresql+psycopg2://user@host/db (many nodes) or journal:///path (one node)",
    )
    parser.add_argument(
        "--trials-total",
        type=int,
        help="COMPLETE + PRUNED trials at which the study ends (default: the study's 'trials')",
    )
    parser.add_argument("--device", help="this worker's device, e.g. cuda:0 (default: the study's)")
    parser.add_argument(
        "--folder", help="the study folder, if not at the path the study was created at"
    )
    parser.add_argument(
        "--index", type=int, help="worker number; seeds its sampler (default: the process id)"
    )
    parser.add_argument(
        "--ladder-only",
        action="store_true",
        help="help build the study's allocation ladder, then stop without running a trial",
    )
    _heartbeat_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from .search.worker import run_worker

        heartbeat = _heartbeat(args)
        result = run_worker(
            args.study,
            args.storage,
            total=args.trials_total,
            device=args.device,
            folder=args.folder,
            index=args.index,
            heartbeat=heartbeat,
            ladder_only=args.ladder_only,
        )
        if result.interrupted:
            return 130
        return 0 if result.finished else 1

    return run


@command("report", help="Pareto tables, hypervolume, best-trial queries and plots of a study")
def _report(parser: argparse.ArgumentParser) -> Handler:
    from .results.report import configure_parser

    return configure_parser(parser)


@command("export", help="rebuild, fine-tune, evaluate and save one trial's compressed model")
def _export(parser: argparse.ArgumentParser) -> Handler:
    from .ship.export import configure_parser

    return configure_parser(parser)


@command("replay", help="re-run one trial from what its study stored; compare with the stored")
def _replay(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    parser.add_argument("--trial", type=int, required=True, help="a COMPLETE trial's number")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's)")
    parser.add_argument(
        "--device", help="device to replay on (default: the study's; cpu if it lacks that GPU)"
    )

    def run(args: argparse.Namespace) -> int:
        from .config import load_config
        from .search.replay import format_replay, replay_trial

        overrides = [] if args.storage is None else [f"storage={json.dumps(args.storage)}"]
        result = replay_trial(load_config(args.study, overrides), args.trial, device=args.device)
        _log.info(format_replay(result))
        return 0 if result.equal else 1

    return run


@command("sensitivity", help="per-layer sensitivity: each layer option's error by ratio and MACs")
def _sensitivity(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("study", help="path to studies/<name>/study.yaml (or its folder)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set initial_design.grid=12 or device=cpu",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--out", "--output", dest="output", metavar="DIR",
        help="output folder (default: <study folder>/report)",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="write the table only")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from .config import load_config
        from .results.report import write_sensitivity
        from .results.sensitivity import (
            compute_scores,
            most_sensitive,
            sensitivity_frame,
            study_if_any,
        )

        overrides = list(args.overrides)
        if args.storage is not None:
            overrides.append(f"storage={json.dumps(args.storage)}")
        cfg = load_config(args.study, overrides)
        frame = sensitivity_frame(compute_scores(cfg), study_if_any(cfg))
        out = Path(args.output) if args.output else cfg.folder / "report"
        try:
            paths = write_sensitivity(frame, out, plot=not args.no_plots)
        except OSError as err:  # e.g. a read-only study folder
            raise ConfigError(
                f"cannot write to {str(out)!r}: {err.strerror or err}; use --out DIR"
            ) from None
        scored = frame[frame["method"] != "keep"]
        _log.info(
            f"sensitivity of {frame['layer'].nunique()} layers: {len(scored)} options scored by "
            f"{frame['score'].iloc[0]} error; most sensitive: {most_sensitive(frame)}"
        )
        _log.info(f"wrote {', '.join(p.name for p in paths)} to {out}")
        return 0

    return run


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


def _output_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``--quiet`` / ``--verbose`` / ``--log-json``: before the subcommand or after it."""
    level = parser.add_mutually_exclusive_group()
    level.add_argument(
        "--quiet", action="store_true", default=default, help="print warnings and errors only"
    )
    level.add_argument(
        "--verbose", action="store_true", default=default, help="print debug lines too"
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="log one JSON object per line: time, level, logger, message (and worker)",
    )


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: the first word that is not an option (the options
    before a subcommand take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand; with ``command``, only that
    subcommand's arguments are set up (another's set-up may import torch or pandas)."""
    parser = argparse.ArgumentParser(
        prog="autodecomp",
        description="Per-layer search over tensor decompositions for trained PyTorch CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"autodecomp {__version__}")
    _output_options(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, fn) in _COMMANDS.in_order():
        sub = subparsers.add_parser(name, help=text, description=text)
        if command is None or name == command:
            _output_options(sub, default=argparse.SUPPRESS)
            sub.set_defaults(run=fn(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autodecomp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen(argv) or "")  # no subcommand (--help): none set up
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose exclude each other")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    with console_logging(level, json_lines=args.log_json):
        _log.debug("autodecomp %s: %s", __version__, " ".join(argv))
        try:
            return args.run(args)
        except ConfigError as err:
            _log.error("autodecomp: error: %s", err)
            return 2
        except KeyboardInterrupt:
            _log.error("autodecomp: interrupted")
            return 130
