"""Bounded waits on a sick network: session guards, TCP options, a frozen-connection watch.

- **Session guards** (:func:`session_guards`): the working session's
  ``idle_in_transaction_session_timeout`` (``DM_IDLE_IN_TRANSACTION_TIMEOUT``, default 60 s,
  hooks included: a dead pod's backend, idle in its transaction, ends on its own and frees
  its locks and the fence row), server-side TCP keepalives and ``tcp_user_timeout``.
- **Client TCP options** (:func:`tune_socket`): every PostgreSQL connection dm opens gets
  ``SO_KEEPALIVE`` (probes after 10 s idle, every 5 s, 3 of them) and ``TCP_USER_TIMEOUT``
  (20 s): asyncpg has no keepalive parameters, so they are set on the socket once connected.
- **The frozen-connection watch** (:class:`FreezeWatch`): the kernel cannot see a network
  that still acknowledges bytes but delivers nothing (a hung proxy, a frozen middlebox).
  dm records when the working connection last sent and last received bytes; a request
  unanswered for ``STALL_SECONDS`` makes it ask the server, on a short connection of its
  own, what that backend is doing. Running (``active``) is a long statement: dm waits on.
  Idle for ``QUIET_SECONDS`` while dm waits for it, gone, or unreachable is a frozen
  network: dm terminates the backend (its transaction rolls back, so a commit in flight
  is decided on the server before dm goes), drops the connection and exits 75. A frozen
  working connection ends dm within about ``STALL_SECONDS + PROBE_SECONDS`` plus the lock
  release (at most 5 s): 20 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa

from dm.core.errors import ConnectionFrozen

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("dm.liveness")

KEEPALIVE_IDLE = 10
"""Seconds of silence before the first TCP keepalive probe (client and server)."""
KEEPALIVE_INTERVAL = 5
"""Seconds between two keepalive probes."""
KEEPALIVE_COUNT = 3
"""Unanswered probes after which the connection is dropped."""
USER_TIMEOUT_MS = 20_000
"""``TCP_USER_TIMEOUT``: sent data unacknowledged this long drops the connection."""
STALL_SECONDS = 8.0
"""How long a request of the working connection may go unanswered before dm asks the
server what its backend is doing."""
QUIET_SECONDS = 2.0
"""How long the backend must have been idle (its answer sent) for the network to count as
frozen."""
PROBE_SECONDS = 4.0
"""How long asking the server may take; no answer in time counts as a frozen network."""
CHECK_SECONDS = 1.0
"""How often the watch looks at the working connection."""


def session_guards(
    version: tuple[int | str, ...], idle_in_transaction: float | None
) -> dict[str, str]:
    """Return the settings (name -> value) that bound a dead client's session on the server.

    :param idle_in_transaction: seconds (None or 0: the server's own setting stays).
    """
    settings = {
        "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
    }
    if version >= (12,):
        settings["tcp_user_timeout"] = str(USER_TIMEOUT_MS)
    if idle_in_transaction:
        settings["idle_in_transaction_session_timeout"] = str(
            max(int(idle_in_transaction * 1000), 1)
        )
    return settings


def tune_socket(sock: socket.socket | None) -> None:
    """Turn on TCP keepalives and ``TCP_USER_TIMEOUT`` on ``sock`` (a TCP socket; a Unix
    socket or a platform without the options is left alone)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def driver_transport(driver: Any) -> Any:
    """Return the asyncio transport of an asyncpg connection (None when it has none)."""
    return getattr(driver, "_transport", None)


class _Tap(asyncio.Protocol):
    """Stands between the transport and asyncpg's protocol, noting when bytes arrive."""

    def __init__(self, inner: Any, watch: FreezeWatch) -> None:
        self.inner = inner
        self.watch = watch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.watch.received = time.monotonic()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class FreezeWatch:
    """Notices a frozen working connection and drops it (see the module's docstring)."""

    def __init__(self, transport: Any, pid: int, open_probe: Callable[[], AsyncEngine]) -> None:
        self.transport = transport
        self.pid = pid
        self.open_probe = open_probe
        """Return an engine for the short connection that asks the server (see
        :func:`watching`)."""
        self.sent = 0.0
        self.received = 0.0
        self.frozen: str | None = None
        """Why the connection was dropped, once it was."""

    def waiting_since(self) -> float | None:
        """Return when the oldest unanswered request was sent (None: nothing is pending)."""
        return self.sent if self.sent > self.received else None

    def _install(self) -> None:
        inner = self.transport.get_protocol()
        self._inner = inner
        self.transport.set_protocol(_Tap(inner, self))
        write, writelines = self.transport.write, self.transport.writelines

        def noted_write(data: Any) -> None:
            self._note_sent()
            write(data)

        def noted_writelines(data: Any) -> None:
            self._note_sent()
            writelines(data)

        self.transport.write = noted_write
        self.transport.writelines = noted_writelines

    def _note_sent(self) -> None:
        if self.sent <= self.received:
            self.sent = time.monotonic()

    def _uninstall(self) -> None:
        for name in ("write", "writelines"):
            with contextlib.suppress(Exception):
                delattr(self.transport, name)
        with contextlib.suppress(Exception):
            self.transport.set_protocol(self._inner)

    async def _watch(self) -> None:
        while self.frozen is None:
            await asyncio.sleep(CHECK_SECONDS)
            since = self.waiting_since()
            if since is None or time.monotonic() - since < STALL_SECONDS:
                continue
            why = await self._ask_server(since)
            if why is not None and self.waiting_since() == since:
                self.frozen = (
                    f"the working connection got no answer for {time.monotonic() - since:.0f}s "
                    f"and {why}: the network froze; dm dropped the connection (its "
                    "transaction, if any, is rolled back on the server)"
                )
                log.error("%s", self.frozen)
                with contextlib.suppress(Exception):
                    self.transport.abort()

    async def _ask_server(self, since: float) -> str | None:
        """Return why the server says the request is lost, or None when it is running."""
        engine = self.open_probe()
        try:
            async with asyncio.timeout(PROBE_SECONDS), engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.text(
                            "SELECT state, wait_event, CAST(EXTRACT(EPOCH FROM clock_timestamp()"
                            " - state_change) AS FLOAT) AS quiet FROM pg_stat_activity "
                            "WHERE pid = :pid"
                        ),
                        {"pid": self.pid},
                    )
                ).first()
                if row is None:
                    return f"its backend {self.pid} is gone"
                if row.state is None:  # another role's backend: its state is hidden
                    return None
                idle = row.state != "active" and (row.quiet or 0.0) >= QUIET_SECONDS
                if not (idle or row.wait_event == "ClientWrite"):
                    return None  # a long statement: the server is working on it
                await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": self.pid})
                return f"its backend {self.pid} was {row.state} (terminated)"
        except Exception as exc:
            if isinstance(exc, TimeoutError | OSError) or _unreachable(exc):
                return f"the server did not answer within {PROBE_SECONDS:g}s either"
            log.warning("could not ask the server about the working connection: %s", exc)
            return None
        finally:
            with contextlib.suppress(Exception):
                await engine.dispose()


def _unreachable(exc: BaseException) -> bool:
    from dm.core.transient import transient_reason

    return transient_reason(exc) is not None


@contextlib.asynccontextmanager
async def watching(
    conn: AsyncConnection, open_probe: Callable[[], AsyncEngine]
) -> AsyncIterator[FreezeWatch | None]:
    """Watch ``conn`` (a PostgreSQL connection of dm's own) for a frozen network while the
    block runs; yield the watch (None where there is none: SQLite, or no transport).

    :param open_probe: returns an engine (autocommit, ``application_name`` ``dm:probe``,
        connect timeout :data:`PROBE_SECONDS`) for asking the server about ``conn``'s backend.
    """
    if conn.dialect.name != "postgresql":
        yield None
        return
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    transport = driver_transport(driver)
    get_pid = getattr(driver, "get_server_pid", None)
    if transport is None or not callable(get_pid):
        yield None
        return
    watch = FreezeWatch(transport, int(get_pid()), open_probe)
    watch._install()
    task = asyncio.create_task(watch._watch(), name="dm-freeze-watch")
    try:
        yield watch
    except Exception as exc:
        if watch.frozen is not None:
            raise ConnectionFrozen(watch.frozen) from exc
        raise
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch._uninstall()
