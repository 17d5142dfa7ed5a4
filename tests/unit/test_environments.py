"""The environment guard's decisions and the slug rules on their own: no database."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import attempt_of
from dm.core.environments import Action
from dm.core.environments import decide
from dm.core.errors import UsageError
from dm.core.slugs import check_message
from dm.core.slugs import slugify
from dm.engine.tracker import Status
from support.revisions import GUARDED
from support.revisions import graph_of


def test_decisions(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, {"a1": (None, ""), "b2": ("a1", GUARDED)})
    a1, b2 = graph.revision("a1"), graph.revision("b2")
    assert decide(a1, True, "production", None).action is Action.RUN
    assert decide(a1, True, "production", None).reason is None
    skip = decide(b2, True, "production", None)
    assert (skip.action, skip.reason) == (
        Action.SKIP,
        "environment 'production' not in ('development',)",
    )
    run = decide(b2, True, "development", None)
    assert (run.action, run.label) == (
        Action.RUN,
        "run: environment 'development' in ('development',)",
    )
    record = decide(b2, False, "production", attempt_of("b2", Status.SKIPPED))
    assert record.action is Action.RECORD
    with pytest.raises(UsageError, match="cannot downgrade b2"):
        decide(b2, False, "production", attempt_of("b2", Status.SUCCESS))
    assert decide(b2, False, "development", attempt_of("b2", Status.SUCCESS)).action is Action.RUN


@pytest.mark.parametrize(
    ("message", "slug"),
    [
        ("Backfill display names", "backfill_display_names"),
        ("Don't delete users!", "don_t_delete_users"),
        ("2fa backfill", "2fa_backfill"),
    ],
)
def test_slugs_follow_alembic(message: str, slug: str) -> None:
    assert slugify(message) == slug
    assert check_message(message) == slug


def test_long_messages_are_truncated_like_alembic() -> None:
    assert slugify("a" * 10 + " " + "b" * 40, limit=20) == "aaaaaaaaaa_"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("ab", "too short"),
        ("a b", "too short"),
        ("import", "Python keyword"),
        ("a/b/c", "path separator"),
        ("..\\evil", "path separator"),
        ("!!!", "at least one letter"),
        ("проверка данных", "ASCII"),  # no ASCII spelling
    ],
)
def test_bad_messages_are_refused(message: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        check_message(message)


def test_non_ascii_messages_are_spelt_in_ascii() -> None:
    assert check_message("überprüfen Kunden") == "uberprufen_kunden"
    assert check_message("Größe ändern, café crème") == "grosse_andern_cafe_creme"
    with pytest.raises(UsageError, match="same slug 'uberprufen_kunden'"):
        check_message("Überprüfen kunden", ["uberprufen KUNDEN"])


def test_duplicate_slugs_are_refused_unless_allowed() -> None:
    with pytest.raises(UsageError, match="same slug"):
        check_message("Sync plans", ["sync   PLANS"])
    assert check_message("Sync plans", ["sync plans"], allow_duplicate=True) == "sync_plans"
