"""Alembic's environment around Alembic-style hooks: ``from alembic import context``.

Alembic runs a revision inside an ``EnvironmentContext`` (the ``context`` of ``env.py``);
migrations written for it ask that environment things: ``context.is_offline_mode()``,
``context.config``, ``context.get_x_argument()``, ``op.get_context().config``,
``op.get_context().get_current_revision()``. dm establishes one around every sync hook,
under ``dm`` and under Alembic's command API alike:

- its ``config`` is the project's Alembic ``Config`` (the caller's own ``Config`` under
  Alembic's command API), with the ``-x key=value`` arguments given to ``dm -x`` (or to
  ``alembic -x``) in ``config.cmd_opts.x``;
- offline mode is false (dm has no ``--sql`` mode);
- the current revision is read from dm's tracker: the heads of the applied data migrations,
  as Alembic's version table would hold them while the revision runs (the revision itself
  not yet among them).

A database (``runtime.open_database``, ``shared.open_shared``) makes its environment current
with :func:`environment`; ``dm.engine.hooks`` reads it and calls :func:`established` around a hook.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy.util import await_only

from dm.core import alembic_compat as compat

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.ext.asyncio import AsyncConnection

    from dm.config.settings import Settings
    from dm.engine.tracker import Tracker


_x_arguments: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "dm_x_arguments", default=()
)
_current: contextvars.ContextVar[HookEnvironment | None] = contextvars.ContextVar(
    "dm_hook_environment", default=None
)


def set_x_arguments(arguments: Sequence[str]) -> None:
    """Record ``dm -x key=value`` arguments for the hooks of this command."""
    _x_arguments.set(tuple(arguments))


class HookEnvironment:
    """What a hook's ``EnvironmentContext`` is made of: the project's Config and tracker."""

    def __init__(self, settings: Settings, tracker: Tracker) -> None:
        self.settings = settings
        self.tracker = tracker
        self.x_arguments = _x_arguments.get()
        self._config: Config | None = None

    def config(self) -> Config:
        """Return the project's Alembic ``Config`` (built once, on first use)."""
        if self._config is None:
            config = self.settings.hook_config()
            if config.cmd_opts is None and self.x_arguments:  # dm -x (never the caller's)
                config.cmd_opts = argparse.Namespace(x=list(self.x_arguments))
            self._config = config
        return self._config


@contextlib.contextmanager
def environment(settings: Settings, tracker: Tracker) -> Iterator[None]:
    """Make the environment of ``settings`` the one hooks run in, inside the block."""
    token = _current.set(HookEnvironment(settings, tracker))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> HookEnvironment | None:
    """Return the hook environment of the database in use (None outside dm's runs)."""
    return _current.get()


@contextlib.contextmanager
def established(
    env: HookEnvironment | None,
    migration_context: MigrationContext,
    conn: AsyncConnection | None,
) -> Iterator[None]:
    """Establish Alembic's ``EnvironmentContext`` around a sync hook (``alembic.context``).

    ``migration_context`` (what ``op.get_context()`` returns) gets it as its environment,
    and reads its current heads from dm's tracker on ``conn``. Without ``env`` (a hook
    called outside dm's commands) nothing is established.
    """
    if env is None:
        yield
        return
    config = env.config()
    context = EnvironmentContext(config, ScriptDirectory.from_config(config), as_sql=False)
    compat.set_migration_context(context, migration_context)
    migration_context.environment_context = context
    migration_context.get_current_heads = _heads_reader(  # type: ignore[method-assign]
        env, config, conn
    )
    with compat.environment_installed(context):
        yield


def _heads_reader(
    env: HookEnvironment, config: Config, conn: AsyncConnection | None
) -> Callable[[], tuple[str, ...]]:
    def get_current_heads() -> tuple[str, ...]:
        from alembic.util import CommandError

        from dm.core.graph import Graph
        from dm.core.planning import applied_revisions

        if conn is None:
            raise CommandError(
                "get_current_revision() answers from dm's tracker only inside a revision's hook"
            )
        latest = await_only(env.tracker.read_latest(conn))
        return Graph.from_config(config).applied_heads(applied_revisions(latest))

    return get_current_heads
