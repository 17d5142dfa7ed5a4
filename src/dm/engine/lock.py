"""The migration lock: one writing dm run per tracker at a time.

PostgreSQL: a transaction-level advisory lock (``pg_try_advisory_xact_lock``) held in a
transaction left open on a dedicated connection for the whole run. An open transaction
keeps its server connection, whatever sits in between: a connection pooler in
transaction or session mode cannot hand it to another client, and the lock ends with the
transaction (at the end of the run, or when the client dies or its connection is closed:
the server or the pooler then rolls it back). No session state is used, so nothing is
left on a pooled server connection.

While waiting, each try is a short transaction on a fresh connection: a waiting run holds
no server connection between tries (in a small session pool the holder can still open
its working connection). The lock transaction sets, with ``SET LOCAL``,
``client_connection_check_interval`` and TCP keepalives (a dead client or node frees the
lock within seconds or about half a minute) and turns the idle-in-transaction timeouts
off. It runs its last statement of each round trip in the simple query protocol, so no
snapshot stays open (it holds back neither ``VACUUM`` nor ``CREATE INDEX CONCURRENTLY``).
While the lock is held a watchdog pings the connection; if it dies the lock is gone, so
the run is stopped (``LockLost``) rather than go on unprotected.

SQLite: an exclusive ``flock`` on ``<database>.<table>.lock``, which the kernel releases
when the process dies; the file names the holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from dm.config.files import open_regular
from dm.config.pooler import pooler_problem
from dm.core.errors import ConfigError
from dm.core.errors import FenceLost
from dm.core.errors import LockLost
from dm.core.errors import LockTimeout
from dm.core.errors import PoolExhausted
from dm.core.errors import describe_error

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine

    from dm.engine.tracker import Tracker

log = logging.getLogger("dm.lock")

POLL_SECONDS = 1.0
"""Upper bound of the (jittered) pause between two attempts on PostgreSQL."""
REPORT_SECONDS = 5.0
"""How often a waiting run logs who holds the lock."""
HEARTBEAT_SECONDS = 5.0
"""How often the lock connection is pinged while the lock is held."""
HEARTBEAT_TIMEOUT = 30.0
"""A ping slower than this counts as a dead lock connection."""
UNLOCK_TIMEOUT = 5.0
"""How long releasing the lock may take before its connection is dropped instead."""

POOL_WAIT_MIN = 5.0
"""Shortest time one try may wait for the pooler to give it a server connection."""


def _lock_settings(version: tuple[int | str, ...]) -> str:
    """Return the ``SET LOCAL`` statements of the lock transaction for server ``version``.

    All are user-settable, so no privilege is needed; each ends with the transaction.
    """
    settings = [
        # A dead node (no FIN/RST) is noticed within about 10 + 5 * 3 seconds.
        "tcp_keepalives_idle = 10",
        "tcp_keepalives_interval = 5",
        "tcp_keepalives_count = 3",
        # The lock transaction is idle for the whole run; it must not be ended for that.
        "idle_in_transaction_session_timeout = 0",
    ]
    if version >= (12,):
        # Data the server sent that stays unacknowledged this long drops the connection.
        settings.append("tcp_user_timeout = 20000")
    if version >= (14,):
        # A client that died is noticed within a second.
        settings.append("client_connection_check_interval = 1000")
    if version >= (17,):
        settings.append("transaction_timeout = 0")
    return "; ".join(f"SET LOCAL {setting}" for setting in settings)


def lock_key(tracker: Tracker) -> int:
    """Return the signed 64-bit advisory lock key of ``tracker``'s table as the server
    resolves it (``resolve_relation``; the configured name until it is resolved)."""
    name = tracker.relation or tracker.qualified_name
    digest = hashlib.sha256(f"dm:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_RESOLVE = sa.text(
    "SELECT current_database() AS db, coalesce(CAST(:schema AS text), (SELECT n.nspname "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass(quote_ident(CAST(:table AS text)))), current_schema()) AS schema"
)


async def resolve_relation(conn: AsyncConnection, tracker: Tracker) -> str:
    """Resolve ``tracker``'s table as the server sees it on ``conn``: its database, its
    schema (the configured one; else where ``search_path`` finds the table, or would create
    it) and its name. Two configurations naming one table differently (``search_path``
    versus ``DM_TRACKER_SCHEMA``) thus take one lock. Read-only; runs in the connection's
    transaction (or begins one, which the caller ends)."""
    if tracker.relation is None:
        params = {"schema": tracker.schema, "table": tracker.name}
        row = (await conn.execute(_RESOLVE, params)).one()
        tracker.relation = f"{row.db}.{row.schema}.{tracker.name}"
    return tracker.relation


@contextlib.asynccontextmanager
async def migration_lock(
    url: URL,
    tracker: Tracker,
    timeout: float,
    application_name: str,
    *,
    connect_retry: float = 0.0,
) -> AsyncIterator[None]:
    """Hold the migration lock for ``tracker`` while the block runs.

    :param timeout: seconds to wait for another run to finish (0 = try once).
    :param connect_retry: seconds to retry a transient failure to open the lock connection.
    :raises LockTimeout: the lock was still held by another run after ``timeout``.
    :raises LockLost: the lock's PostgreSQL connection died while the block ran; the
        block was cancelled.
    """
    if url.get_backend_name() == "postgresql":
        if tracker.relation is None:  # resolved where the lock connection points
            await _resolve_on(url, tracker, connect_retry)
        key = lock_key(tracker)
        database = tracker.relation.rsplit(".", 2)[0] if tracker.relation else None
        async with _advisory_lock(
            url, key, timeout, application_name, connect_retry, database=database
        ):
            yield
    else:
        async with _file_lock(_sqlite_lock_path(url, tracker), timeout):
            yield


async def current_holder(url: URL, tracker: Tracker) -> str | None:
    """Return who holds ``tracker``'s migration lock right now, or None when it is free.

    Read-only and never waits: PostgreSQL is asked through ``pg_locks``; on SQLite the lock
    file is tried without blocking and released at once.
    """
    if url.get_backend_name() != "postgresql":
        return _file_probe(_sqlite_lock_path(url, tracker))
    from dm.config.engines import connect

    engine = _lock_engine(url, "dm:info")
    try:
        async with connect(engine) as conn, conn.begin():
            await resolve_relation(conn, tracker)
            return await _pg_holder(conn, lock_key(tracker))
    finally:
        await engine.dispose()


async def _resolve_on(url: URL, tracker: Tracker, connect_retry: float) -> None:
    """Resolve ``tracker``'s relation on a short-lived connection of ``url``."""
    from dm.config.engines import connect

    engine = _lock_engine(url, "dm:lock")
    try:
        async with connect(engine, retry_seconds=connect_retry) as conn, conn.begin():
            await resolve_relation(conn, tracker)
    finally:
        await engine.dispose()


def writer_waiting_path(url: URL, tracker: Tracker) -> Path | None:
    """Return the file whose presence asks a SQLite run to let another writer in between
    two batches (``dm pause``/``dm cancel``); None on PostgreSQL, where rows are locked,
    not the database."""
    if url.get_backend_name() == "postgresql":
        return None
    database = Path(url.database or "dm.sqlite3").resolve()
    return database.with_name(f"{database.name}.{tracker.name}.writer-waiting")


def _sqlite_lock_path(url: URL, tracker: Tracker) -> Path:
    database = Path(url.database or "dm.sqlite3").resolve()
    return database.with_name(f"{database.name}.{tracker.name}.lock")


# -- PostgreSQL ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _advisory_lock(
    url: URL,
    key: int,
    timeout: float,
    application_name: str,
    connect_retry: float,
    *,
    database: str | None = None,
) -> AsyncIterator[None]:
    """:param database: the tracker's database: the lock connection must be in it (an
    advisory lock excludes only sessions of its own database)."""
    engine = _lock_engine(url, application_name)
    try:
        conn = await _pg_wait(engine, key, timeout, connect_retry, database)
        log.debug("migration lock %s acquired", key)
        owner = asyncio.current_task()
        assert owner is not None
        lost: list[BaseException] = []
        watchdog = asyncio.create_task(_watch(conn, owner, lost), name="dm-lock-watchdog")
        try:
            yield
        except asyncio.CancelledError:
            if lost and owner.uncancel() == 0:
                raise LockLost(
                    "lost the migration lock: its connection died "
                    f"({describe_error(lost[0])}); the work in progress was rolled back "
                    "(batches a non-transactional revision committed stay, and the next run "
                    "resumes after them)"
                ) from None
            raise
        except FenceLost as exc:
            # Another run holds the lock now: this connection's lock is gone (or about
            # to be), whatever it looks like from here.
            lost.append(exc)
            if owner.cancelling():  # the watchdog's cancel, if it fired meanwhile
                owner.uncancel()
            raise
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await _release(conn, rollback=not lost)
    finally:
        await engine.dispose()


async def _pg_wait(
    engine: AsyncEngine,
    key: int,
    timeout: float,
    connect_retry: float,
    database: str | None = None,
) -> AsyncConnection:
    """Try to take ``key`` until it is taken: return the connection whose open transaction
    holds it. Each try is a transaction on a connection of its own, closed when the lock
    was not free.

    :raises LockTimeout: not taken within ``timeout`` seconds (the message says so when
        the pooler had no server connection free for the tries).
    """
    from dm.config.engines import open_connection

    held: list[AsyncConnection] = []

    async def try_once(report_due: Callable[[], bool], deadline: float) -> _Try:
        conn = await open_connection(engine, retry_seconds=connect_retry)
        outcome = _Try(taken=False)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), POOL_WAIT_MIN)):
                if await _try(conn, key, database):
                    held.append(conn)
                    outcome = _Try(taken=True)
                elif report_due():
                    outcome = _Try(taken=False, holder=await _pg_holder_or_gone(conn, key))
        except TimeoutError:
            starved = "no server connection came free for a try (is the pool exhausted?)"
            outcome = _Try(taken=False, starved=starved)
        except DBAPIError as exc:
            problem = pooler_problem(exc)
            if problem is None or not isinstance(problem, PoolExhausted):
                raise
            outcome = _Try(taken=False, starved=str(problem))
        finally:
            if not held:
                await _discard(conn)
        return outcome

    await _poll(try_once, timeout)
    return held[0]


async def _try(conn: AsyncConnection, key: int, database: str | None = None) -> bool:
    """Take ``key`` in the connection's (new) transaction if it is free; when taken, set
    the lock transaction's settings, which also ends the statement's snapshot.

    :param database: the tracker's database, which the connection must be in (read by the
        same statement).
    :raises ConfigError: the connection is in another database.
    """
    query = "SELECT pg_try_advisory_xact_lock(:k), current_database()"
    row = (await conn.execute(sa.text(query), {"k": key})).one()
    taken, found = bool(row[0]), row[1]
    if database is not None and found != database:
        raise ConfigError(
            f"DM_LOCK_DATABASE_URL connects to database {found!r}, but the tracker is in "
            f"database {database!r}: the lock must be taken in the tracker's database (an "
            "advisory lock excludes only sessions of its own database)"
        )
    if taken:
        version = conn.dialect.server_version_info or (0,)
        await _simple(conn, _lock_settings(version))
    return taken


async def _simple(conn: AsyncConnection, sql: str) -> None:
    """Run ``sql`` (no parameters) in the simple query protocol: one round trip, no
    prepared statement, and no snapshot left open after it."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    await driver.execute(sql)


async def _discard(conn: AsyncConnection) -> None:
    """Roll back and close a try's connection; drop it if that fails."""
    try:
        async with asyncio.timeout(UNLOCK_TIMEOUT):
            await conn.close()  # rolls back the open transaction
    except Exception:
        with contextlib.suppress(Exception):
            await conn.invalidate()


async def _release(conn: AsyncConnection, *, rollback: bool) -> None:
    """End the lock transaction (bounded: the network may hang), or drop a connection
    whose lock is gone. Either ends the transaction, and with it the lock: a dropped
    client's open transaction is rolled back by the server or the pooler."""
    if rollback:
        try:
            async with asyncio.timeout(UNLOCK_TIMEOUT):
                await conn.rollback()
                await conn.close()
            return
        except Exception as exc:
            log.warning("could not release the migration lock (%s); dropping its connection", exc)
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()


async def _pg_acquire(
    conn: AsyncConnection,
    key: int,
    timeout: float,
    *,
    function: str = "pg_try_advisory_lock",
    end_try: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Poll ``function`` (a ``pg_try_advisory*_lock``) on ``conn`` until it takes ``key``;
    ``end_try`` runs after each try (and its holder lookup).

    :raises LockTimeout: not taken within ``timeout`` seconds.
    """

    async def try_once(report_due: Callable[[], bool], deadline: float) -> _Try:
        taken = (await conn.execute(sa.text(f"SELECT {function}(:k)"), {"k": key})).scalar_one()
        holder = None if taken or not report_due() else await _pg_holder_or_gone(conn, key)
        if end_try is not None:
            await end_try()
        return _Try(taken=bool(taken), holder=holder)

    await _poll(try_once, timeout)


@dataclass(frozen=True)
class _Try:
    """What one try to take the PostgreSQL lock found."""

    taken: bool
    holder: str | None = None
    """Who holds the lock, when the try looked (see :func:`_poll`)."""
    starved: str | None = None
    """Why the try could not even ask (no server connection came free)."""


async def _poll(
    try_once: Callable[[Callable[[], bool], float], Awaitable[_Try]], timeout: float
) -> None:
    """Call ``try_once`` until it takes the lock, with a jittered pause between tries,
    logging the holder now and then (and each try the pooler starved).

    ``try_once`` gets a predicate that says whether this try should look up the holder
    (due every ``REPORT_SECONDS``, and at the deadline), and the deadline itself.

    :raises LockTimeout: not taken within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_report = time.monotonic()

    def report_due() -> bool:
        now = time.monotonic()
        return now >= next_report or now >= deadline

    while True:
        outcome = await try_once(report_due, deadline)
        if outcome.taken:
            return
        now = time.monotonic()
        if now >= deadline and outcome.holder is None and outcome.starved is None:
            # The try ran just before the deadline, too soon to look the holder up: one
            # last try that does, so the message names who holds the lock.
            outcome = await try_once(lambda: True, deadline)
            if outcome.taken:
                return
        if now >= deadline:
            why = outcome.starved or f"held by {outcome.holder or 'another session'}"
            raise LockTimeout(f"migration lock not acquired within {timeout:g}s; {why}")
        if outcome.starved is not None:
            log.warning("waiting for the migration lock: %s", outcome.starved)
        elif outcome.holder is not None:
            log.info("waiting for the migration lock, held by %s", outcome.holder)
            next_report = now + REPORT_SECONDS
        await asyncio.sleep(min(_jittered(), max(deadline - now, 0.05)))


async def _pg_holder_or_gone(conn: AsyncConnection, key: int) -> str:
    return await _pg_holder(conn, key) or "a session that just released it"


async def _watch(
    conn: AsyncConnection, owner: asyncio.Task[object], lost: list[BaseException]
) -> None:
    """Ping the lock connection; if it fails, record why and cancel ``owner``."""
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                await _simple(conn, "SELECT 1")
        except Exception as exc:
            log.error("the migration lock's connection failed: %s; stopping", describe_error(exc))
            lost.append(exc)
            owner.cancel()
            return


def _lock_engine(url: URL, application_name: str) -> AsyncEngine:
    from dm.config.engines import create_engine

    # Not autocommit: every statement runs in a transaction, as a pooler needs.
    return create_engine(url, application_name=application_name)


async def _pg_holder(conn: AsyncConnection, key: int) -> str | None:
    classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    row = (
        await conn.execute(
            sa.text(
                "SELECT a.pid, a.application_name, a.client_addr, a.backend_start "
                "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = CAST(:classid AS oid) AND l.objid = CAST(:objid AS oid) "
                "AND l.objsubid = 1 AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"classid": classid, "objid": objid},
        )
    ).first()
    if row is None:
        return None
    since = row.backend_start.isoformat(timespec="seconds") if row.backend_start else "?"
    client = f", client {row.client_addr}" if row.client_addr else ""
    name = row.application_name or "no application_name"
    if name.startswith("dm:") and name != "dm:":
        # dm's application_name is dm:<pod name or host name> (runtime.Runtime).
        return f"backend pid {row.pid} (dm on {name[3:]}{client}, since {since})"
    return f"backend pid {row.pid} ({name}{client}, since {since})"


@contextlib.asynccontextmanager
async def lock_on_connection(
    conn: AsyncConnection, tracker: Tracker, timeout: float, *, joined: bool
) -> AsyncIterator[None]:
    """Hold ``tracker``'s migration lock on the working PostgreSQL connection itself.

    For a connection handed to dm by its caller (``dm.alembic.caller_connection``), which dm
    cannot open a second time. Inside the caller's transaction (``joined``) the lock is a
    transaction lock: it is released when the caller commits or rolls back, which is also when dm's
    work becomes visible to other runs. Otherwise it is a session lock, released when the
    block ends. There is no heartbeat: a connection that dies takes the work with it.

    :raises LockTimeout: another run held the lock for ``timeout`` seconds.
    """
    await resolve_relation(conn, tracker)
    key = lock_key(tracker)
    function = "pg_try_advisory_xact_lock" if joined else "pg_try_advisory_lock"
    # Not joined: commit each try's autobegun transaction; a session lock outlives it.
    end_try = None if joined else conn.commit
    await _pg_acquire(conn, key, timeout, function=function, end_try=end_try)
    log.debug("migration lock %s acquired on the caller's connection", key)
    try:
        yield
    finally:
        if not joined:
            with contextlib.suppress(Exception):
                if conn.in_transaction():
                    await conn.rollback()
                await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                await conn.commit()


# -- SQLite ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _file_lock(path: Path, timeout: float) -> AsyncIterator[None]:
    try:  # never through a symlink, never a FIFO or device; created 0600
        fd = open_regular(path, "SQLite lock file")
    except ConfigError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError):
            raise
        # e.g. a container's read-only or root-owned working directory
        raise ConfigError(
            f"cannot create the SQLite lock file {path}: {cause.strerror or cause}; "
            "set DM_DATABASE_URL to the database to migrate (or to a sqlite:/// file in a "
            "writable directory)"
        ) from None
    try:
        deadline = time.monotonic() + timeout
        next_report = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    raise LockTimeout(
                        f"migration lock {path} not acquired within {timeout:g}s; "
                        f"held by {_file_holder(path)}"
                    ) from None
                if now >= next_report:
                    log.info("waiting for the migration lock, held by %s", _file_holder(path))
                    next_report = now + REPORT_SECONDS
                await asyncio.sleep(min(_jittered() / 4, max(deadline - now, 0.02)))
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _file_probe(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _file_holder(path)
    finally:
        os.close(fd)  # closing the descriptor releases a lock just taken
    return None


def _file_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _jittered() -> float:
    return POLL_SECONDS * random.uniform(0.5, 1.0)
