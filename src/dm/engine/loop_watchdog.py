"""End dm within a bounded time when revision code blocks the event loop.

asyncio acts on a revision's time limit or on SIGTERM/SIGINT only when the event loop gets
control back; a hook that calls ``time.sleep()``, loops on the CPU or waits in a
synchronous driver call keeps it. The CLI therefore runs a watchdog thread. When the
deadline of the revision in progress, or a signal, is ``GRACE_SECONDS`` old and dm has
not stopped by itself, the thread stops the revision from outside:

- PostgreSQL: it terminates the working backend from a connection of its own, so the
  revision's transaction rolls back and its row locks go;
- SQLite: it interrupts the working connection's statement and rolls its transaction
  back (on the driver's own thread);

then it records the attempt ``failed`` on a connection of its own (at most
``RESCUE_SECONDS``), reports the error through the CLI and ends the process: exit 1 for a
time limit, 128 + the signal number for a signal. dm is thus gone at most
``GRACE_SECONDS + RESCUE_SECONDS`` (8 s) after the deadline or the signal.

Only the CLI installs a watchdog (``installed``); a program calling dm's API keeps its
process, and ``arm``/``note_signal`` do nothing without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa

from dm.core.errors import FenceLost
from dm.core.transient import is_transient
from dm.engine.tracker import Status

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection

    from dm.engine.tracker import RunInfo
    from dm.engine.tracker import Tracker

log = logging.getLogger("dm.watchdog")


def _seconds(name: str, default: float) -> float:
    """Return the positive number of seconds in environment variable ``name``, else ``default``.

    For dm's own tests only (a blocked-loop case need not wait the full periods out); an
    unset, unparsable or non-positive value keeps the default.
    """
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


GRACE_SECONDS = _seconds("DM_WATCHDOG_GRACE_SECONDS", 4.0)
"""How long dm may take to stop by itself after a deadline or a signal."""
RESCUE_SECONDS = _seconds("DM_WATCHDOG_RESCUE_SECONDS", 4.0)
"""How long the watchdog may take to stop the revision and record its failure."""

Reporter = Callable[[str, int, str], None]
"""Print the final error: ``(message, exit code, kind)``."""


@dataclass(frozen=True)
class Rescue:
    """How to stop the working connection's revision and record its attempt from outside."""

    url: URL
    tracker: Tracker
    run: RunInfo
    backend_pid: int | None = None
    """PostgreSQL: the working connection's backend."""
    sqlite_driver: Any = None
    """SQLite: the working connection's aiosqlite connection."""

    def __call__(self, attempt_id: int, message: str, reason: str | None, duration: int) -> None:
        """Stop the revision and record its attempt failed (runs in the watchdog's thread)."""
        if self.sqlite_driver is not None:
            _rollback_sqlite(self.sqlite_driver)
        asyncio.run(self._record(attempt_id, message, reason, duration))

    async def _record(
        self, attempt_id: int, message: str, reason: str | None, duration: int
    ) -> None:
        from dm.config.engines import create_engine
        from dm.config.urls import through_pooler

        # Through a pooler every statement needs a transaction (and there is no backend
        # of dm's own to terminate): one transaction, committed at the end.
        engine = create_engine(
            self.url,
            application_name="dm:watchdog",
            autocommit=not through_pooler(self.url),
            timeout=2.0,
        )
        try:
            async with engine.connect() as conn, conn.begin():  # autocommit: each statement
                if self.backend_pid is not None:
                    await _terminate(conn, self.backend_pid)
                with contextlib.suppress(FenceLost):  # dm recorded it already after all
                    await self._finish(conn, attempt_id, message, reason, duration)
        finally:
            await engine.dispose()

    async def _finish(
        self,
        conn: AsyncConnection,
        attempt_id: int,
        message: str,
        reason: str | None,
        duration: int,
    ) -> None:
        from dm.engine.recording import Recorder

        await Recorder(conn, self.tracker, self.run, {}).finish(
            attempt_id,
            Status.FAILED,
            duration_ms=duration,
            error_message=message,
            error_traceback=f"{message}\n(recorded by dm's watchdog)\n",
            reason=reason,
        )


async def rescue_for(conn: AsyncConnection, tracker: Tracker, run: RunInfo) -> Rescue:
    """Return how to stop the revisions that run on ``conn`` from another thread.

    The rescue connects with the URL as configured (``configured_url``), not the engine's
    stripped one: ``options`` such as ``search_path`` decide where the tracker is.
    """
    from dm.config.engines import configured_url

    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    url = configured_url(conn.engine)
    if conn.dialect.name == "postgresql":
        from dm.config.urls import through_pooler

        get_pid = getattr(driver, "get_server_pid", None)  # asyncpg
        info = getattr(driver, "info", None)  # psycopg
        found = get_pid() if callable(get_pid) else getattr(info, "backend_pid", None)
        # Through a pooler that pid is the pooler's own number, or a backend serving others.
        pid = found if not through_pooler(url) else None
        return Rescue(url, tracker, run, backend_pid=pid)
    return Rescue(url, tracker, run, sqlite_driver=driver)


async def _terminate(conn: AsyncConnection, pid: int) -> None:
    await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
    for _ in range(40):  # its transaction is rolled back when the backend is gone
        if not (await conn.execute(alive, {"pid": pid})).scalar_one():
            return
        await asyncio.sleep(0.05)


def _rollback_sqlite(driver: Any) -> None:
    """Interrupt and roll back an aiosqlite connection from another thread.

    ``interrupt()`` is safe from any thread; the rollback is queued to the connection's
    own thread (aiosqlite's work queue), which is idle while the event loop is blocked.
    """
    raw = getattr(driver, "_connection", None)
    queue = getattr(driver, "_tx", None)
    if raw is None or queue is None:
        return
    with contextlib.suppress(Exception):
        raw.interrupt()
    done = threading.Event()

    def rollback() -> None:
        try:
            raw.rollback()
        finally:
            done.set()

    queue.put_nowait((_Unawaited(), rollback))
    done.wait(2.0)


class _Unawaited:
    """Stand in for the future aiosqlite's thread reports a result to: none is awaited here.

    aiosqlite 0.20 calls ``future.get_loop()`` unconditionally, so ``None`` in its place
    ended that thread with a traceback; later versions skip a ``None`` future.
    """

    def get_loop(self) -> _Unawaited:
        """Return this stand-in, whose ``call_soon_threadsafe`` drops the result."""
        return self

    def call_soon_threadsafe(self, *args: Any) -> None:
        """Drop the result or the exception (the rollback's caller waits on an event)."""


@dataclass(frozen=True)
class _Armed:
    revision: str
    attempt_id: int
    limit: float | None
    deadline: float | None
    started: float
    rescue: Rescue


class Watchdog:
    """A thread that ends the process when dm does not stop in time by itself."""

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self._cond = threading.Condition()
        self._armed: _Armed | None = None
        self._signal: tuple[signal.Signals, float] | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="dm-watchdog", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (dm is done)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)

    def arm(self, revision: str, attempt_id: int, limit: float | None, rescue: Rescue) -> None:
        """Watch the revision now running (``limit``: its time limit in seconds)."""
        now = time.monotonic()
        deadline = None if limit is None else now + limit
        with self._cond:
            due = self._due()
            self._armed = _Armed(revision, attempt_id, limit, deadline, now, rescue)
            self._wake_if_due_changed(due)

    def disarm(self) -> None:
        """The revision ended and its outcome is recorded."""
        with self._cond:
            due = self._due()
            self._armed = None
            self._wake_if_due_changed(due)

    def _wake_if_due_changed(self, due: float | None) -> None:
        """Wake the thread when what it waits for changed (not, per revision, for a run
        without time limits)."""
        if self._due() != due:
            self._cond.notify_all()

    def note_signal(self, signum: signal.Signals) -> None:
        """A stop was requested: dm has ``GRACE_SECONDS`` to act on it."""
        with self._cond:
            if self._signal is None:
                self._signal = (signum, time.monotonic())
                self._cond.notify_all()

    def _due(self) -> float | None:
        if self._signal is not None:
            return self._signal[1] + GRACE_SECONDS
        if self._armed is not None and self._armed.deadline is not None:
            return self._armed.deadline + GRACE_SECONDS
        return None

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                due = self._due()
                wait = None if due is None else due - time.monotonic()
                if wait is None or wait > 0:
                    self._cond.wait(wait)
                    continue
                armed, received = self._armed, self._signal
                break
            else:
                return
        self._fire(armed, received)

    def _fire(self, armed: _Armed | None, received: tuple[signal.Signals, float] | None) -> None:
        if received is not None:
            name = received[0].name
            code, kind = 128 + received[0].value, "interrupted"
            message = f"interrupted by {name}"
            stored = (
                f"interrupted by {name}; the revision's code kept dm's event loop busy, "
                f"so dm stopped it from outside after {GRACE_SECONDS:g}s"
            )
            reason: str | None = "interrupted"
        else:
            assert armed is not None and armed.limit is not None
            code, kind = 1, "revision_failed"
            stored = (
                f"timed out after {armed.limit:g}s; the revision's code kept dm's event "
                f"loop busy, so dm stopped it from outside {GRACE_SECONDS:g}s later"
            )
            message = f"revision {armed.revision} failed: {stored}"
            reason = None
        if armed is not None:
            log.error("%s: %s", armed.revision, stored)
            duration = int((time.monotonic() - armed.started) * 1000)
            recorded, unreachable = self._run_rescue(armed, stored, reason, duration)
            if unreachable and received is None:
                # The database did not answer dm's own connection either: the network, not
                # the revision, is at fault, and a retry of the run may succeed.
                code, kind = 75, "transient_revision_failure"
                message = (
                    f"revision {armed.revision} failed: timed out after {armed.limit:g}s "
                    "while the database could not be reached (a frozen network; a retry "
                    "may succeed)"
                )
            if not recorded:
                message += (
                    f"; its attempt could not be recorded and stays pending until the "
                    f"next run marks {armed.revision} interrupted"
                )
        else:
            message += f"; dm did not stop within {GRACE_SECONDS:g}s, so it was ended"
        with contextlib.suppress(Exception):
            self._report(message, code, kind)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(code)

    def _run_rescue(
        self, armed: _Armed, message: str, reason: str | None, duration: int
    ) -> tuple[bool, bool]:
        """Stop the revision and record it; return whether it was recorded, and whether the
        database could not be reached to do so."""
        outcome: list[BaseException | None] = []

        def rescue() -> None:
            try:
                armed.rescue(armed.attempt_id, message, reason, duration)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        worker = threading.Thread(target=rescue, name="dm-watchdog-rescue", daemon=True)
        worker.start()
        worker.join(RESCUE_SECONDS)
        if not outcome or outcome[0] is not None:
            why = "took too long" if not outcome else f"{type(outcome[0]).__name__}: {outcome[0]}"
            log.error("could not record the failure of %s: %s", armed.revision, why)
            failure = outcome[0] if outcome else None
            unreachable = (
                failure is None or isinstance(failure, TimeoutError) or is_transient(failure)
            )
            return False, unreachable
        return True, False


_active: list[Watchdog] = []


@contextlib.contextmanager
def installed(report: Reporter) -> Iterator[Watchdog]:
    """Run a watchdog while the block runs (the CLI's commands)."""
    dog = Watchdog(report)
    dog.start()
    _active.append(dog)
    try:
        yield dog
    finally:
        _active.remove(dog)
        dog.stop()


def active() -> Watchdog | None:
    """Return the installed watchdog, if any."""
    return _active[-1] if _active else None


def note_signal(signum: signal.Signals) -> None:
    """Tell the installed watchdog (if any) that SIGTERM/SIGINT arrived."""
    dog = active()
    if dog is not None:
        dog.note_signal(signum)
