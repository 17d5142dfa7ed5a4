"""The fence on every commit of a run's working connection, whoever asks for it.

A run holding the migration lock owns the fence (the meta row ``dm.engine.tracker`` describes).
Its tracker writes carry the fence condition in the statement itself. :class:`CommitFence`
makes the same hold for every other commit on the working connection while the run holds
the lock: dm's own, ``dm.batched``'s, an autocommit block's, ``session.commit()`` or
``op.get_bind().commit()`` in revision code, and a raw ``COMMIT`` statement.

- **A commit** fires the connection's ``commit`` event before the driver commits. Unless a
  fenced statement of the same transaction already matched (its ``FOR SHARE`` row lock
  holds the fence until the commit on PostgreSQL; SQLite lets one writer in at a time),
  the fence row is read, ``FOR SHARE``, in the transaction being committed. A fence that
  is no longer this run's raises :class:`~dm.core.errors.FenceLost` and rolls the transaction
  back: nothing reaches the server's ``COMMIT``.
- **A raw COMMIT statement** (``op.execute("COMMIT")``) is seen before it is sent and
  checked the same way. It is sent as ``COMMIT AND CHAIN`` on PostgreSQL (a ``BEGIN``
  follows it on SQLite), so the revision goes on in a new transaction, fenced in turn.
  Inside the caller's transaction (``config.attributes["connection"]``) a raw COMMIT is
  refused: it would commit the caller's work.
- **A raw ROLLBACK statement** goes on in a new transaction too (``ROLLBACK AND CHAIN``;
  ``BEGIN`` after it on SQLite), so nothing after it commits on its own; the revision's
  mark went with the old transaction, so dm fails the revision.
- **In a transactional revision**, a commit revision code asks for (a raw COMMIT,
  ``op.get_bind().commit()``) makes the revision not atomic: :attr:`CommitFence.raw_commits`
  counts them, and the revision's transaction-local settings and mark are applied again
  before the next transaction's first statement.
- **Inside an autocommit block** each statement commits on its own, so the fence is read
  before each statement (:meth:`CommitFence.autocommit_block`). A takeover between that
  read and the statement is the one window left; a takeover needs the lock first, which
  this run lost only if its lock connection died or hung.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from dm.core.errors import FenceLost
from dm.core.errors import UsageError
from dm.engine.tracker import FENCE_KEY
from dm.engine.tracker import Tracker

FENCE_LOST_AT_COMMIT = (
    "another run took the migration lock over; this run's commit was refused and its "
    "transaction rolled back"
)

_RAW_COMMIT = re.compile(
    r"^\s*(?:COMMIT|END)(?:\s+(?:WORK|TRANSACTION))?(?:\s+AND\s+(NO\s+)?CHAIN)?\s*;?\s*$",
    re.IGNORECASE,
)
_RAW_ROLLBACK = re.compile(
    r"^\s*(?:ROLLBACK|ABORT)(?:\s+(?:WORK|TRANSACTION))?(?:\s+AND\s+(NO\s+)?CHAIN)?\s*;?\s*$",
    re.IGNORECASE,
)
_BEGIN = re.compile(r"^\s*BEGIN\b", re.IGNORECASE)
_LEADING_COMMENTS = re.compile(r"^(?:\s*(?:--[^\n]*(?:\n|$)|/\*.*?\*/))*", re.DOTALL)
_SCRIPT_COMMIT = re.compile(r"(?:^|;)\s*COMMIT\b", re.IGNORECASE)
_QUOTED = re.compile(
    r"\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$"  # a dollar-quoted body (DO $$ ... END $$)
    r"|'(?:[^']|'')*'"  # a string literal
    r'|"(?:[^"]|"")*"'  # a quoted identifier
    r"|--[^\n]*"  # a line comment
    r"|/\*.*?\*/",  # a block comment
    re.DOTALL,
)


def is_raw_commit(statement: str) -> bool:
    """Return whether ``statement`` is a transaction-ending ``COMMIT`` (or ``END``)."""
    return _RAW_COMMIT.match(_LEADING_COMMENTS.sub("", statement)) is not None


def is_raw_rollback(statement: str) -> bool:
    """Return whether ``statement`` is a transaction-ending ``ROLLBACK`` (or ``ABORT``)."""
    return _RAW_ROLLBACK.match(_LEADING_COMMENTS.sub("", statement)) is not None


def script_commits(sql: str) -> bool:
    """Return whether a multi-statement script has a ``COMMIT`` statement (outside quoted
    text, comments and dollar-quoted bodies)."""
    return _SCRIPT_COMMIT.search(_QUOTED.sub(" ", sql)) is not None


class CommitFence:
    """Refuses every commit of ``conn`` once the fence is no longer ``run_id``'s.

    Install it with :meth:`installed` for as long as the run holds the migration lock.
    """

    def __init__(
        self, conn: Connection, tracker: Tracker, run_id: str | None, *, joined: bool = False
    ) -> None:
        """:param run_id: the run whose fence every commit needs; None for a ``dm work``
            process, whose commits need only the range it holds (:meth:`require`).
        :param joined: ``conn`` is inside the caller's transaction (dm commits nothing)."""
        self.conn = conn
        self.joined = joined
        self.held = False
        """A fenced statement of the current transaction matched: its commit is safe."""
        self.raw_commits = 0
        """How many commits revision code asked for inside transactional revisions."""
        self._setup: Sequence[str] = ()
        self._resume_setup = False
        self._per_statement = False
        self._postgres = conn.dialect.name == "postgresql"
        meta = tracker.meta
        self._fence: sa.Select[Any] | None = None
        if run_id is not None:
            self._fence = sa.select(meta.c.key).where(
                meta.c.key == FENCE_KEY, meta.c.value == sa.literal(run_id)
            )
        self._read: str | None = None
        self._read_for_share: str | None = None
        self.require(None)

    def require(self, also: sa.Select[Any] | None) -> None:
        """Make every commit need ``also`` to find a row as well (a worker's lease on the
        range it holds), or only the run's fence again (None)."""
        conditions = [query for query in (self._fence, also) if query is not None]
        if not conditions:
            self._read = self._read_for_share = None
            return
        check = sa.select(sa.literal(1)).where(*(sa.exists(query) for query in conditions))
        shared = sa.select(sa.literal(1)).where(
            *(sa.exists(query.with_for_update(read=True)) for query in conditions)
        )
        self._read = _render(check, self.conn)
        self._read_for_share = _render(shared, self.conn)

    @contextlib.contextmanager
    def installed(self) -> Iterator[CommitFence]:
        """Guard the connection's commits while the block runs."""
        listeners: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = (
            ("commit", self._on_commit, {}),
            ("rollback", self._on_end, {}),
            ("rollback_savepoint", self._on_savepoint_rollback, {}),
            ("before_cursor_execute", self._before_execute, {"retval": True}),
            ("after_cursor_execute", self._after_execute, {}),
        )
        for name, listener, options in listeners:
            event.listen(self.conn, name, listener, **options)
        try:
            yield self
        finally:
            for name, listener, _ in listeners:
                event.remove(self.conn, name, listener)

    @property
    def transaction_setup(self) -> Sequence[str]:
        """The statements that begin the running transactional revision's transaction
        (its transaction-local settings and mark); empty outside its hooks.

        While it is set, a commit is revision code's own: it counts in
        :attr:`raw_commits`, and the statements are applied again in the next transaction
        before its first statement.
        """
        return self._setup

    @transaction_setup.setter
    def transaction_setup(self, statements: Sequence[str]) -> None:
        self._setup = tuple(statements)
        self._resume_setup = False

    def hold(self) -> None:
        """Note that a fenced statement matched in the current transaction."""
        if not self._autocommit(self.conn):
            self.held = True

    @contextlib.contextmanager
    def autocommit_block(self) -> Iterator[None]:
        """Read the fence before each statement while the block runs (autocommit mode)."""
        self._per_statement = True
        try:
            yield
        finally:
            self._per_statement = False

    # -- the connection's events ------------------------------------------------------

    def _on_commit(self, conn: Connection) -> None:
        try:
            if not self.held and not self._autocommit(conn):
                self._check(conn, for_share=self._postgres)
        finally:
            self.held = False
        self._revision_code_committed()

    def _on_end(self, conn: Connection) -> None:
        self.held = False

    def _on_savepoint_rollback(self, conn: Connection, name: str, context: Any) -> None:
        # A row lock taken inside the savepoint is released with it (PostgreSQL).
        self.held = False

    def _before_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        if is_raw_commit(statement):
            return self._raw_commit(conn, statement), parameters
        if is_raw_rollback(statement) and not self._autocommit(conn):
            if self.joined:
                raise UsageError(
                    "the revision's code sent a ROLLBACK statement inside the caller's "
                    "transaction (config.attributes['connection']): it would roll back the "
                    "caller's work, so it was refused; raise an exception instead"
                )
            # Go on in a new transaction, so nothing after it commits on its own; the
            # revision's mark is gone with the old one, so dm fails the revision.
            self.held = False
            self._resume_setup = False
            if self._postgres and "CHAIN" not in statement.upper():
                return "ROLLBACK AND CHAIN", parameters
            return statement, parameters
        if self._autocommit(conn):
            if self._per_statement:
                self._check(conn, for_share=False, rollback=False)
        elif self._resume_setup and not _BEGIN.match(statement):  # after SQLite's BEGIN
            self._resume_setup = False
            for setup in self._setup:
                self._send(conn, setup)
        return statement, parameters

    def _after_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if self._postgres or self._autocommit(conn):
            return
        if not (is_raw_commit(statement) or is_raw_rollback(statement)):
            return
        # The COMMIT or ROLLBACK ended SQLite's transaction; SQLAlchemy still counts it open.
        immediate = conn.get_execution_options().get("dm_sqlite_immediate")
        self._send(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN")

    # -- the checks ---------------------------------------------------------------------

    def _raw_commit(self, conn: Connection, statement: str) -> str:
        """Check the fence before a COMMIT statement; return the statement to send."""
        if self._autocommit(conn):
            return statement  # nothing to commit: each statement committed on its own
        if self.joined:  # the caller's transaction stays the caller's to end
            raise UsageError(
                "the revision's code sent a COMMIT statement inside the caller's "
                "transaction (config.attributes['connection']): it would commit the "
                "caller's work, so it was refused"
            )
        if not self.held:
            self._check(conn, for_share=self._postgres)
        self.held = False
        self._revision_code_committed()
        if self._postgres and "CHAIN" not in statement.upper():
            # The server goes on in a new transaction, as SQLAlchemy and the driver believe.
            return "COMMIT AND CHAIN"
        return statement

    def _revision_code_committed(self) -> None:
        if self._setup:  # inside a transactional revision's hooks
            self.raw_commits += 1
            self._resume_setup = True

    def _check(self, conn: Connection, *, for_share: bool, rollback: bool = True) -> None:
        """Read the fence; if it is another run's, roll back and raise ``FenceLost``."""
        statement = self._read_for_share if for_share else self._read
        if statement is None:
            return
        row = self._send(conn, statement, fetch=True)
        if row is None:
            if rollback:
                self._rollback(conn)
            raise FenceLost(FENCE_LOST_AT_COMMIT)

    @staticmethod
    def _send(conn: Connection, sql: str, *, fetch: bool = False) -> Any:
        """Run ``sql`` on the driver's connection, out of SQLAlchemy's bookkeeping (the
        events fire in the middle of a commit or of another statement)."""
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            cursor.execute(sql)
            return cursor.fetchone() if fetch else None
        finally:
            cursor.close()

    @staticmethod
    def _rollback(conn: Connection) -> None:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        with contextlib.suppress(Exception):  # the caller rolls back SQLAlchemy's side
            driver.rollback()

    @staticmethod
    def _autocommit(conn: Connection) -> bool:
        return bool(conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT")


def _render(statement: sa.Select[Any], conn: Connection) -> str:
    """Return ``statement`` as SQL text with its values inline (the run id is dm's uuid)."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    return str(compiled)
