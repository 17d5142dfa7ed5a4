"""Run a coroutine to completion, turning SIGTERM/SIGINT into a clean, recorded stop.

On the first signal the running task is cancelled: the revision in progress is rolled
back and recorded as failed (interrupted), the lock is released, and ``Interrupted``
carries exit code 143 (SIGTERM) or 130 (SIGINT). Used by the CLI and Alembic's ``env.py``,
never by the programmatic API (an application keeps its own signal handling).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any
from typing import TypeVar

from .errors import Interrupted

T = TypeVar("T")
log = logging.getLogger("dm")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_until_signal(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a new event loop with dm's signal handling."""
    return asyncio.run(_guarded(coro))


async def _guarded(coro: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if not received:
            log.warning("%s received: rolling back the current revision and stopping", signum.name)
            task.cancel()
        received.append(signum)

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await coro
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0].name, 128 + received[0].value) from None
        raise
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
