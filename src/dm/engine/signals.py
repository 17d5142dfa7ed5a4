"""Run a coroutine to completion, turning SIGTERM/SIGINT into a clean, recorded stop.

On the first signal the running task is cancelled: the revision in progress is rolled
back and recorded as failed (interrupted), the lock is released, and ``Interrupted``
carries exit code 143 (SIGTERM) or 130 (SIGINT). Further signals are logged and ignored,
so a second Ctrl-C cannot cut the rollback short. Used by the CLI and Alembic's ``env.py``,
never by the programmatic API (an application keeps its own signal handling).

dm installs real handlers rather than relying on the default action because, as PID 1 of
a container (no tini), a process *ignores* SIGTERM unless it handles it. Outside the event
loop (while it starts and stops) a plain handler raises ``Interrupted`` directly.

While the loop runs, signals are read by a thread of their own (``signal.set_wakeup_fd``
writes each signal's number to a socket as soon as it arrives, whatever the main thread is
doing): it hands the signal to the loop and tells the watchdog (``dm.engine.loop_watchdog``), which
ends dm from outside if revision code keeps the loop too busy to act on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from collections.abc import Coroutine
from types import FrameType
from typing import Any
from typing import TypeVar

from dm.core.errors import Interrupted
from dm.engine import loop_watchdog

T = TypeVar("T")
log = logging.getLogger("dm")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], Any] | int | None


def run_until_signal(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a new event loop with dm's signal handling.

    :raises Interrupted: SIGTERM or SIGINT arrived; exit code ``128 + signal number``.
    """
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)  # signal handlers can only be set in the main thread
    previous: dict[signal.Signals, _Handler] = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        for signum in _SIGNALS:
            signal.signal(signum, _raise_interrupted)
        return asyncio.run(_guarded(coro))
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    raise Interrupted(name, 128 + signum)


async def _guarded(coro: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if not received:
            log.warning("%s received: rolling back the work in progress and stopping", signum.name)
            task.cancel()
        else:
            log.warning("%s received: already stopping, please wait", signum.name)
        received.append(signum)

    listener = _Listener(loop, on_signal)
    try:
        listener.start()
        return await coro
    except asyncio.CancelledError:
        if received:
            raise _interrupted(received[0]) from None
        raise
    except Exception as exc:
        # An error caused by the cancellation (or met while stopping) is still a stop
        # on request: report the signal, so a Job does not count it as a failure.
        if received:
            raise _interrupted(received[0]) from exc
        raise
    finally:
        listener.stop()


class _Listener:
    """Read signals in a thread and hand them to the event loop and the watchdog."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[signal.Signals], None]
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._thread = threading.Thread(target=self._listen, name="dm-signals", daemon=True)
        self._previous_fd: int | None = None

    def start(self) -> None:
        """Route SIGTERM and SIGINT to the listening thread.

        The signals are held back meanwhile: one that arrives before the socket is the
        wakeup fd and the plain handlers are replaced would reach neither the socket nor a
        handler that acts on it. Held back, it is delivered once both are in place.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self._previous_fd = signal.set_wakeup_fd(
                self._write.fileno(), warn_on_full_buffer=False
            )
            for signum in _SIGNALS:
                signal.signal(signum, _noted)  # the number reaches the socket; nothing to do
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def stop(self) -> None:
        """Restore the plain handlers and end the listening thread (also after a partial
        ``start``)."""
        for signum in _SIGNALS:
            signal.signal(signum, _raise_interrupted)
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        self._write.close()  # the thread reads the end of the stream and returns
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self._read.close()

    def _listen(self) -> None:
        numbers = {s.value: s for s in _SIGNALS}
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number in numbers:
                    loop_watchdog.note_signal(numbers[number])
                    with contextlib.suppress(RuntimeError):  # the loop already closed
                        self._loop.call_soon_threadsafe(self._callback, numbers[number])


def _noted(signum: int, frame: FrameType | None) -> None:
    """Do nothing: the signal's number was written to the listener's socket."""


def _interrupted(signum: signal.Signals) -> Interrupted:
    return Interrupted(signum.name, 128 + signum.value)
