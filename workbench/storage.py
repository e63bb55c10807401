"""Where Optuna studies live: storage URLs, their secrets, the lock around critical sections, heartbeats.

Owns: the default SQLite URL, :func:`mask_url` (secrets never printed), :func:`sqlite_path`, :func:`check_heartbeat`,
:class:`StorageLock` (a file lock beside an SQLite file, an advisory lock on PostgreSQL), :func:`storage_errors`
(a clear ConfigError for a corrupt file or a refused server) and :func:`open_storage` (Optuna's ``RDBStorage`` with
heartbeats and one retry of a killed worker's trial). Must not: define search spaces, objectives or workers
(:mod:`workbench.sweep`).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import ConfigError

# ---------------------------------------------------------------------------------------------
# storage
STORAGE_ENV = "WORKBENCH_STORAGE"  # the storage URL for `workbench sweep` when --storage is not given (workers get it here)
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "sslpassword", "api_key", "apikey")
LOCK_KEY = 0x776F726B62656E63  # "workbenc": the PostgreSQL advisory lock of the sweep's critical sections


def default_storage_url(runs_dir: str | os.PathLike = "runs") -> str:
    """``sqlite:///<abs>/runs/optuna.db``: absolute, so worker processes started elsewhere agree."""
    return f"sqlite:///{(Path(runs_dir) / 'optuna.db').resolve()}"


def mask_url(url: str) -> str:
    """The URL with every secret replaced by ***: the password of the user info (the user info ends at the LAST
    '@' of the authority, so a user name or password holding '@' is masked whole) and query-string values whose
    key names a secret (``?password=...``). Parsed with urllib, never pattern-matched; the rest stays as written."""
    url = str(url)
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(f"//{parts.netloc}", f"//{userinfo.partition(':')[0]}:***@{host}", 1)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(_is_secret(k) for k, _ in query):
        masked = urllib.parse.urlencode([(k, "***" if _is_secret(k) else v) for k, v in query], safe="*")
        url = url.replace(f"?{parts.query}", f"?{masked}", 1)
    return url


def _is_secret(key: str) -> bool:
    return key.lower() in SECRET_QUERY_KEYS


def _redact(text: str, url: str) -> str:
    """``text`` (an error message) with the URL and each of its secrets (4 characters or more) masked."""
    text = text.replace(url, mask_url(url))
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = [userinfo.partition(":")[2]] + [v for k, v in urllib.parse.parse_qsl(parts.query) if _is_secret(k)]
    for secret in secrets:
        for form in {secret, urllib.parse.unquote(secret)}:
            if len(form) >= 4:
                text = text.replace(form, "***")
    return text


def sqlite_path(url: str) -> Path | None:
    """The database file of an ``sqlite:///PATH`` URL (None for other back ends and in-memory databases)."""
    if not url.startswith("sqlite") or ":///" not in url:
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_heartbeat(heartbeat: Any, grace: Any = None) -> None:
    """ConfigError unless ``heartbeat`` is an integer >= 1 and ``grace`` (if given) an integer > heartbeat: without
    heartbeats a killed worker's trial stays RUNNING for ever and every worker waiting for it hangs."""
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
        raise ConfigError(f"heartbeat = {heartbeat!r}: expected an integer >= 1 (seconds between a running trial's heartbeats; "
                          "without them a killed worker's trial would never be failed and the sweep would hang)")
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace <= heartbeat):
        raise ConfigError(f"grace = {grace!r}: expected an integer > heartbeat = {heartbeat} (seconds without a heartbeat before "
                          "a trial counts as dead)")


class StorageLock:
    """One exclusive lock per storage, shared by every process that uses it, for short critical sections:
    creating the schema and the study, and claiming the next trial (so that workers never start more trials
    than asked). SQLite: ``flock`` on ``<database>.lock`` beside the file (one machine); PostgreSQL: a session
    advisory lock (any machine). Either is released by the system when its holder dies. Other back ends: no
    lock. ``acquire``/``release`` pair up; ``release`` of a lock not held does nothing."""

    def __init__(self, url: str):
        self.url = url
        self._fd: int | None = None
        self._conn = None
        self._engine = None

    def acquire(self) -> None:
        path = sqlite_path(self.url)
        if path is not None and self._fd is None:
            import fcntl

            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
        elif self.url.startswith("postgresql") and self._conn is None:
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10})
            conn = self._engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
            self._conn = conn

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # ends the session: the advisory lock goes with it

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def storage_errors(url: str):
    """Turn database errors into one-line ConfigErrors naming the (masked) storage: a corrupt SQLite file says so."""
    import sqlalchemy

    try:
        yield
    except ConfigError:
        raise
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, OSError, RuntimeError) as e:
        cause = e.__cause__ or e  # sqlalchemy and the drivers raise many kinds (OperationalError, DatabaseError, ArgumentError, ...)
        msg = _redact(str(cause).strip().splitlines()[0] if str(cause).strip() else "", url)
        path = sqlite_path(url)
        if path is not None and any(w in msg for w in ("file is not a database", "malformed", "disk image")):
            raise ConfigError(f"storage = {mask_url(url)!r}: {path} is not a valid SQLite database ({msg}); move it away or give "
                              "another --storage") from None
        raise ConfigError(f"storage = {mask_url(url)!r}: cannot open the study storage ({type(cause).__name__}: {msg})") from None


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose stale trials also include RUNNING trials that never recorded a heartbeat and
    started more than the grace period ago: their worker died between creating the trial and its first
    heartbeat, or ran without heartbeats. Optuna skips those, so they would stay RUNNING and hang the sweep."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        return stale + [t for t in self._silent_trial_ids(study_id) if t not in stale]

    def _silent_trial_ids(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        grace = timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
        now = datetime.now()  # optuna's datetime_start: local time, naive
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        old = [t._trial_id for t in running if t.datetime_start is not None and now - t.datetime_start > grace]
        if not old:
            return []
        beat = models.TrialHeartbeatModel
        with _create_scoped_session(self.scoped_session) as session:
            beating = {tid for (tid,) in session.query(beat.trial_id).filter(beat.trial_id.in_(old))}
        return [t for t in old if t not in beating]


def open_storage(url: str | None = None, heartbeat: int | None = 10, grace: int | None = None, create: bool = True) -> optuna.storages.RDBStorage:
    """Open (and create the tables of) the study storage at ``url`` (default: :func:`default_storage_url`).

    ``heartbeat``: seconds between a running trial's heartbeats (None: off, for readers only); ``grace``: seconds
    without a heartbeat after which a running trial counts as dead (default 3 heartbeats). A dead trial is failed
    and re-queued once with the same parameters. ``create=False``: an SQLite file must exist already (nothing is
    created otherwise). The schema is created under the :class:`StorageLock`, so processes starting together on a
    new database do not race. ConfigError names the (password-masked) URL on failure."""
    url = url or default_storage_url()
    if not isinstance(url, str) or not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", url):
        shown = mask_url(url) if isinstance(url, str) else url
        raise ConfigError(f"storage = {shown!r}: expected an SQLAlchemy URL such as sqlite:///runs/optuna.db "
                          "or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB")
    if urllib.parse.urlsplit(url).netloc.count("@") > 1:
        raise ConfigError(f"storage = {mask_url(url)!r}: the user name or password holds an unencoded '@'; write it as %40")
    if heartbeat is not None:
        check_heartbeat(heartbeat, grace)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.is_file():
            raise ConfigError(f"storage = {mask_url(url)!r}: {path} does not exist, so there is no study to join (nothing was created); "
                              "create the study first with `workbench sweep` without --join, or check --storage")
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for the file lock instead of failing at once
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    kwargs: dict[str, Any] = {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module=__name__)
    if heartbeat:
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": int(grace or 3 * heartbeat)}
        if retry is not None:
            kwargs["heartbeat_stale_trial_callback"] = retry(max_retry=1)
        else:  # optuna < 4.9
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    with storage_errors(url), StorageLock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _Storage(url, engine_kwargs=engine_kwargs, **kwargs)
