"""Schema prerequisites: what a revision's ``requires_schema`` asks of the application's own
Alembic schema migrations, and whether the database has it.

The application's Alembic setup is read as Alembic reads it: its section of a config file
(``[alembic]`` of dm's ``alembic.ini`` by default) gives the script directory, whose
revision graph decides what "has schema revision X" means — X is one of the revisions in
the application's version table (``alembic_version``) or an ancestor of one (``depends_on``
included). A missing version table means no schema revision yet. Nothing here writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError

from dm.core.errors import ConfigError
from dm.core.errors import RevisionFileError
from dm.core.errors import one_line
from dm.core.graph import Graph
from dm.core.graph import Revision
from dm.core.graph import display_path
from dm.core.planning import SchemaState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from dm.config.settings import Settings

SETTINGS_HINT = (
    "DM_SCHEMA_CONFIG / DM_SCHEMA_ALEMBIC_SECTION (dm.schema_config, dm.schema_alembic_section)"
)


class AppSchema:
    """The application's Alembic schema migrations: its script directory and version table."""

    def __init__(
        self, script_dir: ScriptDirectory, version_table: str, version_schema: str | None
    ) -> None:
        self.script_dir = script_dir
        self.version_table = version_table
        self.version_schema = version_schema

    @classmethod
    def for_graph(cls, settings: Settings, graph: Graph) -> AppSchema | None:
        """Return the application's schema migrations when a revision of ``graph`` declares
        ``requires_schema`` (None otherwise: nothing is read), with every id checked.

        :raises ConfigError: the application's Alembic section cannot be read.
        :raises RevisionFileError: a revision requires an id the application lacks.
        """
        requiring = [rev for rev in graph.revisions if rev.requires_schema]
        if not requiring:
            return None
        schema = cls.load(settings, requiring[0])
        schema.check(requiring)
        return schema

    @classmethod
    def load(cls, settings: Settings, first: Revision) -> AppSchema:
        """Load the application's script directory named by the settings.

        :param first: a revision declaring ``requires_schema``, named in errors.
        """
        from alembic.config import Config

        path = Path(settings.schema_config or settings.config_file)
        section = settings.schema_alembic_section
        why = f"{display_path(first.path)} declares requires_schema"
        if not path.is_file():
            raise ConfigError(
                f"{path}: the application's Alembic config file is not found ({why}; set "
                f"{SETTINGS_HINT})"
            )
        config = Config(str(path), ini_section=section)
        try:
            found = config.file_config.has_section(section)
            location = config.get_main_option("script_location") if found else None
        except Exception as exc:  # an unreadable file: configparser's error
            raise ConfigError(f"{path}: cannot read: {one_line(exc)}") from None
        if not found or not location:
            missing = (
                f"no [{section}] section" if not found else f"[{section}] has no script_location"
            )
            raise ConfigError(
                f"{path}: {missing} for the application's Alembic schema migrations ({why}; "
                f"set {SETTINGS_HINT})"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                script_dir = ScriptDirectory.from_config(config)
                script_dir.revision_map.heads  # noqa: B018 - loads the revision files
        except (CommandError, RevisionError) as exc:
            raise ConfigError(
                f"{path}: [{section}]: cannot load the application's schema revisions: "
                f"{one_line(exc)}"
            ) from None
        except Exception as exc:  # a schema revision file that does not import
            raise ConfigError(
                f"{path}: [{section}]: cannot load the application's schema revisions: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from None
        return cls(script_dir, settings.schema_version_table, settings.schema_version_schema)

    def check(self, revisions: Iterable[Revision]) -> None:
        """Refuse a ``requires_schema`` id that is no revision of the application.

        :raises RevisionFileError: naming the file and the id.
        """
        for rev in revisions:
            for required in rev.requires_schema:
                try:
                    found = self.script_dir.revision_map.get_revision(required)
                except (CommandError, RevisionError):
                    found = None
                if found is None or found.revision != required:
                    raise RevisionFileError(
                        f"{display_path(rev.path)}: requires_schema {required!r} names no "
                        f"revision of the application's Alembic schema migrations in "
                        f"{display_path(self.script_dir.versions)}"
                    )

    async def read(self, conn: AsyncConnection) -> SchemaState:
        """Read the application's version table in the caller's transaction."""
        current = await conn.run_sync(self._versions)
        applied: set[str] = set()
        for revision in current:
            try:
                found = self.script_dir.iterate_revisions(revision, "base")
                applied.update(script.revision for script in found)
            except (CommandError, RevisionError):  # a revision this code does not know
                continue
        return SchemaState(current, frozenset(applied))

    def _versions(self, sync: sa.Connection) -> tuple[str, ...]:
        schema = self.version_schema if sync.dialect.name == "postgresql" else None
        if not sa.inspect(sync).has_table(self.version_table, schema=schema):
            return ()
        table = sa.table(self.version_table, sa.column("version_num"), schema=schema)
        rows = sync.execute(sa.select(table.c.version_num)).scalars()
        return tuple(sorted(str(row) for row in rows))
