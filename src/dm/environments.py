"""Environment guards: which revisions may run in the current environment.

A revision may declare ``environments = ("development", "staging")``; anywhere else it
does not run. Its upgrade is recorded ``skipped`` with the reason, it does not block the
revisions after it, and an upgrade in an allowed environment runs it later. There is no
override: the environment comes from ``DM_ENVIRONMENT``/``ENVIRONMENT`` only, and the
default, ``production``, is the safe one.

:func:`decide` is the one place the decision is made: plans, ``--dry-run`` output and the
recorded rows all come from it. Pure: no database, no event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError
from .graph import Step

if TYPE_CHECKING:
    from alembic.script import Script

    from .graph import Graph
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


def allowed_environments(script: Script) -> tuple[str, ...] | None:
    """Return the environments ``script`` may run in (None: every environment)."""
    value = getattr(script.module, "environments", None)
    return None if value is None else tuple(value)


def guard_reason(script: Script, environment: str) -> str | None:
    """Return why ``script`` may not run in ``environment`` (None when it may)."""
    allowed = allowed_environments(script)
    if allowed is None or environment in allowed:
        return None
    return f"environment {environment!r} not in {allowed!r}"


def decide(step: Step, environment: str, latest: Attempt | None) -> Decision:
    """Decide what to do with ``step`` in ``environment``, given the revision's latest row.

    :raises UsageError: a downgrade of a revision whose upgrade ran, in an environment
        where the revision may not run (no flag overrides the guard).
    """
    if not step.is_upgrade and latest is not None and latest.is_skipped:
        return Decision(Action.RECORD, SKIPPED_NOTHING_TO_UNDO)
    reason = guard_reason(step.script, environment)
    if reason is None:
        allowed = allowed_environments(step.script)
        if allowed is None:
            return Decision(Action.RUN)
        return Decision(Action.RUN, f"environment {environment!r} in {allowed!r}")
    if step.is_upgrade:
        return Decision(Action.SKIP, reason)
    raise UsageError(
        f"cannot downgrade {step.revision}: {reason}; it may only be undone where it may run"
    )


def retry_skipped(graph: Graph, latest: Mapping[str, Attempt], environment: str) -> list[Step]:
    """Return upgrade steps for skipped revisions now allowed, parents before children."""
    if not any(attempt.is_skipped for attempt in latest.values()):
        return []  # the common case: no graph walk
    return [
        Step(script, True)
        for script in graph.walk()
        if (attempt := latest.get(script.revision)) is not None
        and attempt.is_skipped
        and guard_reason(script, environment) is None
    ]


def plan_upgrade(
    graph: Graph, target: str, latest: Mapping[str, Attempt], environment: str
) -> list[Step]:
    """Plan an upgrade to ``target``: skipped revisions now allowed first, then the rest.

    Retried skipped revisions are limited to those ``target`` includes (for ``heads``,
    every one; for a relative target such as ``+1``, the ones below the revision it
    reaches from base).
    """
    from .tracker import applied_revisions

    steps = graph.plan_upgrade(target, applied_revisions(latest))
    retries = retry_skipped(graph, latest, environment)
    if retries:
        try:
            scope = {step.revision for step in graph.plan_upgrade(target, ())}
        except UsageError:
            scope = set()
        retries = [step for step in retries if step.revision in scope]
    planned = {step.revision for step in retries}
    return retries + [step for step in steps if step.revision not in planned]


def decisions(
    steps: Sequence[Step], environment: str, latest: Mapping[str, Attempt]
) -> list[Decision]:
    """Return the decision for each of ``steps`` (see :func:`decide`)."""
    return [decide(step, environment, latest.get(step.revision)) for step in steps]
