"""Settings: where the project lives, which database to use, and how to run.

Precedence, highest first: explicit values (command-line options or keyword arguments),
``DM_*`` environment variables (``DATABASE_URL`` and ``ENVIRONMENT`` are accepted too), the
``.env`` file beside the config file (not the working directory's), the ``dm.*`` keys and
``sqlalchemy.url`` of dm's section in ``alembic.ini``, and finally the defaults — among
them the embedded SQLite file ``dm.sqlite3`` beside ``alembic.ini``. An empty value
(``DM_ENVIRONMENT=``) counts as unset.

Every value is checked when settings load, before dm connects: numbers must be finite and
in range, names must fit the tracker's columns and PostgreSQL's identifiers.
"""

from __future__ import annotations

import configparser
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from pydantic import AliasChoices
from pydantic import Field
from pydantic import PrivateAttr
from pydantic import SecretStr
from pydantic import ValidationError
from pydantic import ValidationInfo
from pydantic import field_validator
from pydantic_settings import BaseSettings
from pydantic_settings import InitSettingsSource
from pydantic_settings import PydanticBaseSettingsSource
from pydantic_settings import SettingsConfigDict

from dm.core.environments import is_declared
from dm.core.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import URL

log = logging.getLogger("dm.settings")

DEFAULT_SECTION = "data_migrations"
EMBEDDED_DATABASE = "dm.sqlite3"
DOTENV = ".env"
DEFAULT_ENVIRONMENT_SOURCE = "the default"

MAX_SECONDS = 2_147_483.0
"""Upper bound of every time setting: PostgreSQL's ``statement_timeout`` and ``lock_timeout``
take at most 2147483647 ms (about 24.8 days)."""
MAX_TRACKER_TABLE = 48
"""The tracker's index ``ix_<table>_revision_id`` must fit PostgreSQL's 63-byte names."""
MAX_IDENTIFIER = 63
MAX_ENVIRONMENT = 64
MAX_POD_NAME = 255
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYSTEM_SCHEMAS = ("information_schema",)

# ini key (in dm's section) -> settings field
_INI_KEYS = {
    "sqlalchemy.url": "database_url",
    "dm.environment": "environment",
    "dm.environments": "environments",
    "dm.tracker_table": "tracker_table",
    "dm.tracker_schema": "tracker_schema",
    "dm.lock_timeout": "lock_timeout",
    "dm.lock_database_url": "lock_database_url",
    "dm.timeout": "timeout",
    "dm.max_runtime": "max_runtime",
    "dm.pg_lock_timeout": "pg_lock_timeout",
    "dm.lock_retries": "lock_retries",
    "dm.lock_retry_wait": "lock_retry_wait",
    "dm.schema_config": "schema_config",
    "dm.schema_alembic_section": "schema_alembic_section",
    "dm.schema_version_table": "schema_version_table",
    "dm.schema_version_schema": "schema_version_schema",
    "dm.connect_retry_seconds": "connect_retry_seconds",
    "dm.idle_in_transaction_timeout": "idle_in_transaction_timeout",
}


class Settings(BaseSettings):
    """Everything dm needs to know to run, resolved from all configuration sources."""

    model_config = SettingsConfigDict(
        env_prefix="DM_",
        env_file=None,
        env_ignore_empty=True,
        extra="ignore",
        hide_input_in_errors=True,
        populate_by_name=True,
        frozen=True,
    )

    config_file: Path = Field(Path("alembic.ini"), validation_alias="DM_CONFIG")
    ini_section: str = Field(DEFAULT_SECTION, validation_alias="DM_INI_SECTION")
    database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DM_DATABASE_URL", "DATABASE_URL", "database_url")
    )
    lock_database_url: SecretStr | None = Field(None, validation_alias="DM_LOCK_DATABASE_URL")
    environment: str = Field(
        "production",
        validation_alias=AliasChoices("DM_ENVIRONMENT", "ENVIRONMENT", "environment"),
    )
    environments: str | None = None
    """The declared environment names, comma-separated (None: any name is accepted)."""
    tracker_table: str = "script_run_tracker"
    tracker_schema: str | None = None
    lock_timeout: float = 600.0
    timeout: float | None = None
    max_runtime: float | None = None
    """Seconds a run may work before its batched loop stops at a batch boundary (exit 5)."""
    pg_lock_timeout: float = 5.0
    lock_retries: int = Field(3, ge=0, le=20)
    """How many times a transactional revision is run again after a lock wait timed out."""
    lock_retry_wait: float = Field(1.0, le=3600)
    """Seconds before the first retry; each further retry waits twice as long."""
    schema_config: Path | None = None
    """The config file holding the application's Alembic section (default: dm's)."""
    schema_alembic_section: str = "alembic"
    schema_version_table: str = "alembic_version"
    schema_version_schema: str | None = None
    connect_retry_seconds: float = Field(20.0, ge=0, le=600)
    """How long a run's first connections retry a transient failure (0 = no retry)."""
    idle_in_transaction_timeout: float = 60.0
    """PostgreSQL ``idle_in_transaction_session_timeout`` of the working connection (0 =
    off): a dead run's session, idle in its transaction, ends on its own after it."""
    pod_name: str | None = Field(
        None, validation_alias=AliasChoices("DM_POD_NAME", "POD_NAME", "pod_name")
    )
    _url_source: str = PrivateAttr("the configuration")
    _parsed: dict[tuple[str, ...], URL] = PrivateAttr(default_factory=dict)
    """URLs already parsed, by what they were parsed from (see ``_once``)."""
    _alembic_config: Any = PrivateAttr(None)
    """Where the database URL came from (an option, a variable, ``.env`` or the ini)."""
    _environment_source: str = PrivateAttr(DEFAULT_ENVIRONMENT_SOURCE)

    @field_validator(
        "lock_timeout",
        "pg_lock_timeout",
        "lock_retry_wait",
        "timeout",
        "max_runtime",
        "idle_in_transaction_timeout",
    )
    @classmethod
    def _seconds(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        low = 0.0
        if (
            math.isnan(value)
            or value > MAX_SECONDS
            or value < low
            or (value == low and info.field_name in ("timeout", "max_runtime"))
        ):
            bound = "above 0" if info.field_name in ("timeout", "max_runtime") else "from 0"
            raise ValueError(
                f"must be a number of seconds {bound} up to {MAX_SECONDS:.0f} (about 24 days)"
            )
        return value

    @field_validator("tracker_table")
    @classmethod
    def _table(cls, value: str) -> str:
        return _identifier(value, MAX_TRACKER_TABLE)

    @field_validator("schema_version_table")
    @classmethod
    def _version_table(cls, value: str) -> str:
        return _identifier(value, MAX_IDENTIFIER)

    @field_validator("schema_alembic_section")
    @classmethod
    def _section(cls, value: str) -> str:
        if not value.strip() or any(c in value for c in "[]\n"):
            raise ValueError("must be the name of a config file section, e.g. alembic")
        return value.strip()

    @field_validator("tracker_schema", "schema_version_schema")
    @classmethod
    def _schema(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError(
                "must be a letter or underscore followed by letters, digits and underscores"
            )
        if len(value) > MAX_IDENTIFIER:
            raise ValueError(f"must be at most {MAX_IDENTIFIER} characters")
        system = value.lower().startswith("pg_") or value.lower() in _SYSTEM_SCHEMAS
        if system and info.field_name == "tracker_schema":
            raise ValueError(f"{value!r} is a PostgreSQL system schema; pick your own")
        return value

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip() or "production"
            if len(value) > MAX_ENVIRONMENT:
                raise ValueError(f"must be at most {MAX_ENVIRONMENT} characters")
        return value

    @field_validator("environments", mode="before")
    @classmethod
    def _environments(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",")]
            if not value.strip():
                return None
            if not all(names) or any(len(name) > MAX_ENVIRONMENT for name in names):
                raise ValueError(
                    "must be environment names separated by commas, e.g. "
                    f"'development, staging, production' (each at most {MAX_ENVIRONMENT} "
                    "characters)"
                )
            return ", ".join(names)
        return value

    @field_validator("pod_name", mode="before")
    @classmethod
    def _pod_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip() or None
            if value is not None and len(value) > MAX_POD_NAME:
                raise ValueError(f"must be at most {MAX_POD_NAME} characters")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Insert the ini file below the environment and above the defaults."""
        ini = _IniSettingsSource(settings_cls, init_settings)
        return init_settings, env_settings, dotenv_settings, file_secret_settings, ini

    @classmethod
    def load(cls, **values: Any) -> Settings:
        """Build settings, dropping ``None`` values and reporting errors in one line.

        The ``.env`` read is the one beside the config file (``-c``/``DM_CONFIG``, else
        ``./alembic.ini``); a ``DM_CONFIG`` inside it therefore cannot move the project.
        """
        given = {key: value for key, value in values.items() if value is not None}
        config = given.get("config_file") or os.environ.get("DM_CONFIG") or "alembic.ini"
        dotenv = _dotenv_beside(Path(config))
        from_files = _secret_files(given)
        values = _under_aliases(cls, {**from_files, **given})
        try:
            settings = cls(_env_file=dotenv, **values)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise ConfigError(_describe_validation_error(exc)) from None
        if dotenv is not None and Path(settings.config_file) != Path(config):
            raise ConfigError(
                f"{dotenv}: DM_CONFIG cannot be set in the .env file, which is read from "
                f"beside the config file ({config}); set DM_CONFIG in the environment or "
                "pass -c instead"
            )
        settings._url_source = _where_url(given, dotenv, Path(config))
        settings._environment_source = _where_environment(
            settings.environment, given, dotenv, Path(config), settings.ini_section
        )
        declared = settings.declared_environments
        if declared is not None and not is_declared(settings.environment, declared):
            raise ConfigError(
                f"environment {settings.environment!r} (from {settings.environment_source}) "
                f"is not one of the declared environments ({', '.join(declared)}; "
                "dm.environments): fix the name, or declare it"
            )
        if "database_url" in from_files and "database_url" not in given:
            variable = URL_FILE_VARIABLES["database_url"][0]
            settings._url_source = f"{variable} ({os.environ[variable]})"
        from dm.config.redaction import register

        register(settings.secrets())
        if dotenv is not None:
            log.debug("read settings from %s", dotenv)
        else:
            log.debug("no %s beside %s", DOTENV, config)
        return settings

    @classmethod
    def from_alembic_config(cls, config: Config) -> Settings:
        """Build settings from Alembic's ``Config`` object as its caller holds it.

        dm's keys come from the Config's section (a Config built in code needs no file).
        A ``sqlalchemy.url`` set on the Config in code (it differs from the file's, or there
        is no file) wins over ``DM_DATABASE_URL``/``DATABASE_URL``, as ``--database-url``
        does; the file's own value stays below them, as for ``dm``.
        """
        section = config.config_ini_section
        path = Path(config.config_file_name) if config.config_file_name else None
        try:
            options = config.get_section(section) or {}
        except configparser.InterpolationError as exc:
            raise ConfigError(_interpolation_problem(path, section, exc.option)) from None
        values: dict[str, Any] = {}
        for key, field in _INI_KEYS.items():
            value = str(options.get(key) or "").strip()
            if value:
                values[field] = value
        url = values.pop("database_url", None)
        explicit = url if url is not None and url != _file_url(path, section) else None
        if url is not None and explicit is None:
            values["database_url"] = url
        settings = cls.load(
            config_file=path, ini_section=section, database_url=explicit, ini_values=values
        )
        if explicit is not None:
            settings._url_source = "sqlalchemy.url set on the Alembic Config"
        settings._alembic_config = config
        return settings

    @property
    def declared_environments(self) -> tuple[str, ...] | None:
        """Return the environment names ``dm.core.environments`` declares (None: not declared)."""
        if self.environments is None:
            return None
        return tuple(name.strip() for name in self.environments.split(","))

    @property
    def environment_source(self) -> str:
        """Return where ``environment`` came from, highest precedence first:
        ``DM_ENVIRONMENT``, ``ENVIRONMENT``, either in the ``.env`` beside the config file,
        ``dm.environment`` in the config file, else the default (``production``)."""
        return self._environment_source

    @property
    def url_source(self) -> str:
        """Return where the database URL comes from (or that it is the embedded default)."""
        if self.database_url is None:
            return "the embedded SQLite default: no database is configured"
        return self._url_source

    def secrets(self) -> list[str]:
        """Return the secret parts of the configured URLs, to scrub from any output."""
        from dm.config.urls import secrets_of

        found: list[str] = []
        for value in (self.database_url, self.lock_database_url):
            if value is not None:
                found.extend(secrets_of(value.get_secret_value()))
        return found

    @property
    def project_dir(self) -> Path:
        """Return the directory holding the config file."""
        return self.config_file.resolve().parent

    def url(self) -> URL:
        """Return the database URL, normalised for dm's async drivers (parsed once)."""
        return self._once("url", self._parse_url)

    def lock_url(self) -> URL:
        """Return the URL of the lock connection (defaults to the database URL)."""
        return self._once("lock_url", self._parse_lock_url)

    def _once(self, name: str, parse: Callable[[], URL]) -> URL:
        """Return ``parse()``, parsed once per value of the settings it reads."""
        key = (
            name,
            _raw(self.database_url),
            _raw(self.lock_database_url),
            str(self.config_file),
        )
        url = self._parsed.get(key)
        if url is None:
            url = self._parsed[key] = parse()
        return url

    def _parse_url(self) -> URL:
        from dm.config.urls import embedded_url
        from dm.config.urls import normalise_url

        if self.database_url is None:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise ConfigError(
                    "no database configured (set DM_DATABASE_URL or DATABASE_URL): "
                    "the embedded SQLite default is refused inside Kubernetes"
                )
            return embedded_url(self.project_dir / EMBEDDED_DATABASE)
        try:
            return normalise_url(self.database_url.get_secret_value(), "database URL")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; it comes from {self._url_source}") from None

    def _parse_lock_url(self) -> URL:
        from dm.config.urls import normalise_url

        if self.lock_database_url is None:
            return self.url()
        return normalise_url(self.lock_database_url.get_secret_value(), "DM_LOCK_DATABASE_URL")

    def redacted_url(self) -> str:
        """Return the database URL with the password and secret query values hidden."""
        from dm.config.urls import redact

        return redact(self.url())

    def alembic_config(self) -> Config:
        """Return the Alembic ``Config`` for dm's section of the config file."""
        from alembic.config import Config

        path = self.config_file
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (run 'dm init' or pass -c PATH)")
        parser = _read_ini(path)
        if not parser.has_section(self.ini_section):
            raise ConfigError(f"{path}: no [{self.ini_section}] section (pass -n SECTION)")
        location = parser.get(self.ini_section, "script_location", fallback="")
        if not location:
            raise ConfigError(f"{path}: [{self.ini_section}] has no script_location")
        return Config(str(path), ini_section=self.ini_section)

    def hook_config(self) -> Config:
        """Return the ``Config`` revision hooks see as ``context.config``: the caller's own
        under Alembic's command API, else a new one for dm's section."""
        given: Config | None = self._alembic_config
        return given if given is not None else self.alembic_config()


class _IniSettingsSource(PydanticBaseSettingsSource):
    """Read ``sqlalchemy.url`` and the ``dm.*`` keys of dm's section in the config file."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        explicit = init.init_kwargs if isinstance(init, InitSettingsSource) else {}
        # Explicit values arrive under the field name or, normalised, under the alias.
        path = explicit.get("DM_CONFIG") or explicit.get("config_file")
        section = explicit.get("DM_INI_SECTION") or explicit.get("ini_section")
        given = explicit.get("ini_values")
        self._values: dict[str, Any] | None = dict(given) if isinstance(given, dict) else None
        self._path = Path(path or os.environ.get("DM_CONFIG") or "alembic.ini")
        self._section = str(section or os.environ.get("DM_INI_SECTION") or DEFAULT_SECTION)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values are read all at once in ``__call__``."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self._values is not None:  # the caller's Alembic Config, read already
            return self._values
        if not self._path.is_file():
            return {}
        parser = _read_ini(self._path)
        if not parser.has_section(self._section):
            return {}
        values: dict[str, Any] = {}
        for key, field in _INI_KEYS.items():
            value = _ini_get(parser, self._section, key, self._path)
            if value:
                values[field] = value
        return values


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser({"here": str(path.resolve().parent)})
    text = _read_text(path, "config file")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: cannot parse config file: {first_line}") from None
    return parser


def _read_text(path: Path, what: str) -> str:
    """Return the UTF-8 text of ``path``, or raise one line naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: {what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line})"
        ) from None


def _file_url(path: Path | None, section: str) -> str | None:
    """Return ``sqlalchemy.url`` of ``section`` in the file at ``path`` (None: no such key)."""
    if path is None or not path.is_file():
        return None
    parser = _read_ini(path)
    if not parser.has_section(section):
        return None
    return _ini_get(parser, section, "sqlalchemy.url", path) or None


def _ini_get(parser: configparser.ConfigParser, section: str, key: str, path: Path | None) -> str:
    """Return ``key`` of ``section`` (stripped; "" when absent), interpolated as Alembic does.

    :raises ConfigError: the value holds a lone ``%`` (a percent-encoded password such as
        ``%21``): names the key, never the value, which may hold a password.
    """
    try:
        return parser.get(section, key, fallback="").strip()
    except configparser.InterpolationError:
        raise ConfigError(_interpolation_problem(path, section, key)) from None


def _interpolation_problem(path: Path | None, section: str, key: str) -> str:
    where = f"{path}: " if path is not None else ""
    return (
        f"{where}[{section}] {key}: a '%' must be written '%%' in the config file (e.g. a "
        "percent-encoded password: %21 as %%21)"
    )


def _where_url(given: dict[str, Any], dotenv: Path | None, config: Path) -> str:
    """Return where the database URL came from, for error messages."""
    names = ("DM_DATABASE_URL", "DATABASE_URL")
    if given.get("database_url"):
        return "--database-url"
    for name in names:
        if os.environ.get(name):
            return name
    if dotenv is not None:
        from dotenv import dotenv_values

        values = dotenv_values(dotenv)
        for name in names:
            if values.get(name):
                return f"{name} in {dotenv}"
    return f"sqlalchemy.url in {config}"


def _where_environment(
    value: str, given: dict[str, Any], dotenv: Path | None, config: Path, section: str
) -> str:
    """Return where the environment ``value`` came from: the first source, in precedence
    order, that holds it."""
    names = ("DM_ENVIRONMENT", "ENVIRONMENT")
    candidates: list[tuple[str, Any]] = [("set in code", given.get("environment"))]
    candidates += [(name, os.environ.get(name)) for name in names]
    if dotenv is not None:
        from dotenv import dotenv_values

        found = dotenv_values(dotenv)
        candidates += [(f"{name} in {dotenv}", found.get(name)) for name in names]
    ini_values = given.get("ini_values")
    if isinstance(ini_values, dict):
        candidates.append((f"dm.environment in {config}", ini_values.get("environment")))
    elif config.is_file():
        parser = _read_ini(config)
        if parser.has_section(section):
            ini = parser.get(section, "dm.environment", fallback="")
            candidates.append((f"dm.environment in {config}", ini))
    for source, candidate in candidates:
        if isinstance(candidate, str) and candidate.strip() == value:
            return source
    return DEFAULT_ENVIRONMENT_SOURCE


def _under_aliases(cls: type[BaseSettings], given: dict[str, Any]) -> dict[str, Any]:
    """Return explicit values keyed by their field's first alias, as the environment's are.

    pydantic-settings before 2.9 merges an explicit ``database_url=`` and an environment
    ``DM_DATABASE_URL`` as two keys, and pydantic then takes the alias listed first: the
    environment would win. Under the same key the explicit value wins on every version.
    """
    keyed: dict[str, Any] = {}
    for name, value in given.items():
        field = cls.model_fields.get(name)
        alias = field.validation_alias if field is not None else None
        if isinstance(alias, AliasChoices):
            alias = alias.choices[0]
        keyed[alias if isinstance(alias, str) else name] = value
    return keyed


URL_FILE_VARIABLES = {
    "database_url": ("DM_DATABASE_URL_FILE", ("DM_DATABASE_URL", "DATABASE_URL")),
    "lock_database_url": ("DM_LOCK_DATABASE_URL_FILE", ("DM_LOCK_DATABASE_URL",)),
}
"""Settings that may be read from a file (a mounted secret): field -> (the variable naming
the file, the variables holding the value itself)."""


def _secret_files(given: dict[str, Any]) -> dict[str, str]:
    """Return the URLs read from the files ``DM_DATABASE_URL_FILE`` and
    ``DM_LOCK_DATABASE_URL_FILE`` name (the file's text, surrounding whitespace removed).

    An explicit value (``--database-url``) wins over the file, as over the variable.

    :raises ConfigError: both a ``_FILE`` variable and its plain twin are set, or the file
        cannot be read or is empty (the message names the variable and the file, never
        the file's content).
    """
    found: dict[str, str] = {}
    for field, (variable, plain) in URL_FILE_VARIABLES.items():
        path = os.environ.get(variable, "").strip()
        if not path:
            continue
        both = [name for name in plain if os.environ.get(name, "").strip()]
        if both:
            raise ConfigError(
                f"setting {variable} and {both[0]} are both set; set only one of them"
            )
        if given.get(field):
            continue
        text = _read_text(Path(path), f"the file {variable} names").strip()
        if not text:
            raise ConfigError(f"{path}: the file {variable} names is empty")
        found[field] = text
    return found


def _dotenv_beside(config: Path) -> Path | None:
    """Return the ``.env`` beside ``config`` when there is one, checked to be readable."""
    dotenv = config.resolve().parent / DOTENV
    if not dotenv.is_file():
        return None
    _read_text(dotenv, DOTENV)
    return dotenv


_ENV_NAMES = {
    "database_url": "DM_DATABASE_URL",
    "lock_database_url": "DM_LOCK_DATABASE_URL",
    "environment": "DM_ENVIRONMENT",
    "environments": "DM_ENVIRONMENTS",
    "pod_name": "DM_POD_NAME",
    "config_file": "DM_CONFIG",
    "ini_section": "DM_INI_SECTION",
}


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        field = str(error["loc"][0]) if error["loc"] else "settings"
        name = field if field.isupper() else _ENV_NAMES.get(field, f"DM_{field.upper()}")
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"setting {name}: {message}")
    return "; ".join(parts)


def _raw(value: SecretStr | None) -> str:
    return "" if value is None else value.get_secret_value()


def _identifier(value: str, longest: int) -> str:
    """Return ``value``, a plain SQL identifier of at most ``longest`` characters."""
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            "must be a letter or underscore followed by letters, digits and underscores"
        )
    if len(value) > longest:
        raise ValueError(f"must be at most {longest} characters")
    return value
