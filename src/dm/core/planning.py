"""Plans: which revisions a verb runs, in which direction and order, and what is done with
each (run it, record it skipped, record an undo of a skipped upgrade).

One planner per verb, each taking the graph, the revisions' latest attempts (their states,
see ``dm.core.state``) and the environment, and returning :class:`Step`\\ s with the environment
guard's decision attached. Refusals (an irreversible downgrade, a missing ancestor, an
applied dependant, a guarded downgrade, an application schema revision a step requires
but the database lacks) are raised here, before anything runs. Pure: no database, no
event loop (the schema state is read by the caller, ``dm.engine.execution``).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace
from typing import TYPE_CHECKING

from dm.core import alembic_compat as compat
from dm.core.environments import OVERRIDDEN
from dm.core.environments import SKIPPED_NOTHING_TO_UNDO
from dm.core.environments import Action
from dm.core.environments import Decision
from dm.core.environments import decide
from dm.core.environments import guard_reason
from dm.core.errors import IrreversiblePlan
from dm.core.errors import SchemaNotReady
from dm.core.errors import UnknownTarget
from dm.core.errors import UsageError
from dm.core.graph import Graph
from dm.core.graph import Revision
from dm.core.graph import display_path
from dm.core.state import UNFINISHED

if TYPE_CHECKING:
    from alembic.script import Script

    from dm.core.state import Attempt

Latest = Mapping[str, "Attempt"]


@dataclass(frozen=True)
class Step:
    """One revision to run (or record) in one direction, with the guard's decision."""

    rev: Revision
    is_upgrade: bool
    reason: str | None = None
    """Why this step runs, recorded with its attempt (e.g. ``forced: <why>``)."""
    decision: Decision = Decision(Action.RUN)

    @property
    def revision(self) -> str:
        """Return the revision id."""
        return self.rev.id

    @property
    def script(self) -> Script:
        """Return Alembic's script of the revision."""
        return self.rev.script

    @property
    def direction(self) -> str:
        """Return ``"upgrade"`` or ``"downgrade"``."""
        return "upgrade" if self.is_upgrade else "downgrade"

    @property
    def description(self) -> str:
        """Return the first line of the revision's docstring."""
        return self.rev.description

    @property
    def transactional(self) -> bool:
        """Return False when the revision commits per batch (``transactional = False``)."""
        return self.rev.transactional

    @property
    def timeout(self) -> float | None:
        """Return the revision's own time limit in seconds, if it sets one."""
        return self.rev.timeout

    @property
    def reversible(self) -> bool:
        """Return whether the revision defines ``downgrade()``."""
        return self.rev.reversible

    @property
    def runs(self) -> bool:
        """Return whether the step runs a hook (else it is only recorded)."""
        return self.decision.action is Action.RUN


# -- one planner per verb -------------------------------------------------------------------


def plan_upgrade(graph: Graph, target: str, latest: Latest, environment: str) -> list[Step]:
    """Plan ``dm upgrade``: skipped revisions now allowed and deferred backfills first, then
    the path to ``target``.

    Retried revisions are limited to those ``target`` includes (for ``heads``, every one;
    for a relative target such as ``+1``, the ones below the revision it reaches from
    base). A deferred backfill (see :func:`deferred_revisions`) does not hold up the path:
    the revisions after it are planned too (``dm.engine.execution`` holds back those that declare
    ``requires_complete`` while it is unfinished).
    """
    path = graph.upgrade_path(target, passed_revisions(graph, latest))
    retries = _allowed_again(graph, latest, environment) + deferred_revisions(graph, latest)
    if retries:
        try:
            scope = {rev.id for rev in graph.upgrade_path(target, ())}
        except UsageError:
            scope = set()
        retries = [rev for rev in retries if rev.id in scope]
    planned = {rev.id for rev in retries}
    revisions = retries + [rev for rev in path if rev.id not in planned]
    return with_decisions([Step(rev, True) for rev in revisions], environment, latest)


def plan_downgrade(graph: Graph, target: str, latest: Latest, environment: str) -> list[Step]:
    """Plan ``dm downgrade``: the applied revisions above ``target``, newest first.

    :raises IrreversiblePlan: a revision on the way that ran has no ``downgrade()``.
    """
    path = graph.downgrade_path(target, applied_revisions(latest))
    steps = with_decisions([Step(rev, False) for rev in path], environment, latest)
    require_reversible(steps, target)
    return steps


def plan_stamp(
    graph: Graph,
    target: str,
    latest: Latest,
    environment: str,
    *,
    ignore_environment: bool = False,
) -> list[Step]:
    """Plan ``dm stamp``: up to ``target`` if it lies ahead, else down to it (recorded only,
    so irreversible revisions may be passed).

    The environment guard decides as it does for a run: stamping up records a revision it
    excludes ``skipped``, as an upgrade here would; stamping down records the undo of a
    skipped upgrade (nothing to undo), and refuses an applied revision it excludes. With
    ``ignore_environment`` every revision is recorded applied (or not), the override noted
    in its reason.

    :raises UnknownTarget: ``target`` is neither ahead of nor below the applied revisions.
    :raises UsageError: stamping down an applied revision the guard excludes.
    """
    applied = applied_revisions(latest)
    try:
        up = graph.upgrade_path(target, applied)
    except UnknownTarget as upward_error:
        try:
            down = graph.downgrade_path(target, applied)
        except UnknownTarget:
            # Graph errors say "cannot upgrade to ...": say what the user asked for.
            reason = str(upward_error).partition(": ")[2] or str(upward_error)
            raise UnknownTarget(f"cannot stamp {target!r}: {reason}") from None
        revisions, is_upgrade = down, False
    else:
        if up or target == "heads":
            revisions, is_upgrade = up, True
        else:
            revisions, is_upgrade = graph.downgrade_path(target, applied), False
    return [
        _stamped(rev, is_upgrade, environment, latest.get(rev.id), ignore_environment)
        for rev in revisions
    ]


STAMPED = "stamped"
"""The recorded reason of a stamp the environment guard has nothing to say about."""


def _stamped(
    rev: Revision, is_upgrade: bool, environment: str, attempt: Attempt | None, ignore: bool
) -> Step:
    """Return the step recording ``rev`` stamped, with what it records and why."""
    if not is_upgrade and attempt is not None and attempt.is_skipped:
        why = SKIPPED_NOTHING_TO_UNDO
        return Step(rev, False, reason=f"{STAMPED}; {why}", decision=Decision(Action.RECORD, why))
    guard = guard_reason(rev, environment)
    if guard is None:
        hook = "upgrade" if is_upgrade else "downgrade"
        why = f"stamped as {'applied' if is_upgrade else 'not applied'}; {hook}() not run"
        return Step(rev, is_upgrade, reason=STAMPED, decision=Decision(Action.RECORD, why))
    if ignore:
        why = f"{OVERRIDDEN}: {guard}"
        return Step(
            rev, is_upgrade, reason=f"{STAMPED}; {why}", decision=Decision(Action.RECORD, why)
        )
    if is_upgrade:  # what an upgrade here would record
        return Step(rev, True, reason=f"{STAMPED}; {guard}", decision=Decision(Action.SKIP, guard))
    raise UsageError(
        f"cannot stamp {rev.id} as not applied: {guard}; it may only be undone where it may "
        "run (--ignore-environment records it anyway); nothing was recorded"
    )


def plan_run(
    graph: Graph,
    rev: Revision,
    latest: Latest,
    environment: str,
    forced_reason: str | None,
    *,
    ignore_environment: bool = False,
) -> list[Step]:
    """Plan ``dm run REV``: its upgrade, once all its ancestors are applied.

    Nothing when it is applied already, unless forced (then the step carries why). The
    environment guard applies to a forced run too: an applied revision it excludes is
    refused, unless ``ignore_environment`` (then the step's reason records the override).

    :raises UsageError: an ancestor is not applied (each is named); a forced run of an
        applied revision the environment guard excludes.
    """
    passed = passed_revisions(graph, latest)
    missing = [r for r in ancestors(graph, rev.id) if r not in passed]
    if missing:
        raise UsageError(
            f"cannot run {rev.id}: not applied yet: {', '.join(missing)} "
            f"(apply them first, e.g. dm upgrade {rev.id})"
        )
    attempt = latest.get(rev.id)
    waiting = incomplete_requirements(rev, latest)
    if waiting and not (attempt is not None and attempt.is_applied and forced_reason is None):
        raise UsageError(
            f"cannot run {rev.id}: it requires {', '.join(waiting)} complete "
            "(requires_complete), and it is not; dm upgrade (or dm resume) finishes it first"
        )
    if attempt is not None and attempt.is_applied and forced_reason is None:
        return []
    why = forced_reason if attempt is not None and attempt.is_applied else None
    step = Step(rev, True, reason=why)
    decision = decide(
        rev, True, environment, latest.get(rev.id), ignore_environment=ignore_environment
    )
    return [_decided(step, decision)]


def plan_rollback(graph: Graph, rev: Revision, latest: Latest, environment: str) -> list[Step]:
    """Plan ``dm rollback REV``: its downgrade, when nothing after it is applied or skipped.

    :raises UsageError: revisions after it are applied or skipped (each is named).
    :raises IrreversiblePlan: it ran and has no ``downgrade()``.
    """
    attempt = latest.get(rev.id)
    if attempt is None or not attempt.counts_as_applied:
        return []
    later = [latest[r] for r in descendants(graph, rev.id) if r in latest]
    applied = [a.revision for a in later if a.is_applied]
    skipped = [a.revision for a in later if a.is_skipped]
    if applied or skipped:
        found = [f"applied revisions depend on it: {', '.join(applied)}"] if applied else []
        if skipped:  # they never ran here, but plans pass them as if applied
            found.append(f"skipped revisions come after it: {', '.join(skipped)}")
        raise UsageError(f"cannot roll back {rev.id}: {'; '.join(found)} (roll them back first)")
    steps = with_decisions([Step(rev, False)], environment, latest)
    require_reversible(steps, rev.id, verb="rollback")
    return steps


# -- shared pieces --------------------------------------------------------------------------


def applied_revisions(latest: Latest) -> set[str]:
    """Return the revisions plans pass: every applied one, and those the environment guard
    skipped (see ``Attempt.counts_as_applied``)."""
    return {revision for revision, attempt in latest.items() if attempt.counts_as_applied}


def deferred_revisions(graph: Graph, latest: Latest) -> list[Revision]:
    """Return the deferred backfills, parents before children: revisions that say
    ``blocks_deploy = False`` whose upgrade stopped at a batch boundary (``incomplete``,
    ``paused``, ``cancelled``). Plans pass them as if applied, and retry them."""
    found = {
        revision
        for revision, attempt in latest.items()
        if attempt.direction == "upgrade"
        and attempt.state in UNFINISHED
        and graph.known(revision)
        and not graph.revision(revision).blocks_deploy
    }
    if not found:
        return []  # the common case: no graph walk
    return [graph.revision(s.revision) for s in graph.walk() if s.revision in found]


DEFERRED = (
    "it does not block the deploy (blocks_deploy = False): the run goes on with the "
    "revisions after it, except those that declare requires_complete on it"
)
"""What happens after a deferred backfill stopped at a batch boundary."""


def passed_revisions(graph: Graph, latest: Latest) -> set[str]:
    """Return the revisions plans pass: :func:`applied_revisions` and the deferred
    backfills (:func:`deferred_revisions`)."""
    return applied_revisions(latest) | {rev.id for rev in deferred_revisions(graph, latest)}


def incomplete_requirements(rev: Revision, latest: Latest) -> list[str]:
    """Return the revisions ``rev`` declares ``requires_complete`` whose upgrade is not
    complete (a skipped or abandoned one counts as complete: it will not run here)."""
    return [
        required
        for required in rev.requires_complete
        if (attempt := latest.get(required)) is None or not attempt.counts_as_applied
    ]


def waits(step: Step, complete: Collection[str], held: Collection[str]) -> str | None:
    """Return why an upgrade ``step`` may not run yet (None when it may): a revision it
    declares ``requires_complete`` is not in ``complete``, or a parent of it is ``held``
    back."""
    if not step.is_upgrade:
        return None
    missing = [rev for rev in step.rev.requires_complete if rev not in complete]
    if missing:
        return (
            f"waits for {', '.join(missing)} to complete (requires_complete; a deferred "
            "backfill, resumed by each run)"
        )
    parents = [rev for rev in compat.all_down_revisions(step.script) if rev in held]
    if parents:
        return f"waits for {', '.join(parents)}, held back before it"
    return None


def require_reversible(steps: Iterable[Step], target: str, *, verb: str = "downgrade") -> None:
    """Refuse a plan whose downgrade steps run a revision without ``downgrade()``.

    :param verb: the command refused, as the message says it (``rollback`` names the
        revision rolled back; ``downgrade`` the target).
    :raises IrreversiblePlan: naming every such revision and its file.
    """
    irreversible = [s for s in steps if not s.is_upgrade and s.runs and not s.reversible]
    if irreversible:
        names = ", ".join(f"{s.revision} ({display_path(s.rev.path)})" for s in irreversible)
        what = f"roll back {target}" if verb == "rollback" else f"downgrade to {target!r}"
        raise IrreversiblePlan(f"cannot {what}: no downgrade() in {names}; nothing was run")


def needs_schema(steps: Iterable[Step]) -> bool:
    """Return whether a step runs an upgrade that declares ``requires_schema``."""
    return any(s.is_upgrade and s.runs and s.rev.requires_schema for s in steps)


def schema_blocked(steps: Iterable[Step], state: SchemaState) -> list[str]:
    """Return one line per step whose upgrade needs application schema revisions the
    database lacks (steps the environment guard skips need nothing)."""
    found = []
    for step in steps:
        missing = state.missing(step.rev) if step.is_upgrade and step.runs else ()
        if missing:
            plural = "s" if len(missing) > 1 else ""
            found.append(
                f"revision {step.revision} needs the application's schema revision{plural} "
                f"{', '.join(missing)} (database is at {state.describe()})"
            )
    return found


def require_schema(steps: Iterable[Step], state: SchemaState) -> None:
    """Refuse the whole plan while a step needs schema revisions the database lacks.

    :raises SchemaNotReady: naming each such revision and what it needs; nothing runs.
    """
    blocked = schema_blocked(steps, state)
    if blocked:
        raise SchemaNotReady(
            f"{'; '.join(blocked)}; run the application's `alembic upgrade` first (nothing was run)"
        )


def ancestors(graph: Graph, revision: str) -> list[str]:
    """Return every ancestor of ``revision`` (``depends_on`` included), oldest first."""
    found: set[str] = set()
    todo = list(compat.all_down_revisions(graph.script(revision)))
    while todo:
        rev = todo.pop()
        if rev not in found:
            found.add(rev)
            todo.extend(compat.all_down_revisions(graph.script(rev)))
    return [s.revision for s in graph.walk() if s.revision in found]


def descendants(graph: Graph, revision: str) -> list[str]:
    """Return every revision that has ``revision`` as an ancestor, newest first."""
    found: set[str] = {revision}
    ordered = graph.walk()
    for script in ordered:  # parents come before children
        if found.intersection(compat.all_down_revisions(script)):
            found.add(script.revision)
    found.discard(revision)
    return [s.revision for s in reversed(ordered) if s.revision in found]


def with_decisions(steps: list[Step], environment: str, latest: Latest) -> list[Step]:
    """Return ``steps`` with the environment guard's decision attached to each.

    :raises UsageError: the guard forbids a step (a guarded downgrade).
    """
    return [
        _decided(step, decide(step.rev, step.is_upgrade, environment, latest.get(step.revision)))
        for step in steps
    ]


def _decided(step: Step, decision: Decision) -> Step:
    """Return ``step`` with ``decision``; a step the guard lets run (its ``environments``
    allow this one, or ``--ignore-environment``) records the guard's reason too."""
    if decision.action is Action.RUN and decision.reason:
        step = replace(step, reason="; ".join(filter(None, [step.reason, decision.reason])))
    return replace(step, decision=decision)


def _allowed_again(graph: Graph, latest: Latest, environment: str) -> list[Revision]:
    """Return the skipped revisions this environment allows, parents before children."""
    if not any(attempt.is_skipped for attempt in latest.values()):
        return []  # the common case: no graph walk
    return [
        graph.revision(script.revision)
        for script in graph.walk()
        if (attempt := latest.get(script.revision)) is not None
        and attempt.is_skipped
        and guard_reason(graph.revision(script.revision), environment) is None
    ]


@dataclass(frozen=True)
class SchemaState:
    """The application's schema revisions in the database: the version table's rows, and
    every revision they include."""

    current: tuple[str, ...]
    """The rows of the application's version table (empty: none, or no table)."""
    applied: frozenset[str]
    """``current`` and all their ancestors in the application's revision graph."""

    def missing(self, rev: Revision) -> tuple[str, ...]:
        """Return the schema revisions ``rev`` requires that the database does not have."""
        return tuple(required for required in rev.requires_schema if required not in self.applied)

    def describe(self) -> str:
        """Return where the database stands, for messages: ``1234abcd`` or ``no ...``."""
        return ", ".join(self.current) if self.current else "no schema revision"
