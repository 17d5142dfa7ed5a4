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
