"""What several verb families share."""

from __future__ import annotations

from dm.core.errors import UnknownTarget
from dm.core.graph import Graph
from dm.core.graph import Revision


def one_revision(graph: Graph, revision: str) -> Revision:
    found = graph.resolve(revision)
    if not found:
        raise UnknownTarget(f"no revision matches {revision!r}")
    if len(found) > 1:
        names = ", ".join(s.revision for s in found)
        raise UnknownTarget(f"{revision!r} names several revisions ({names}); name one")
    return graph.revision(found[0].revision)


def plain_id(revision: str) -> bool:
    """Return whether ``revision`` looks like a revision id rather than a symbolic target."""
    return bool(revision) and all(c.isalnum() or c in "_-" for c in revision)
