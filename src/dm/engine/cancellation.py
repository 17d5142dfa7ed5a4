"""Work that must run to its end even when the task awaiting it is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def finish_despite_cancel(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even if this task is cancelled meanwhile, then re-cancel.

    For what a cancellation must not cut in half: a failure being recorded, a rollback, a
    worker giving its range up. A second cancellation waits too.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            cancelled = True
            if task.done():
                break
    if cancelled:
        raise asyncio.CancelledError
    task.result()
