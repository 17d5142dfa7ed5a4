"""The caller's database: dm on the connection or engine Alembic's caller handed over.

Alembic's "sharing a connection" recipe, its asyncio recipe and pytest-alembic put a
SQLAlchemy ``Connection`` or ``Engine`` (or their asyncio twins) in
``config.attributes["connection"]``. dm then runs on that database and no other:

- A connection inside a transaction (``with engine.begin() as conn``, or one that already
  executed something): dm *joins* it. Its transactions become savepoints, nothing is
  committed, the lock is PostgreSQL's transaction-level advisory lock (released when the
  caller commits or rolls back), and the caller's rollback undoes everything dm did,
  tracker rows included. A ``transactional = False`` revision runs as one savepoint
  (``dm.batched`` pages without checkpoints); an autocommit block is refused.
- A connection with no transaction begun, or an engine (dm opens one connection from it):
  dm commits per revision as usual, holding a session advisory lock on that connection.

The caller's session settings are left alone (no ``lock_timeout``, no ``SET``); a sync
driver (psycopg, sqlite3) runs straight through SQLAlchemy's asyncio layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncTransaction
from sqlalchemy.util import await_only
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from dm.core.errors import ConfigError
from dm.engine.attempts import Runner
from dm.engine.execution import Database
from dm.engine.execution import run_info
from dm.engine.execution import tracker_for

if TYPE_CHECKING:
    from dm.config.settings import Settings
    from dm.engine.recording import Recorder

log = logging.getLogger("dm.shared")

SOURCE = "config.attributes['connection']"
"""How log lines and errors name the caller's connection."""

_SUPPORTED = ("postgresql", "sqlite")


def is_shareable(given: object) -> bool:
    """Return whether ``given`` is something dm can run on: a connection, an engine, or an
    object whose ``connect()`` yields a connection (as pytest-alembic wraps one)."""
    if isinstance(given, Connection | Engine | AsyncConnection | AsyncEngine):
        return True
    return callable(getattr(given, "connect", None))


def needs_callers_loop(given: object) -> bool:
    """Return whether ``given`` belongs to the caller's running event loop (an async driver's
    connection), so dm must run on that loop, from inside its greenlet."""
    if isinstance(given, AsyncConnection):
        return True
    return isinstance(given, Connection) and given.dialect.is_async


def is_thread_bound(given: object) -> bool:
    """Return whether ``given`` is an in-memory SQLite database of a sync driver, which
    exists only in the thread that opened it (dm cannot move it to a worker thread)."""
    if isinstance(given, Connection | Engine):
        engine = given.engine
        return (
            engine.dialect.name == "sqlite"
            and not engine.dialect.is_async
            and _in_memory(engine.url.database)
        )
    return False


class JoinedConnection(AsyncConnection):
    """The caller's connection inside the caller's transaction.

    dm's transactions on it are savepoints: ``begin`` opens one, ``commit`` releases it and
    ``rollback`` rolls back to it; the caller's own transaction is never ended.
    """

    def begin(self) -> AsyncTransaction:
        return self.begin_nested()

    async def commit(self) -> None:
        nested = self._sync().get_nested_transaction()
        if nested is not None:
            await greenlet_spawn(nested.commit)

    async def rollback(self) -> None:
        nested = self._sync().get_nested_transaction()
        if nested is not None:
            await greenlet_spawn(nested.rollback)

    def in_transaction(self) -> bool:
        return self._sync().in_nested_transaction()

    def _sync(self) -> Connection:
        assert self.sync_connection is not None
        return self.sync_connection


class SharedDatabase(Database):
    """A :class:`~dm.engine.execution.Database` on the caller's connection instead of dm's own."""

    def __init__(self, settings: Settings, sync: Connection) -> None:
        backend = sync.dialect.name
        if backend not in _SUPPORTED:
            raise ConfigError(
                f"the connection in {SOURCE} is {backend}; dm runs on PostgreSQL and SQLite"
            )
        self.settings = settings
        self.tracker = tracker_for(settings, backend)
        self.url = sync.engine.url
        self.application_name = f"dm:{settings.pod_name or socket.gethostname()}"
        self.joined = sync.in_transaction()
        """Whether dm runs inside the caller's transaction (see the module docstring)."""
        self.engine = _async_engine(sync.engine)
        view = JoinedConnection if self.joined else AsyncConnection
        self._given = view(self.engine, sync)
        self._conn = self._given
        self.run = run_info(settings)
        self._exit = contextlib.AsyncExitStack()
        self._announced = False

    async def close(self) -> None:
        await self._exit.aclose()  # the connection and engine stay the caller's

    async def conn(self) -> AsyncConnection:
        return self._given

    async def _close_conn(self) -> None:
        """Keep the caller's connection open while waiting for the lock: it is theirs."""

    def _file_missing(self) -> bool:
        return False

    def claim_timeout(self) -> float | None:
        """Inside the caller's transaction, set no ``lock_timeout``: it would outlive dm's
        savepoint and bound the caller's own statements."""
        return None if self.joined else self.settings.lock_timeout

    def migration_lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Return the lock on the caller's connection (PostgreSQL) or beside its file."""
        from dm.engine.lock import lock_on_connection
        from dm.engine.lock import migration_lock

        timeout = self.settings.lock_timeout
        if self.url.get_backend_name() == "postgresql":
            return lock_on_connection(self._given, self.tracker, timeout, joined=self.joined)
        if _in_memory(self.url.database):
            return contextlib.nullcontext()  # no other connection can see this database
        return migration_lock(self.url, self.tracker, timeout, self.application_name)

    def runner(self, recorder: Recorder) -> Runner:
        return Runner(recorder, timeout=self.settings.timeout, shared=True, joined=self.joined)

    async def prepare(self) -> None:
        """Make SQLite's transactions real ones on the caller's connection.

        The sqlite3 driver begins a transaction only before a data change, so the caller's
        ``engine.begin()`` may not have begun one yet, and DDL would commit at once. dm
        emits ``BEGIN`` itself: inside the caller's transaction once, otherwise whenever
        SQLAlchemy begins one (until :meth:`close`).
        """
        sync = self._given.sync_connection
        assert sync is not None
        if not sync.dialect.is_async:
            for name, listener in _SYNC_DRIVER_LISTENERS:
                event.listen(sync, name, listener)
                self._exit.callback(event.remove, sync, name, listener)
        if self.url.get_backend_name() != "sqlite":
            return
        if self.joined:
            if not await self._given.run_sync(_driver_in_transaction):
                await self._given.exec_driver_sql("BEGIN")
            return
        event.listen(sync, "begin", _sqlite_begin)
        self._exit.callback(event.remove, sync, "begin", _sqlite_begin)


@contextlib.asynccontextmanager
async def open_shared(
    settings: Settings, given: object, *, own_loop: bool
) -> AsyncIterator[SharedDatabase]:
    """Yield a :class:`SharedDatabase` on ``given`` (a connection, or one opened from an engine).

    :param own_loop: dm runs on a loop of its own, not the caller's: on PostgreSQL it
        connects through a pool of its own (see ``_own_pool``), closed afterwards, whatever
        the outcome.
    """
    if isinstance(given, Engine) and given.dialect.is_async:
        given = AsyncEngine(given)
    if isinstance(given, AsyncEngine):
        # asyncpg's connections belong to the loop that opened them; aiosqlite's work from
        # any loop (and an in-memory database lives in its pool's one connection).
        own_pool = own_loop and given.dialect.name == "postgresql"
        engine = _own_pool(given) if own_pool else given
        try:
            async with engine.connect() as conn:
                assert conn.sync_connection is not None
                async with _shared(settings, conn.sync_connection) as db:
                    yield db
        finally:
            if own_pool:
                await engine.dispose()
    elif isinstance(given, AsyncConnection):
        assert given.sync_connection is not None
        async with _shared(settings, given.sync_connection) as db:
            yield db
    elif isinstance(given, Connection):
        async with _shared(settings, given) as db:
            yield db
    else:  # an Engine, or anything whose connect() yields a Connection
        with given.connect() as sync:  # type: ignore[attr-defined]
            if not isinstance(sync, Connection):
                raise ConfigError(
                    f"{SOURCE}.connect() gave a {type(sync).__name__}, not a SQLAlchemy Connection"
                )
            async with _shared(settings, sync) as db:
                yield db


@contextlib.asynccontextmanager
async def _shared(settings: Settings, sync: Connection) -> AsyncIterator[SharedDatabase]:
    from dm.engine.alembic_context import environment

    db = SharedDatabase(settings, sync)
    try:
        await db.prepare()
        with environment(settings, db.tracker):
            yield db
    finally:
        await db.close()


def _own_pool(given: AsyncEngine) -> AsyncEngine:
    """Return the caller's async engine with a pool of dm's own (the same creator, pool
    events and dialect).

    An async driver's connection belongs to the event loop that opened it. The caller's
    pool holds connections of the caller's loop, which dm, on a loop of its own, cannot
    use; and a connection dm opened must not go back to that pool, where the caller's next
    query would meet a connection of dm's closed loop.
    """
    sync = given.sync_engine
    engine = Engine(
        sync.pool.recreate(),
        sync.dialect,
        sync.url,
        logging_name=sync.logging_name,
        echo=sync.echo,
        execution_options=sync.get_execution_options(),
        hide_parameters=sync.hide_parameters,
    )
    return AsyncEngine(engine)


def _async_engine(sync_engine: Engine) -> AsyncEngine:
    """Return an ``AsyncEngine`` over the caller's engine, whatever its driver.

    ``AsyncEngine`` refuses a sync driver because connecting through it would need an async
    one. dm never connects through it: it only wraps the caller's open connection, whose
    calls ``greenlet_spawn`` runs straight through (a sync driver never awaits).
    """
    if sync_engine.dialect.is_async:
        return AsyncEngine(sync_engine)
    engine = AsyncEngine.__new__(AsyncEngine)
    engine.sync_engine = engine._assign_proxied(sync_engine)
    return engine


def _yield_to_loop(*_: Any) -> None:
    """Let the event loop run before each statement of a sync driver.

    SQLAlchemy's asyncio layer expects every statement to await the driver; a sync driver
    never does, so each statement passes the loop once here (which also lets a signal or
    a time limit act between statements).
    """
    if in_greenlet():
        await_only(asyncio.sleep(0))


class _SoftClosingCursor:
    """A sync driver's cursor with the one method SQLAlchemy's asyncio results call on an
    async driver's cursor (closing it is left to the result, as with the sync driver)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    async def _async_soft_close(self) -> None:
        return None


def _adapt_cursor(*args: Any) -> None:
    context = args[4]
    if context is not None and not isinstance(context.cursor, _SoftClosingCursor):
        context.cursor = _SoftClosingCursor(context.cursor)


_SYNC_DRIVER_LISTENERS = (
    ("before_cursor_execute", _yield_to_loop),
    ("after_cursor_execute", _adapt_cursor),
)


def _driver_in_transaction(sync: Connection) -> bool:
    driver: Any = sync.connection.driver_connection
    return bool(getattr(driver, "in_transaction", True))


def _sqlite_begin(sync: Connection) -> None:
    if sync.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    if not _driver_in_transaction(sync):
        sync.exec_driver_sql("BEGIN")


def _in_memory(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database
