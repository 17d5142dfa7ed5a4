"""Call a revision's hooks: async ones directly, Alembic-style sync ones with ``op`` bound.

A sync hook (``def upgrade():`` using ``from alembic import op``, or ``def upgrade(session)``
taking a sync ``Session``) runs through ``AsyncSession.run_sync`` on dm's connection,
inside the revision's transaction, with Alembic's ``Operations`` installed on a
``MigrationContext`` over that connection: ``op.execute``, ``op.get_bind()``,
``op.bulk_insert``, ``op.add_column``, ``op.batch_alter_table`` and the rest act on dm's
transaction, and ``op.get_context().autocommit_block()`` is dm's :func:`autocommit`.

Two helpers serve async hooks as well: :func:`execute_script` runs several SQL statements
in one call (asyncpg refuses them in one prepared statement), and :func:`autocommit` runs
statements outside the revision's transaction (``CREATE INDEX CONCURRENTLY``, ``VACUUM``).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sqlite3
import warnings
from collections.abc import AsyncIterator
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import await_only

from dm.backfill.batching import BatchingError
from dm.backfill.batching import RunUnit
from dm.backfill.batching import current_run
from dm.core.errors import UsageError
from dm.engine import alembic_context
from dm.engine.fence import script_commits

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from dm.core.graph import Hook


class UnawaitedCoroutine(Exception):
    """A hook created a coroutine and dropped it: the work it stood for never ran."""


async def call_hook(hook: Hook, session: AsyncSession) -> Any:
    """Call ``hook`` with ``session`` (async) or through ``run_sync`` with ``op`` bound.

    Whatever the hook returns is awaited if it is awaitable (a decorator may hide an
    ``async def``). A coroutine the call created and dropped unawaited is an error
    (:class:`UnawaitedCoroutine`): the hook did not do its work, so it must not succeed.
    """
    if hook.is_async:
        with _no_unawaited_coroutine(hook):
            outcome = hook.fn(session)
            return await outcome if inspect.isawaitable(outcome) else outcome
    env = alembic_context.current()
    conn = await session.connection() if env is not None else None
    return await session.run_sync(_call_sync, hook, current_run(), env, conn)


def _call_sync(
    sync_session: Session,
    hook: Hook,
    run: RunUnit | None,
    env: alembic_context.HookEnvironment | None = None,
    conn: AsyncConnection | None = None,
) -> Any:
    connection = sync_session.connection()
    context = _DmMigrationContext(connection.dialect, connection, {}, None)
    context.dm_run = run
    _route_scripts(context, connection)
    with (
        alembic_context.established(env, context, conn),
        Operations.context(context),
        _no_unawaited_coroutine(hook),
    ):
        outcome = hook.fn(sync_session) if hook.kind == "session" else hook.fn()
        return await_only(outcome) if inspect.isawaitable(outcome) else outcome


@contextlib.contextmanager
def _no_unawaited_coroutine(hook: Hook) -> Iterator[None]:
    """Raise :class:`UnawaitedCoroutine` when the block drops a coroutine unawaited.

    Python only warns ("coroutine ... was never awaited") when such a coroutine is
    freed; the warning is caught here and turned into the hook's failure. Other warnings
    raised in the block are passed on as they were.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", _NEVER_AWAITED, RuntimeWarning)
            yield
    finally:
        for other in caught:
            if not _is_never_awaited(other):
                warnings.warn_explicit(
                    other.message, other.category, other.filename, other.lineno, source=other.source
                )
    dropped = [w for w in caught if _is_never_awaited(w)]
    if dropped:
        name = getattr(hook.fn, "__name__", "the hook")
        raise UnawaitedCoroutine(
            f"{name}() dropped a coroutine without awaiting it ({dropped[0].message}): the "
            "work it stands for did not run; a decorator around an async hook must return "
            "(or await) the coroutine, e.g. 'return await fn(*args, **kwargs)'"
        )


_NEVER_AWAITED = r"coroutine .* was never awaited"


def _is_never_awaited(caught: warnings.WarningMessage) -> bool:
    return issubclass(caught.category, RuntimeWarning) and bool(
        re.match(_NEVER_AWAITED, str(caught.message))
    )


class _DmMigrationContext(MigrationContext):
    """Alembic's migration context over dm's connection, with dm's autocommit block."""

    dm_run: RunUnit | None = None

    @contextlib.contextmanager
    def autocommit_block(self) -> Iterator[None]:
        """Run the block outside the revision's transaction, as :func:`autocommit` does."""
        block = _autocommit_of(self.dm_run)
        await_only(block.__aenter__())
        try:
            yield
        except BaseException as exc:
            if not await_only(block.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            await_only(block.__aexit__(None, None, None))


def _route_scripts(context: MigrationContext, connection: Connection) -> None:
    """Make ``op.execute`` of a multi-statement string run it as a script."""
    impl = context.impl
    execute = impl.execute

    def execute_maybe_script(
        sql: sa.Executable | str, execution_options: dict[str, Any] | None = None
    ) -> None:
        text = _script_text(sql)
        if text is not None and _is_multi_statement(text):
            _run_script(connection, text)
        else:
            execute(sql, execution_options)

    impl.execute = execute_maybe_script  # type: ignore[method-assign]


def _script_text(sql: object) -> str | None:
    """Return the SQL of a plain string or a ``text()`` without bound parameters."""
    if isinstance(sql, str):
        return sql
    if isinstance(sql, sa.TextClause) and not sql._bindparams:
        return sql.text
    return None


def _is_multi_statement(sql: str) -> bool:
    body = sql.strip().rstrip(";").strip()
    return ";" in body


async def execute_script(session: AsyncSession, sql: str) -> None:
    """Run ``sql``, one or more statements separated by ``;``, in the session's transaction.

    asyncpg runs every statement as a prepared statement, which holds one command only;
    this sends the script with PostgreSQL's simple query protocol instead (no parameters,
    ``DO $$ ... $$`` blocks and function bodies included). On SQLite the script is split
    into complete statements, run one by one, without ``executescript``'s implicit COMMIT.
    """
    if not isinstance(sql, str):
        raise TypeError("execute_script() takes the SQL script as a str")
    await session.flush()
    connection = await session.connection()
    await connection.run_sync(_run_script, sql)


def _run_script(connection: Connection, sql: str) -> None:
    dialect = connection.dialect
    if dialect.name == "sqlite":
        for statement in _sqlite_statements(sql):
            connection.exec_driver_sql(statement)  # a COMMIT among them passes the fence
        return
    if script_commits(sql):
        # Sent whole, a COMMIT inside the script would reach the server before dm's fence
        # could check that this run still holds the migration lock.
        raise UsageError(
            "a multi-statement script with a COMMIT statement: run the COMMIT on its own "
            '(op.execute("COMMIT")), or put the statements that must run outside a '
            "transaction in an autocommit block"
        )
    if dialect.driver not in ("asyncpg", "psycopg") or not dialect.is_async:
        connection.exec_driver_sql(sql)
        return
    # Start the driver's transaction as SQLAlchemy would (nothing in autocommit mode).
    connection.exec_driver_sql("SELECT 1")
    adapted = connection.connection.dbapi_connection
    driver = connection.connection.driver_connection
    assert adapted is not None and driver is not None
    try:
        await_only(driver.execute(sql))  # no parameters: the simple query protocol
    except dialect.loaded_dbapi.Error as exc:  # psycopg's errors are DB-API errors already
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    except Exception as exc:
        try:
            cast(Any, adapted)._handle_exception(exc)  # raises the DB-API shaped error
        except Exception as translated:
            raise sa.exc.DBAPIError.instance(
                sql, None, translated, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        raise  # pragma: no cover - _handle_exception always raises


def _sqlite_statements(sql: str) -> Iterator[str]:
    buffer = ""
    for piece in sql.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip().rstrip(";").strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip().rstrip(";").strip():
        yield buffer.strip().rstrip(";")


@contextlib.asynccontextmanager
async def autocommit(session: AsyncSession) -> AsyncIterator[None]:
    """Run the block's statements outside the revision's transaction, each committing at once.

    The revision's work so far is committed first (as Alembic's ``autocommit_block()``
    does), the block runs in autocommit mode, and the rest of the hook runs in a new
    transaction (in a transactional revision, with its final status, as before). If the
    block fails, the work before it and each statement the block completed stay
    committed; the attempt is recorded failed. Keep such a revision idempotent, e.g. the
    block alone in its own revision with ``IF NOT EXISTS``.
    """
    block = _autocommit_of(current_run())
    await session.flush()
    async with block:
        yield


def _autocommit_of(run: RunUnit | None) -> AbstractAsyncContextManager[None]:
    if run is None:
        raise BatchingError("an autocommit block works only in a revision's hook during a dm run")
    return run.autocommit()
