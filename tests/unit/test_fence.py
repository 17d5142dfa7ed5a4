"""Which statements the commit fence treats as ending a transaction (``dm.engine.fence``).

The fence itself, on every commit path of a real run, is tested in
``tests/scenarios/test_commit_fence.py``.
"""

from __future__ import annotations

import pytest

from dm.engine.fence import is_raw_commit
from dm.engine.fence import is_raw_rollback
from dm.engine.fence import script_commits


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT",
        "commit;",
        "  Commit Work ; ",
        "END TRANSACTION",
        "COMMIT AND CHAIN",
        "COMMIT AND NO CHAIN",
        "-- finish the enum first\nCOMMIT",
        "/* before ALTER TYPE */ COMMIT",
    ],
)
def test_commit_statements_are_recognised(statement: str) -> None:
    assert is_raw_commit(statement)
    assert not is_raw_rollback(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT PREPARED 'tx1'",
        "SELECT 'COMMIT'",
        "UPDATE t SET note = 'commit'",
        "END LOOP",
        "-- COMMIT\nSELECT 1",
    ],
)
def test_other_statements_are_not_commits(statement: str) -> None:
    assert not is_raw_commit(statement)


@pytest.mark.parametrize(
    "statement", ["ROLLBACK", "rollback work;", "ABORT", "-- undo\nROLLBACK AND CHAIN"]
)
def test_rollback_statements_are_recognised(statement: str) -> None:
    assert is_raw_rollback(statement)
    assert not is_raw_commit(statement)


def test_rollback_to_a_savepoint_is_not_a_rollback() -> None:
    assert not is_raw_rollback("ROLLBACK TO SAVEPOINT s1")


@pytest.mark.parametrize(
    ("script", "commits"),
    [
        ("INSERT INTO t VALUES (1); COMMIT; ALTER TYPE mood ADD VALUE 'x'", True),
        ("commit;\nselect 1", True),
        ("DO $$ BEGIN UPDATE t SET n = n + 1; END $$; SELECT 1", False),
        ("CREATE FUNCTION f() RETURNS void AS $b$ BEGIN COMMIT; END $b$ LANGUAGE plpgsql", False),
        ("UPDATE t SET note = '; COMMIT'; SELECT 1", False),
        ("SELECT 1; -- COMMIT\nSELECT 2", False),
        ("SELECT 1; /* ; COMMIT */ SELECT 2", False),
    ],
)
def test_a_commit_inside_a_script_is_found_outside_quotes_and_bodies(
    script: str, commits: bool
) -> None:
    assert script_commits(script) is commits
