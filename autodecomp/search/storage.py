"""Storage URLs -> Optuna storages; the only module that parses them.

Three kinds, by how many processes share a study:

- ``sqlite:///study.db`` (relative to the current folder; ``sqlite:////abs/study.db``):
  one process, the default (``<study folder>/study.db``).
- ``journal:///study.journal`` (``journal:////abs/study.journal``): an Optuna journal file
  (:class:`~optuna.storages.journal.JournalFileBackend`), for several processes on one
  node. The file is appended under a lock file, so it also works on NFS, but the heartbeat
  compares the clocks of the processes: keep its workers on one node.
- ``postgresql+psycopg2://user:password@host:port/database`` (any SQLAlchemy URL): many
  nodes. Each process keeps a small connection pool, pinged before use.
- ``grpc://host:port``: Optuna's gRPC storage proxy (``run_grpc_proxy_server``) in front
  of a database, for hundreds of workers (one database connection pool in the proxy).

Every storage opened to run trials has a heartbeat (:class:`Heartbeat`): a process records
one every ``interval`` seconds while it runs a trial; a RUNNING trial whose heartbeat is
older than ``grace`` seconds belongs to a dead process (SIGKILL, lost node), and the next
process that starts a trial marks it FAIL and re-queues its parameters
(:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`). Optuna implements the
heartbeat for RDB storages only; :class:`HeartbeatJournalStorage` and
:class:`HeartbeatGrpcStorageProxy` add it as a trial attribute.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import GrpcStorageProxy, JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import ConfigError
from ..core.files import exclusive_lock
from ..core.optuna_compat import BaseHeartbeat, trial_id, without_constraints

__all__ = [
    "GRPC_SCHEME",
    "JOURNAL_SCHEME",
    "Heartbeat",
    "HeartbeatGrpcStorageProxy",
    "HeartbeatJournalStorage",
    "check_storage",
    "grpc_address",
    "journal_path",
    "open_storage",
    "open_storage_readonly",
    "setup_lock",
    "shown",
    "storage_folder",
    "trial_start_lock",
]

JOURNAL_SCHEME = "journal"
GRPC_SCHEME = "grpc"
_GRPC_PORT = 13000
_HEARTBEAT_ATTR = "autodecomp:heartbeat"
_SERVER_POOL = {"pool_size": 2, "max_overflow": 4, "pool_pre_ping": True, "pool_recycle": 1800}
_CONNECT_TIMEOUT_S = 10
_LOCK_IDLE_TIMEOUT = "120s"  # a lock holder that vanished mid-transaction is cut off after this


class _RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, except that the re-queued trial does not inherit the failed
    one's constraints or heartbeat: its run sets its own (Optuna would keep the old
    constraint values and warn that the new ones are ignored)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fresh = copy.copy(trial)
        fresh.system_attrs = {
            key: value
            for key, value in without_constraints(trial.system_attrs).items()
            if key != _HEARTBEAT_ATTR
        }
        super().__call__(study, fresh)


@dataclass(frozen=True)
class Heartbeat:
    """Heartbeat settings: seconds between beats, seconds of silence that mark a trial dead
    (``None``: twice the interval), and how often one trial's parameters are re-queued."""

    interval: int = 60
    grace: int | None = None
    max_retry: int = 3

    @property
    def grace_s(self) -> int:
        return 2 * self.interval if self.grace is None else self.grace

    def retry_callback(self) -> RetryHeartbeatStaleTrialCallback:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _RetryStaleTrial(max_retry=self.max_retry)


def shown(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def _parse(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"storage {url!r} is not a valid storage URL (e.g. sqlite:///study.db, "
            "journal:///study.journal, postgresql+psycopg2://user@host/db)"
        ) from None


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:///path`` URL (SQLite's slash rules); ``None`` for other URLs."""
    if not url.startswith(f"{JOURNAL_SCHEME}:"):
        return None
    parsed = _parse(url)
    if parsed.drivername != JOURNAL_SCHEME or parsed.host or not parsed.database:
        raise ConfigError(
            f"storage {url!r}: a journal URL is journal:///relative/path or "
            "journal:////absolute/path"
        )
    return Path(parsed.database).expanduser()


def _local_file(url: str) -> Path | None:
    """The file behind a journal or file-based SQLite URL, else ``None``."""
    path = journal_path(url)
    if path is not None:
        return path
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser()
    return None


def storage_folder(storage: str) -> Path | None:
    """The folder of a file storage (a journal or SQLite URL, or a file path), else ``None``."""
    journal = journal_path(storage)
    if journal is not None:
        return journal.resolve().parent
    if "://" not in storage:
        return Path(storage).expanduser().resolve().parent
    path = _local_file(storage)
    return None if path is None else path.parent


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def _first_line(err: BaseException) -> str:
    """The first line of ``err`` (Optuna's storage errors: of the database error behind it)."""
    if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _sqlite_readonly_url(path: Path, *, immutable: bool) -> str:
    """A URL opening the SQLite file ``path`` read-only (SQLite refuses any write)."""
    query = "mode=ro&immutable=1&uri=true" if immutable else "mode=ro&uri=true"
    return f"sqlite:///file:{quote(str(path.resolve()))}?{query}"


def _rdb_readonly(url: str, shown_as: str) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if _parse(url).get_backend_name() == "postgresql":  # the server refuses every write
        kwargs["connect_args"] = {
            "connect_timeout": _CONNECT_TIMEOUT_S,
            "options": "-c default_transaction_read_only=on",
        }
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True)
    except (
        SQLAlchemyError,
        optuna.exceptions.StorageInternalError,
        ImportError,
        OSError,
        RuntimeError,
        ValueError,
    ) as err:
        raise ConfigError(f"cannot open storage {shown_as}: {_first_line(err)}") from None


def _sqlite_readonly(path: Path, shown_as: str) -> optuna.storages.RDBStorage:
    """The SQLite file opened read-only (``mode=ro``): the database is never written.

    A database in write-ahead-log mode (as :func:`open_storage` leaves it) is read through
    its ``-shm`` index, which SQLite creates next to the file if missing; in a folder where
    it cannot (read-only) and with no ``-wal`` file (so every committed trial is in the
    database file itself, and no process can be writing it), the file is opened
    ``immutable``: read as it is, without any lock or side file.
    """
    try:
        return _rdb_readonly(_sqlite_readonly_url(path, immutable=False), shown_as)
    except ConfigError:
        pending = [path.with_name(path.name + s) for s in ("-wal", "-journal")]
        if os.access(path.parent, os.W_OK) or any(p.exists() for p in pending):
            raise
    return _rdb_readonly(_sqlite_readonly_url(path, immutable=True), shown_as)


def open_storage_readonly(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage opened for reading: nothing is created or written.

    A SQLite file is opened read-only (:func:`_sqlite_readonly`; also in a read-only
    folder), a PostgreSQL database in read-only transactions; Optuna's schema set-up is
    skipped (an older schema is an error naming ``optuna storage upgrade``, not an
    upgrade). A journal file is only read.

    Args:
        storage: a database URL (``sqlite:///...``, ``postgresql://...``), a journal URL
            (``journal:///...``) or a file path: a SQLite database, or else an Optuna
            journal file (``JournalFileBackend``).

    Raises:
        ConfigError: a missing file or database, an unreachable server, or a storage that
            cannot be opened (one line).
    """
    journal = journal_path(storage)
    if journal is not None:
        if not journal.is_file():
            raise ConfigError(f"storage {storage!r}: no journal file (has the study been created?)")
        storage = str(journal)
    if "://" not in storage:
        path = Path(storage).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"storage {storage!r}: no such file (give a database URL, a SQLite file or an "
                "Optuna journal file)"
            )
        if not _is_sqlite(path):
            return JournalStorage(JournalFileBackend(str(path)))
        return _sqlite_readonly(path, shown(storage))
    local = _local_file(storage)
    if local is not None:
        if not local.is_file():
            raise ConfigError(f"storage {storage!r}: no database file (has the search run?)")
        return _sqlite_readonly(local, shown(storage))
    if _parse(storage).get_backend_name() != "sqlite":  # a server: one line if unreachable
        check_storage(storage)
    return _rdb_readonly(storage, shown(storage))


def _engine_kwargs(url: str) -> dict[str, Any]:
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        return {}
    kwargs: dict[str, Any] = dict(_SERVER_POOL)
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT_S}
    return kwargs


def check_storage(url: str) -> None:
    """Raise :class:`ConfigError` if the storage cannot be used; creates nothing."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    if grpc_address(url) is not None:
        _grpc_proxy(url, Heartbeat()).close()
        return
    path = _local_file(url)
    if path is not None:
        folder = path.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"storage {url!r}: folder {str(folder)!r} is missing or read-only")
        return
    if _parse(url).get_backend_name() == "sqlite":  # in memory
        return
    try:
        engine = create_engine(url, **_engine_kwargs(url))
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as err:
        raise ConfigError(
            f"cannot reach storage {shown(url)}: no database driver ({err}); for PostgreSQL "
            "write postgresql+psycopg2://... (pip install 'autodecomp[postgres]')"
        ) from None
    except (SQLAlchemyError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot reach storage {shown(url)}: {first}") from None


class _AttrHeartbeat(BaseHeartbeat):
    """Optuna's heartbeat protocol (which Optuna implements for RDB) on any storage.

    A beat is a trial system attribute holding the writer's clock; a RUNNING trial is stale
    when its last beat (or its start, whichever is later) is more than ``grace`` seconds old.
    ``study.optimize`` then fails it and calls the retry callback, as for an RDB storage.
    The processes' clocks must agree to well within ``grace`` (one node, or NTP).
    """

    _heartbeat: Heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        # a trial failed as stale meanwhile takes no beat (its tell will fail too)
        with suppress(UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            start = trial.datetime_start.timestamp() if trial.datetime_start else now
            # a retried trial inherits its predecessor's system attributes: take the later one
            last = max(float(trial.system_attrs.get(_HEARTBEAT_ATTR, 0.0)), start)
            if now - last > self._heartbeat.grace_s:
                stale.append(trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat.interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self._heartbeat.retry_callback()


class HeartbeatJournalStorage(_AttrHeartbeat, JournalStorage):
    """A journal-file storage with a heartbeat."""

    def __init__(self, path: str | os.PathLike[str], heartbeat: Heartbeat) -> None:
        JournalStorage.__init__(self, JournalFileBackend(str(path)))
        self._heartbeat = heartbeat


class HeartbeatGrpcStorageProxy(_AttrHeartbeat, GrpcStorageProxy):
    """A client of Optuna's gRPC storage proxy (``grpc://host:port``) with a heartbeat."""

    def __init__(self, host: str, port: int, heartbeat: Heartbeat) -> None:
        GrpcStorageProxy.__init__(self, host=host, port=port)
        self._heartbeat = heartbeat


def grpc_address(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``grpc://host:port`` URL (an Optuna gRPC storage proxy)."""
    if not url.startswith(f"{GRPC_SCHEME}:"):
        return None
    parsed = _parse(url)
    if parsed.drivername != GRPC_SCHEME or not parsed.host or parsed.database:
        raise ConfigError(f"storage {url!r}: a gRPC proxy URL is grpc://host:port")
    return parsed.host, parsed.port or _GRPC_PORT


def _grpc_proxy(url: str, heartbeat: Heartbeat) -> HeartbeatGrpcStorageProxy:
    host, port = grpc_address(url) or ("", 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proxy = HeartbeatGrpcStorageProxy(host, port, heartbeat)
    except ImportError as err:
        raise ConfigError(f"storage {url!r} needs grpcio and protobuf ({err})") from None
    try:
        proxy.wait_server_ready(timeout=_CONNECT_TIMEOUT_S)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"cannot reach storage {url}: no gRPC proxy answers there") from None
    return proxy


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_storage(url: str, heartbeat: Heartbeat | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage behind ``url``, with a heartbeat (creates the file or schema if needed).

    A SQLite file is put in write-ahead-log mode with ``synchronous=NORMAL``: a trial makes
    dozens of small writes (one per parameter and attribute), and this cuts each from about
    25 ms to 3 ms here while staying safe against crashes of the process (WAL needs a local
    file system, not NFS). A server database gets a pool of 2 (+4 overflow) connections,
    pinged before use, and a 10 s connection timeout.
    """
    from sqlalchemy import event

    heartbeat = heartbeat or Heartbeat()
    path = journal_path(url)
    if path is not None:
        return HeartbeatJournalStorage(path, heartbeat)
    if grpc_address(url) is not None:
        return _grpc_proxy(url, heartbeat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_s,
            heartbeat_stale_trial_callback=heartbeat.retry_callback(),
        )
    if _local_file(url) is not None:
        event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()
    return storage


@contextmanager
def _advisory_lock(storage: optuna.storages.RDBStorage, name: str) -> Iterator[None]:
    """A PostgreSQL transaction-scoped advisory lock; freed if the holder's connection dies."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    key = _lock_key(name)
    connection = storage.engine.connect()
    transaction = connection.begin()
    try:
        connection.execute(
            text(f"SET LOCAL idle_in_transaction_session_timeout = '{_LOCK_IDLE_TIMEOUT}'")
        )
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield
    finally:
        with suppress(SQLAlchemyError):  # the server ends a holder idle past the timeout
            transaction.commit()
        connection.close()


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def _server_session_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock through a connection of its own (no Optuna table
    needs to exist); freed if the holder's connection dies."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, **{**_engine_kwargs(url), "pool_size": 1, "max_overflow": 0})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key(name)})
            try:
                yield
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key(name)}
                )
    finally:
        engine.dispose()


def setup_lock(url: str) -> AbstractContextManager[None]:
    """A lock to hold while opening a study's storage and creating (or loading) the study:
    concurrent ``autodecomp search`` processes on a new SQLite file or database would
    otherwise race to create Optuna's tables, and would each compute the allocation ladder.

    A ``flock`` on ``<file>.setup.lock`` next to a journal or SQLite file, a PostgreSQL
    advisory lock, and no lock for other storages.
    """
    path = _local_file(url)
    if path is not None:
        return exclusive_lock(path.with_name(f"{path.name}.setup.lock"))
    if grpc_address(url) is None and _parse(url).get_backend_name() == "postgresql":
        return _server_session_lock(url, "autodecomp:setup")
    return nullcontext()


def trial_start_lock(
    url: str, storage: optuna.storages.BaseStorage, study_name: str
) -> AbstractContextManager[None]:
    """A lock, shared by every process of the study, to hold while counting trials and
    starting one, so that no two processes start the last trial of a study.

    A ``flock`` on ``<file>.workers.lock`` next to a journal or SQLite file, a PostgreSQL
    advisory lock, and no lock for other storages (gRPC proxy, MySQL: there concurrent
    workers may overshoot the total by a trial or two).
    """
    path = _local_file(url)
    if path is not None:
        return exclusive_lock(path.with_name(f"{path.name}.workers.lock"))
    if isinstance(storage, optuna.storages.RDBStorage) and _parse(url).get_backend_name() == (
        "postgresql"
    ):
        return _advisory_lock(storage, f"autodecomp:{study_name}")
    return nullcontext()
