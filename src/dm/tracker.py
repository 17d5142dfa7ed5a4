"""``script_run_tracker``: the only state dm keeps, one row per attempt.

A revision's current state is its latest row. The table's own layout is versioned in the
companion ``<table>_meta`` table and upgraded in place (under the migration lock) when an
older dm created it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession

SCHEMA_VERSION = 2
"""Layout of the tracker written by this dm.

1. pre-release prototype: ``id, revision, status, started_at, finished_at, error``.
2. one row per attempt with direction, attempt number, timings, error message and
   traceback, who/where, dm version, environment, file checksum (sha256) and checkpoint.
"""


class Status(enum.StrEnum):
    """Status of one attempt."""

    PENDING = "pending"  # running now, or the run died (a later run marks it failed)
    SUCCESS = "success"  # upgrade (and verify) committed, or stamped as applied
    FAILED = "failed"  # rolled back; the error says why
    ROLLED_BACK = "rolled_back"  # downgrade committed, or stamped as not applied
    SKIPPED = "skipped"  # not run: the revision's `environments` exclude this environment


# The legal moves of one attempt row: it is born pending and ends once.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.SUCCESS, Status.FAILED, Status.ROLLED_BACK}),
    Status.SUCCESS: frozenset(),
    Status.FAILED: frozenset(),
    Status.ROLLED_BACK: frozenset(),
    Status.SKIPPED: frozenset(),  # inserted directly (like stamps), never from pending
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
    """Where a non-transactional revision's ``batched`` loop stands (see ``dm.batching``)."""

    @property
    def can_resume(self) -> bool:
        """Return whether a new attempt in the same direction starts at ``checkpoint``."""
        return self.status is Status.FAILED and bool(self.checkpoint)

    @property
    def is_applied(self) -> bool:
        """Return whether the revision's upgrade is in effect after this attempt."""
        if self.direction == "upgrade":
            return self.status is Status.SUCCESS
        return self.status in (Status.FAILED, Status.PENDING)

    @property
    def is_skipped(self) -> bool:
        """Return whether the environment guard skipped the revision's upgrade."""
        return self.direction == "upgrade" and self.status is Status.SKIPPED

    @property
    def counts_as_applied(self) -> bool:
        """Return whether the graph treats the revision as passed when planning.

        A skipped upgrade never ran, so it is not applied, but it must not block the
        revisions after it: plans treat it as applied, and an upgrade in an environment
        that allows it schedules it again.
        """
        return self.is_applied or self.is_skipped


@dataclass(frozen=True)
class RunInfo:
    """Who runs, where, and with what: stamped on every attempt of one dm invocation."""

    run_id: str
    run_by: str
    pod_name: str | None
    dm_version: str
    environment: str


def applied_revisions(latest: Mapping[str, Attempt]) -> set[str]:
    """Return the revisions plans treat as applied, given each one's latest attempt.

    That is every revision whose upgrade is in effect, plus those the environment guard
    skipped (see ``Attempt.counts_as_applied``).
    """
    return {revision for revision, attempt in latest.items() if attempt.counts_as_applied}


def _per_revision(table: sa.TableClause) -> sa.Subquery:
    """Each revision's latest attempt id (``last_id``) and number of attempts (``attempts``)."""
    return (
        sa.select(sa.func.max(table.c.id).label("last_id"), sa.func.count().label("attempts"))
        .group_by(table.c.revision)
        .subquery()
    )


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Return ``value`` as an aware UTC datetime (SQLite returns naive ones)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class Tracker:
    """The tracker tables of one database, and the queries dm runs on them."""

    def __init__(self, table: str = "script_run_tracker", schema: str | None = None) -> None:
        self.name = table
        self.schema = schema
        self.metadata = sa.MetaData(schema=schema)
        big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
        self.table = sa.Table(
            table,
            self.metadata,
            sa.Column("id", big_id, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(36), nullable=False),
            sa.Column("revision", sa.String(64), nullable=False),
            sa.Column("description", sa.Text()),
            sa.Column("direction", sa.String(16), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("finished_at", sa.DateTime(timezone=True)),
            sa.Column("duration_ms", sa.Integer()),
            sa.Column("error_message", sa.Text()),
            sa.Column("error_traceback", sa.Text()),
            sa.Column("reason", sa.Text()),
            sa.Column("run_by", sa.String(255)),
            sa.Column("pod_name", sa.String(255)),
            sa.Column("dm_version", sa.String(32)),
            sa.Column("environment", sa.String(64)),
            sa.Column("checksum", sa.String(64)),
            sa.Column("checkpoint", sa.JSON()),
            sa.Index(f"ix_{table}_revision_id", "revision", "id"),
            sa.Index(f"ix_{table}_status", "status"),
        )
        # Built once: the runner writes two rows per revision, so statement construction
        # and compilation must not be paid each time (the compiled form is cached).
        self._insert_attempt = self.table.insert().returning(self.table.c.id)
        self._update_pending = self.table.update().where(
            self.table.c.id == sa.bindparam("attempt_id"),
            self.table.c.status == Status.PENDING.value,
        )

        self.meta = sa.Table(
            f"{table}_meta",
            self.metadata,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(255), nullable=False),
        )

    @property
    def qualified_name(self) -> str:
        """Return ``schema.table`` (or just the table name)."""
        return f"{self.schema}.{self.name}" if self.schema else self.name

    # -- layout ---------------------------------------------------------------------

    async def exists(self, conn: AsyncConnection) -> bool:
        """Return whether the tracker table exists (read-only)."""
        return await conn.run_sync(
            lambda sync: sa.inspect(sync).has_table(self.name, schema=self.schema)
        )

    async def ensure(self, conn: AsyncConnection) -> None:
        """Create the tracker, or bring an older layout up to date; commits.

        Call it while holding the migration lock, so concurrent runs never race on DDL.
        """
        async with conn.begin():
            await conn.run_sync(self._ensure_sync)

    def _ensure_sync(self, sync: sa.Connection) -> None:
        if self.schema and sync.dialect.name == "postgresql":
            sync.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        inspector = sa.inspect(sync)
        if not inspector.has_table(self.name, schema=self.schema):
            self.metadata.create_all(sync)
            self._write_version(sync, SCHEMA_VERSION, insert=True)
            return
        has_meta = inspector.has_table(self.meta.name, schema=self.schema)
        if not has_meta:
            self.meta.create(sync)
            self._write_version(sync, 1, insert=True)
        version = int(sync.execute(self._version_query()).scalar_one())
        if version > SCHEMA_VERSION:
            from .errors import ConfigError

            raise ConfigError(
                f"tracker {self.qualified_name} has layout {version}, newer than this dm "
                f"understands ({SCHEMA_VERSION}); upgrade dm"
            )
        if version < 2:
            self._upgrade_1_to_2(sync, inspector)
            self._write_version(sync, 2)

    def _version_query(self) -> sa.Select[tuple[Any]]:
        return sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")

    def _write_version(self, sync: sa.Connection, version: int, insert: bool = False) -> None:
        if insert:
            sync.execute(self.meta.insert().values(key="schema_version", value=str(version)))
        else:
            sync.execute(
                self.meta.update()
                .where(self.meta.c.key == "schema_version")
                .values(value=str(version))
            )

    def _upgrade_1_to_2(self, sync: sa.Connection, inspector: sa.Inspector) -> None:
        present = {col["name"] for col in inspector.get_columns(self.name, schema=self.schema)}
        preparer = sync.dialect.identifier_preparer
        table = preparer.format_table(self.table)
        if "error" in present and "error_message" not in present:
            sync.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN error TO error_message")
            present.add("error_message")
        for column in self.table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=sync.dialect)
            sync.exec_driver_sql(
                f"ALTER TABLE {table} ADD COLUMN {preparer.format_column(column)} {kind}"
            )
        t = self.table
        older = t.alias("older")
        attempt_number = (
            sa.select(sa.func.count())
            .where(older.c.revision == t.c.revision, older.c.id <= t.c.id)
            .scalar_subquery()
        )
        sync.execute(
            t.update().values(
                run_id=sa.func.coalesce(t.c.run_id, "pre-v2"),
                direction=sa.func.coalesce(t.c.direction, "upgrade"),
                attempt=sa.func.coalesce(t.c.attempt, attempt_number),
            )
        )
        for index in t.indexes:
            index.create(sync, checkfirst=True)

    # -- reads ----------------------------------------------------------------------

    async def latest(self, conn: AsyncConnection) -> dict[str, Attempt]:
        """Return the latest attempt of every revision the tracker knows (read-only)."""
        t = self.table
        per_revision = _per_revision(t)
        query = sa.select(
            t.c.id,
            t.c.revision,
            t.c.description,
            t.c.direction,
            t.c.status,
            t.c.attempt,
            t.c.started_at,
            t.c.finished_at,
            t.c.duration_ms,
            t.c.error_message,
            t.c.reason,
            t.c.run_by,
            t.c.pod_name,
            t.c.checksum,
            t.c.checkpoint,
            per_revision.c.attempts,
        ).join(per_revision, t.c.id == per_revision.c.last_id)
        rows = (await conn.execute(query)).all()
        return {
            row.revision: Attempt(
                id=row.id,
                revision=row.revision,
                description=row.description,
                direction=row.direction,
                status=Status(row.status),
                attempt=row.attempt,
                started_at=as_utc(row.started_at),
                finished_at=as_utc(row.finished_at),
                duration_ms=row.duration_ms,
                error_message=row.error_message,
                reason=row.reason,
                run_by=row.run_by,
                pod_name=row.pod_name,
                checksum=row.checksum,
                attempts=row.attempts,
                checkpoint=row.checkpoint,
            )
            for row in rows
        }

    async def read_latest(self, conn: AsyncConnection) -> dict[str, Attempt]:
        """Like ``latest``, but also read a tracker still in layout 1 (read-only).

        ``ensure`` upgrades the layout only under the migration lock; reads made before
        it (planning, ``status``, ``current``, ``check``) must understand the old layout.
        """
        legacy = await conn.run_sync(
            lambda sync: not sa.inspect(sync).has_table(self.meta.name, schema=self.schema)
        )
        if not legacy:
            return await self.latest(conn)
        v1 = sa.table(
            self.name,
            sa.column("id"),
            sa.column("revision"),
            sa.column("status"),
            sa.column("started_at", sa.DateTime(timezone=True)),
            sa.column("finished_at", sa.DateTime(timezone=True)),
            sa.column("error"),
            schema=self.schema,
        )
        per_revision = _per_revision(v1)
        query = sa.select(v1, per_revision.c.attempts).join(
            per_revision, v1.c.id == per_revision.c.last_id
        )
        return {
            row.revision: Attempt(
                id=row.id,
                revision=row.revision,
                description=None,
                direction="upgrade",
                status=Status(row.status),
                attempt=row.attempts,
                started_at=as_utc(row.started_at),
                finished_at=as_utc(row.finished_at),
                duration_ms=None,
                error_message=row.error,
                reason=None,
                run_by=None,
                pod_name=None,
                checksum=None,
                attempts=row.attempts,
            )
            for row in (await conn.execute(query)).all()
        }

    async def history(self, conn: AsyncConnection, revision: str) -> list[sa.Row[Any]]:
        """Return every attempt of ``revision``, oldest first."""
        t = self.table
        query = sa.select(t).where(t.c.revision == revision).order_by(t.c.id)
        return list((await conn.execute(query)).all())

    # -- writes (each call runs in the caller's transaction) --------------------------

    async def start(
        self,
        conn: AsyncConnection,
        run: RunInfo,
        *,
        revision: str,
        description: str,
        direction: str,
        attempt: int,
        checksum: str | None,
        status: Status = Status.PENDING,
        reason: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> int:
        """Insert an attempt row and return its id (``checkpoint``: where it resumes)."""
        now = utcnow()
        finished = None if status is Status.PENDING else now
        result = await conn.execute(
            self._insert_attempt,
            {
                "run_id": run.run_id,
                "revision": revision,
                "description": description,
                "direction": direction,
                "status": status.value,
                "attempt": attempt,
                "started_at": now,
                "finished_at": finished,
                "duration_ms": None if finished is None else 0,
                "reason": reason,
                "run_by": run.run_by,
                "pod_name": run.pod_name,
                "dm_version": run.dm_version,
                "environment": run.environment,
                "checksum": checksum,
                "checkpoint": None if checkpoint is None else dict(checkpoint),
            },
        )
        return int(result.scalar_one())

    async def finish(
        self,
        conn: AsyncConnection,
        attempt_id: int,
        status: Status,
        *,
        duration_ms: int,
        error_message: str | None = None,
        error_traceback: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Move a pending attempt to its final ``status``."""
        if status not in TRANSITIONS[Status.PENDING]:  # pragma: no cover - programming error
            raise ValueError(f"a pending attempt cannot become {status.value}")
        values: dict[str, Any] = {
            "attempt_id": attempt_id,
            "status": status.value,
            "finished_at": utcnow(),
            "duration_ms": duration_ms,
        }
        if error_message is not None:
            values.update(error_message=error_message, error_traceback=error_traceback)
        if reason is not None:
            values["reason"] = reason
        await conn.execute(self._update_pending, values)

    async def save_checkpoint(
        self,
        executor: AsyncConnection | AsyncSession,
        attempt_id: int,
        checkpoint: Mapping[str, Any],
    ) -> None:
        """Store ``checkpoint`` in a pending attempt, in the caller's transaction."""
        await executor.execute(
            self._update_pending, {"attempt_id": attempt_id, "checkpoint": dict(checkpoint)}
        )

    async def annotate_latest(self, conn: AsyncConnection, revision: str, reason: str) -> None:
        """Set the reason of ``revision``'s latest attempt, unless it already has one."""
        t = self.table
        last = sa.select(sa.func.max(t.c.id)).where(t.c.revision == revision).scalar_subquery()
        await conn.execute(
            t.update().where(t.c.id == last, t.c.reason.is_(None)).values(reason=reason)
        )

    async def fail_pending(self, conn: AsyncConnection, reason: str) -> list[str]:
        """Mark every pending attempt failed with ``reason``; return their revisions."""
        t = self.table
        pending = (
            await conn.execute(
                sa.select(t.c.id, t.c.revision).where(t.c.status == Status.PENDING.value)
            )
        ).all()
        if pending:
            await conn.execute(
                t.update()
                .where(t.c.id.in_([row.id for row in pending]))
                .values(
                    status=Status.FAILED.value,
                    finished_at=utcnow(),
                    error_message=reason,
                    reason="interrupted",
                )
            )
        return [row.revision for row in pending]
