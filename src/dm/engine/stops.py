"""When a run stops early on purpose: its time box, and requests left on a running attempt.

A transactional revision cannot stop midway, so the run's ``max_runtime`` is checked
before each step starts (the run's first step always starts, so every run makes
progress). A batched revision stops at a batch boundary, right after a batch and its
checkpoint committed: when ``dm pause`` or ``dm cancel`` left a request on the attempt (the
checkpoint update returns it), or when the run's or the revision's ``max_runtime`` is up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from dm.backfill.errors import LoopStop
from dm.core.errors import Incomplete
from dm.core.planning import Step
from dm.engine.recording import Request
from dm.engine.tracker import Status

log = logging.getLogger("dm.runner")

WRITER_GRACE = 1.0
"""How long a SQLite run waits between two batches for a writer that asked to get in."""

_STATUS_OF_REQUEST = {
    "pause": Status.PAUSED,
    "cancel": Status.CANCELLED,
    "abandon": Status.ABANDONED,
    "stop": Status.STOPPED,  # the run's own stop, left for the other processes' workers
}


class StopAtBoundary(LoopStop):
    """Raised by the stop check after a batch committed: the attempt ends ``status``.

    A ``BaseException``, so revision code catching ``Exception`` around its loop cannot
    swallow it and go on as if the loop had finished.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StopPolicy:
    """Decides, before a step and after each checkpoint, whether the run stops there."""

    def __init__(
        self,
        *,
        max_runtime: float | None = None,
        started: float | None = None,
        writer_waiting: Path | None = None,
    ) -> None:
        """:param max_runtime: seconds the run may work, counted from ``started`` (a
            ``time.monotonic()`` value; default: now).
        :param writer_waiting: (SQLite) a file another process creates while it waits for
            the database's write lock: between two batches the run then lets it in.
        """
        self.max_runtime = max_runtime
        self.run_started = time.monotonic() if started is None else started
        self.writer_waiting = writer_waiting
        self.step_started: float | None = None
        """When the current step started (``time.monotonic()``); None before the first."""

    def before_step(self, step: Step) -> None:
        """Refuse to start ``step`` once the run's ``max_runtime`` is up.

        :raises Incomplete: the step and those after it did not run.
        """
        if self.max_runtime is None or self.step_started is None:
            return
        if time.monotonic() - self.run_started >= self.max_runtime:
            message = (
                f"max runtime of {self.max_runtime:g}s reached before {step.direction} "
                f"{step.revision} started: it and the revisions after it did not run; the "
                "next run goes on from there"
            )
            raise Incomplete(step.revision, message)  # told once, as a stop, by dm's CLI

    def step_starts(self) -> None:
        """Note that a step starts now (its own ``max_runtime`` counts from here)."""
        self.step_started = time.monotonic()

    async def after_checkpoint(self, step: Step, request: object) -> None:
        """After a batch committed: stop there if another shell asked (``request``) or the
        run's or the revision's time is up; on SQLite first let a waiting writer in.

        :raises StopAtBoundary: the attempt ends there.
        """
        if self.writer_waiting is not None and self.writer_waiting.exists():
            await _let_writer_in(self.writer_waiting)
        if isinstance(request, Request) and request.action in _STATUS_OF_REQUEST:
            raise StopAtBoundary(_STATUS_OF_REQUEST[request.action], request.describe())
        now = time.monotonic()
        limits = []
        if self.max_runtime is not None:
            limits.append((self.run_started + self.max_runtime, self.max_runtime, "run's"))
        if step.rev.max_runtime is not None and self.step_started is not None:
            own = step.rev.max_runtime
            limits.append((self.step_started + own, own, "revision's"))
        for deadline, seconds, whose in limits:
            if now >= deadline:
                reason = f"stopped: the {whose} max runtime of {seconds:g}s was reached"
                raise StopAtBoundary(Status.STOPPED, reason)


def next_step_after(stop: StopAtBoundary, step: Step) -> str:
    """Say what happens next to a step that stopped at a batch boundary."""
    return {
        Status.STOPPED: f"the next dm {step.direction} resumes it",
        Status.PAUSED: f"dm resume {step.revision} (or the next dm {step.direction}) resumes it",
        Status.CANCELLED: f"the next dm {step.direction} starts it over",
        Status.ABANDONED: "plans pass it: it does not run again",
    }[stop.status]


async def _let_writer_in(path: Path) -> None:
    """Hold off the next batch (SQLite) while another process waits for the write lock:
    until it removes ``path``, for at most ``WRITER_GRACE`` seconds. Its request, if any,
    comes back with the next checkpoint."""
    deadline = time.monotonic() + WRITER_GRACE
    while path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
