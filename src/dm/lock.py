"""The migration lock: one writing dm run per tracker at a time.

PostgreSQL: a session advisory lock, polled with ``pg_try_advisory_lock`` on a dedicated
autocommit connection, so no backend ever waits inside a lock queue and a killed client
frees it within seconds. SQLite: an exclusive ``flock`` on ``<database>.lock``, which the
kernel releases when the process dies.
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
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .errors import LockTimeout

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .tracker import Tracker

log = logging.getLogger("dm.lock")

POLL_SECONDS = 1.0
REPORT_SECONDS = 5.0


def lock_key(tracker: Tracker) -> int:
    """Return the signed 64-bit advisory lock key of ``tracker``'s schema and table."""
    digest = hashlib.sha256(f"dm:{tracker.qualified_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.asynccontextmanager
async def migration_lock(
    url: URL, tracker: Tracker, timeout: float, application_name: str
) -> AsyncIterator[None]:
    """Hold the migration lock for ``tracker`` while the block runs.

    :param timeout: seconds to wait for another run to finish (0 = try once).
    :raises LockTimeout: the lock was still held by another run after ``timeout``.
    """
    if url.get_backend_name() == "postgresql":
        async with _advisory_lock(url, lock_key(tracker), timeout, application_name):
            yield
    else:
        async with _file_lock(_sqlite_lock_path(url, tracker), timeout):
            yield


def _sqlite_lock_path(url: URL, tracker: Tracker) -> Path:
    database = Path(url.database or "dm.sqlite3").resolve()
    return database.with_name(f"{database.name}.{tracker.name}.lock")


@contextlib.asynccontextmanager
async def _advisory_lock(
    url: URL, key: int, timeout: float, application_name: str
) -> AsyncIterator[None]:
    from .db import connect

    engine = _lock_engine(url, application_name)
    try:
        async with connect(engine) as conn:
            await _pg_settings(conn)
            deadline = time.monotonic() + timeout
            next_report = time.monotonic()
            while not (
                await conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
            ).scalar_one():
                now = time.monotonic()
                holder = None
                if now >= next_report or now >= deadline:
                    holder = await _pg_holder(conn, key)
                if now >= deadline:
                    raise LockTimeout(
                        f"migration lock not acquired within {timeout:g}s; held by {holder}"
                    )
                if holder is not None:
                    log.info("waiting for the migration lock, held by %s", holder)
                    next_report = now + REPORT_SECONDS
                await asyncio.sleep(min(_jittered(), max(deadline - now, 0.05)))
            log.debug("migration lock %s acquired", key)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        await engine.dispose()


def _lock_engine(url: URL, application_name: str) -> sa.ext.asyncio.AsyncEngine:
    from .db import create_engine

    return create_engine(url, application_name=application_name, autocommit=True)


async def _pg_settings(conn: sa.ext.asyncio.AsyncConnection) -> None:
    # Frees the lock within seconds when the client dies mid-statement (PostgreSQL 14+).
    with contextlib.suppress(Exception):
        await conn.execute(sa.text("SET client_connection_check_interval = '1s'"))


async def _pg_holder(conn: sa.ext.asyncio.AsyncConnection, key: int) -> str:
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
        return "an unknown session"
    since = row.backend_start.isoformat(timespec="seconds") if row.backend_start else "?"
    client = f", client {row.client_addr}" if row.client_addr else ""
    return f"pid {row.pid} ({row.application_name or 'no application_name'}{client}, since {since})"


@contextlib.asynccontextmanager
async def _file_lock(path: Path, timeout: float) -> AsyncIterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _file_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _jittered() -> float:
    return POLL_SECONDS * random.uniform(0.5, 1.0)
