"""dm.privileges: which right a permission error means, from the statement dm sent."""

from __future__ import annotations

import pytest

from dm.core.privileges import privilege_problem


class Denied(Exception):
    """Shaped like a driver's error: a SQLSTATE and PostgreSQL's message."""

    sqlstate = "42501"


class Wrapped(Exception):
    """Shaped like SQLAlchemy's error: the statement and the driver's error as ``orig``."""

    def __init__(self, statement: str, orig: BaseException) -> None:
        super().__init__(str(orig))
        self.statement = statement
        self.orig = orig


@pytest.mark.parametrize(
    ("statement", "message", "expected"),
    [
        ("INSERT INTO t VALUES (1)", "permission denied for table t", "lacks INSERT on table t"),
        ("UPDATE m SET v = 1", "permission denied for table m", "lacks UPDATE on table m"),
        ("CREATE SCHEMA dm", "permission denied for database app", "lacks CREATE on database app"),
        ("CREATE TABLE dm.t ()", "permission denied for schema dm", "lacks CREATE on schema dm"),
        ("SELECT 1 FROM dm.t", "permission denied for schema dm", "lacks USAGE on schema dm"),
        ("INSERT INTO t DEFAULT VALUES", "permission denied for sequence t_id_seq", "lacks USAGE"),
    ],
)
def test_the_missing_right_is_named_with_its_object(
    statement: str, message: str, expected: str
) -> None:
    problem = privilege_problem(Wrapped(statement, Denied(message)))
    assert problem is not None and problem.exit_code == 2
    assert expected in str(problem)


def test_other_errors_are_not_privilege_problems() -> None:
    assert privilege_problem(Wrapped("SELECT 1", ValueError("boom"))) is None
