"""``dm.core.transient``: which failures a retry may cure, classified from the exception chain.

The exceptions are the drivers' own classes, and where it is cheap the real thing: a refused
connection, a failed DNS lookup, SQLite's busy error, PostgreSQL's refused login.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError

from conftest import PG_HOST
from conftest import PG_PORT
from conftest import pg_user
from dm.core.transient import is_transient
from dm.core.transient import transient_reason

pytestmark = pytest.mark.matrix  # also runs in the version matrix (tests/README.md)

TRANSIENT_SQLSTATES = ["08000", "08003", "08006", "57P01", "57P02", "57P03", "40001", "40P01"]
TRANSIENT_SQLSTATES += ["55P03", "53300", "25006"]
PERMANENT_SQLSTATES = ["23505", "42P01", "42601", "22012", "28P01", "3D000", "57014"]


def _postgres_error(sqlstate: str) -> Exception:
    """Return an instance of asyncpg's exception class for ``sqlstate``."""
    classes = {
        getattr(cls, "sqlstate", None): cls
        for cls in (getattr(asyncpg.exceptions, name) for name in asyncpg.exceptions.__all__)
        if isinstance(cls, type)
    }
    error: Exception = classes[sqlstate](f"server said {sqlstate}")
    return error


def _wrapped(orig: Exception) -> DBAPIError:
    """Wrap ``orig`` the way SQLAlchemy reports a driver error."""
    return DBAPIError("SELECT 1", None, orig)


@pytest.mark.parametrize("sqlstate", TRANSIENT_SQLSTATES)
def test_transient_sqlstates(sqlstate: str) -> None:
    error = _postgres_error(sqlstate)
    assert transient_reason(error) == f"SQLSTATE {sqlstate}"
    assert is_transient(_wrapped(error))


@pytest.mark.parametrize("sqlstate", PERMANENT_SQLSTATES)
def test_permanent_sqlstates(sqlstate: str) -> None:
    error = _postgres_error(sqlstate)
    assert not is_transient(error)
    assert not is_transient(_wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 1)"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    ],
    ids=repr,
)
def test_network_failures_are_transient(error: OSError) -> None:
    assert is_transient(error)
    assert is_transient(_wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad data"),
        KeyError("missing"),
        ZeroDivisionError("division by zero"),
        TimeoutError(),  # a revision's own time limit: the next run would time out too
        FileNotFoundError(errno.ENOENT, "No such file"),
        PermissionError(errno.EACCES, "Permission denied"),
        OSError("something else"),
        asyncpg.exceptions.InterfaceError("cannot perform operation: another is in progress"),
    ],
    ids=repr,
)
def test_other_failures_are_permanent(error: Exception) -> None:
    assert not is_transient(error)
    assert transient_reason(error) is None


def test_a_connection_sqlalchemy_invalidated_is_transient() -> None:
    """SQLAlchemy's disconnect detection (``connection_invalidated``) counts as lost."""
    error = OperationalError("SELECT 1", None, ValueError("closed"), connection_invalidated=True)
    assert transient_reason(error) == "connection lost"


def test_the_chain_is_followed_through_cause_and_context() -> None:
    deadlock = _wrapped(_postgres_error("40P01"))
    with pytest.raises(RuntimeError) as caused:
        try:
            raise deadlock
        except DBAPIError as exc:
            raise RuntimeError("revision gave up") from exc
    assert is_transient(caused.value)

    with pytest.raises(RuntimeError) as handled:
        try:
            raise deadlock
        except DBAPIError:
            raise RuntimeError("while handling it") from None
    assert not is_transient(handled.value)  # "from None" hides the context

    with pytest.raises(RuntimeError) as implicit:
        try:
            raise deadlock
        except DBAPIError:
            raise RuntimeError("while handling it")  # noqa: B904
    assert is_transient(implicit.value)


def test_a_cyclic_chain_ends() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert not is_transient(first)


def test_a_real_refused_connection_is_transient() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def connect() -> None:
        await asyncpg.connect(host="127.0.0.1", port=port, user="x", database="x", timeout=5)

    with pytest.raises(OSError) as excinfo:
        asyncio.run(connect())
    assert is_transient(excinfo.value)


def test_a_real_dns_failure_is_transient() -> None:
    with pytest.raises(socket.gaierror) as excinfo:
        socket.getaddrinfo("no-such-host.invalid", 5432)
    assert transient_reason(excinfo.value) == "DNS failure"


def test_real_sqlite_busy_is_transient(tmp_path: Path) -> None:
    """Another writer holds the file past the busy timeout: the lock wait timed out."""
    path = tmp_path / "busy.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("CREATE TABLE t (x INTEGER)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as excinfo:
            waiter.execute("BEGIN IMMEDIATE")
    finally:
        holder.close()
        waiter.close()
    assert transient_reason(excinfo.value) == "SQLITE_BUSY"


def test_a_real_missing_sqlite_directory_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError) as excinfo:
        sqlite3.connect(tmp_path / "missing" / "db.sqlite3")
    assert not is_transient(excinfo.value)


@pytest.mark.postgres
def test_a_real_refused_login_and_missing_database_are_permanent() -> None:
    """A person must fix these: retrying would only delay the error."""

    async def connect(user: str, database: str) -> None:
        conn = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=user, database=database, timeout=5
        )
        await conn.close()  # pragma: no cover

    for user, database in (("dm_no_such_role", "postgres"), (pg_user(), "dm_no_such_db")):
        with pytest.raises(asyncpg.PostgresError) as excinfo:
            asyncio.run(connect(user, database))
        assert not is_transient(excinfo.value), excinfo.value


# -- psycopg 3: libpq reports a failed connection without a SQLSTATE ---------------------------


def test_a_real_refused_psycopg_connection_is_transient() -> None:
    import psycopg

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(host="127.0.0.1", port=port, user="x", dbname="x", connect_timeout=5)
    assert transient_reason(excinfo.value) == "connection failed"
    assert is_transient(_wrapped(excinfo.value))


@pytest.mark.postgres
def test_a_real_psycopg_refused_login_and_missing_database_are_permanent() -> None:
    import psycopg

    for user, database in (("dm_no_such_role", "postgres"), (pg_user(), "dm_no_such_db")):
        with pytest.raises(psycopg.OperationalError) as excinfo:
            psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=database)
        assert not is_transient(excinfo.value), excinfo.value


@pytest.mark.postgres
def test_a_real_psycopg_lock_timeout_is_transient() -> None:
    """psycopg's SQLSTATEs come from its own exception classes, with the same attribute."""
    import psycopg

    dsn = f"host={PG_HOST} port={PG_PORT} user={pg_user()} dbname=postgres"
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as waiter:
        holder.execute("SELECT pg_advisory_xact_lock(2323)")
        waiter.execute("SET lock_timeout = '50ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable) as excinfo:
            waiter.execute("SELECT pg_advisory_xact_lock(2323)")
    assert transient_reason(_wrapped(excinfo.value)) == "SQLSTATE 55P03"
