"""The runner's cancellation helpers on their own (in-process asyncio, no database).

``finish_despite_cancel`` guards the write of a failure against a second cancellation;
``_interruptible`` interrupts SQLite's running statement before a cancellation unwinds the
hook. The behaviour they give real runs is tested with real processes in
``test_process.py`` and ``test_batched_process.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from dm.engine.cancellation import finish_despite_cancel
from dm.engine.unit import _interruptible


def testfinish_despite_cancel_completes_the_work_then_reports_the_cancellation() -> None:
    finished: list[str] = []
    release = asyncio.Event()

    async def record() -> None:
        await release.wait()
        finished.append("recorded")

    async def scenario() -> None:
        task = asyncio.create_task(finish_despite_cancel(record()))
        await asyncio.sleep(0)
        task.cancel()  # twice: a second signal must not cut the record short either
        await asyncio.sleep(0)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert finished == ["recorded"]


def testfinish_despite_cancel_passes_the_work_result_and_errors_through() -> None:
    async def fail() -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        asyncio.run(finish_despite_cancel(fail()))
    asyncio.run(finish_despite_cancel(asyncio.sleep(0)))


def test_interruptible_interrupts_first_and_lets_the_hook_unwind() -> None:
    calls: list[str] = []
    interrupted = asyncio.Event()

    async def hook() -> None:
        try:
            await interrupted.wait()  # a statement running in SQLite's thread
            calls.append("statement interrupted")
            raise RuntimeError("interrupted")
        finally:
            calls.append("hook unwound")

    async def interrupt() -> None:
        calls.append("interrupt")
        interrupted.set()

    async def scenario() -> None:
        task = asyncio.create_task(_interruptible(hook(), interrupt))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):  # the cancellation is what is reported
            await task

    asyncio.run(scenario())
    assert calls == ["interrupt", "statement interrupted", "hook unwound"]


def test_interruptible_cancels_a_hook_that_ignores_the_interrupt() -> None:
    calls: list[str] = []

    async def hook() -> None:
        try:
            await asyncio.sleep(3600)  # awaiting something an interrupt does not reach
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise

    async def interrupt() -> None:
        calls.append("interrupt")

    async def scenario() -> None:
        task = asyncio.create_task(_interruptible(hook(), interrupt))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert calls.count("interrupt") >= 1 and calls[-1] == "cancelled"


def test_interruptible_returns_the_hook_result_when_not_cancelled() -> None:
    async def hook() -> None:
        raise ValueError("the revision's own error")

    async def interrupt() -> None:  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(ValueError, match="own error"):
        asyncio.run(_interruptible(hook(), interrupt))
