"""dm: data migrations and maintenance scripts, run the way Alembic runs schema revisions.

The programmatic API (``dm.api``): ``upgrade``, ``downgrade``, ``current``, ``status``,
``check``, ``run``, ``rollback``, ``resolve``, ``verify``, ``info``, ``pause``, ``resume`` and
``cancel`` are coroutines; each has a blocking ``*_sync`` twin. See ``dm.api`` for the details.
"""

from __future__ import annotations

import typing as _typing

from .errors import DmError

if _typing.TYPE_CHECKING:
    from .api import cancel
    from .api import cancel_sync
    from .api import check
    from .api import check_sync
    from .api import current
    from .api import current_sync
    from .api import downgrade
    from .api import downgrade_sync
    from .api import info
    from .api import info_sync
    from .api import pause
    from .api import pause_sync
    from .api import resolve
    from .api import resolve_sync
    from .api import resume
    from .api import resume_sync
    from .api import rollback
    from .api import rollback_sync
    from .api import run
    from .api import run_sync
    from .api import status
    from .api import status_sync
    from .api import upgrade
    from .api import upgrade_sync
    from .api import verify
    from .api import verify_sync
    from .batching import batched
    from .hooks import autocommit
    from .hooks import execute_script

__version__ = "0.1.0"

__all__ = [
    "DmError",
    "__version__",
    "autocommit",
    "batched",
    "cancel",
    "cancel_sync",
    "check",
    "check_sync",
    "current",
    "current_sync",
    "downgrade",
    "downgrade_sync",
    "execute_script",
    "info",
    "info_sync",
    "pause",
    "pause_sync",
    "resolve",
    "resolve_sync",
    "resume",
    "resume_sync",
    "rollback",
    "rollback_sync",
    "run",
    "run_sync",
    "status",
    "status_sync",
    "upgrade",
    "upgrade_sync",
    "verify",
    "verify_sync",
]


def __getattr__(name: str) -> _typing.Any:
    """Import the programmatic API on first use, so ``import dm`` stays light."""
    if name == "batched":
        from .batching import batched

        return batched
    if name in ("autocommit", "execute_script"):
        from . import hooks

        return getattr(hooks, name)
    if name in __all__ and name not in ("DmError", "__version__"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dm' has no attribute {name!r}")
