"""Statuses of attempts, and what a revision's attempts leave in effect: one rule, one
name per state.

The rule reads the revision's attempts in order; only some of them change what is in
effect (the *decisive* ones):

- ``success`` (an upgrade run, stamped or resolved) makes it ``applied``;
- ``rolled_back`` (a downgrade or rollback run, stamped or resolved) makes it
  ``rolled_back``; ``skipped`` (the environment guard) makes it ``skipped``;
- a ``failed`` attempt that committed batches (it has a checkpoint) makes it ``partial``:
  some of its work is in effect and the next run in the same direction resumes;
- any other ``failed`` attempt was rolled back whole and changes nothing, so a revision
  ``applied`` before stays ``applied`` (a failed forced re-run, a failed downgrade); a
  revision with nothing in effect is ``failed``;
- a ``pending`` attempt makes it ``running`` (or, when no run holds the migration lock, a
  run that died: the next run marks the attempt interrupted and retries it);
- a batched attempt that stopped at a batch boundary, its checkpoint committed, makes it
  ``incomplete`` (its time was up: ``stopped``), ``paused`` (``dm pause``), ``cancelled``
  (``dm cancel``: the next run starts over) or ``abandoned`` (``dm cancel --skip``: plans
  pass it, it does not run again).

So the state follows from the revision's latest attempt and its latest decisive one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    """Status of one attempt (one tracker row)."""

    PENDING = "pending"  # running now, or the run died (a later run marks it failed)
    SUCCESS = "success"  # upgrade (and verify) committed, or stamped/resolved as applied
    FAILED = "failed"  # rolled back, except the batches a non-transactional attempt committed
    ROLLED_BACK = "rolled_back"  # downgrade committed, or stamped/resolved as not applied
    SKIPPED = "skipped"  # not run: the revision's `environments` exclude this environment
    STOPPED = "stopped"  # stopped at a batch boundary when its time was up; resumes
    PAUSED = "paused"  # stopped at a batch boundary by `dm pause`; resumes
    CANCELLED = "cancelled"  # stopped by `dm cancel`; the next run starts over
    ABANDONED = "abandoned"  # stopped by `dm cancel --skip`; not run again


# The legal moves of one attempt row: it is born pending and ends once.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset(
        {
            Status.SUCCESS,
            Status.FAILED,
            Status.ROLLED_BACK,
            Status.STOPPED,
            Status.PAUSED,
            Status.CANCELLED,
            Status.ABANDONED,
        }
    ),
    Status.SUCCESS: frozenset(),
    Status.FAILED: frozenset(),
    Status.ROLLED_BACK: frozenset(),
    Status.SKIPPED: frozenset(),  # inserted directly (like stamps), never from pending
    Status.STOPPED: frozenset(),
    Status.PAUSED: frozenset(),
    Status.CANCELLED: frozenset(),  # also inserted directly by `dm cancel` of a stopped one
    Status.ABANDONED: frozenset(),
}

STOPPED_AT_BOUNDARY = frozenset({Status.STOPPED, Status.PAUSED, Status.CANCELLED, Status.ABANDONED})
"""The statuses of an attempt that stopped at a batch boundary, its checkpoint committed."""
RESUMABLE = frozenset({Status.FAILED, Status.STOPPED, Status.PAUSED})
"""The statuses whose checkpoint the next attempt in the same direction resumes from."""


class State(enum.StrEnum):
    """What is in effect of one revision."""

    NOT_RUN = "not_run"  # no attempt at all
    APPLIED = "applied"  # its upgrade is in effect
    ROLLED_BACK = "rolled_back"  # undone (or stamped/resolved as not applied)
    SKIPPED = "skipped"  # the environment guard skipped its upgrade: it never ran here
    FAILED = "failed"  # its attempts failed and were rolled back; nothing is in effect
    PARTIAL = "partial"  # a failed non-transactional attempt committed batches; resumable
    RUNNING = "running"  # an attempt is pending: running now, or its run died
    INCOMPLETE = "incomplete"  # stopped at a batch boundary when its time was up; resumes
    PAUSED = "paused"  # stopped at a batch boundary by `dm pause`; resumes
    CANCELLED = "cancelled"  # stopped by `dm cancel`: batches stay, the next run starts over
    ABANDONED = "abandoned"  # stopped by `dm cancel --skip`: plans pass it


UNFINISHED = frozenset({State.INCOMPLETE, State.PAUSED, State.CANCELLED})
"""States of a batched revision stopped part-way that a later run takes up again."""


def is_decisive(status: Status, has_checkpoint: bool) -> bool:
    """Return whether an attempt with ``status`` changes what is in effect."""
    return status is not Status.FAILED or has_checkpoint


def derive(latest: Status, decisive: Status | None) -> State:
    """Return the state left by a revision's attempts.

    :param latest: the status of its latest attempt.
    :param decisive: the status of its latest decisive attempt (see :func:`is_decisive`),
        None when it has none.
    """
    if latest is Status.PENDING:
        return State.RUNNING
    if decisive is None:
        return State.FAILED if latest is Status.FAILED else State.NOT_RUN
    state = _STATE_OF[decisive]
    if latest is Status.FAILED and state in (State.ROLLED_BACK, State.SKIPPED):
        return State.FAILED  # a failed attempt after them: still nothing in effect
    return state


_STATE_OF = {
    Status.SUCCESS: State.APPLIED,
    Status.ROLLED_BACK: State.ROLLED_BACK,
    Status.SKIPPED: State.SKIPPED,
    Status.FAILED: State.PARTIAL,  # decisive only with a checkpoint
    Status.PENDING: State.RUNNING,
    Status.STOPPED: State.INCOMPLETE,
    Status.PAUSED: State.PAUSED,
    Status.CANCELLED: State.CANCELLED,
    Status.ABANDONED: State.ABANDONED,
}


@dataclass(frozen=True)
class Attempt:
    """The latest attempt of one revision, with how many attempts it had in all."""

    id: int
    revision: str
    description: str | None
    direction: str
    status: Status
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    error_message: str | None
    reason: str | None
    run_by: str | None
    pod_name: str | None
    checksum: str | None
    attempts: int
    checkpoint: dict[str, Any] | None = None
    """Where a non-transactional revision's ``batched`` loop stands (``dm.backfill.batching``)."""
    in_effect: Status | None = None
    """The status of the revision's latest decisive attempt (see ``dm.core.state``)."""
    in_effect_checksum: str | None = None
    """The file checksum that attempt recorded: what is in effect came from that file."""
    request: str | None = None
    """``pause``, ``cancel`` or ``abandon``, asked of this attempt from another shell."""
    request_by: str | None = None
    request_reason: str | None = None

    @property
    def state(self) -> State:
        """Return what the revision's attempts leave in effect (the rule in ``dm.core.state``)."""
        return derive(self.status, self.in_effect)

    @property
    def can_resume(self) -> bool:
        """Return whether a new attempt in the same direction starts at ``checkpoint``
        (a failed, stopped or paused one; a cancelled one starts over)."""
        return self.status in RESUMABLE and bool(self.checkpoint)

    @property
    def is_applied(self) -> bool:
        """Return whether plans treat the revision's upgrade as in effect.

        That is the ``applied`` state, and a downgrade left unfinished (``partial`` or
        ``running``): the next downgrade goes on with it, the next upgrade leaves it.
        """
        state = self.state
        if state is State.APPLIED:
            return True
        unfinished = state in (State.PARTIAL, State.RUNNING) or state in UNFINISHED
        return self.direction == "downgrade" and unfinished

    @property
    def is_skipped(self) -> bool:
        """Return whether the environment guard skipped the revision's upgrade."""
        return self.state is State.SKIPPED

    @property
    def counts_as_applied(self) -> bool:
        """Return whether the graph treats the revision as passed when planning.

        A skipped upgrade never ran, so it is not applied, but it must not block the
        revisions after it: plans treat it as applied, and an upgrade in an environment
        that allows it schedules it again.
        """
        return self.is_applied or self.is_skipped or self.is_abandoned_upgrade

    @property
    def is_abandoned_upgrade(self) -> bool:
        """Return whether ``dm cancel --skip`` settled its upgrade: plans pass it."""
        return self.state is State.ABANDONED and self.direction == "upgrade"
