"""The one path that records attempts: every verb that writes a tracker row goes through it.

A :class:`Recorder` belongs to one run holding the migration lock. It numbers each attempt
after the revision's earlier ones, stamps who, where and which run, stores the revision
file's checksum and the reason, and fences every write (see ``dm.tracker``): a run that
lost the lock cannot record anything, so it cannot commit the work recorded with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from .graph import checksum
from .planning import Step
from .tracker import Attempt
from .tracker import RunInfo
from .tracker import Status
from .tracker import Tracker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession


class Recorder:
    """Writes the attempt rows of one run, on its working connection, fenced by its run id."""

    def __init__(
        self,
        conn: AsyncConnection,
        tracker: Tracker,
        run: RunInfo,
        latest: Mapping[str, Attempt],
    ) -> None:
        self.conn = conn
        self.tracker = tracker
        self.run = run
        self.latest: Mapping[str, Attempt] = dict(latest)
        """Each revision's latest attempt when the run took the lock (what it planned from)."""
        self._numbers = {revision: attempt.attempt for revision, attempt in latest.items()}

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
        attempt_id = await self.tracker.start(
            self.conn,
            self.run,
            revision=revision,
            description=description,
            direction=direction,
            attempt=number,
            checksum=checksum,
            status=status,
            reason=reason,
            checkpoint=checkpoint,
        )
        self._numbers[revision] = number
        return attempt_id

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
    ) -> None:
        """Move this run's pending attempt to ``status`` in the caller's transaction.

        :raises FenceLost: the attempt is no longer this run's.
        """
        await self.tracker.finish(
            self.conn,
            self.run,
            attempt_id,
            status,
            duration_ms=duration_ms,
            error_message=error_message,
            error_traceback=error_traceback,
            reason=reason,
        )

    async def save_checkpoint(
        self, attempt_id: int, session: AsyncSession, checkpoint: Mapping[str, Any]
    ) -> None:
        """Store a batched loop's checkpoint in the session's (the batch's) transaction.

        :raises FenceLost: the attempt is no longer this run's; the batch must roll back.
        """
        await self.tracker.save_checkpoint(session, self.run, attempt_id, checkpoint)
