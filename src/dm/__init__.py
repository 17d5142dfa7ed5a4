"""dm: data migrations and maintenance scripts, run the way Alembic runs schema revisions."""

from __future__ import annotations

from .errors import DmError

__version__ = "0.1.0"

__all__ = ["DmError", "__version__"]
