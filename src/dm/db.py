"""Engines and connections: asyncpg for PostgreSQL, aiosqlite for the embedded default."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .errors import DatabaseUnavailable

CONNECT_TIMEOUT = 15.0
SQLITE_BUSY_TIMEOUT = 30.0


def create_engine(
    url: URL, *, application_name: str = "dm", autocommit: bool = False
) -> AsyncEngine:
    """Return an engine without a pool: dm holds one connection per purpose."""
    connect_args: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args["server_settings"] = {"application_name": application_name[:63]}
        connect_args["timeout"] = CONNECT_TIMEOUT
    else:
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT
    if autocommit:
        options["isolation_level"] = "AUTOCOMMIT"
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args, **options)
    if is_sqlite(url) and not autocommit:
        _emit_sqlite_begin(engine)
    return engine


def _emit_sqlite_begin(engine: AsyncEngine) -> None:
    """Make SQLAlchemy emit BEGIN itself (SQLAlchemy's documented SQLite recipe).

    The sqlite3 driver's legacy mode begins a transaction only before INSERT/UPDATE/
    DELETE, so DDL such as CREATE TABLE at the start of a revision was committed at once
    and survived the revision's rollback.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def is_sqlite(url: URL) -> bool:
    """Return whether ``url`` points at a SQLite database."""
    return url.get_backend_name() == "sqlite"


@contextlib.asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """Open a connection, reporting an unreachable database in one line."""
    try:
        conn = await engine.connect()
    except Exception as exc:
        raise DatabaseUnavailable(describe_connect_error(engine.url, exc)) from None
    try:
        yield conn
    finally:
        await conn.close()


def describe_connect_error(url: URL, exc: BaseException) -> str:
    """Return one line naming the database (password hidden) and why it failed."""
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    if url.get_backend_name() == "postgresql":
        where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}/{url.database}"
        if url.username:
            where += f" as {url.username}"
    else:
        where = f"SQLite file {url.database}"
    return f"cannot connect to {where}: {type(cause).__name__}: {reason}"
