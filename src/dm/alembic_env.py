"""Old path of ``dm.alembic.env``: the ``env.py`` of projects made by earlier versions imports
it."""

from __future__ import annotations

from dm.alembic.env import run

__all__ = ["run"]
