"""Database URLs: accept what users paste, hand SQLAlchemy what its async drivers need."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

_POSTGRES_SCHEMES = {
    "postgres",
    "postgresql",
    "postgresql+asyncpg",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+pg8000",
}
_SQLITE_SCHEMES = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}
# libpq's sslmode values map one to one onto asyncpg's ``ssl`` argument.
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def normalise_url(raw: str, setting: str) -> URL:
    """Parse ``raw`` and switch it to the asyncpg or aiosqlite driver.

    :param raw: the URL as configured.
    :param setting: the name used in error messages (never the URL, which holds a password).
    """
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{setting} is not a valid URL (expected e.g. postgresql://user@host/db)"
        ) from None
    scheme = url.drivername
    if scheme in _POSTGRES_SCHEMES:
        return _postgres(url, setting)
    if scheme in _SQLITE_SCHEMES:
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                f"{setting}: an in-memory SQLite database cannot hold the tracker; give a file path"
            )
        return url.set(drivername="sqlite+aiosqlite")
    raise ConfigError(
        f"{setting}: unsupported database '{scheme}' (use postgresql:// or sqlite:///)"
    )


def embedded_url(path: Path) -> URL:
    """Return the URL of the embedded SQLite database file at ``path``."""
    return URL.create("sqlite+aiosqlite", database=str(path))


def _postgres(url: URL, setting: str) -> URL:
    query = dict(url.query)
    sslmode = query.pop("sslmode", None)
    if sslmode is not None:
        if isinstance(sslmode, tuple) or sslmode not in _SSLMODES:
            raise ConfigError(
                f"{setting}: unsupported sslmode (use one of {', '.join(sorted(_SSLMODES))})"
            )
        query.setdefault("ssl", sslmode)
    if not url.database:
        raise ConfigError(f"{setting}: no database name in the URL")
    return url.set(drivername="postgresql+asyncpg", query=query)
