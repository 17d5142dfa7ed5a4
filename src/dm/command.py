"""One function per dm command: settings and arguments in, a result object out.

What the commands share (graph, tracker, database, lock, plan execution) is ``dm.runtime``.

Nothing here prints or exits; ``dm.cli`` renders the results, and programs may call these
functions directly. Database commands are coroutines; graph-only commands are plain
functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from alembic.script.revision import RevisionError
from alembic.util import CommandError

from . import planning
from .errors import UnknownTarget
from .errors import UsageError
from .graph import Graph
from .graph import Revision
from .graph import check_new_revision_id
from .graph import checksum
from .graph import display_path
from .planning import Step
from .runtime import Database
from .runtime import PlannedStep as PlannedStep
from .runtime import RunResult as RunResult
from .runtime import execute_plan
from .runtime import load_graph
from .runtime import open_database
from .runtime import planned
from .runtime import recorded_status
from .runtime import shown_state
from .schema import AppSchema
from .state import UNFINISHED
from .state import State
from .tracker import Attempt

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import Script

    from .settings import Settings

log = logging.getLogger("dm.command")


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RevisionInfo:
    """A revision file as the graph sees it."""

    revision: str
    down_revisions: list[str]
    description: str
    branch_labels: list[str]
    depends_on: list[str]
    path: str
    is_head: bool
    is_branch_point: bool
    is_merge_point: bool
    reversible: bool
    doc: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    """The module-level attributes dm reads from the file (``transactional``...)."""

    @classmethod
    def of(cls, rev: Revision) -> RevisionInfo:
        """Describe ``rev``."""
        script = rev.script
        return cls(
            revision=script.revision,
            down_revisions=list(_as_list(script.down_revision)),
            description=rev.description,
            branch_labels=sorted(script.branch_labels),
            depends_on=list(_as_list(script.dependencies)),
            path=display_path(script.path),
            is_head=script.is_head,
            is_branch_point=script.is_branch_point,
            is_merge_point=script.is_merge_point,
            reversible=rev.reversible,
            doc=rev.doc,
            attributes={
                "transactional": rev.transactional,
                "environments": list(rev.environments) if rev.environments is not None else None,
                "timeout": rev.timeout,
                "max_runtime": rev.max_runtime,
                "blocks_deploy": rev.blocks_deploy,
                "requires_schema": list(rev.requires_schema),
                "requires_complete": list(rev.requires_complete),
                "idempotent": rev.idempotent,
            },
        )


@dataclass(frozen=True)
class CurrentResult:
    """The applied heads, as derived from the tracker."""

    heads: list[str]
    graph_heads: list[str]
    skipped: list[str] = field(default_factory=list)
    """Those of ``heads`` the environment guard skipped (they never ran here)."""


@dataclass(frozen=True)
class RevisionStatus:
    """One revision's latest attempt (``status`` is None when it never ran)."""

    revision: str
    description: str
    status: str | None = None
    """The latest attempt's status (None when it never ran)."""
    state: str = State.NOT_RUN.value
    """What is in effect (``dm.state``); a ``running`` attempt shows ``died`` when its run
    died, ``pausing`` or ``cancelling`` when ``dm pause`` or ``dm cancel`` asked it to stop."""
    direction: str | None = None
    applied: bool = False
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    run_by: str | None = None
    pod_name: str | None = None
    error: str | None = None
    reason: str | None = None
    is_head: bool = False
    missing_file: bool = False
    modified: bool = False
    """The file changed since the attempt that applied it (checksums differ)."""
    checkpoint: dict[str, Any] | None = None
    """Where a non-transactional revision's batches stand (running, failed, stopped,
    paused or cancelled attempt)."""
    request: str | None = None
    """``pause``, ``cancel`` or ``abandon``: what ``dm pause``/``dm cancel`` asked of the
    latest attempt; with ``request_by`` (who) and ``request_reason`` (why)."""
    request_by: str | None = None
    request_reason: str | None = None
    blocks_deploy: bool = True
    """False: ``dm check`` passes while the revision is unfinished (``blocks_deploy = False``)."""


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found: everything must be empty for the check to pass."""

    pending: list[str]
    failed: list[str]
    """Revisions in state ``failed`` or ``partial``: the next run retries or resumes them."""
    running: list[str]
    missing: list[str]
    modified: list[str] = field(default_factory=list)
    allow_modified: bool = False
    died: list[str] = field(default_factory=list)
    """Revisions whose attempt is pending while no run holds the lock: the run died, and
    the next run marks the attempt interrupted and retries it."""
    needs_schema: list[str] = field(default_factory=list)
    """One line per pending revision that an upgrade would refuse: it requires application
    schema revisions the database lacks (``requires_schema``)."""
    incomplete: list[str] = field(default_factory=list)
    """Batched revisions stopped at a batch boundary: ``incomplete`` (time up), ``paused``
    or ``cancelled``; a later run takes them up again."""
    deferred: list[str] = field(default_factory=list)
    """Unfinished revisions (not run, running, died, incomplete, paused, cancelled) that do
    not fail the check because they say ``blocks_deploy = False``."""
    abandoned: list[str] = field(default_factory=list)
    """Passed, but never applied: settled by ``dm cancel --skip`` (not run again)."""
    skipped: list[str] = field(default_factory=list)
    """Passed, but never applied here: the environment guard skipped them."""

    @property
    def ok(self) -> bool:
        """Return whether nothing is pending, failed, running, died, incomplete, missing or
        (unless allowed) modified since it was applied."""
        modified = self.modified and not self.allow_modified
        unsettled = self.pending or self.failed or self.running or self.died or self.incomplete
        return not (unsettled or self.missing or modified)


@dataclass(frozen=True)
class InitResult:
    """Files written by ``init``."""

    config_file: str
    script_location: str
    appended_section: bool
    schema_section: str | None = None
    """The application's Alembic section found in the config file and wired for
    ``requires_schema`` (``dm.schema_alembic_section``), if any."""
    gitignore: str | None = None
    """The ``.gitignore`` written or extended to leave out the embedded database, if any."""


# -- project loading --------------------------------------------------------------------


# -- commands that write -----------------------------------------------------------------


async def upgrade(settings: Settings, target: str = "heads", *, dry_run: bool = False) -> RunResult:
    """Upgrade to a later revision (default: every head).

    :param target: ``heads``, ``head``, a revision, ``branch@head``, ``+N``...
    :param dry_run: only return the plan.
    """
    graph = load_graph(settings, cached=True)  # imported before anything runs
    schema = AppSchema.for_graph(settings, graph)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_upgrade(graph, target, latest, settings.environment)

    return await execute_plan(settings, target, plan, dry_run=dry_run, schema=schema, graph=graph)


async def downgrade(settings: Settings, target: str, *, dry_run: bool = False) -> RunResult:
    """Revert to an earlier revision, running ``downgrade()`` hooks newest first.

    :param target: a revision, ``base``, ``-N``, ``branch@-N``...
    :param dry_run: only return the plan.
    """
    graph = load_graph(settings)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_downgrade(graph, target, latest, settings.environment)

    return await execute_plan(settings, target, plan, dry_run=dry_run)


async def stamp(
    settings: Settings,
    target: str,
    *,
    dry_run: bool = False,
    ignore_environment: bool = False,
) -> RunResult:
    """Record revisions as applied (or not) up to ``target`` without running them.

    Moving up records ``success`` rows, or ``skipped`` for a revision the environment
    guard excludes (as an upgrade here would); moving down records ``rolled_back`` rows
    and refuses an applied revision the guard excludes. Each row carries the reason
    ``stamped`` (with the guard's verdict, if any); the result's plan says per revision what
    is recorded and why.

    :param dry_run: only return the plan; nothing is written.
    :param ignore_environment: record every revision applied (or not) whatever its
        ``environments``; the override is recorded in each such row's reason.
    """
    from .runner import StepResult

    graph = load_graph(settings)
    environment = settings.environment

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_stamp(
            graph, target, latest, environment, ignore_environment=ignore_environment
        )

    async with open_database(settings) as probe:  # refuse a bad target before creating anything
        steps = plan(await probe.read_latest())
    if dry_run:
        return RunResult(target, planned(steps), dry_run=True)
    async with open_database(settings) as db, db.locked() as (recorder, interrupted):
        steps = plan(recorder.latest)
        results = []
        async with recorder.conn.begin():  # all or nothing
            for step in steps:
                status = recorded_status(step)
                await recorder.record_step(step, status)
                log.info(
                    "stamp %s: recorded %s (%s)", step.revision, status.value, step.decision.reason
                )
                results.append(
                    StepResult(step.revision, step.direction, status, 0, step.description)
                )
        return RunResult(target, planned(steps), results, interrupted)


# -- commands that read the database -------------------------------------------------------


async def current(settings: Settings) -> CurrentResult:
    """Show the applied heads, as recorded in the tracker."""
    graph = load_graph(settings, cached=True)
    async with open_database(settings) as db:
        latest = await db.read_latest()
    heads = graph.applied_heads(planning.applied_revisions(latest))
    skipped = [rev for rev in heads if latest[rev].is_skipped]
    return CurrentResult(list(heads), list(graph.heads), skipped)


async def status(settings: Settings) -> list[RevisionStatus]:
    """Show every revision with its state and latest attempt, oldest revision first."""
    graph = load_graph(settings, cached=True)
    async with open_database(settings) as db:
        latest = await db.read_latest()
        died = await db.died(latest)
    heads = set(graph.heads)
    rows = [
        _revision_status(
            s.revision,
            graph.revision(s.revision).description,
            latest.get(s.revision),
            died,
            is_head=s.revision in heads,
            modified=_is_modified(s, latest.get(s.revision)),
            blocks_deploy=graph.revision(s.revision).blocks_deploy,
        )
        for s in graph.walk()
    ]
    for revision, attempt in latest.items():
        if not graph.known(revision):
            rows.append(
                _revision_status(
                    revision, attempt.description or "", attempt, died, missing_file=True
                )
            )
    return rows


def _is_modified(script: Script, attempt: Attempt | None) -> bool:
    """Return whether ``script``'s file changed since the attempt that applied it."""
    if attempt is None or attempt.state is not State.APPLIED:
        return False
    applied_from = attempt.in_effect_checksum
    return applied_from is not None and applied_from != checksum(script)


def _revision_status(
    revision: str,
    description: str,
    attempt: Attempt | None,
    died: Collection[str],
    *,
    is_head: bool = False,
    modified: bool = False,
    missing_file: bool = False,
    blocks_deploy: bool = True,
) -> RevisionStatus:
    if attempt is None:
        return RevisionStatus(
            revision,
            description,
            is_head=is_head,
            missing_file=missing_file,
            blocks_deploy=blocks_deploy,
        )
    return RevisionStatus(
        revision=revision,
        description=description,
        status=attempt.status.value,
        state=shown_state(attempt, revision in died),
        direction=attempt.direction,
        applied=attempt.is_applied,
        attempts=attempt.attempts,
        started_at=attempt.started_at,
        finished_at=attempt.finished_at,
        duration_ms=attempt.duration_ms,
        run_by=attempt.run_by,
        pod_name=attempt.pod_name,
        error=attempt.error_message,
        reason=attempt.reason,
        is_head=is_head,
        missing_file=missing_file,
        modified=modified,
        checkpoint=attempt.checkpoint,
        request=attempt.request,
        request_by=attempt.request_by,
        request_reason=attempt.request_reason,
        blocks_deploy=blocks_deploy,
    )


async def check(settings: Settings, *, allow_modified: bool = False) -> CheckResult:
    """Check that every revision is applied and none failed or is running.

    :param allow_modified: do not fail on revision files changed since they were applied.
    """
    graph = load_graph(settings, cached=True)
    schema = AppSchema.for_graph(settings, graph)
    async with open_database(settings) as db:
        return await _check(settings, graph, db, allow_modified, schema)


async def _check(
    settings: Settings,
    graph: Graph,
    db: Database,
    allow_modified: bool,
    schema: AppSchema | None = None,
) -> CheckResult:
    latest = await db.read_latest()
    died = await db.died(latest)

    def having(*states: State) -> list[str]:
        return sorted(r for r, a in latest.items() if a.state in states and r not in died)

    def blocking(revisions: Collection[str]) -> list[str]:
        return [r for r in revisions if not _deferrable(graph, r)]

    running = having(State.RUNNING)
    failed = having(State.FAILED, State.PARTIAL)
    incomplete = having(*UNFINISHED)
    missing = sorted(r for r, a in latest.items() if a.is_applied and not graph.known(r))
    modified = sorted(
        r for r, a in latest.items() if graph.known(r) and _is_modified(graph.script(r), a)
    )
    skip = set(running) | set(failed) | set(died) | set(incomplete)
    steps = planning.plan_upgrade(graph, "heads", latest, settings.environment)
    pending = [s.revision for s in steps if s.revision not in skip]
    needs_schema = []
    if schema is not None and planning.needs_schema(steps):
        needs_schema = planning.schema_blocked(steps, await db.read_schema(schema))
    unfinished = [*pending, *running, *sorted(died), *incomplete]
    deferred = sorted(r for r in unfinished if _deferrable(graph, r))
    return CheckResult(
        *(blocking(pending), failed, blocking(running), missing, modified, allow_modified),
        died=blocking(sorted(died)),
        needs_schema=needs_schema,
        incomplete=blocking(incomplete),
        deferred=deferred,
        abandoned=having(State.ABANDONED),
        skipped=having(State.SKIPPED),
    )


def _deferrable(graph: Graph, revision: str) -> bool:
    """Return whether ``revision`` says the application may start before it is done."""
    return graph.known(revision) and not graph.revision(revision).blocks_deploy


async def check_wait(
    settings: Settings,
    *,
    timeout: float = 300.0,
    interval: float = 5.0,
    allow_modified: bool = False,
) -> CheckResult:
    """Poll ``check`` until it passes or ``timeout`` seconds have passed; return the last result.

    Each poll reads the tracker once, without the lock, and logs one line naming what it
    still waits for. A transient database failure during a poll (the database restarting,
    unreachable for a moment) is logged and counts as "not yet".

    :raises TransientFailure: no poll reached the database before the timeout.
    :raises UsageError: bad configuration or revision files, a refused login, a missing
        database (a person must fix these: waiting does not help).
    """
    import asyncio
    import time

    from .errors import DatabaseUnreachable
    from .errors import TransientFailure
    from .transient import is_transient

    graph = load_graph(settings, cached=True)
    schema = AppSchema.for_graph(settings, graph)
    # The polls retry on their own schedule: no start-up retry inside a poll.
    settings = settings.model_copy(update={"connect_retry_seconds": 0.0})
    deadline = time.monotonic() + timeout
    result: CheckResult | None = None
    polls = 0
    while True:
        polls += 1
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, interval)):
                async with open_database(settings) as db:
                    result = await _check(settings, graph, db, allow_modified, schema)
            unreachable = None
        except TransientFailure as exc:
            unreachable = str(exc)
        except TimeoutError:
            unreachable = "the database did not answer in time"
        except Exception as exc:
            if not is_transient(exc):
                raise
            unreachable = f"transient database failure: {' '.join(str(exc).split())}"
        if result is not None and unreachable is None and result.ok:
            log.info("check passed after %d poll(s)", polls)
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if result is None:
                raise DatabaseUnreachable(
                    f"{unreachable} (gave up waiting after {timeout:g}s, {polls} poll(s))"
                )
            log.warning(
                "gave up waiting after %gs (%d poll(s)): %s", timeout, polls, _waiting_for(result)
            )
            return result
        if unreachable is not None:
            log.warning("poll %d: %s; next poll in %gs", polls, unreachable, interval)
        elif result is not None:
            log.info(
                "poll %d: waiting for %s; next poll in %gs (%.0fs left)",
                polls,
                _waiting_for(result),
                interval,
                remaining,
            )
        await asyncio.sleep(min(interval, remaining))


def _waiting_for(result: CheckResult) -> str:
    """Summarise in one line what keeps ``result`` from passing."""
    parts = [
        f"{label} {', '.join(revisions)}"
        for label, revisions in (
            ("pending", result.pending),
            ("needing schema", [line.split()[1] for line in result.needs_schema]),
            ("running", result.running),
            ("died", result.died),
            ("incomplete", result.incomplete),
            ("failed", result.failed),
            ("missing", result.missing),
            ("modified", [] if result.allow_modified else result.modified),
        )
        if revisions
    ]
    return "; ".join(parts) or "nothing"


# -- commands on the revision files only -----------------------------------------------------


def heads(settings: Settings) -> list[RevisionInfo]:
    """Show the head revisions of the graph."""
    graph = load_graph(settings, cached=True)
    return [RevisionInfo.of(graph.revision(rev)) for rev in graph.heads]


def branches(settings: Settings) -> list[RevisionInfo]:
    """Show the revisions where the graph branches."""
    graph = load_graph(settings, cached=True)
    return [RevisionInfo.of(graph.revision(s.revision)) for s in graph.walk() if s.is_branch_point]


def history(settings: Settings, rev_range: str | None = None) -> list[RevisionInfo]:
    """Show revisions newest first, optionally limited to ``start:end``."""
    graph = load_graph(settings, cached=True)
    base, head = "base", "heads"
    if rev_range:
        if ":" not in rev_range:
            raise UsageError(f"history range {rev_range!r} must look like START:END")
        start, end = rev_range.split(":", 1)
        base, head = start or "base", end or "heads"
    try:
        scripts = list(graph.script_dir.walk_revisions(base=base, head=head))
    except (CommandError, RevisionError) as exc:
        raise UnknownTarget(f"history range {rev_range!r}: {' '.join(str(exc).split())}") from None
    return [RevisionInfo.of(graph.revision(s.revision)) for s in scripts]


def show(settings: Settings, revision: str) -> list[RevisionInfo]:
    """Show the revision(s) a target names."""
    graph = load_graph(settings, cached=True)
    found = graph.resolve(revision)
    if not found:
        raise UnknownTarget(f"no revision matches {revision!r}")
    return [RevisionInfo.of(graph.revision(s.revision)) for s in found]


def revision(
    settings: Settings,
    message: str,
    *,
    head: str = "head",
    branch_label: str | None = None,
    depends_on: Sequence[str] = (),
    rev_id: str | None = None,
    splice: bool = False,
    allow_duplicate_slug: bool = False,
    sync: bool = False,
) -> RevisionInfo:
    """Create a revision file from the project's template.

    :param sync: write an Alembic-style revision instead (plain ``def upgrade()`` using
        ``op``), from dm's own template.
    :param allow_duplicate_slug: accept a message whose slug an existing revision has.
    :raises UsageError: the message's slug is unreadable, shorter than 3 letters or digits, a
        Python keyword, holds a path separator, or repeats an existing revision's slug.
    """
    from alembic import command as alembic_command

    from .slugs import check_message
    from .slugs import docstring_safe

    config = _quiet(settings.alembic_config())
    graph = Graph.from_config(config)  # refuse to add to a broken graph
    check_message(
        message,
        [rev.description for rev in graph.revisions],
        limit=graph.script_dir.truncate_slug_length,
        allow_duplicate=allow_duplicate_slug,
    )
    if rev_id is not None:
        parents = {head.partition("@")[0], *depends_on}
        check_new_revision_id(graph, rev_id, parents)
    with _remove_on_failure(graph):
        try:
            script = alembic_command.revision(
                config,
                message=docstring_safe(message),
                head=head,
                splice=splice,
                branch_label=branch_label,
                depends_on=list(depends_on) or None,  # type: ignore[arg-type]  # takes a list
                rev_id=rev_id,
            )
        except (CommandError, RevisionError) as exc:
            raise UsageError(f"cannot create revision: {' '.join(str(exc).split())}") from None
        if script is None or isinstance(script, list):  # pragma: no cover - autogenerate only
            raise UsageError("cannot create revision: Alembic returned no single script")
        _name_in_ascii(Path(script.path), message, graph.script_dir.truncate_slug_length)
        if sync:
            from .templates import render_sync_revision

            down = script.down_revision
            Path(script.path).write_text(
                render_sync_revision(
                    message=docstring_safe(message),
                    revision=script.revision,
                    down_revision=down if down is None or isinstance(down, str) else tuple(down),
                    branch_labels=branch_label,
                    depends_on=tuple(depends_on) or None,
                )
            )
        # the new file must load; the graph cache is refreshed
        loaded = Graph.from_config(_quiet(settings.alembic_config()), cached=True)
    if len(loaded.heads) > max(len(graph.heads), 1):
        log.warning(
            "revision %s makes a new head: the graph now has %d heads (%s); 'dm upgrade heads' "
            "runs every branch, in no set order, and 'dm upgrade head' refuses; join them "
            "with 'dm merge heads' if one needs the other",
            script.revision,
            len(loaded.heads),
            ", ".join(loaded.heads),
        )
    return RevisionInfo.of(loaded.revision(script.revision))


def _name_in_ascii(path: Path, message: str, limit: int) -> None:
    """Rename the file Alembic wrote when its slug holds letters outside ASCII: the file
    name gets the ASCII slug, the message (docstring, description) stays as written."""
    from .slugs import alembic_slug
    from .slugs import slugify

    theirs, ours = alembic_slug(message, limit), slugify(message, limit)
    if theirs != ours and path.name.endswith(f"{theirs}.py"):
        path.rename(path.with_name(path.name[: -len(f"{theirs}.py")] + f"{ours}.py"))


@contextlib.contextmanager
def _remove_on_failure(graph: Graph) -> Iterator[None]:
    """Delete any file written into the revision directories when the block raises."""
    directories = graph.version_dirs

    def files() -> set[Path]:
        return {p for d in directories if d.is_dir() for p in d.iterdir() if p.is_file()}

    before = files()
    try:
        yield
    except BaseException:
        for path in files() - before:
            path.unlink(missing_ok=True)
        raise


def merge(
    settings: Settings,
    revisions: Sequence[str],
    message: str | None = None,
    *,
    branch_label: str | None = None,
    rev_id: str | None = None,
) -> RevisionInfo:
    """Create a revision that merges ``revisions`` (default: every head).

    :param message: the merge's description; default ``merge <rev> and <rev>``.
    :raises UsageError: fewer than two distinct revisions to merge.
    """
    from alembic import command as alembic_command

    config = _quiet(settings.alembic_config())
    graph = Graph.from_config(config)
    targets = list(revisions) or ["heads"]
    parents = sorted({script.revision for target in targets for script in graph.resolve(target)})
    if len(parents) < 2:
        found = ", ".join(parents) or "none"
        raise UsageError(
            f"nothing to merge: {' '.join(targets)} names fewer than two revisions ({found}); "
            "a merge joins two or more heads"
        )
    if message is None or not message.strip():
        message = "merge " + " and ".join(parents)
    from .slugs import docstring_safe

    if rev_id is not None:
        check_new_revision_id(graph, rev_id, revisions)
    with _remove_on_failure(graph):
        try:
            script = alembic_command.merge(
                config,
                targets,
                message=docstring_safe(message),
                branch_label=branch_label,
                rev_id=rev_id,
            )
        except (CommandError, RevisionError) as exc:
            raise UsageError(f"cannot merge: {' '.join(str(exc).split())}") from None
        if script is None:
            raise UsageError("cannot merge: Alembic returned no script")
        # the new file must load; the graph cache is refreshed
        loaded = Graph.from_config(_quiet(settings.alembic_config()), cached=True)
    return RevisionInfo.of(loaded.revision(script.revision))


def init(directory: Path, *, section: str = "data_migrations") -> InitResult:
    """Create ``alembic.ini`` (or add dm's section to it) and ``data_migrations/``."""
    from .files import append_regular
    from .files import write_new
    from .templates import render_section
    from .templates import write_script_directory

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scripts = directory / "data_migrations"
    if (scripts / "env.py").exists():
        raise UsageError(f"{display_path(scripts)} already exists; refusing to overwrite it")
    config_file = directory / "alembic.ini"
    appended = os.path.lexists(config_file)
    schema_section = None
    if appended:
        if config_file.is_symlink() or not config_file.is_file():
            raise UsageError(
                f"{display_path(config_file)} is not a regular file (a symbolic link?); "
                "dm init does not write through it"
            )
        existing = config_file.read_text(encoding="utf-8")
        if f"[{section}]" in existing:
            raise UsageError(f"{display_path(config_file)} already has a [{section}] section")
        schema_section = _alembic_section_of(existing)
    section_text = render_section(section, schema_section=schema_section)
    write_script_directory(scripts)
    if appended:
        separator = (
            "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
        )
        append_regular(config_file, separator + section_text)
    else:
        write_new(config_file, section_text)
    gitignore = _ignore_embedded_database(directory)
    return InitResult(
        display_path(config_file), display_path(scripts), appended, schema_section, gitignore
    )


_EMBEDDED_DATABASE_PATTERN = "/dm.sqlite3*"


def _ignore_embedded_database(directory: Path) -> str | None:
    """Add the embedded SQLite database (and its lock and journal files) to
    ``directory/.gitignore``; return its path, or None when it already lists them."""
    path = directory / ".gitignore"
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if _EMBEDDED_DATABASE_PATTERN in existing.splitlines():
        return None
    entry = f"# dm's embedded database (dm init)\n{_EMBEDDED_DATABASE_PATTERN}\n"
    if path.exists() or path.is_symlink():
        separator = "\n" if existing and not existing.endswith("\n") else ""
        from .files import append_regular

        append_regular(path, separator + entry)  # never through a link (dm.files)
    else:
        from .files import write_new

        write_new(path, entry)
    return display_path(path)


def _alembic_section_of(text: str) -> str | None:
    """Return ``alembic`` when ``text`` (an existing config file) has an ``[alembic]``
    section with a ``script_location``: the application's schema migrations."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    if parser.has_option("alembic", "script_location"):
        return "alembic"
    return None


def _quiet(config: Config) -> Config:
    import argparse

    config.cmd_opts = argparse.Namespace(quiet=True, x=None)
    return config


def _as_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


__all__ = [
    "CheckResult",
    "CurrentResult",
    "InitResult",
    "PlannedStep",
    "RevisionInfo",
    "RevisionStatus",
    "RunResult",
    "branches",
    "check",
    "check_wait",
    "current",
    "downgrade",
    "heads",
    "history",
    "init",
    "merge",
    "revision",
    "show",
    "stamp",
    "status",
    "upgrade",
]
