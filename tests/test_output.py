"""What the command line prints and what `import autodecomp` costs: the version from the
package metadata, log lines as text or JSON (worker fields), a lazy public API, no fcntl."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

import autodecomp
from autodecomp.cli import main
from autodecomp.core.logs import console_logging, worker_fields

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def _python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"autodecomp {version('autodecomp')}"
    assert autodecomp.__version__ == version("autodecomp")


def test_quiet_keeps_warnings_and_errors_only(capsys):
    log = logging.getLogger("autodecomp.test")
    with console_logging(logging.WARNING):
        log.info("an info line")
        log.debug("a debug line")
        log.warning("warning: a warning line")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: a warning line\n"
    with console_logging(logging.DEBUG):
        log.debug("a debug line")
    assert capsys.readouterr().out == "a debug line\n"
    with console_logging():  # default: INFO on stdout, the bare message
        log.info("an info line")
        log.debug("a debug line")
    assert capsys.readouterr().out == "an info line\n"


def test_log_json_lines_carry_time_level_logger_message_and_worker(capsys):
    log = logging.getLogger("autodecomp.search.worker")
    with console_logging(json_lines=True):
        log.info("plain")
        with worker_fields(7):
            log.info("trial %d done", 3)
            log.warning("warning: slow")
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["message"] for r in records] == ["plain", "trial 3 done"]
    for record in records:
        assert record["level"] == "INFO" and record["logger"] == "autodecomp.search.worker"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])
    assert "worker" not in records[0] and records[1]["worker"] == 7
    (warning,) = [json.loads(line) for line in err.splitlines()]
    assert warning["level"] == "WARNING" and warning["worker"] == 7


def test_worker_lines_carry_a_timestamp_and_the_index(capsys):
    log = logging.getLogger("autodecomp.search.worker")
    with console_logging():
        log.info("before")
        with worker_fields(3):
            log.info("joined")
        log.info("after")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "before" and lines[2] == "after"
    assert re.fullmatch(rf"{STAMP} worker 3: joined", lines[1]), lines[1]


def test_the_console_handlers_are_removed_afterwards():
    logger = logging.getLogger("autodecomp")
    before = (list(logger.handlers), logger.level, logger.propagate)
    with console_logging(logging.DEBUG, json_lines=True):
        assert len(logger.handlers) == len(before[0]) + 2
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "methods", "--verbose"])
    assert done.value.code == 2 and "--quiet and --verbose" in capsys.readouterr().err


def test_import_works_without_fcntl():
    """`filelock` does the locking: no `fcntl` (as on Windows) is no ImportError."""
    code = """
import sys, tempfile, warnings
warnings.simplefilter("ignore")  # filelock: "only soft file lock is available"
sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError
import autodecomp
from autodecomp.core.files import exclusive_lock
with tempfile.TemporaryDirectory() as folder, exclusive_lock(folder + "/x.lock"):
    pass
print(autodecomp.count_params(autodecomp.get_model("digits_cnn", in_channels=1)) > 0)
"""
    assert _python(code).stdout.strip() == "True"


def test_lazy_init_exposes_every_public_name():
    code = """
import sys
import autodecomp
assert "torch" not in sys.modules, "import autodecomp loaded torch"
assert set(autodecomp.__all__) <= set(dir(autodecomp))
for name in autodecomp.__all__:
    exec(f"from autodecomp import {name}")
    assert getattr(autodecomp, name) is not None, name
try:
    autodecomp.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("no AttributeError")
namespace = {}
exec("from autodecomp import *", namespace)
assert set(autodecomp.__all__) <= set(namespace)
print(len(autodecomp.__all__))
"""
    assert int(_python(code).stdout) == len(autodecomp.__all__)


def test_help_imports_neither_torch_nor_pandas():
    """What keeps `autodecomp --help` fast (README: the timing against `import torch`)."""
    code = """
import contextlib, io, sys
from autodecomp.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--help"])
    except SystemExit as done:
        assert done.code == 0
assert "search" in out.getvalue() and "--log-json" in out.getvalue()
print(sorted(m for m in ("torch", "pandas", "scipy", "optuna") if m in sys.modules))
"""
    assert _python(code).stdout.strip() == "[]"
