"""``dm.config.urls``: which driver a PostgreSQL URL selects, and what each driver is given."""

from __future__ import annotations

import pytest
from psycopg import AsyncClientCursor

from dm.config.urls import connect_arguments
from dm.config.urls import is_psycopg
from dm.config.urls import normalise_url
from dm.config.urls import through_pooler


@pytest.mark.parametrize(
    "scheme", ["postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg2"]
)
def test_other_postgresql_schemes_run_on_asyncpg(scheme: str) -> None:
    url = normalise_url(f"{scheme}://app@db/app", "DM_DATABASE_URL")
    assert url.drivername == "postgresql+asyncpg"
    assert not is_psycopg(url)


def test_psycopg_scheme_runs_on_psycopg_with_libpq_parameters_as_they_are() -> None:
    raw = (
        "postgresql+psycopg://app:s3cret@db:6432/app?sslmode=require&connect_timeout=2.5"
        "&application_name=billing&options=-c%20search_path%3Dops&statement_cache_size=0"
    )
    url = normalise_url(raw, "DM_DATABASE_URL")
    assert is_psycopg(url) and through_pooler(url)
    engine_url, args = connect_arguments(url)
    assert engine_url.render_as_string(hide_password=False) == (
        "postgresql+psycopg://app:s3cret@db:6432/app"
    )
    assert args == {
        "cursor_factory": AsyncClientCursor,  # psycopg2's client-side binding
        "sslmode": "require",
        "connect_timeout": 3,  # libpq takes whole seconds
        "application_name": "billing",
        "options": "-c search_path=ops",
        "prepare_threshold": None,  # through a transaction pooler: nothing prepared
    }


def test_psycopg_url_refuses_what_libpq_does_not_take() -> None:
    from dm.core.errors import ConfigError

    refused = r"'keepalives' is not supported by dm's PostgreSQL driver \(psycopg\)"
    with pytest.raises(ConfigError, match=refused):
        normalise_url("postgresql+psycopg://app@db/app?keepalives=1", "DM_DATABASE_URL")
