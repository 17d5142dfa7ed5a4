"""Engines and connections: asyncpg for PostgreSQL, aiosqlite for the embedded default.

A run's first connections retry a transient failure (refused, reset, timed out, DNS) with
exponential backoff and jitter for up to ``DM_CONNECT_RETRY_SECONDS``, logging each retry;
a login refused, a missing database or a bad URL fails at once.

A PostgreSQL URL marked as going through a transaction pooler (``statement_cache_size=0``,
see ``dm.config.urls.through_pooler``) gets connections on which nothing outlives its
transaction: statements are prepared unnamed and cached nowhere, and settings are applied
per transaction (``transaction_settings``) instead of to the session. On such a URL dm
also runs no statement outside a transaction: a pooler may send an autocommit statement's
Parse and Bind to two different server connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
import weakref
from collections.abc import AsyncIterator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dm.config.liveness import driver_transport
from dm.config.liveness import tune_socket
from dm.config.pooler import pooler_problem
from dm.config.urls import connect_arguments
from dm.config.urls import is_psycopg
from dm.config.urls import mask_urls_in
from dm.core.errors import DatabaseUnavailable
from dm.core.errors import DatabaseUnreachable
from dm.core.transient import is_transient

log = logging.getLogger("dm.db")

_configured_urls: weakref.WeakKeyDictionary[Engine, URL] = weakref.WeakKeyDictionary()

CONNECT_TIMEOUT = 15.0
SQLITE_BUSY_TIMEOUT = 30.0
SQLITE_IMMEDIATE = "dm_sqlite_immediate"
"""Execution option: begin each transaction of the connection with ``BEGIN IMMEDIATE``
(SQLite's write lock from the start). A run's working connection sets it: a transaction
that read first and then writes would fail at once ("database is locked") if another
process (``dm pause``) took the write lock in between; holding it from the start makes
the other process wait for the commit instead."""
RETRY_FIRST_PAUSE = 0.25
"""Pause before the first retry of a connection (doubled each time, with jitter)."""
RETRY_MAX_PAUSE = 4.0
"""Longest pause between two connection attempts."""


def create_engine(
    url: URL,
    *,
    application_name: str = "dm",
    autocommit: bool = False,
    timeout: float | None = None,
) -> AsyncEngine:
    """Return an engine without a pool: dm holds one connection per purpose.

    :param timeout: seconds to connect (PostgreSQL) or to wait for a lock (SQLite).
    """
    connect_args: dict[str, Any] = {}
    options: dict[str, Any] = {}
    configured = url
    if is_psycopg(url):
        url, from_url = connect_arguments(url)
        connect_args["connect_timeout"] = math.ceil(timeout or CONNECT_TIMEOUT)
        connect_args["application_name"] = application_name[:63]
        connect_args.update(from_url)  # the URL's own values win over dm's
    elif url.get_backend_name() == "postgresql":
        url, from_url = connect_arguments(url)
        connect_args["timeout"] = timeout or CONNECT_TIMEOUT
        connect_args.update(from_url)
        # The URL's own application_name (and `options` settings) win over dm's.
        connect_args["server_settings"] = {
            "application_name": application_name[:63],
            **from_url.get("server_settings", {}),
        }
    else:
        connect_args["timeout"] = timeout or SQLITE_BUSY_TIMEOUT
    if autocommit:
        options["isolation_level"] = "AUTOCOMMIT"
    # hide_parameters: a failing statement's bound values (row data) stay out of every
    # error text, hence out of the tracker and the logs.
    engine = create_async_engine(
        url, poolclass=NullPool, connect_args=connect_args, hide_parameters=True, **options
    )
    _configured_urls[engine.sync_engine] = configured
    if url.get_backend_name() == "postgresql":
        _tune_sockets(engine)
    if is_sqlite(url) and not autocommit:
        _emit_sqlite_begin(engine)
    if is_sqlite(url):
        _create_private_database(engine, url)
    return engine


def _create_private_database(engine: AsyncEngine, url: URL) -> None:
    """Create a SQLite database file that does not exist yet with mode 0600 (it holds the
    tracker's tracebacks), refusing a symlink or non-regular file at its path, just before
    the first connection would create it under the umask."""
    from dm.config.files import create_private

    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)

    @event.listens_for(engine.sync_engine, "do_connect")
    def _before_connect(*_args: Any) -> None:
        if not os.path.lexists(path):  # an existing file (or link) is the user's own
            create_private(path, "SQLite database")


def _tune_sockets(engine: AsyncEngine) -> None:
    """Give each new connection's socket TCP keepalives and ``TCP_USER_TIMEOUT``
    (``dm.config.liveness``): asyncpg has no parameters for them."""

    @event.listens_for(engine.sync_engine, "connect")
    def _tune(dbapi_connection: Any, _record: Any) -> None:
        transport = driver_transport(getattr(dbapi_connection, "driver_connection", None))
        if transport is not None:
            tune_socket(transport.get_extra_info("socket"))


def configured_url(engine: AsyncEngine) -> URL:
    """Return the URL ``engine`` was made from, with the query parameters (``options``,
    SSL, ``connect_timeout``) that left ``engine.url`` for the driver's arguments."""
    return _configured_urls.get(engine.sync_engine, engine.url)


def _emit_sqlite_begin(engine: AsyncEngine) -> None:
    """Make SQLAlchemy emit BEGIN itself (SQLAlchemy's documented SQLite recipe).

    The sqlite3 driver's legacy mode begins a transaction only before INSERT/UPDATE/
    DELETE, so DDL such as CREATE TABLE at the start of a revision was committed at once
    and survived the revision's rollback. A connection switched to ``AUTOCOMMIT`` (an
    autocommit block, ``dm.autocommit``) gets no BEGIN: each statement commits at once.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(SQLITE_IMMEDIATE) else "BEGIN")


def is_sqlite(url: URL) -> bool:
    """Return whether ``url`` points at a SQLite database."""
    return url.get_backend_name() == "sqlite"


@contextlib.asynccontextmanager
async def connect(
    engine: AsyncEngine, *, retry_seconds: float = 0.0
) -> AsyncIterator[AsyncConnection]:
    """Open a connection, retrying transient failures for ``retry_seconds``.

    :raises DatabaseUnreachable: the failure was transient and outlasted the retries.
    :raises DatabaseUnavailable: the login was refused, the database is missing, or the
        URL cannot be used (not retried: a person must fix it).
    """
    conn = await open_connection(engine, retry_seconds=retry_seconds)
    try:
        yield conn
    finally:
        await conn.close()


async def open_connection(engine: AsyncEngine, *, retry_seconds: float = 0.0) -> AsyncConnection:
    """Return a new connection (the caller closes it), retrying as :func:`connect` does."""
    deadline = time.monotonic() + retry_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            if retry_seconds <= 0:
                return await engine.connect()
            # Each attempt is bounded too, so the whole wait stays near retry_seconds.
            remaining = deadline - time.monotonic()
            async with asyncio.timeout(min(CONNECT_TIMEOUT, max(remaining, 1.0))):
                return await engine.connect()
        except Exception as exc:
            message = describe_connect_error(engine.url, exc)
            if not (is_transient(exc) or isinstance(exc, TimeoutError)):
                raise DatabaseUnavailable(message) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if attempt > 1:
                    message += f" (gave up after {attempt} attempts in {retry_seconds:g}s)"
                raise DatabaseUnreachable(message) from None
            pause = min(remaining, _backoff(attempt))
            log.warning(
                "%s; retry %d in %.1fs (for up to %gs: DM_CONNECT_RETRY_SECONDS)",
                message,
                attempt,
                pause,
                retry_seconds,
            )
            await asyncio.sleep(pause)


def _backoff(attempt: int) -> float:
    """Return the pause after failed attempt number ``attempt``: doubling, jittered."""
    pause = min(RETRY_FIRST_PAUSE * 2.0 ** (attempt - 1), RETRY_MAX_PAUSE)
    return pause * random.uniform(0.5, 1.0)


def transaction_settings(conn: AsyncConnection, settings: Mapping[str, str]) -> None:
    """Apply ``settings`` to every later transaction of ``conn``, each ending with it.

    For a connection that may be pooled: a session ``SET`` would stay on the server
    connection for the pooler's next client. Each transaction begins with one
    ``set_config(name, value, true)`` per setting, in a single statement; an autocommit
    connection gets none.
    """
    if not settings:
        return
    calls = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in settings.items())
    statement = f"SELECT {calls}"
    sync = conn.sync_connection
    assert sync is not None

    @event.listens_for(sync, "begin")
    def _apply(begun: Any) -> None:
        if begun.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            begun.exec_driver_sql(statement)


def describe_connect_error(url: URL, exc: BaseException) -> str:
    """Return one line naming the database (password hidden) and why it failed."""
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    reason = " ".join(str(cause).split())
    problem = pooler_problem(exc)
    if problem is not None:
        reason = str(problem)
    if not reason:
        reason = "timed out" if isinstance(cause, TimeoutError) else type(cause).__name__
    secrets = [str(url.password)] if url.password else []
    reason = mask_urls_in(reason, secrets)
    if url.get_backend_name() == "postgresql":
        where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}/{url.database}"
        if url.username:
            where += f" as {url.username}"
    else:
        where = f"SQLite file {url.database}"
    return f"cannot connect to {where}: {type(cause).__name__}: {reason}"
