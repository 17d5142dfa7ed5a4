"""The one rule that derives a revision's state from its attempts (``dm.core.state``), pure."""

from __future__ import annotations

import pytest

from dm.core.state import State
from dm.core.state import Status
from dm.core.state import derive
from dm.core.state import is_decisive

S, F, R, K, P = Status.SUCCESS, Status.FAILED, Status.ROLLED_BACK, Status.SKIPPED, Status.PENDING
CHECKPOINT = True


def fold(*attempts: tuple[Status, bool]) -> State:
    """Derive the state of attempts given oldest first as (status, has checkpoint)."""
    if not attempts:
        return State.NOT_RUN
    decisive = [status for status, kept in attempts if is_decisive(status, kept)]
    return derive(attempts[-1][0], decisive[-1] if decisive else None)


@pytest.mark.parametrize(
    ("attempts", "state"),
    [
        ((), State.NOT_RUN),
        (((S, False),), State.APPLIED),
        (((F, False),), State.FAILED),  # a failed first run rolled back whole
        (((F, False), (S, False)), State.APPLIED),
        (((S, False), (F, False)), State.APPLIED),  # a failed forced re-run changes nothing
        (((S, False), (R, False)), State.ROLLED_BACK),
        (((S, False), (R, False), (F, False)), State.FAILED),  # nothing in effect, and failed
        (((K, False),), State.SKIPPED),
        (((K, False), (F, False)), State.FAILED),  # allowed later, then failed
        (((F, CHECKPOINT),), State.PARTIAL),  # committed batches
        (((F, CHECKPOINT), (F, CHECKPOINT)), State.PARTIAL),
        (((F, CHECKPOINT), (S, False)), State.APPLIED),
        (((S, False), (P, False)), State.RUNNING),
        (((P, False),), State.RUNNING),
    ],
)
def test_state_follows_the_latest_and_the_latest_decisive_attempt(
    attempts: tuple[tuple[Status, bool], ...], state: State
) -> None:
    assert fold(*attempts) is state


def test_only_a_failed_attempt_without_checkpoint_is_not_decisive() -> None:
    assert not is_decisive(F, False)
    assert is_decisive(F, True)
    assert all(is_decisive(status, False) for status in (S, R, K, P))
