"""Old path of ``dm.testing.plugin``'s settings class, kept for ``conftest.py`` files."""

from __future__ import annotations

from dm.testing import DmTestConfig

__all__ = ["DmTestConfig"]
