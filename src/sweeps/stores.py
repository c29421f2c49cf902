"""Where runs and studies are kept, checked before any work starts.

A tracking URI with a scheme MLflow has no store for (``ftp://``, or a plain folder, whose
file store MLflow 3 refuses) is a config error. A server that does not answer is an error
in seconds: left to the libraries, MLflow retries an unreachable tracking server or
database for about two minutes (urllib3's and its own backoff) and then prints a
traceback, after the run has been set up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds a server has to answer the check
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQL stores
SERVERS = ("http", "https")  # an MLflow tracking server
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"  # a local store's artifacts, beside mlruns/mlflow.db
TRACKING_SCHEMES = (*DATABASES, *SERVERS, "databricks")


class StoreError(RuntimeError):
    """A store that cannot be used: its server does not answer or is not what the URI says,
    its database driver is missing, or its local file cannot be made."""


def scheme(uri: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://u@h/db``; ``""`` for a path."""
    head, sep, _ = uri.partition("://")
    if not sep and uri.startswith("databricks"):  # "databricks" or "databricks://profile"
        return "databricks"
    return head.split("+", 1)[0].lower() if sep else ""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:///mlruns/mlflow.db`` relative,
    ``sqlite:////tmp/mlflow.db`` absolute), without its query string (``?timeout=60``).
    None for an in-memory database (``sqlite:///:memory:``, ``sqlite:///``) and for any
    other URI. Shared by the MLflow store and the Optuna storage."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    return None


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def check_tracking_uri(uri: str, name: str = "mlflow.tracking_uri") -> None:
    """ValueError naming the setting ``name``, ``uri`` and what is allowed, unless MLflow has a
    store for ``uri``."""
    if scheme(uri) in TRACKING_SCHEMES:
        return
    hint = (
        " (a folder is MLflow's file store, which MLflow 3 no longer opens)"
        if scheme(uri) in ("", "file")
        else ""
    )
    raise ValueError(
        f"{name} {redact(uri)!r} is not a store MLflow can open{hint}; use a "
        "database URI (sqlite:///mlruns/mlflow.db, postgresql://user:pw@host/db, mysql://, "
        "mssql://) or a tracking server's URL (http://host:5000)"
    )


def check_tracking_store(uri: str, name: str = "mlflow.tracking_uri", read: bool = False) -> None:
    """``check_tracking_uri``, then ``check_reachable``: what a command that reads or writes
    runs checks first. ``read``: it only reads runs, so a local SQLite store must exist
    (opening a missing one would make an empty store where the user mistyped a path)."""
    check_tracking_uri(uri, name)
    db = sqlite_path(uri)
    if read and db is not None and not db.is_file():
        raise StoreError(
            f"no MLflow store at {uri}: {db} does not exist (record runs with sweeps.run "
            f"first, or give {name} of a store that has them)"
        )
    check_reachable(uri, "MLflow tracking store")


def check_run_store(tracking_uri: str, artifact_root: str) -> None:
    """What a command that records runs checks first: its store (``check_reachable``) and,
    for a local store, its artifact folder (a tracking server keeps artifacts its own way)."""
    check_reachable(tracking_uri, "MLflow tracking store")
    if not is_server(tracking_uri):
        check_artifact_root(artifact_root)


def check_reachable(
    uri: str, what: str, timeout: float = CONNECT_TIMEOUT, shown: str | None = None
) -> None:
    """Raise ``StoreError`` unless the store behind ``uri`` can be used: a tracking server
    answers its ``/health`` request within ``timeout`` seconds (every MLflow server answers
    it; one that asks for credentials passes, as MLflow's own calls send them), a database
    server a connection, and a local SQLite file's folder can be made. ``what`` names the
    store in the message (``MLflow tracking store``, ``Optuna storage``), ``shown`` the URI
    to name there (the one the user gave, when ``uri`` names its driver); never a password."""
    kind = scheme(uri)
    where = f"the {what} at {redact(shown or uri)}"
    if kind in SERVERS:
        _check_http(uri, where, timeout)
    elif kind == "sqlite":
        db = sqlite_path(uri)
        if db is not None:  # None: in memory
            check_file(db, where)
    elif kind in DATABASES:
        _check_database(uri, where, timeout)


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (not a database or a folder)."""
    return scheme(uri) in SERVERS


def server_down(uri: str, timeout: float = 2.0) -> StoreError | None:
    """The error of a tracking server's health check (``timeout`` seconds at most, without
    MLflow's minutes of retries), or None when it answers."""
    try:
        check_reachable(uri, "MLflow tracking store", timeout=timeout)
    except StoreError as e:
        return e
    return None


def check_file(path: Path, where: str) -> None:
    """``StoreError`` unless a store's local file at ``path`` is a file or can be made: its
    folder made now (the store would make it), writable, and ``path`` not a folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot make the folder of {where}: {e.strerror} ({e.filename})"
        ) from None
    if path.is_dir():
        raise StoreError(f"{where} is a folder, not a file")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"cannot write into the folder of {where} ({path.parent})")


def check_artifact_root(root: str, name: str = "mlflow.artifact_root") -> None:
    """``StoreError`` unless a local artifact folder (a path or ``file://``; where a local
    store's new experiments keep their artifacts) can be made and written; made now."""
    if scheme(root) not in ("", "file"):
        return  # s3://, a server's own: not ours to check
    path = Path(root.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot make {name} {root}: {e.strerror} ({e.filename})") from None
    if not os.access(path, os.W_OK):
        raise StoreError(f"cannot write into {name} {root}")


def _check_http(uri: str, where: str, timeout: float) -> None:
    health = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # a server that wants credentials: MLflow sends them
            return
        raise StoreError(
            f"{where} answers {redact(health)} with HTTP {e.code} "
            f"{e.reason}: it is not an MLflow tracking server, or not a running one"
        ) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):  # it answered; MLflow has its own TLS settings
            return
        reason: object = e.reason
    except (OSError, ValueError) as e:  # a timeout, a reset; a malformed URL
        reason = e
    raise StoreError(f"{where} does not answer ({reason}); {_start_hint(uri)}")


def _start_hint(uri: str) -> str:
    """What to do about a tracking server that does not answer: on this machine, the
    command that starts one at that address; elsewhere, check that it runs."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if host in ("localhost", "127.0.0.1", "::1"):
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # a malformed port: MLflow's default
            port = 5000
        return (
            f"start it (mlflow server --host {host} --port {port} --backend-store-uri "
            "sqlite:///mlruns/mlflow.db) or use a store that runs"
        )
    return (
        f"check that it runs and that this machine reaches {host or uri}, or use a store that runs"
    )


def _check_database(uri: str, where: str, timeout: float) -> None:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # libpq and MySQL take whole seconds (0: wait for ever)
    seconds = max(1, math.ceil(timeout))
    connect_args = {"connect_timeout": seconds} if scheme(uri) != "mssql" else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        extra = " (pip install 'sweeps[postgres]')" if scheme(uri) == "postgresql" else ""
        raise StoreError(f"no database driver for {where}: {e}{extra}") from None
    try:
        with engine.connect():
            return
    except sqlalchemy.exc.SQLAlchemyError as e:
        orig = getattr(e, "orig", None) or e
        reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        raise StoreError(f"cannot connect to {where}: {reason}") from None
    finally:
        engine.dispose()


# -- a database store that stops answering for a while -------------------------------------

#: seconds a database store may stay unreachable (a server restart, a failover) before the
#: error of a ``retrying`` call that waits for it is raised
PATIENCE = 120.0
_retry_state = threading.local()  # inside a retried call: nested calls are not retried again
_answered_again = -math.inf  # time.monotonic() when a store last answered after a wait


class LockLost(Exception):
    """The database session that held a cross-process lock ended while it was held (its
    server restarted, its connection dropped): the server released the lock then, so
    another process may have taken it and what was done under it may have raced that."""


def guarding(check: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
    """Within: a ``retrying`` call that fails with a ``transient`` error first calls
    ``check``, which raises ``LockLost`` when the lock the caller holds is gone; the call
    is then not made again without it. One per thread (a lock's holder)."""

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        previous = getattr(_retry_state, "guard", None)
        _retry_state.guard = check
        try:
            yield
        finally:
            _retry_state.guard = previous

    return scope()


def waited_within(seconds: float) -> bool:
    """Whether this process waited for a store that did not answer (``retrying``) within the
    last ``seconds``: what others recorded meanwhile (heartbeats) may be late by as long."""
    return time.monotonic() - _answered_again < seconds


def transient(e: BaseException) -> BaseException | None:
    """The error in ``e``'s chain that makes it the database server being unreachable for
    now (restarting, failing over, a dropped connection) or a transaction to run again (a
    deadlock), not a fault of the request: SQLAlchemy's OperationalError or InterfaceError,
    or a connection it invalidated, also when wrapped (Optuna's StorageInternalError,
    MLflow's MlflowException). None for any other error (an MLflow tracking server's
    connection errors included: MLflow's client retries those itself)."""
    import sqlalchemy.exc

    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, LockLost):  # waiting brings no lock back
            return None
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return err
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return err
        err = err.__cause__ or err.__context__
    return None


def retrying(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, called again while it fails with a ``transient`` error, for up
    to ``PATIENCE`` seconds (0.5 s, then doubling up to 5 s between calls), with one
    warning when the waiting starts and one line when it is over. ``what`` names the store."""
    global _answered_again
    if getattr(_retry_state, "active", False):
        return fn(*args, **kwargs)
    _retry_state.active = True
    try:
        start, pause, warned = time.monotonic(), 0.5, False
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                cause = transient(e)
                if cause is None:
                    raise
                guard = getattr(_retry_state, "guard", None)
                if guard is not None:
                    guard()  # raises LockLost when the caller's lock went with the server
                if time.monotonic() - start + pause > PATIENCE:
                    raise
                if not warned:
                    text = str(getattr(cause, "orig", None) or cause).strip()
                    log.warning(
                        "the %s does not answer (%s); trying again for up to %.0f s",
                        what,
                        text.splitlines()[0] if text else type(cause).__name__,
                        PATIENCE,
                    )
                    warned = True
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if warned:
                _answered_again = time.monotonic()
                log.warning("the %s answers again (%.1f s)", what, _answered_again - start)
            return result
    finally:
        _retry_state.active = False
