"""``script_run_tracker``: the only state dm keeps, one row per attempt.

What a revision's rows leave in effect is derived by the one rule in ``dm.core.state``. The
table's own layout is versioned in the companion ``<table>_meta`` table and upgraded in
place (under the migration lock) when an older dm created it.

**Fencing.** The meta table also holds the ``fence``: the run id of the run that last took
the migration lock. Every write a run makes to attempt rows (through ``dm.engine.recording``, with
the statements built here) carries the condition "the fence is still mine" (read ``FOR
SHARE`` on PostgreSQL, so a takeover waits for a write in flight, and a write after a
takeover matches nothing) and must match exactly one row; otherwise
:class:`~dm.core.errors.FenceLost` is raised before the caller commits. A run that lost its lock
without noticing (a dead or hung lock connection) therefore never commits again: its
transaction rolls back, and the run that took over owns the revision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import overload

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles

from dm.backfill.ranges import ranges_table
from dm.config.redaction import stored
from dm.core.errors import ConfigError
from dm.core.errors import FenceBusy
from dm.core.errors import TrackerDamaged
from dm.core.state import TRANSITIONS as TRANSITIONS
from dm.core.state import Attempt
from dm.core.state import Status as Status

SCHEMA_VERSION = 5
"""Layout of the tracker written by this dm.

1. pre-release prototype: ``id, revision, status, started_at, finished_at, error``.
2. one row per attempt with direction, attempt number, timings, error message and
   traceback, who/where, dm version, environment, file checksum (sha256) and checkpoint.
3. a request on a running attempt (``request``: ``pause``, ``cancel`` or ``abandon``), who
   made it (``request_by``) and why (``request_reason``), written by ``dm pause`` and
   ``dm cancel`` and returned to the running batched loop by its checkpoint update.
4. where the environment's value came from (``environment_source``: ``DM_ENVIRONMENT``,
   ``dm.environment in alembic.ini``...) and ``db_user``, the database's ``session_user``
   of the connection that wrote the row, beside the self-asserted ``run_by`` (NULL on SQLite).
5. the ``<table>_ranges`` table: the key ranges of batched loops run with ``workers``
   (``dm.backfill.ranges``), claimed and checkpointed by each worker.
"""

RANGES_LAYOUT = 5
"""The first layout with the ranges table (parallel batched loops)."""
REQUEST_COLUMNS = ("request", "request_by", "request_reason")
"""The columns layout 3 added (read as NULL from a layout 2 tracker)."""
WHO_COLUMNS = ("environment_source", "db_user")
"""The columns layout 4 added (read as NULL from an older tracker)."""


class SessionUser(sa.sql.functions.FunctionElement[str]):
    """The database role of the writing connection: ``session_user`` on PostgreSQL, NULL
    elsewhere (SQLite has no roles). Part of the attempt insert, so it costs no query."""

    type = sa.String(255)
    inherit_cache = True


def _session_user_default(element: SessionUser, compiler: Any, **kw: Any) -> str:
    return "NULL"


def _session_user_postgresql(element: SessionUser, compiler: Any, **kw: Any) -> str:
    return "session_user"


# Registered by call, not as decorators: SQLAlchemy 2.0.30, the lowest supported, leaves
# `compiles` unannotated, which mypy --strict refuses on a decorator.
compiles(SessionUser)(_session_user_default)  # type: ignore[no-untyped-call, unused-ignore]
compiles(SessionUser, "postgresql")(_session_user_postgresql)  # type: ignore[no-untyped-call, unused-ignore]


_REBUILD = (
    "To start a new tracker on purpose instead (its history is lost), drop both tables "
    "(DROP TABLE {name}, {meta}) and record what is applied with dm stamp"
)

FENCE_KEY = "fence"
"""The meta row naming the run id that holds the migration lock (see "Fencing" above)."""
MIN_CLAIM_SECONDS = 1.0
"""The shortest wait for the fence row (``--lock-timeout 0`` still lets a fenced write of the
previous holder that is in flight finish)."""
_LOCK_NOT_AVAILABLE = "55P03"

FENCE_LOST = "another run took the migration lock over; this run's write was refused"

# The columns an attempt row is inserted with (``id`` is generated).
_COLUMNS = (
    "run_id",
    "revision",
    "description",
    "direction",
    "status",
    "attempt",
    "started_at",
    "finished_at",
    "duration_ms",
    "reason",
    "run_by",
    "pod_name",
    "dm_version",
    "environment",
    "checksum",
    "checkpoint",
    "environment_source",
)


@dataclass(frozen=True)
class RunInfo:
    """Who runs, where, and with what: stamped on every attempt of one dm invocation."""

    run_id: str
    run_by: str
    pod_name: str | None
    dm_version: str
    environment: str
    environment_source: str = "the default"
    """Where ``environment`` came from (see ``Settings.environment_source``)."""


def _per_revision(
    table: sa.TableClause, has_checkpoint: sa.ColumnElement[bool] | None = None
) -> sa.Subquery:
    """Each revision's latest attempt id (``last_id``), latest decisive attempt id
    (``decisive_id``, see ``dm.core.state``) and number of attempts (``attempts``)."""
    decisive = table.c.status != Status.FAILED.value
    if has_checkpoint is not None:
        decisive = sa.or_(decisive, has_checkpoint)
    return (
        sa.select(
            sa.func.max(table.c.id).label("last_id"),
            sa.func.max(sa.case((decisive, table.c.id))).label("decisive_id"),
            sa.func.count().label("attempts"),
        )
        .group_by(table.c.revision)
        .subquery()
    )


def _has_checkpoint(column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """Return whether a checkpoint is stored (a JSON ``null`` counts as none)."""
    return sa.and_(column.is_not(None), sa.cast(column, sa.Text) != "null")


def _sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a PostgreSQL error wrapped by SQLAlchemy, if it has one."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        code = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if isinstance(code, str):
            return code
        link = getattr(link, "orig", None) or link.__cause__
    return None


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
        self.relation: str | None = None
        """``database.schema.table`` as the server resolves it, once known (PostgreSQL):
        the migration lock's key (``dm.engine.lock.resolve_relation``)."""
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
            sa.Column("request", sa.String(16)),
            sa.Column("request_by", sa.String(255)),
            sa.Column("request_reason", sa.Text()),
            sa.Column("environment_source", sa.String(255)),
            sa.Column("db_user", sa.String(255)),
            sa.Index(f"ix_{table}_revision_id", "revision", "id"),
            sa.Index(f"ix_{table}_status", "status"),
        )
        self.meta = sa.Table(
            f"{table}_meta",
            self.metadata,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(255), nullable=False),
        )
        self.ranges = ranges_table(self.metadata, table)
        held = (
            sa.select(self.meta.c.key)
            .where(self.meta.c.key == FENCE_KEY, self.meta.c.value == sa.bindparam("fence"))
            .with_for_update(read=True)
        )
        self._fence_held = sa.exists(held)
        # The fenced statements dm.engine.recording writes attempt rows with, built once (the
        # checkpoint update runs once per batch): bind ``fence`` to the writing run's id.
        values: list[sa.ColumnElement[Any]] = [
            sa.bindparam(f"v_{name}", type_=self.table.c[name].type) for name in _COLUMNS
        ]
        self.insert_attempt = (
            self.table.insert()
            .from_select(
                [*_COLUMNS, "db_user"],
                sa.select(*values, SessionUser()).where(self._fence_held),
            )
            .returning(self.table.c.id)
        )
        # The update returns the request another shell left on the attempt (dm pause,
        # dm cancel): the batched loop learns of it with the checkpoint it writes anyway.
        t = self.table
        self.update_attempt = (
            t.update()
            .where(
                t.c.id == sa.bindparam("attempt_id"),
                t.c.run_id == sa.bindparam("fence"),
                t.c.status == Status.PENDING.value,
                self._fence_held,
            )
            .returning(t.c.request, t.c.request_by, t.c.request_reason)
        )

    def fence_held(self, run_id: str) -> sa.ColumnElement[bool]:
        """Return the condition "the fence is ``run_id``'s" (its row read ``FOR SHARE``)."""
        held = (
            sa.select(self.meta.c.key)
            .where(self.meta.c.key == FENCE_KEY, self.meta.c.value == sa.literal(run_id))
            .with_for_update(read=True)
        )
        return sa.exists(held)

    @property
    def qualified_name(self) -> str:
        """Return ``schema.table`` (or just the table name)."""
        return f"{self.schema}.{self.name}" if self.schema else self.name

    # -- layout ---------------------------------------------------------------------

    async def layout(self, conn: AsyncConnection) -> int | None:
        """Return the tracker's layout version, None when there is no tracker (read-only).

        :raises TrackerDamaged: the tables were changed by hand (one dropped, columns
            missing, the layout row gone); the message says how to repair it.
        """
        return await conn.run_sync(self._layout)

    def _layout(self, sync: sa.Connection) -> int | None:
        name, meta = self.qualified_name, f"{self.qualified_name}_meta"
        has_table, has_meta = self._present(sync)
        if has_table != has_meta:
            # Another run may be creating both right now (in one transaction), and the two
            # look-ups straddled its commit: look again before calling the tracker damaged.
            has_table, has_meta = self._present(sync)
        inspector = sa.inspect(sync)
        if not has_table:
            if has_meta:
                raise TrackerDamaged(
                    f"tracker table {name} is missing while {meta} exists: its history was "
                    f"dropped. {_REBUILD.format(name=name, meta=meta)}"
                )
            return None
        present = {col["name"] for col in inspector.get_columns(self.name, schema=self.schema)}
        if not has_meta:
            if "run_id" not in present:
                return 1  # the pre-release layout, which had no meta table
            raise TrackerDamaged(
                f"tracker table {meta} is missing while {name} has layout "
                f"{SCHEMA_VERSION}; recreate it: CREATE TABLE {meta} (key VARCHAR(64) PRIMARY "
                f"KEY, value VARCHAR(255) NOT NULL); INSERT INTO {meta} VALUES "
                f"('schema_version', '{SCHEMA_VERSION}')"
            )
        found = sync.execute(self._version_query()).scalar_one_or_none()
        if found is None or not str(found).isdigit():
            raise TrackerDamaged(
                f"tracker table {meta} has no valid schema_version row ({found!r}); restore it: "
                f"INSERT INTO {meta} VALUES ('schema_version', '{SCHEMA_VERSION}')"
            )
        version = int(found)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"tracker {name} has layout {version}, newer than this dm understands "
                f"({SCHEMA_VERSION}); upgrade dm"
            )
        missing = sorted({column.name for column in self.table.columns} - present)
        if version == SCHEMA_VERSION and missing:
            raise TrackerDamaged(
                f"tracker table {name} lacks column(s) {', '.join(missing)} of layout "
                f"{version}: it was altered by hand; restore them (renamed back, or added "
                f"as in a fresh tracker). {_REBUILD.format(name=name, meta=meta)}"
            )
        return version

    def _present(self, sync: sa.Connection) -> tuple[bool, bool]:
        """Return whether the tracker table and its meta table exist (a fresh look)."""
        inspector = sa.inspect(sync)
        return (
            inspector.has_table(self.name, schema=self.schema),
            inspector.has_table(self.meta.name, schema=self.schema),
        )

    async def ensure(self, conn: AsyncConnection) -> None:
        """Create the tracker, or bring an older layout up to date; commits.

        Call it while holding the migration lock, so concurrent runs never race on DDL.

        :raises TrackerDamaged: see :meth:`layout`; nothing is created then.
        """
        async with conn.begin():
            await conn.run_sync(self._ensure_sync)

    def _ensure_sync(self, sync: sa.Connection) -> None:
        postgres = sync.dialect.name == "postgresql"
        if self.schema and postgres and not sa.inspect(sync).has_schema(self.schema):
            # Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database
            # even when the schema exists, a right the migration role need not have.
            # SQLAlchemy 2.0.30, the lowest supported, leaves these DDL calls unannotated.
            create = sa.schema.CreateSchema(self.schema, if_not_exists=True)  # type: ignore[no-untyped-call, unused-ignore]
            sync.execute(create)
        version = self._layout(sync)
        if version is None:
            self.metadata.create_all(sync)
            self._write_version(sync, SCHEMA_VERSION, insert=True)
        elif version < SCHEMA_VERSION:
            if version < 2:
                self.meta.create(sync)
                self._write_version(sync, 1, insert=True)
                self._upgrade_1_to_2(sync, sa.inspect(sync))
            self._add_missing_columns(sync)  # 2 -> 3 -> 4: new columns, all nullable
            self.ranges.create(sync, checkfirst=True)  # 4 -> 5: the ranges table
            self._write_version(sync, SCHEMA_VERSION)

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

    def _add_missing_columns(self, sync: sa.Connection) -> None:
        """Add the columns of this layout the table lacks (nullable, without defaults:
        on PostgreSQL and SQLite a metadata-only change, however many rows)."""
        inspector = sa.inspect(sync)
        present = {col["name"] for col in inspector.get_columns(self.name, schema=self.schema)}
        preparer = sync.dialect.identifier_preparer
        table = preparer.format_table(self.table)  # type: ignore[no-untyped-call, unused-ignore]
        for column in self.table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=sync.dialect)
            name = preparer.format_column(column)  # type: ignore[no-untyped-call, unused-ignore]
            sync.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _upgrade_1_to_2(self, sync: sa.Connection, inspector: sa.Inspector) -> None:
        present = {col["name"] for col in inspector.get_columns(self.name, schema=self.schema)}
        preparer = sync.dialect.identifier_preparer
        table = preparer.format_table(self.table)  # type: ignore[no-untyped-call, unused-ignore]
        if "error" in present and "error_message" not in present:
            sync.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN error TO error_message")
        self._add_missing_columns(sync)
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

    async def latest(
        self, conn: AsyncConnection, layout: int = SCHEMA_VERSION
    ) -> dict[str, Attempt]:
        """Return the latest attempt of every revision the tracker knows (read-only).

        :param layout: the tracker's layout (2 or later); layout 2 has no request columns.
        """
        t = self.table
        requests = [t.c[name] if layout >= 3 else sa.null().label(name) for name in REQUEST_COLUMNS]
        per_revision = _per_revision(t, _has_checkpoint(t.c.checkpoint))
        decisive = t.alias("decisive")
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
            decisive.c.status.label("in_effect"),
            decisive.c.checksum.label("in_effect_checksum"),
            *requests,
        ).select_from(
            t.join(per_revision, t.c.id == per_revision.c.last_id).outerjoin(
                decisive, decisive.c.id == per_revision.c.decisive_id
            )
        )
        rows = (await conn.execute(query)).all()
        return {
            row.revision: Attempt(
                id=row.id,
                revision=row.revision,
                description=row.description,
                direction=row.direction,
                status=self._status(row.status, row.revision),
                attempt=row.attempt,
                started_at=as_utc(row.started_at),
                finished_at=as_utc(row.finished_at),
                duration_ms=row.duration_ms,
                error_message=stored(row.error_message),
                reason=row.reason,
                run_by=row.run_by,
                pod_name=row.pod_name,
                checksum=row.checksum,
                attempts=row.attempts,
                checkpoint=row.checkpoint,
                in_effect=self._status(row.in_effect, row.revision),
                in_effect_checksum=row.in_effect_checksum,
                request=row.request,
                request_by=row.request_by,
                request_reason=row.request_reason,
            )
            for row in rows
        }

    async def read_latest(self, conn: AsyncConnection) -> dict[str, Attempt]:
        """Like ``latest``, but check the tables first, and also read a tracker still in
        layout 1; no tracker reads as no attempts (read-only).

        ``ensure`` upgrades the layout only under the migration lock; reads made before
        it (planning, ``status``, ``current``, ``check``) must understand the old layout.

        :raises TrackerDamaged: see :meth:`layout`.
        """
        version = await self.layout(conn)
        if version is None:
            return {}
        if version > 1:
            return await self.latest(conn, version)
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
        decisive = v1.alias("decisive")
        query = sa.select(
            v1, per_revision.c.attempts, decisive.c.status.label("in_effect")
        ).select_from(
            v1.join(per_revision, v1.c.id == per_revision.c.last_id).outerjoin(
                decisive, decisive.c.id == per_revision.c.decisive_id
            )
        )
        return {
            row.revision: Attempt(
                id=row.id,
                revision=row.revision,
                description=None,
                direction="upgrade",
                status=self._status(row.status, row.revision),
                attempt=row.attempts,
                started_at=as_utc(row.started_at),
                finished_at=as_utc(row.finished_at),
                duration_ms=None,
                error_message=stored(row.error),
                reason=None,
                run_by=None,
                pod_name=None,
                checksum=None,
                attempts=row.attempts,
                in_effect=self._status(row.in_effect, row.revision),
            )
            for row in (await conn.execute(query)).all()
        }

    @overload
    def _status(self, value: str, revision: str) -> Status: ...
    @overload
    def _status(self, value: str | None, revision: str) -> Status | None: ...

    def _status(self, value: str | None, revision: str) -> Status | None:
        """Return the status ``value`` read from one of ``revision``'s attempts."""
        if value is None:
            return None
        try:
            return Status(value)
        except ValueError:
            known = ", ".join(status.value for status in Status)
            raise TrackerDamaged(
                f"tracker table {self.qualified_name} has an unknown status {value!r} in a "
                f"row of revision {revision}: it was changed by hand; set it to one of {known}"
            ) from None

    async def history(
        self, conn: AsyncConnection, revision: str, layout: int = SCHEMA_VERSION
    ) -> list[sa.Row[Any]]:
        """Return every attempt of ``revision``, oldest first (layout 2: no request columns)."""
        t = self.table
        columns = [
            sa.null().label(c.name)
            if (layout < 3 and c.name in REQUEST_COLUMNS) or (layout < 4 and c.name in WHO_COLUMNS)
            else c
            for c in t.columns
        ]
        query = sa.select(*columns).where(t.c.revision == revision).order_by(t.c.id)
        return list((await conn.execute(query)).all())

    async def request(
        self, conn: AsyncConnection, attempt_id: int, request: str, by: str, reason: str | None
    ) -> bool:
        """Leave ``request`` on a running (pending) attempt, in the caller's transaction.

        Not fenced and without the migration lock: the run holding the lock reads it back
        with its next checkpoint. Return False when the attempt is no longer pending.
        """
        t = self.table
        updated = await conn.execute(
            t.update()
            .where(t.c.id == attempt_id, t.c.status == Status.PENDING.value)
            .values(request=request, request_by=by[:255], request_reason=reason)
        )
        return bool(updated.rowcount == 1)

    async def attempt_progress(
        self, conn: AsyncConnection, attempt_id: int
    ) -> tuple[str, Any] | None:
        """Return an attempt's status and checkpoint (None when it is gone)."""
        t = self.table
        row = (
            await conn.execute(sa.select(t.c.status, t.c.checkpoint).where(t.c.id == attempt_id))
        ).first()
        return None if row is None else (row.status, row.checkpoint)

    async def settle_stuck(
        self,
        conn: AsyncConnection,
        attempt_id: int,
        run_id: str,
        status: Status,
        reason: str,
        *,
        timeout: float | None = None,
    ) -> bool:
        """Take the fence for ``run_id`` and end the pending attempt with ``status``, in the
        caller's transaction; return False when it is no longer pending.

        For a run that is alive but no longer answering (``dm cancel --stuck-after``): it
        still holds the migration lock, but from the commit on, every commit it tries is
        refused by the fence, and it exits 3 if it ever wakes up.
        """
        await self.claim(conn, run_id, timeout)
        t = self.table
        updated = await conn.execute(
            t.update()
            .where(t.c.id == attempt_id, t.c.status == Status.PENDING.value)
            .values(status=status.value, finished_at=utcnow(), reason=reason)
        )
        return bool(updated.rowcount == 1)

    # -- writes (each call runs in the caller's transaction) --------------------------

    async def claim(self, conn: AsyncConnection, run_id: str, timeout: float | None = None) -> None:
        """Make ``run_id`` the fence: from now on only its writes match (call under the lock).

        On PostgreSQL the update waits for a fenced write of the previous holder that is
        still in flight, so that write either commits before the takeover or matches nothing;
        with ``timeout`` it waits at most that long (at least ``MIN_CLAIM_SECONDS``), for
        the rest of the caller's transaction too.

        :raises FenceBusy: a transaction of another session still holds the fence row after
            ``timeout``; the message names its backend (exit 75: it ends on its own).
        """
        claim = self.meta.update().where(self.meta.c.key == FENCE_KEY).values(value=run_id)
        if timeout is None or conn.dialect.name != "postgresql":
            updated = await conn.execute(claim)
        else:
            limit = max(timeout, MIN_CLAIM_SECONDS)
            await conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(limit * 1000)}"))
            try:
                async with conn.begin_nested():  # the transaction stays usable after a timeout
                    updated = await conn.execute(claim)
            except sa.exc.DBAPIError as exc:
                if _sqlstate(exc) != _LOCK_NOT_AVAILABLE:
                    raise
                holders = await self._fence_holders(conn)
                raise FenceBusy(
                    f"the fence of {self.qualified_name} was not claimed within {limit:g}s: its "
                    f"row is locked by {holders} (a run that lost the migration lock may still "
                    "be writing, or a dead pod's session the server has not noticed yet); run "
                    "again once it has ended, or end it (docs/operations.md)"
                ) from None
        if updated.rowcount == 0:
            await conn.execute(self.meta.insert().values(key=FENCE_KEY, value=run_id))

    def _quoted_meta(self, conn: AsyncConnection) -> str:
        """Return the meta table's name as SQL quotes it (schema included)."""
        preparer = conn.dialect.identifier_preparer
        return str(preparer.format_table(self.meta))  # type: ignore[no-untyped-call, unused-ignore]

    async def _fence_holders(self, conn: AsyncConnection) -> str:
        """Describe the other sessions whose open transaction locked rows of the meta table."""
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT DISTINCT a.pid, a.application_name, a.state, CAST(EXTRACT(EPOCH "
                    "FROM clock_timestamp() - a.xact_start) AS INTEGER) AS seconds, "
                    "a.state_change "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'relation' AND l.granted "
                    "AND l.mode <> 'AccessShareLock' AND l.pid <> pg_backend_pid() "
                    "AND l.relation = to_regclass(:meta) ORDER BY a.pid"
                ),
                {"meta": self._quoted_meta(conn)},
            )
        ).all()
        if not rows:
            return "a transaction that has ended since"
        return ", ".join(
            f"backend {row.pid} (application_name {row.application_name!r}, {row.state}"
            + ("" if row.seconds is None else f", in its transaction for {row.seconds}s")
            + (
                ""
                if row.state_change is None
                else f", {row.state} since {row.state_change.isoformat(timespec='seconds')}"
            )
            + ")"
            for row in rows
        )

    async def fail_pending(self, conn: AsyncConnection, run: RunInfo, reason: str) -> list[str]:
        """Mark every pending attempt failed with ``reason``; return their revisions.

        Call it right after :meth:`claim`, in the same transaction: the attempts are those
        of runs that died or lost the lock.
        """
        t = self.table
        pending = (
            await conn.execute(
                sa.select(t.c.id, t.c.revision).where(t.c.status == Status.PENDING.value)
            )
        ).all()
        if pending:
            await conn.execute(
                t.update()
                .where(
                    t.c.id.in_([row.id for row in pending]),
                    t.c.status == Status.PENDING.value,
                    self._fence_held,
                )
                .values(
                    status=Status.FAILED.value,
                    finished_at=utcnow(),
                    error_message=reason,
                    reason="interrupted",
                ),
                {"fence": run.run_id},
            )
        return [row.revision for row in pending]
