"""dm.redaction: the one rule for text leaving the process, and what the tracker may keep."""

from __future__ import annotations

from dm.config import redaction

STORED = """Traceback (most recent call last):
asyncpg.exceptions.UniqueViolationError: duplicate key value violates unique constraint "k"
DETAIL:  Key (email)=(bob@example.org) already exists.
sqlalchemy.exc.IntegrityError: (UniqueViolationError) duplicate key value violates "k"
[SQL: INSERT INTO people (email, note)
VALUES ('bob@example.org', $1)]
[parameters: ('secret note',)]
(Background on this error at: https://sqlalche.me/e/21/gkpj)
psycopg.errors.BadCopyFileFormat: extra data after last expected column
CONTEXT:  COPY people, line 1: "bob@example.org,x"
"""


def test_the_tracker_keeps_no_row_values_statements_or_parameters() -> None:
    kept = redaction.for_tracker(STORED)
    assert kept is not None
    assert "bob@example.org" not in kept and "secret note" not in kept
    assert "duplicate key value violates unique constraint" in kept
    assert "[SQL: (row values not stored)]" in kept
    assert "(Background on this error at: https://sqlalche.me/e/21/gkpj)" in kept
    assert "extra data after last expected column" in kept
    assert redaction.for_tracker(None) is None


def test_registered_secrets_and_urls_are_masked_everywhere() -> None:
    redaction.register(["Pw22registered"])
    text = "token Pw22registered, url postgresql://u:Other22pw@h/db?sslpassword=Key22pw"
    assert redaction.scrub(text) == "token ***, url postgresql://u:***@h/db?sslpassword=***"
    assert redaction.scrub("Pw22given", ["Pw22given"]) == "***"
