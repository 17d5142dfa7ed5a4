"""Environment guards: which revisions may run in the current environment.

A revision may declare ``environments = ("development", "staging")``; anywhere else it
does not run. Its upgrade is recorded ``skipped`` with the reason, it does not block the
revisions after it, and an upgrade in an allowed environment runs it later. The
environment comes from ``DM_ENVIRONMENT``/``ENVIRONMENT`` only, and the default,
``production``, is the safe one. Only ``dm run`` and ``dm stamp`` take an override,
``--ignore-environment``, recorded with the attempt (:data:`OVERRIDDEN`). An upgrade the guard
excludes is never recorded ``skipped`` over an applied revision: its work is in effect.

:func:`decide` is the one place the decision is made: ``dm.core.planning`` attaches it to each
step, and ``--dry-run`` output and the recorded rows come from there. Pure: no database,
no event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dm.core.errors import RevisionFileError
from dm.core.errors import UsageError

if TYPE_CHECKING:
    from dm.core.graph import Revision
    from dm.core.state import Attempt


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
OVERRIDDEN = "environment guard overridden (--ignore-environment)"
"""Starts the recorded reason of a step the guard excludes but an operator ran anyway."""


def allows(names: Iterable[str], environment: str) -> bool:
    """Return whether ``environment`` is one of ``names``, case and surrounding spaces
    aside (``Staging`` is ``staging``)."""
    return any(same_environment(name, environment) for name in names)


def guard_reason(rev: Revision, environment: str) -> str | None:
    """Return why ``rev`` may not run in ``environment`` (None when it may)."""
    if rev.environments is None or allows(rev.environments, environment):
        return None
    return f"environment {environment!r} not in {rev.environments!r}"


def check_declared(revisions: Iterable[Revision], declared: tuple[str, ...] | None) -> None:
    """Refuse a revision whose ``environments`` names an environment ``dm.core.environments``
    does not declare (a typo there would skip the revision everywhere, silently).

    :raises RevisionFileError: one line naming the file and the name.
    """
    if declared is None:
        return
    from dm.core.graph import display_path

    for rev in revisions:
        for name in rev.environments or ():
            if not is_declared(name, declared):
                raise RevisionFileError(
                    f"{display_path(rev.script.path)}: environments names {name!r}, which is "
                    f"not a declared environment ({', '.join(declared)}; dm.environments)"
                )


def decide(
    rev: Revision,
    is_upgrade: bool,
    environment: str,
    latest: Attempt | None,
    *,
    ignore_environment: bool = False,
) -> Decision:
    """Decide what to do with ``rev`` in ``environment``, given its latest attempt.

    :param ignore_environment: run what the guard excludes (``--ignore-environment``); the
        decision's reason then starts with :data:`OVERRIDDEN`.
    :raises UsageError: a downgrade of a revision whose upgrade ran, in an environment
        where the revision may not run; an upgrade of an applied revision there (a forced
        run: recording it ``skipped`` would hide work that is in effect).
    """
    if not is_upgrade and latest is not None and latest.is_skipped:
        return Decision(Action.RECORD, SKIPPED_NOTHING_TO_UNDO)
    reason = guard_reason(rev, environment)
    if reason is None:
        if rev.environments is None:
            return Decision(Action.RUN)
        return Decision(Action.RUN, f"environment {environment!r} in {rev.environments!r}")
    if ignore_environment:
        return Decision(Action.RUN, f"{OVERRIDDEN}: {reason}")
    if is_upgrade and latest is not None and latest.is_applied:
        raise UsageError(
            f"cannot run {rev.id}: {reason}, and it is applied here (recording it skipped "
            "would hide work that is in effect); --ignore-environment runs it anyway "
            "(recorded with the attempt); nothing was run"
        )
    if is_upgrade:
        return Decision(Action.SKIP, reason)
    raise UsageError(f"cannot downgrade {rev.id}: {reason}; it may only be undone where it may run")


def same_environment(one: str, other: str) -> bool:
    """Return whether two environment names are the same: case and surrounding spaces
    do not count (``Staging`` is ``staging``)."""
    return one.strip().casefold() == other.strip().casefold()


def is_declared(name: str, declared: tuple[str, ...]) -> bool:
    """Return whether ``name`` is one of ``declared`` (compared by :func:`same_environment`)."""
    return any(same_environment(name, known) for known in declared)
