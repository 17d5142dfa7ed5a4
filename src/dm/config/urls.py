"""Database URLs: accept what users paste, hand SQLAlchemy what its async drivers need.

Two rules users meet here:

- **Passwords may hold an unencoded ``@``.** The user information runs to the *last* ``@``
  before the host, so ``postgresql://u:p@ss@host/db`` logs in as ``u`` with ``p@ss``.
- **libpq query parameters are translated** to asyncpg's ``connect()`` arguments
  (``LIBPQ_PARAMETERS``); any other parameter is refused before dm connects.
- **``statement_cache_size=0``** (or ``prepared_statement_cache_size=0``) says the URL goes
  through a transaction pooler such as PgBouncer: dm then uses no named prepared statement
  on it (``through_pooler``, and ``dm.config.engines`` for what else changes).

Every URL dm shows (errors, ``dm info``, logs) goes through ``redact`` or ``mask_url``:
the password and secret query values (``SECRET_QUERY_KEYS``) become ``***``.
"""

from __future__ import annotations

import math
import re
import shlex
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dm.core.errors import ConfigError

_POSTGRES_SCHEMES = {
    "postgres",
    "postgresql",
    "postgresql+asyncpg",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+pg8000",
}
_SQLITE_SCHEMES = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
_SESSION_ATTRS = {"any", "primary", "standby", "prefer-standby", "read-write", "read-only"}

SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "sslkey", "passfile"})
"""Query parameters whose values are never shown (a password, or where a key lives)."""

MASK = "***"
MAX_CONNECT_TIMEOUT = 2_147_483.0

# libpq parameter -> what dm does with it (documented in the README).
LIBPQ_PARAMETERS = {
    "connect_timeout": "asyncpg timeout (seconds)",
    "application_name": "server setting application_name",
    "options": "server settings, from its -c name=value pairs",
    "sslmode": "asyncpg ssl mode",
    "sslrootcert": "asyncpg ssl",
    "sslcert": "asyncpg ssl",
    "sslkey": "asyncpg ssl",
    "sslpassword": "asyncpg ssl",
    "sslcrl": "asyncpg ssl",
    "ssl_min_protocol_version": "asyncpg ssl",
    "ssl_max_protocol_version": "asyncpg ssl",
    "target_session_attrs": "asyncpg target_session_attrs",
    "passfile": "asyncpg passfile",
    "krbsrvname": "asyncpg krbsrvname",
    "gsslib": "asyncpg gsslib",
    "host": "the host (or a Unix socket directory)",
    "port": "the port",
    "user": "the user name",
    "password": "the password",
    "ssl": "asyncpg ssl mode (asyncpg's own name for sslmode)",
    "prepared_statement_cache_size": "SQLAlchemy's asyncpg statement cache (0: pooled)",
    "statement_cache_size": "asyncpg's statement cache (0: through a transaction pooler)",
}
POOLER_KEYS = ("statement_cache_size", "prepared_statement_cache_size")
"""Query parameters whose value 0 marks a URL that goes through a transaction pooler."""
_SSL_DSN_KEYS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)
_KEYWORD_KEYS = ("passfile", "krbsrvname", "gsslib", "target_session_attrs")
_SQLALCHEMY_KEYS = ("host", "port", "prepared_statement_cache_size")

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.DOTALL)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def normalise_url(raw: str, setting: str) -> URL:
    """Parse ``raw`` and switch it to the asyncpg or aiosqlite driver.

    :param raw: the URL as configured.
    :param setting: the name used in error messages (never the URL, which holds a password).
    :raises ConfigError: the URL is malformed, names an unsupported database, or carries a
        query parameter dm cannot pass on.
    """
    try:
        url = make_url(_encode_userinfo(raw.strip()))
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


def _encode_userinfo(raw: str) -> str:
    """Percent-encode ``@``, ``/``, ``?`` and ``#`` in the user information of ``raw``."""
    match = _SCHEME.match(raw)
    if match is None or match["scheme"].lower().startswith("sqlite"):
        return raw  # a SQLite path may hold an '@'
    rest = match["rest"]
    end = _userinfo_end(rest)
    if end < 0:
        return raw
    user, colon, password = rest[:end].partition(":")
    quoted = _requote(user) + (colon + _requote(password) if colon else "")
    return f"{match['scheme']}://{quoted}{rest[end:]}"


def _requote(part: str) -> str:
    return urllib.parse.quote(urllib.parse.unquote(part), safe="")


def _userinfo_end(rest: str) -> int:
    """Return the index of the ``@`` ending the user information, or -1 when there is none.

    That is the last ``@`` before the query; a ``?`` counts as starting the query only
    after the first ``@`` or after a ``/`` (a password may hold a ``?``).
    """
    first_at = rest.find("@")
    if first_at < 0:
        return -1
    first_query = rest.find("?")
    if 0 <= first_query < first_at and "/" in rest[:first_query]:
        return -1  # the '@' is in the query: host/db?x=a@b
    query = rest.find("?", first_at)
    return rest.rfind("@", 0, query if query >= 0 else len(rest))


def _mask_end(rest: str) -> int:
    """Return ``_userinfo_end``, erring towards masking what may be a password."""
    end = _userinfo_end(rest)
    first_at = rest.find("@")
    if end < 0 and first_at >= 0 and ":" in rest[:first_at] and "=" not in rest[:first_at]:
        return first_at  # a password holding '/' and '?'
    return end


def _postgres(url: URL, setting: str) -> URL:
    query: dict[str, str] = {}
    for key, value in url.query.items():
        if key not in LIBPQ_PARAMETERS:
            raise ConfigError(
                f"{setting}: query parameter {key!r} is not supported by dm's PostgreSQL "
                f"driver ({'psycopg' if url.drivername == PSYCOPG else 'asyncpg'}); remove it "
                f"(supported: {', '.join(sorted(LIBPQ_PARAMETERS))})"
            )
        if isinstance(value, tuple):
            raise ConfigError(f"{setting}: query parameter {key!r} is given more than once")
        query[key] = value
    user = query.pop("user", None)
    password = query.pop("password", None)
    if user is not None:
        url = url.set(username=user)
    if password is not None:
        url = url.set(password=password)
    if "ssl" in query and "sslmode" in query:
        raise ConfigError(f"{setting}: give sslmode or ssl, not both")
    if "ssl" in query:
        query["sslmode"] = query.pop("ssl")
    if "sslmode" in query and query["sslmode"] not in _SSLMODES:
        raise ConfigError(
            f"{setting}: unsupported sslmode (use one of {', '.join(sorted(_SSLMODES))})"
        )
    attrs = query.get("target_session_attrs")
    if attrs is not None and attrs not in _SESSION_ATTRS:
        raise ConfigError(
            f"{setting}: unsupported target_session_attrs "
            f"(use one of {', '.join(sorted(_SESSION_ATTRS))})"
        )
    if "connect_timeout" in query:
        _connect_timeout(query["connect_timeout"], setting)
    for key in POOLER_KEYS:
        if key in query and not query[key].isdigit():
            raise ConfigError(
                f"{setting}: {key} must be a whole number (0 when the URL goes through a "
                "transaction pooler such as PgBouncer)"
            )
    if "options" in query:
        _server_options(query["options"], setting)
    if not url.database:
        raise ConfigError(f"{setting}: no database name in the URL")
    if url.drivername == PSYCOPG:
        _require_psycopg(setting)
        return url.set(query=query)
    return url.set(drivername="postgresql+asyncpg", query=query)


PSYCOPG = "postgresql+psycopg"
"""The scheme that selects psycopg 3 (SQLAlchemy's async psycopg dialect); every other
PostgreSQL scheme runs on asyncpg."""


def is_psycopg(url: URL) -> bool:
    """Return whether ``url`` (normalised) runs on psycopg 3 rather than asyncpg."""
    return url.drivername == PSYCOPG


def _require_psycopg(setting: str) -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{setting}: postgresql+psycopg:// needs psycopg 3, which is not installed: "
            "pip install 'dm[psycopg]', or use postgresql:// (asyncpg)"
        ) from None


def _connect_timeout(value: str, setting: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_CONNECT_TIMEOUT):
        raise ConfigError(
            f"{setting}: connect_timeout must be a number of seconds between 0 and "
            f"{MAX_CONNECT_TIMEOUT:.0f}"
        )
    return seconds


def _server_options(value: str, setting: str) -> dict[str, str]:
    """Parse libpq's ``options`` (``-c name=value`` pairs) into server settings."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = ["?"]
    settings: dict[str, str] = {}
    words.reverse()
    while words:
        word = words.pop()
        if word == "-c" and words:
            word = words.pop()
        elif word.startswith("-c"):
            word = word[2:]
        elif word.startswith("--"):
            # As the server reads ``--name=value``: dashes in the name are underscores; the
            # value is kept as written.
            name, equals, rest = word[2:].partition("=")
            word = name.replace("-", "_") + equals + rest
        else:
            raise ConfigError(
                f"{setting}: options supports only '-c name=value' pairs (as in "
                "options=-c%20statement_timeout%3D5000)"
            )
        name, equals, setting_value = word.partition("=")
        if not equals or not name:
            raise ConfigError(f"{setting}: options: expected name=value after -c")
        settings[name] = setting_value
    return settings


def connect_arguments(url: URL) -> tuple[URL, dict[str, Any]]:
    """Split a normalised PostgreSQL URL into the URL SQLAlchemy gets and asyncpg arguments.

    SQLAlchemy passes the query on to ``asyncpg.connect()`` as keywords, which knows none
    of libpq's names; they leave the URL here and come back as ``connect()`` arguments.
    SSL files go through a query-only DSN, which asyncpg parses as libpq does.
    """
    if is_psycopg(url):
        return _psycopg_arguments(url)
    query = dict(url.query)
    args: dict[str, Any] = {}
    server_settings: dict[str, str] = {}
    if "connect_timeout" in query:
        args["timeout"] = float(str(query.pop("connect_timeout")))
    if "options" in query:
        server_settings.update(_server_options(str(query.pop("options")), "database URL"))
    if "application_name" in query:
        server_settings["application_name"] = str(query.pop("application_name"))
    if server_settings:
        args["server_settings"] = server_settings
    for key in _KEYWORD_KEYS:
        if key in query:
            args[key] = query.pop(key)
    ssl = {key: str(query.pop(key)) for key in _SSL_DSN_KEYS if key in query}
    if ssl:
        args["dsn"] = "postgresql://?" + urllib.parse.urlencode(ssl)
    kept = {key: value for key, value in query.items() if key in _SQLALCHEMY_KEYS}
    if through_pooler(url):
        # No statement outlives its transaction: asyncpg caches none, SQLAlchemy caches
        # none, and each is prepared unnamed (replaced by the next one on that server
        # connection, never bound by name from another transaction).
        args["statement_cache_size"] = 0
        args["prepared_statement_name_func"] = _unnamed
        kept["prepared_statement_cache_size"] = "0"
    elif "statement_cache_size" in query:
        args["statement_cache_size"] = int(str(query["statement_cache_size"]))
    return url.set(query=kept), args


def _psycopg_arguments(url: URL) -> tuple[URL, dict[str, Any]]:
    """Split a normalised psycopg URL into the URL SQLAlchemy gets and ``connect()`` arguments.

    psycopg takes libpq's parameters as they are (``options`` included); dm adds only
    client-side binding (``%s`` and several statements with parameters, as psycopg2 had) and,
    through a transaction pooler, no prepared statement at all.
    """
    from psycopg import AsyncClientCursor

    query = {key: str(value) for key, value in url.query.items()}
    args: dict[str, Any] = {"cursor_factory": AsyncClientCursor}
    pooled = through_pooler(url)
    for key in POOLER_KEYS:
        query.pop(key, None)
    if "connect_timeout" in query:
        args["connect_timeout"] = max(1, math.ceil(float(query.pop("connect_timeout"))))
    args.update(query)
    if pooled:
        args["prepare_threshold"] = None
    return url.set(query={}), args


def through_pooler(url: URL) -> bool:
    """Return whether ``url`` is marked as going through a transaction pooler
    (``statement_cache_size=0`` or ``prepared_statement_cache_size=0``)."""
    return url.get_backend_name() == "postgresql" and any(
        str(url.query.get(key, "")).strip() == "0" for key in POOLER_KEYS
    )


def _unnamed() -> str:
    """Name every prepared statement "" (PostgreSQL's unnamed statement)."""
    return ""


# -- showing URLs ------------------------------------------------------------------------------


def redact(url: URL) -> str:
    """Return ``url`` as text with its password and secret query values replaced by ``***``."""
    base = url.set(query={}).render_as_string(hide_password=True)
    if not url.query:
        return base
    pairs = []
    for key, value in url.query.items():
        values = value if isinstance(value, tuple) else (value,)
        for one in values:
            shown = MASK if key.lower() in SECRET_QUERY_KEYS else one
            pairs.append(f"{urllib.parse.quote(key)}={urllib.parse.quote(shown, safe='*/')}")
    return base + "?" + "&".join(pairs)


def mask_url(raw: str) -> str:
    """Return ``raw`` with anything that may be a secret replaced by ``***``.

    Works on any text that looks like a URL, valid or not: the password (everything from
    the first ``:`` of the user information to its last ``@``) and the values of
    ``SECRET_QUERY_KEYS`` in the query. Text that is not a URL but holds an ``@`` is
    masked whole.
    """
    match = _SCHEME.match(raw)
    if match is None:
        return MASK if "@" in raw else raw
    if match["scheme"].lower().startswith("sqlite"):
        return raw  # a file path, never a password
    rest = match["rest"]
    end = _mask_end(rest)
    if end >= 0:
        user, colon, _password = rest[:end].partition(":")
        rest = user + (colon + MASK if colon else "") + rest[end:]
    path, question, query = rest.partition("?")
    if question:
        query = "&".join(_mask_pair(pair) for pair in query.split("&"))
    return f"{match['scheme']}://{path}{question}{query}"


def _mask_pair(pair: str) -> str:
    key, equals, _value = pair.partition("=")
    if equals and urllib.parse.unquote_plus(key).lower() in SECRET_QUERY_KEYS:
        return f"{key}={MASK}"
    return pair


def mask_urls_in(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every URL in it masked and every one of ``secrets`` removed."""
    text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def secrets_of(raw: str) -> list[str]:
    """Return the secret strings in URL ``raw`` (decoded and as written) to scrub from output.

    Values shorter than 4 characters are left out: replacing them everywhere would garble
    every line, and the URL masking still hides them where they appear in a URL.
    """
    found: set[str] = set()
    match = _SCHEME.match(raw.strip())
    if match is None:
        return []
    rest = match["rest"]
    end = _mask_end(rest)
    if end >= 0:
        _user, colon, password = rest[:end].partition(":")
        if colon:
            found.update({password, urllib.parse.unquote(password)})
    _path, _question, query = rest[max(end, 0) :].partition("?")
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS:
            found.add(value)
    for pair in query.split("&"):
        key, _equals, value = pair.partition("=")
        if urllib.parse.unquote_plus(key).lower() in SECRET_QUERY_KEYS:
            found.add(value)
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)
