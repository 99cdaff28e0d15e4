"""`report` and `export` only read a study: a read-only study folder, an unreachable server."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from tiny_study import make_study, tiny_config

from autodecomp.cli import main
from autodecomp.results.study_view import read_study

STUDY = tiny_config(
    name="tiny",
    baseline={"epochs": 1},
    space={"methods": ["tucker"], "ratio": [0.1, 0.9]},
    proxy={"steps": 2, "batch_size": 32, "bn_batches": 1},
    trials=2,
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """The folder of a tiny study that has run (SQLite in write-ahead-log mode)."""
    return make_study(tmp_path_factory.mktemp("ro"), STUDY, search=True).parent


def _copy(searched: Path, to: Path, *, finished: bool) -> Path:
    """A copy of the study folder; ``finished``: as a finished search leaves it (the log of
    the write-ahead-log mode folded into the database file and removed), else as a killed
    one does (``study.db-wal`` and ``-shm`` next to it)."""
    shutil.copytree(searched, to)
    connection = sqlite3.connect(to / "study.db")  # the last connection: cleans up
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    assert not (to / "study.db-wal").exists()
    if not finished:  # a process writes in WAL mode, then dies without closing
        write = (
            "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('UPDATE studies SET study_name = study_name'); c.commit(); os._exit(0)"
        )
        subprocess.run([sys.executable, "-c", write, str(to / "study.db")], check=True)
        assert (to / "study.db-wal").stat().st_size > 0
    return to


@pytest.fixture
def folder(searched, tmp_path) -> Path:
    return _copy(searched, tmp_path / "tiny", finished=True)


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (sha256, mtime in ns)}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("autodecomp: error: "), err
    for text in expected:
        assert text in err, err
    return err


def test_report_writes_nothing_in_the_study_folder(folder, tmp_path, capsys):
    """Proves, for any user (root included, whom file permissions would not stop): no file
    of the study folder changes (contents and modification times) except SQLite's
    shared-memory index ``study.db-shm`` of a database in write-ahead-log mode, in which
    every reader records its read marks, and no file but SQLite's ``-wal`` / ``-shm`` pair
    appears; and the database is open in a mode where SQLite refuses any write."""
    index = "study.db-shm"

    def data(files: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
        return {k: v for k, v in files.items() if k != index}

    before = _files(folder)
    out = tmp_path / "elsewhere"
    assert main(["report", str(folder / "study.yaml"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "report.md").is_file() and len(pd.read_csv(out / "trials.csv")) == 2
    after = _files(folder)
    assert {k: v for k, v in data(after).items() if k in before} == data(before)
    assert set(after) - set(before) <= {"study.db-wal", index}
    study = read_study(str(folder / "study.db"))
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study.set_user_attr("written", True)  # "attempt to write a readonly database"
    assert data(_files(folder)) == data(after)


def _read_only_mount_works() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt && ! touch /mnt/.probe"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0 or not _read_only_mount_works(),
    reason="needs root and mount namespaces (unshare -m) for a read-only bind mount",
)
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "killed"])
def test_report_on_a_read_only_file_system(searched, tmp_path, finished):
    """The study folder is bind-mounted read-only over itself in a private mount namespace, so
    every write fails, root's too (chmod would not stop root): ``report`` still reads the
    study (SQLite: read-only through the existing ``-shm`` index, or, when there is none and
    SQLite cannot create one there, immutable), writes to ``--out``, and without it says in
    one line that the folder is read-only."""
    folder = _copy(searched, tmp_path / "tiny", finished=finished)
    before = _files(folder)

    def report(*extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "autodecomp", "report", str(folder / "study.yaml")]
        command = f'mount --bind -o ro {folder} {folder} && exec "$@"'
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", command, "sh", *argv, "--no-plots", *extra],
            capture_output=True,
            text=True,
            check=False,
        )

    out = tmp_path / "out"
    done = report("--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and len(pd.read_csv(out / "trials.csv")) == 2
    done = report()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"autodecomp: error: cannot write the report to '{folder / 'report'}': Read-only file "
        "system; write it elsewhere with --out DIR"
    ]
    assert _files(folder) == before


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0 or not _read_only_mount_works(),
    reason="needs root and mount namespaces (unshare -m) for a read-only bind mount",
)
def test_export_on_a_read_only_file_system(searched, tmp_path):
    """Export reads the study and the cached baseline (taking no lock) from a folder mounted
    read-only, and writes its model file elsewhere."""
    folder = _copy(searched, tmp_path / "tiny", finished=True)
    before = _files(folder)
    target = tmp_path / "model.pt"
    argv = [sys.executable, "-m", "autodecomp", "export", str(folder / "study.yaml")]
    command = f'mount --bind -o ro {folder} {folder} && exec "$@"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, "sh", *argv, "--trial", "0", "-o", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert target.is_file()
    assert _files(folder) == before


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def test_report_and_export_on_an_unreachable_postgresql_exit_2_in_one_line(folder, capsys):
    url = f"postgresql+psycopg2://me:secret@127.0.0.1:{_closed_port()}/autodecomp"
    assert main(["report", url, "--study-name", "tiny"]) == 2
    err = _one_line_error(capsys, "cannot reach storage", "Connection refused")
    assert "secret" not in err and "invalid data in the commit" not in err
    assert main(["report", str(folder / "study.yaml"), "--storage", url]) == 2
    _one_line_error(capsys, "cannot reach storage")
    export = ["export", str(folder / "study.yaml"), "--trial", "0", "--storage", url]
    assert main([*export, "-o", str(folder.parent / "t.pt")]) == 2
    err = _one_line_error(capsys, "cannot reach storage")
    assert "secret" not in err
