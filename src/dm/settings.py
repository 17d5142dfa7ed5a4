"""Old path of ``dm.config.settings``'s ``Settings`` (``settings=`` of the programmatic API)."""

from __future__ import annotations

from dm.config.settings import Settings

__all__ = ["Settings"]
