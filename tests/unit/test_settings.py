"""Settings: where each value comes from, URL normalisation, and errors that keep secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import cli_runner
from conftest import make_sqlite
from dm import verbs
from dm.cli import main
from dm.config.settings import Settings
from dm.config.urls import connect_arguments
from dm.config.urls import mask_url
from dm.config.urls import mask_urls_in
from dm.config.urls import normalise_url
from dm.config.urls import redact
from dm.config.urls import through_pooler
from dm.core.errors import ConfigError

pytestmark = pytest.mark.matrix  # also runs in the version matrix (tests/README.md)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No dm setting leaks in from the outer environment or a ``.env`` file."""
    for name in list(os.environ):
        if name.startswith("DM_"):
            monkeypatch.delenv(name)
    for name in ("DATABASE_URL", "ENVIRONMENT", "POD_NAME", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    """A ``dm init`` project; returns its alembic.ini."""
    verbs.init(tmp_path / "proj")
    return tmp_path / "proj" / "alembic.ini"


def set_ini_url(ini: Path, url: str) -> None:
    text = ini.read_text()
    assert "\nsqlalchemy.url =\n" in text
    ini.write_text(text.replace("\nsqlalchemy.url =\n", f"\nsqlalchemy.url = {url}\n"))


def database(settings: Settings) -> str:
    """The file name of the SQLite database the settings point at."""
    url = settings.url()
    assert url.drivername == "sqlite+aiosqlite"
    return Path(url.database or "").name


# -- precedence, one test per neighbouring pair ------------------------------------------------


def test_option_beats_dm_database_url(ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DM_DATABASE_URL", "sqlite:///from_dm_env.db")
    settings = Settings.load(config_file=ini, database_url="sqlite:///from_option.db")
    assert database(settings) == "from_option.db"


def test_dm_database_url_beats_database_url(ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///from_plain_env.db")
    monkeypatch.setenv("DM_DATABASE_URL", "sqlite:///from_dm_env.db")
    assert database(Settings.load(config_file=ini)) == "from_dm_env.db"


def test_database_url_beats_ini(ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_ini_url(ini, "sqlite:///from_ini.db")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///from_plain_env.db")
    assert database(Settings.load(config_file=ini)) == "from_plain_env.db"


def test_ini_beats_embedded_default(ini: Path) -> None:
    set_ini_url(ini, "sqlite:///from_ini.db")
    assert database(Settings.load(config_file=ini)) == "from_ini.db"


def test_embedded_default_lives_next_to_alembic_ini(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory does not matter
    url = Settings.load(config_file=ini).url()
    assert url.drivername == "sqlite+aiosqlite"
    assert Path(url.database or "") == ini.resolve().parent / "dm.sqlite3"


@pytest.mark.parametrize(
    ("field", "prefixed", "plain"),
    [("environment", "DM_ENVIRONMENT", "ENVIRONMENT"), ("pod_name", "DM_POD_NAME", "POD_NAME")],
)
def test_dm_prefixed_variables_beat_plain_ones(
    ini: Path, monkeypatch: pytest.MonkeyPatch, field: str, prefixed: str, plain: str
) -> None:
    monkeypatch.setenv(plain, "from-plain")
    assert getattr(Settings.load(config_file=ini), field) == "from-plain"
    monkeypatch.setenv(prefixed, "from-prefixed")
    assert getattr(Settings.load(config_file=ini), field) == "from-prefixed"
    assert getattr(Settings.load(config_file=ini, **{field: "explicit"}), field) == "explicit"


def test_unprefixed_field_names_are_not_read_from_the_environment(
    ini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generic names such as CONFIG_FILE belong to other programs in the same container."""
    monkeypatch.chdir(ini.parent)
    monkeypatch.setenv("CONFIG_FILE", "/etc/app/app.ini")
    monkeypatch.setenv("INI_SECTION", "app")
    monkeypatch.setenv("LOCK_DATABASE_URL", "postgresql://u@elsewhere/app")
    settings = Settings.load()
    assert settings.config_file == Path("alembic.ini")
    assert settings.ini_section == "data_migrations"
    assert settings.lock_database_url is None
    settings.alembic_config()  # the project's own file and section


def test_dm_config_env_selects_the_ini(ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_ini_url(ini, "sqlite:///from_ini.db")
    monkeypatch.setenv("DM_CONFIG", str(ini))
    settings = Settings.load()
    assert settings.config_file == ini
    assert database(settings) == "from_ini.db"


def test_dotenv_sits_between_environment_and_ini(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_ini_url(ini, "sqlite:///from_ini.db")
    (ini.parent / ".env").write_text("DM_DATABASE_URL=sqlite:///from_dotenv.db\n")
    assert database(Settings.load(config_file=ini)) == "from_dotenv.db"
    monkeypatch.setenv("DM_DATABASE_URL", "sqlite:///from_dm_env.db")
    assert database(Settings.load(config_file=ini)) == "from_dm_env.db"


def test_ini_dm_keys_and_environment_override(ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ini.read_text().replace("# dm.lock_timeout = 600", "dm.lock_timeout = 42")
    ini.write_text(text.replace("# dm.timeout =", "dm.timeout = 7.5"))
    settings = Settings.load(config_file=ini)
    assert (settings.lock_timeout, settings.timeout) == (42.0, 7.5)
    monkeypatch.setenv("DM_LOCK_TIMEOUT", "3")
    assert Settings.load(config_file=ini).lock_timeout == 3.0
    assert Settings.load(config_file=ini, lock_timeout=1).lock_timeout == 1.0


def test_cli_option_wins_end_to_end(ini: Path, tmp_path: Path) -> None:
    """``--database-url`` decides where ``dm upgrade`` writes, over DM_DATABASE_URL."""
    (ini.parent / "data_migrations" / "versions" / "r1.py").write_text(
        "revision = 'r1'\ndown_revision = None\nasync def upgrade(session):\n    pass\n"
    )
    chosen, ignored = make_sqlite(tmp_path / "a"), make_sqlite(tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = cli_runner().invoke(
        main,
        ["--database-url", chosen.url, "upgrade"],
        env={"DM_CONFIG": str(ini), "DM_DATABASE_URL": ignored.url},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert [r.revision for r in chosen.tracker()] == ["r1"]
    assert not (tmp_path / "b" / "test.sqlite3").exists()
    assert not (ini.parent / "dm.sqlite3").exists()


# -- URL normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://u:pw@db.example:5433/app",
        "postgresql://u:pw@db.example:5433/app",
        "postgresql+psycopg2://u:pw@db.example:5433/app",
        "postgresql+asyncpg://u:pw@db.example:5433/app",
    ],
)
def test_postgres_urls_use_asyncpg(raw: str) -> None:
    url = normalise_url(raw, "database URL")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "u",
        "pw",
        "db.example",
        5433,
        "app",
    )


def test_sslmode_reaches_asyncpg_through_its_dsn_parser() -> None:
    url = normalise_url("postgresql://u@db.example/app?sslmode=require", "database URL")
    clean, args = connect_arguments(url)
    assert dict(clean.query) == {}
    assert args == {"dsn": "postgresql://?sslmode=require"}


@pytest.mark.parametrize(
    ("raw", "database"),
    [
        ("sqlite:///relative.db", "relative.db"),
        ("sqlite:////abs/path/x.sqlite3", "/abs/path/x.sqlite3"),
        ("sqlite+pysqlite:///y.db", "y.db"),
        ("sqlite+aiosqlite:///z.db", "z.db"),
    ],
)
def test_sqlite_urls_use_aiosqlite(raw: str, database: str) -> None:
    url = normalise_url(raw, "database URL")
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == database


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("mysql://u:s3cretpw@h/x", "unsupported database 'mysql'"),
        ("notaurl://", "unsupported database 'notaurl'"),
        ("::s3cretpw::", "not a valid URL"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("postgresql://u:s3cretpw@h", "no database name"),
        ("postgresql://u:s3cretpw@h/x?sslmode=maybe", "unsupported sslmode"),
    ],
)
def test_bad_urls_are_config_errors_without_the_password(raw: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalise_url(raw, "DM_DATABASE_URL")
    message = str(caught.value)
    assert needle in message
    assert "DM_DATABASE_URL" in message
    assert "s3cretpw" not in message
    assert "\n" not in message


# -- refusals and secrets ------------------------------------------------------------------------


def test_kubernetes_without_url_refuses_embedded_default(
    ini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ConfigError, match="DM_DATABASE_URL"):
        Settings.load(config_file=ini).url()
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/app")
    assert Settings.load(config_file=ini).url().drivername == "postgresql+asyncpg"


@pytest.mark.parametrize("value", ["forever123", "-5", "nan-ish77"])
def test_invalid_lock_timeout_is_one_line_without_the_value(
    ini: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DM_LOCK_TIMEOUT", value)
    with pytest.raises(ConfigError) as caught:
        Settings.load(config_file=ini)
    message = str(caught.value)
    assert message.startswith("setting DM_LOCK_TIMEOUT: ")
    assert "\n" not in message
    assert value not in message
    assert caught.value.exit_code == 2


def test_invalid_values_from_the_ini_name_the_setting(ini: Path) -> None:
    ini.write_text(ini.read_text().replace("# dm.timeout =", "dm.timeout = 0"))
    with pytest.raises(ConfigError, match="DM_TIMEOUT"):
        Settings.load(config_file=ini)


def test_tracker_table_must_be_an_identifier(ini: Path) -> None:
    with pytest.raises(ConfigError, match="DM_TRACKER_TABLE"):
        Settings.load(config_file=ini, tracker_table="runs; DROP TABLE users")


@pytest.mark.parametrize("field", ["tracker_table", "tracker_schema", "schema_version_table"])
def test_identifiers_refuse_a_trailing_newline(ini: Path, field: str) -> None:
    with pytest.raises(ConfigError, match=f"DM_{field.upper()}"):
        Settings.load(config_file=ini, **{field: "runs\n"})


def test_password_is_hidden(ini: Path) -> None:
    url = "postgresql://app:s3cretpw@db.example:5432/app"
    settings = Settings.load(config_file=ini, database_url=url)
    assert "s3cretpw" not in repr(settings)
    assert "s3cretpw" not in str(settings)
    assert "s3cretpw" not in repr(settings.database_url)
    assert "s3cretpw" not in settings.redacted_url()
    assert "***" in settings.redacted_url()
    assert settings.url().password == "s3cretpw"  # still usable to connect


def test_missing_config_file_and_section(ini: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.ini: config file not found"):
        Settings.load(config_file=tmp_path / "nope.ini").alembic_config()
    with pytest.raises(ConfigError, match=r"no \[other\] section"):
        Settings.load(config_file=ini, ini_section="other").alembic_config()
    ini.write_text("[data_migrations]\nsqlalchemy.url =\n")
    with pytest.raises(ConfigError, match="no script_location"):
        Settings.load(config_file=ini).alembic_config()


def test_unparsable_config_file(ini: Path) -> None:
    ini.write_text("this is not an ini file\n")
    with pytest.raises(ConfigError) as caught:
        Settings.load(config_file=ini).alembic_config()
    assert "cannot parse config file" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_connect_retry_seconds_from_ini_and_environment(
    ini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings.load(config_file=ini).connect_retry_seconds == 20.0
    text = ini.read_text()
    assert "# dm.connect_retry_seconds = 20" in text
    ini.write_text(text.replace("# dm.connect_retry_seconds = 20", "dm.connect_retry_seconds = 5"))
    assert Settings.load(config_file=ini).connect_retry_seconds == 5.0
    monkeypatch.setenv("DM_CONNECT_RETRY_SECONDS", "0")
    assert Settings.load(config_file=ini).connect_retry_seconds == 0.0


@pytest.mark.parametrize("value", ["-1", "601", "soon"])
def test_invalid_connect_retry_seconds_is_refused_up_front(
    ini: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DM_CONNECT_RETRY_SECONDS", value)
    with pytest.raises(ConfigError) as caught:
        Settings.load(config_file=ini)
    assert str(caught.value).startswith("setting DM_CONNECT_RETRY_SECONDS: ")
    assert caught.value.exit_code == 2


# -- URL masking and libpq parameters (#9) -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown", "password"),
    [
        ("postgresql://u:p@ss@db:5432/app", "postgresql://u:***@db:5432/app", "p@ss"),
        ("postgresql://u:a@b@c@db/app", "postgresql://u:***@db/app", "a@b@c"),
        ("postgresql://u:p%40ss@db/app", "postgresql://u:***@db/app", "p@ss"),
        ("postgresql://u:pa/ss@db/app", "postgresql://u:***@db/app", "pa/ss"),
        (
            "postgresql://u:p?w@db/app?sslmode=require",
            "postgresql://u:***@db/app?sslmode=require",
            "p?w",
        ),
        ("postgresql://u@db/app?password=s3cret", "postgresql://u@db/app?password=***", "s3cret"),
        ("postgresql://u:pw@[::1]:5432/app", "postgresql://u:***@[::1]:5432/app", "pw"),
        ("postgresql://u@db/app", "postgresql://u@db/app", None),
        (
            "postgresql://db/app?application_name=a@b",
            "postgresql://db/app?application_name=a@b",
            None,
        ),
    ],
)
def test_userinfo_runs_to_the_last_at_and_is_masked(
    raw: str, shown: str, password: str | None
) -> None:
    assert mask_url(raw) == shown
    url = normalise_url(raw, "DM_DATABASE_URL")
    assert url.password == password
    assert url.host in ("db", "::1")
    if password:
        assert password not in redact(url)


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u@db/app?sslpassword=kpw1&sslmode=require",
        "postgresql://u@db/app?sslkey=/keys/client.key",
        "postgresql://u@db/app?passfile=/secret/pgpass",
    ],
)
def test_secret_query_values_are_masked(raw: str) -> None:
    secret = raw.split("=", 1)[1].split("&")[0]
    assert secret not in mask_url(raw)
    assert secret not in redact(normalise_url(raw, "X"))
    assert "***" in redact(normalise_url(raw, "X"))


def test_text_is_scrubbed_of_urls_and_secrets() -> None:
    text = "failed: postgresql://u:p@ss@db/app and again s3cretpw"
    assert mask_urls_in(text, ["s3cretpw"]) == "failed: postgresql://u:***@db/app and again ***"


def test_sqlite_paths_may_hold_an_at() -> None:
    assert normalise_url("sqlite:////srv/a@b/x.db", "X").database == "/srv/a@b/x.db"
    assert mask_url("sqlite:////srv/a@b/x.db") == "sqlite:////srv/a@b/x.db"


def test_libpq_parameters_become_asyncpg_arguments() -> None:
    url = normalise_url(
        "postgresql://u@db/app?connect_timeout=7&application_name=jobs"
        "&options=-c%20statement_timeout%3D5s%20-csearch_path%3Dapp&sslmode=verify-full"
        "&sslrootcert=/ca.pem&target_session_attrs=primary&host=/run/pg",
        "X",
    )
    clean, args = connect_arguments(url)
    assert dict(clean.query) == {"host": "/run/pg"}
    assert args == {
        "timeout": 7.0,
        "server_settings": {
            "statement_timeout": "5s",
            "search_path": "app",
            "application_name": "jobs",
        },
        "target_session_attrs": "primary",
        "dsn": "postgresql://?sslmode=verify-full&sslrootcert=%2Fca.pem",
    }


@pytest.mark.parametrize("key", ["statement_cache_size", "prepared_statement_cache_size"])
def test_statement_cache_size_0_marks_a_url_through_a_pooler(key: str) -> None:
    """asyncpg's usual PgBouncer switch is accepted and makes every statement unnamed and
    uncached (#29); a direct URL keeps the named, cached statements."""
    url = normalise_url(f"postgresql://u@pgbouncer:6432/app?{key}=0", "X")
    assert through_pooler(url)
    clean, args = connect_arguments(url)
    assert dict(clean.query) == {"prepared_statement_cache_size": "0"}
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() == ""
    direct = normalise_url("postgresql://u@db/app?statement_cache_size=50", "X")
    assert not through_pooler(direct)
    assert connect_arguments(direct)[1] == {"statement_cache_size": 50}
    assert not through_pooler(normalise_url("postgresql://u@db/app", "X"))


def test_statement_cache_size_must_be_a_number() -> None:
    with pytest.raises(ConfigError, match="DM_DATABASE_URL: statement_cache_size must be"):
        normalise_url("postgresql://u@db/app?statement_cache_size=off", "DM_DATABASE_URL")


def test_dotenv_in_the_working_directory_is_not_read(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("DM_DATABASE_URL=sqlite:///from_cwd.db\n")
    assert database(Settings.load(config_file=ini)) == "dm.sqlite3"
    (ini.parent / ".env").write_text("DM_ENVIRONMENT=\nDM_DATABASE_URL=sqlite:///beside.db\n")
    settings = Settings.load(config_file=ini)
    assert database(settings) == "beside.db"
    assert settings.environment == "production"


def test_dm_config_in_the_dotenv_is_refused_not_half_applied(
    ini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .env is found through the config file, so it cannot choose the config file:
    honouring it would mix the other ini's name with this ini's settings."""
    other = ini.parent / "sub" / "alembic.ini"
    other.parent.mkdir()
    other.write_text(ini.read_text())
    (ini.parent / ".env").write_text(f"DM_CONFIG={other}\n")
    monkeypatch.delenv("DM_CONFIG", raising=False)
    monkeypatch.chdir(ini.parent)
    with pytest.raises(ConfigError, match="DM_CONFIG cannot be set in the .env file"):
        Settings.load()
    assert Settings.load(config_file=other).config_file == other  # -c (or the env) works


def test_url_files_sit_at_the_environments_level(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_ini_url(ini, "sqlite:///from_ini.db")
    url_file, lock_file = tmp_path / "url", tmp_path / "lock-url"
    url_file.write_text("postgresql://app:Pw22file@db/app\n")
    lock_file.write_text(" postgresql://app:Pw22lock@direct/app ")
    monkeypatch.setenv("DM_DATABASE_URL_FILE", str(url_file))
    monkeypatch.setenv("DM_LOCK_DATABASE_URL_FILE", str(lock_file))
    settings = Settings.load(config_file=ini)
    assert settings.url().host == "db" and settings.lock_url().host == "direct"
    assert settings.url_source == f"DM_DATABASE_URL_FILE ({url_file})"
    assert "Pw22file" in settings.secrets() and "Pw22lock" in settings.secrets()
    explicit = Settings.load(config_file=ini, database_url="sqlite:///explicit.db")
    assert explicit.url().database == "explicit.db"


@pytest.mark.parametrize(
    ("variable", "plain"),
    [
        ("DM_DATABASE_URL_FILE", "DM_DATABASE_URL"),
        ("DM_DATABASE_URL_FILE", "DATABASE_URL"),
        ("DM_LOCK_DATABASE_URL_FILE", "DM_LOCK_DATABASE_URL"),
    ],
)
def test_a_url_file_and_its_plain_variable_together_are_refused(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, plain: str
) -> None:
    (tmp_path / "url").write_text("sqlite:///a.db")
    monkeypatch.setenv(variable, str(tmp_path / "url"))
    monkeypatch.setenv(plain, "sqlite:///b.db")
    with pytest.raises(ConfigError, match=f"setting {variable} and {plain} are both set"):
        Settings.load(config_file=ini)


def test_an_empty_url_file_is_refused(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "url").write_text("\n")
    monkeypatch.setenv("DM_DATABASE_URL_FILE", str(tmp_path / "url"))
    with pytest.raises(ConfigError, match="the file DM_DATABASE_URL_FILE names is empty"):
        Settings.load(config_file=ini)


@pytest.mark.parametrize("key", ["sqlalchemy.url", "dm.lock_database_url"])
def test_a_percent_encoded_password_in_the_ini_names_the_key_not_the_value(
    ini: Path, key: str
) -> None:
    from alembic.config import Config

    text = ini.read_text()
    ini.write_text(
        text.replace("\nsqlalchemy.url =\n", f"\n{key} = postgresql://u:%21s3cr3t@h/db\n")
    )
    with pytest.raises(ConfigError) as refused:
        Settings.load(config_file=ini)
    assert f"[data_migrations] {key}: a '%' must be written '%%'" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        Settings.from_alembic_config(Config(str(ini), ini_section="data_migrations"))
    assert "s3cr3t" not in str(refused.value) and key in str(refused.value)
