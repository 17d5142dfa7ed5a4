"""Errors raised by dm, each carrying the exit code the CLI uses.

::

    DmError (1)
    ├── UsageError (2)              bad input that dm refused before changing anything
    │   ├── ConfigError            a setting, URL or config file is wrong
    │   ├── TrackerDamaged         the tracker tables were changed by hand
    │   ├── RevisionFileError      a revision file cannot be used
    │   ├── UnknownTarget          a target/revision does not resolve
    │   ├── IrreversiblePlan       a downgrade path holds a revision without downgrade()
    │   ├── SchemaNotReady         the database lacks a schema revision a revision requires
    │   ├── DatabaseUnavailable    the database refused the login or does not exist
    │   ├── PoolerMisconfigured    a connection pooler needs a setting dm lacks
    │   └── PrivilegeMissing       the database role lacks a grant (dm.core.privileges)
    ├── RevisionFailed (1)         a revision's hook raised or verify() returned False
    │   └── TransientRevisionFailure (75)  it failed on a transient database error
    ├── TransientFailure (75)      a retry of the same run may succeed (EX_TEMPFAIL)
    │   ├── DatabaseUnreachable    connection refused, reset or timed out; DNS failure
    │   ├── TransientRevisionFailure       (also a RevisionFailed)
    │   ├── PoolExhausted          the connection pooler had no server connection free
    │   ├── FenceBusy              a session of a run that lost the lock still holds the
    │   │                          fence row after the lock timeout (e.g. a dead pod's)
    │   └── ConnectionFrozen       the working connection stopped answering (network)
    ├── Incomplete (5)             a batched revision stopped at a batch boundary (max
    │                              runtime, dm pause, dm cancel); later revisions did not run
    ├── LockTimeout (3)            another dm run held the lock for too long
    ├── LockLost (3)               the lock's connection died mid-run; the run stopped
    │   └── FenceLost              another run took the lock over; this run's write refused
    └── Interrupted (130 / 143)    SIGINT / SIGTERM stopped the run

Messages name the file, revision or setting at fault and never contain a password.
"""

from __future__ import annotations


class DmError(Exception):
    """Base class of every error dm reports to the user."""

    exit_code = 1


class UsageError(DmError):
    """The request was refused before anything changed."""

    exit_code = 2


class ConfigError(UsageError):
    """A setting, database URL or configuration file is invalid."""


class TrackerDamaged(UsageError):
    """The tracker tables were changed by hand; the message says how to repair them."""


class RevisionFileError(UsageError):
    """A revision file cannot be loaded or breaks the revision contract."""


class UnknownTarget(UsageError):
    """A target given to a command does not name a revision."""


class IrreversiblePlan(UsageError):
    """A downgrade would pass through a revision that has no ``downgrade()``."""


class SchemaNotReady(UsageError):
    """A revision to run requires an application schema revision the database lacks
    (``requires_schema``); nothing was run."""


class DatabaseUnavailable(UsageError):
    """The database refused the login, does not exist, or the URL cannot be used."""


class PoolerMisconfigured(UsageError):
    """A connection pooler between dm and PostgreSQL needs a setting dm was not given."""


class RevisionFailed(DmError):
    """A revision raised, or its ``verify()`` returned False; its work was rolled back."""

    exit_code = 1

    def __init__(self, revision: str, message: str) -> None:
        super().__init__(f"revision {revision} failed: {message}")
        self.revision = revision


class TransientFailure(DmError):
    """The run failed for a reason a retry of the same run may cure (EX_TEMPFAIL).

    A connection refused, reset or closed, a DNS failure, a deadlock, a serialization
    failure, a lock wait that timed out, or a server shutting down or starting up.
    """

    exit_code = 75


class DatabaseUnreachable(TransientFailure):
    """The database could not be reached, even after the start-up retries."""


class PoolExhausted(TransientFailure):
    """The connection pooler gave no server connection in time; a later run may get one."""


class FenceBusy(TransientFailure):
    """The fence was not claimed within the lock timeout: a session of a run that lost the
    migration lock (often a dead pod's backend the server has not noticed yet) still holds
    its row. It goes on its own (``idle_in_transaction_session_timeout``, TCP keepalives),
    so a later run may succeed."""


class ConnectionFrozen(TransientFailure):
    """The working connection's statement got no answer while the server was not running
    it (or could not be reached): the network froze; dm dropped the connection."""


class TransientRevisionFailure(RevisionFailed, TransientFailure):
    """A revision failed because of a transient database failure; it was rolled back."""

    exit_code = 75


class Incomplete(DmError):
    """The run stopped early on purpose: its time was up, or another shell paused or
    cancelled the running batched revision. Committed batches stay, nothing failed, and
    the revisions after it did not run."""

    exit_code = 5

    def __init__(self, revision: str, message: str, stopped: str | None = None) -> None:
        """:param stopped: the status the revision's attempt was recorded with when it
        stopped at a batch boundary (None: it did not start)."""
        super().__init__(message)
        self.revision = revision
        self.stopped = stopped


class LockTimeout(DmError):
    """The migration lock was not acquired within the lock timeout."""

    exit_code = 3


class LockLost(DmError):
    """The migration lock's connection died during the run, which was then stopped."""

    exit_code = 3


class FenceLost(LockLost):
    """Another run took the migration lock over: this run's tracker write matched nothing.

    Raised before the write's transaction commits, so the work in it is rolled back.
    """


class Interrupted(DmError):
    """A signal stopped the run; the revision in progress was rolled back."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.exit_code = exit_code


def one_line(exc: BaseException) -> str:
    """Return ``exc``'s message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """Return ``Type: message`` on one line; for a wrapped driver error (SQLAlchemy's
    ``DBAPIError``), the driver's own error, without the statement and its parameters."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
