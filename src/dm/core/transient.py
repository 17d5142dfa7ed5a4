"""Tell failures a retry may cure (transient) from those a person must fix (permanent).

A failure is transient when anything in its exception chain (``__cause__``, ``__context__``
and SQLAlchemy's ``orig``) is one of:

- a lost or refused connection: ``ConnectionError`` (refused, reset, aborted, broken pipe),
  an ``OSError`` whose errno says the network or host is unreachable, a DNS failure
  (``socket.gaierror``), asyncio's "Multiple exceptions" of a connect to several addresses,
  or a connection SQLAlchemy invalidated because the driver reported it closed;
- a PostgreSQL SQLSTATE of class 08 (connection exception), 57P01 ``admin_shutdown``,
  57P02 ``crash_shutdown``, 57P03 ``cannot_connect_now``, 40001 ``serialization_failure``,
  40P01 ``deadlock_detected``, 55P03 ``lock_not_available`` (``lock_timeout``), 53300
  ``too_many_connections`` (another client leaves) or 25006 ``read_only_sql_transaction``
  (a primary demoted to a replica while a failover is in progress);
- SQLite's busy or locked error (its wait for another writer timed out).

Everything else is permanent: the revision's own error, ``verify()`` failing, bad
configuration, files or targets, a login refused or a database missing. This module is pure:
it imports no driver and reads only attributes of the exceptions it is given.
"""

from __future__ import annotations

import errno
import socket

TRANSIENT_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "40001", "40P01", "55P03", "53300", "25006"}
)
"""SQLSTATEs a retry may cure, besides the whole class 08."""
LOCK_NOT_AVAILABLE = "55P03"
"""``lock_not_available``: a lock wait ran past ``lock_timeout`` (or ``NOWAIT`` failed)."""

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,
    }
)
_SQLITE_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_MAX_DEPTH = 32


def transient_reason(exc: BaseException) -> str | None:
    """Return why ``exc`` is transient (e.g. ``SQLSTATE 40P01``), or None when it is not."""
    for link in _chain(exc):
        reason = _reason_of(link)
        if reason is not None:
            return reason
    return None


def is_transient(exc: BaseException) -> bool:
    """Return whether a retry of the same run may succeed where ``exc`` failed."""
    return transient_reason(exc) is not None


def is_lock_timeout(exc: BaseException) -> bool:
    """Return whether ``exc`` is a PostgreSQL lock wait that ran past ``lock_timeout``
    (SQLSTATE 55P03 ``lock_not_available``), anywhere in its chain."""
    return any(
        (getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)) == LOCK_NOT_AVAILABLE
        for link in _chain(exc)
    )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc`` and every exception it was raised from or while handling (with
    SQLAlchemy's ``orig``), nearest first."""
    return _chain(exc)


def _chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc`` and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _MAX_DEPTH:
        link = todo.pop(0)
        if any(link is known for known in seen):
            continue
        seen.append(link)
        nexts = [getattr(link, "orig", None), link.__cause__]
        if not link.__suppress_context__:
            nexts.append(link.__context__)
        todo.extend(e for e in nexts if isinstance(e, BaseException))
    return seen


def _reason_of(exc: BaseException) -> str | None:
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES):
        return f"SQLSTATE {sqlstate}"
    if getattr(exc, "connection_invalidated", False) is True:
        return "connection lost"
    if getattr(exc, "sqlite_errorname", None) in _SQLITE_BUSY:
        return str(getattr(exc, "sqlite_errorname", ""))
    if _is_psycopg_connection_failure(exc):
        return "connection failed"
    if isinstance(exc, socket.gaierror):
        return "DNS failure"
    if isinstance(exc, ConnectionError):
        return type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError):
        if exc.errno in _TRANSIENT_ERRNOS:
            return type(exc).__name__
        if exc.errno is None and str(exc).startswith("Multiple exceptions:"):
            return "connection refused"  # asyncio tried several addresses; each failed
    return None


# libpq's words for a connection that could not be made or was lost; psycopg raises them as
# an OperationalError without a SQLSTATE (a refused login or a missing database has other
# words, and stays permanent).
_LIBPQ_CONNECTION_FAILURES = (
    "connection refused",
    "could not translate host name",
    "timeout expired",
    "server closed the connection unexpectedly",
    "connection reset",
    "no route to host",
    "network is unreachable",
    "could not receive data from server",
    "could not send data to server",
    "the database system is starting up",
    "the database system is shutting down",
)


def _is_psycopg_connection_failure(exc: BaseException) -> bool:
    kind = type(exc)
    if not kind.__module__.startswith("psycopg") or kind.__name__ != "OperationalError":
        return False
    if getattr(exc, "sqlstate", None):
        return False
    text = str(exc).lower()
    return any(words in text for words in _LIBPQ_CONNECTION_FAILURES)
