"""``dm check --offline``: check the revision files without a database.

Like ``alembic check`` is for a schema, this is for the revision graph, in a pre-commit hook
or a CI job: every revision file is imported and checked as a run would check it (its
attributes, its parents, branch labels, ``depends_on``, ``requires_complete``), the
``requires_schema`` ids are looked up in the application's Alembic migrations when a revision
declares any, and more than one head is reported. Nothing connects to a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm.config.settings import Settings


@dataclass(frozen=True)
class OfflineCheck:
    """What ``dm check --offline`` found in the revision files (they all loaded)."""

    revisions: int
    heads: tuple[str, ...]
    allow_multiple_heads: bool

    @property
    def ok(self) -> bool:
        """Whether the check passes: at most one head, unless several are allowed."""
        return len(self.heads) <= 1 or self.allow_multiple_heads


def check_offline(settings: Settings, *, allow_multiple_heads: bool = False) -> OfflineCheck:
    """Load and check every revision file of the project; no database is used.

    :raises RevisionFileError: a revision file that does not load or breaks the graph
        (exit 2, naming it).
    :raises ConfigError: the config file, or the application's Alembic section that
        ``requires_schema`` names, cannot be read (exit 2).
    """
    from dm.core.graph import Graph
    from dm.engine.app_schema import AppSchema

    graph = Graph.from_config(settings.alembic_config())
    AppSchema.for_graph(settings, graph)  # requires_schema ids must be the application's
    return OfflineCheck(len(graph.revisions), tuple(graph.heads), allow_multiple_heads)
