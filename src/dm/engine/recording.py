"""The one path that records attempts: every verb that writes a tracker row goes through it.

A :class:`Recorder` belongs to one run holding the migration lock. It numbers each attempt
after the revision's earlier ones, stamps who, where and which run, stores the revision
file's checksum and the reason, and fences every write (see ``dm.engine.tracker``): a run that
lost the lock cannot record anything, so it cannot commit the work recorded with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa

from dm.config.redaction import for_tracker
from dm.core.errors import FenceLost
from dm.core.graph import checksum
from dm.core.planning import Step
from dm.core.state import Attempt
from dm.engine.tracker import FENCE_LOST
from dm.engine.tracker import TRANSITIONS
from dm.engine.tracker import RunInfo
from dm.engine.tracker import Status
from dm.engine.tracker import Tracker
from dm.engine.tracker import utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession

    from dm.engine.fence import CommitFence

IN_REVISION = "dm.in_revision"
"""The PostgreSQL setting, transaction-local, that marks a transactional revision's
transaction from before its hooks to its final status (``dm.engine.unit``)."""


class Recorder:
    """Writes the attempt rows of one run, on its working connection, fenced by its run id."""

    def __init__(
        self,
        conn: AsyncConnection,
        tracker: Tracker,
        run: RunInfo,
        latest: Mapping[str, Attempt],
        *,
        fence: CommitFence | None = None,
    ) -> None:
        """:param fence: the run's commit fence, told of each fenced write that matched
        (that transaction's commit needs no other check)."""
        self.conn = conn
        self.fence = fence
        self.tracker = tracker
        self.run = run
        self.latest: Mapping[str, Attempt] = dict(latest)
        """Each revision's latest attempt when the run took the lock (what it planned from)."""
        self._numbers = {revision: attempt.attempt for revision, attempt in latest.items()}
        self._update_in_revision = tracker.update_attempt.where(
            sa.text(f"current_setting('{IN_REVISION}', true) = 'on'")
        )

    async def record(
        self,
        revision: str,
        *,
        description: str,
        direction: str,
        status: Status,
        checksum: str | None,
        reason: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> int:
        """Insert the revision's next attempt in the caller's transaction; return its id.

        :raises FenceLost: another run took the migration lock over.
        """
        number = self._numbers.get(revision, 0) + 1
        now = utcnow()
        finished = None if status is Status.PENDING else now
        row = {
            "run_id": self.run.run_id,
            "revision": revision,
            "description": description,
            "direction": direction,
            "status": status.value,
            "attempt": number,
            "started_at": now,
            "finished_at": finished,
            "duration_ms": None if finished is None else 0,
            "reason": reason,
            "run_by": self.run.run_by,
            "pod_name": self.run.pod_name,
            "dm_version": self.run.dm_version,
            "environment": self.run.environment,
            "checksum": checksum,
            "checkpoint": None if checkpoint is None else dict(checkpoint),
            "environment_source": self.run.environment_source[:255],
        }
        params = {f"v_{name}": value for name, value in row.items()}
        result = await self.conn.execute(
            self.tracker.insert_attempt, {**params, "fence": self.run.run_id}
        )
        attempt_id = result.scalar_one_or_none()
        if attempt_id is None:
            raise FenceLost(f"revision {revision}: {FENCE_LOST}")
        if self.fence is not None:
            self.fence.hold()
        self._numbers[revision] = number
        return int(attempt_id)

    async def record_step(
        self,
        step: Step,
        status: Status,
        *,
        reason: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> int:
        """Insert ``step``'s next attempt (file checksum included) in the caller's transaction."""
        return await self.record(
            step.revision,
            description=step.description,
            direction=step.direction,
            status=status,
            checksum=checksum(step.script),
            reason=reason if reason is not None else step.reason,
            checkpoint=checkpoint,
        )

    async def finish(
        self,
        attempt_id: int,
        status: Status,
        *,
        duration_ms: int,
        error_message: str | None = None,
        error_traceback: str | None = None,
        reason: str | None = None,
        in_revision: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Move this run's pending attempt to ``status`` in the caller's transaction.

        :param in_revision: PostgreSQL, a transactional revision's final status: the update
            also requires the revision's mark (``IN_REVISION``); when it matches nothing,
            this is awaited first, to raise why the mark is gone.
        :raises FenceLost: the attempt is no longer this run's.
        """
        if status not in TRANSITIONS[Status.PENDING]:  # pragma: no cover - programming error
            raise ValueError(f"a pending attempt cannot become {status.value}")
        values: dict[str, Any] = {
            "status": status.value,
            "finished_at": utcnow(),
            "duration_ms": duration_ms,
        }
        if error_message is not None:
            values.update(
                error_message=for_tracker(error_message),
                error_traceback=for_tracker(error_traceback),
            )
        if reason is not None:
            values["reason"] = reason
        if in_revision is None:
            await self._update(self.conn, attempt_id, values)
            return
        try:
            await self._update(self.conn, attempt_id, values, self._update_in_revision)
        except FenceLost:
            await in_revision()  # the mark is gone: say so, as a check before would have
            raise

    async def save_checkpoint(
        self, attempt_id: int, session: AsyncSession, checkpoint: Mapping[str, Any]
    ) -> Request | None:
        """Store a batched loop's checkpoint in the session's (the batch's) transaction;
        return the request another shell left on the attempt (``dm pause``, ``dm cancel``),
        read by the same statement.

        :raises FenceLost: the attempt is no longer this run's; the batch must roll back.
        """
        return await self._update(session, attempt_id, {"checkpoint": dict(checkpoint)})

    async def ask_stop(self, attempt_id: int, session: AsyncSession, reason: str) -> None:
        """Leave a ``stop`` request on this run's attempt, in the session's transaction: the
        run stops on its own (its time box) and asks the other processes' workers of its
        loop to stop at their next checkpoint too.

        :raises FenceLost: the attempt is no longer this run's.
        """
        values = {"request": "stop", "request_by": self.run.run_by[:255], "request_reason": reason}
        await self._update(session, attempt_id, values)

    async def _update(
        self,
        executor: AsyncConnection | AsyncSession,
        attempt_id: int,
        values: Mapping[str, Any],
        statement: sa.Update | None = None,
    ) -> Request | None:
        """Update this run's pending attempt; exactly one row must match (the fence).
        Return the request left on it, if any."""
        params = {**values, "attempt_id": attempt_id, "fence": self.run.run_id}
        update = self.tracker.update_attempt if statement is None else statement
        result = await executor.execute(update, params)
        rows = result.all()
        if len(rows) != 1:
            raise FenceLost(f"attempt {attempt_id}: {FENCE_LOST}")
        if self.fence is not None:
            self.fence.hold()
        request, by, reason = rows[0]
        return None if request is None else Request(request, by, reason)


@dataclass(frozen=True)
class Request:
    """What another shell asked of a running attempt: ``pause``, ``cancel`` or ``abandon``."""

    action: str
    by: str | None
    reason: str | None

    def describe(self) -> str:
        """Return e.g. ``paused by ops@host: peak traffic``."""
        done = {
            "pause": "paused",
            "cancel": "cancelled",
            "abandon": "cancelled (--skip)",
            "stop": "stopped",
        }
        text = f"{done.get(self.action, self.action)} by {self.by or 'unknown'}"
        return f"{text}: {self.reason}" if self.reason else text
