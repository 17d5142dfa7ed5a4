"""Lock-wait retries, like GitLab's ``with_lock_retries``, for transactional revisions.

On PostgreSQL, with ``DM_PG_LOCK_TIMEOUT`` set on dm's own connection, a transactional
revision whose statement waited longer than ``lock_timeout`` (SQLSTATE 55P03) is rolled
back and run again in the same attempt, up to ``DM_LOCK_RETRIES`` more times, each try with
twice the previous ``lock_timeout`` and after a pause doubling from ``DM_LOCK_RETRY_WAIT``.
The revision's time limit covers all its tries. A try whose autocommit block (or revision
code) committed work is not retried, and neither is a ``transactional = False`` revision:
the next run resumes it from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from dm.core.planning import Step

MAX_LOCK_TIMEOUT = 2_147_483.0
"""PostgreSQL's ``lock_timeout`` takes at most 2147483647 ms."""


class LockWaitTimedOut(Exception):
    """A revision's lock waits timed out on every try; the driver's error is its cause."""


@dataclass(frozen=True)
class LockRetries:
    """How a revision's lock waits are bounded and retried on this run's connection."""

    lock_timeout: float | None
    """``DM_PG_LOCK_TIMEOUT``: the first try's ``lock_timeout``, in seconds."""
    retries: int = 0
    wait: float = 1.0
    """The pause before the first retry, doubled before each next one."""
    ours: bool = False
    """dm set the connection's ``lock_timeout``: PostgreSQL, on a connection of its own (a
    caller's keeps its settings and its transaction, so a lock wait there is neither
    retried nor blamed on dm's settings)."""

    @property
    def active(self) -> bool:
        """Return whether a lock wait that timed out is dm's to explain and retry."""
        return self.ours and bool(self.lock_timeout)

    def tries(self) -> int:
        """Return how many tries a transactional revision gets."""
        return self.retries + 1 if self.active else 1

    def timeout_of(self, number: int) -> float:
        """Return the ``lock_timeout`` of try ``number``: doubled on each retry."""
        return min((self.lock_timeout or 0.0) * (1 << (number - 1)), MAX_LOCK_TIMEOUT)

    def pause_after(self, number: int) -> float:
        """Return the pause between try ``number`` and the next."""
        return self.wait * (1 << (number - 1))

    def advice(self, step: Step, tries: int, *, partly_committed: bool = False) -> str:
        """Say which settings bounded the lock waits of ``tries`` tries, and what to change."""
        timeouts = ", ".join(f"{self.timeout_of(n):g}s" for n in range(1, tries + 1))
        settings = (
            f"DM_PG_LOCK_TIMEOUT={self.lock_timeout:g}s, DM_LOCK_RETRIES={self.retries}, "
            f"DM_LOCK_RETRY_WAIT={self.wait:g}s"
        )
        if not step.transactional:
            return (
                f"a lock wait timed out (lock_timeout {timeouts}; {settings}); a "
                "transactional = False revision is not retried in place: the next run resumes "
                "it from its checkpoint"
            )
        why = " (not retried: an autocommit block committed)" if partly_committed else ""
        return (
            f"lock wait timed out on each of {tries} tries (lock_timeout {timeouts}){why}; "
            f"{settings}: raise DM_PG_LOCK_TIMEOUT or DM_LOCK_RETRIES, or find the session "
            "holding the lock (pg_locks)"
        )
