"""Environment guards: which revisions may run in the current environment.

A revision may declare ``environments = ("development", "staging")``; anywhere else it
does not run. Its upgrade is recorded ``skipped`` with the reason, it does not block the
revisions after it, and an upgrade in an allowed environment runs it later. There is no
override: the environment comes from ``DM_ENVIRONMENT``/``ENVIRONMENT`` only, and the
default, ``production``, is the safe one.

:func:`decide` is the one place the decision is made: ``dm.planning`` attaches it to each
step, and ``--dry-run`` output and the recorded rows come from there. Pure: no database,
no event loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .graph import Revision
    from .tracker import Attempt


class Action(enum.StrEnum):
    """What dm does with one step of a plan."""

    RUN = "run"  # run the hook and record the outcome
    SKIP = "skip"  # record `skipped`: not allowed in this environment
    RECORD = "record"  # downgrade of a skipped revision: nothing ran, so nothing to undo


@dataclass(frozen=True)
class Decision:
    """The environment guard's verdict on one step."""

    action: Action
    reason: str | None = None

    @property
    def label(self) -> str:
        """Return the decision as shown in plans: ``run``, or the action and its reason."""
        return self.action.value if self.reason is None else f"{self.action}: {self.reason}"


SKIPPED_NOTHING_TO_UNDO = "its upgrade was skipped; nothing to undo"


def guard_reason(rev: Revision, environment: str) -> str | None:
    """Return why ``rev`` may not run in ``environment`` (None when it may)."""
    if rev.environments is None or environment in rev.environments:
        return None
    return f"environment {environment!r} not in {rev.environments!r}"


def decide(rev: Revision, is_upgrade: bool, environment: str, latest: Attempt | None) -> Decision:
    """Decide what to do with ``rev`` in ``environment``, given its latest attempt.

    :raises UsageError: a downgrade of a revision whose upgrade ran, in an environment
        where the revision may not run (no flag overrides the guard).
    """
    if not is_upgrade and latest is not None and latest.is_skipped:
        return Decision(Action.RECORD, SKIPPED_NOTHING_TO_UNDO)
    reason = guard_reason(rev, environment)
    if reason is None:
        if rev.environments is None:
            return Decision(Action.RUN)
        return Decision(Action.RUN, f"environment {environment!r} in {rev.environments!r}")
    if is_upgrade:
        return Decision(Action.SKIP, reason)
    raise UsageError(f"cannot downgrade {rev.id}: {reason}; it may only be undone where it may run")
