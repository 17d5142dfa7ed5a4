"""Files dm creates: never through a symlink, never over an existing file, private by default.

dm writes a few files of its own: the SQLite lock file and the embedded SQLite database
(which holds tracebacks), and the project ``dm init`` creates. A symlink planted at one of
these paths must not redirect the write (``O_NOFOLLOW``), a path that is not a regular file
(a FIFO, a device, a directory) is refused, and files dm creates that hold run data are
readable by their owner only (0600, whatever the umask).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dm.core.errors import ConfigError
from dm.core.errors import UsageError

PRIVATE = 0o600
"""Mode of the files dm creates that hold run data (the database, the lock file)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_regular(path: Path, what: str, *, mode: int = PRIVATE) -> int:
    """Open (creating it with ``mode`` when missing) the regular file at ``path`` for
    reading and writing; return its descriptor.

    :raises ConfigError: ``path`` is a symlink or not a regular file, or cannot be opened;
        one line naming it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(
                f"{what} {path} is a symbolic link; dm does not follow it (remove it)"
            ) from None
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        kind = os.fstat(fd).st_mode
    except OSError:  # pragma: no cover - fstat of an open descriptor does not fail
        os.close(fd)
        raise
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise ConfigError(f"{what} {path} is not a regular file; dm refuses to use it")
    return fd


def create_private(path: Path, what: str) -> bool:
    """Create ``path`` empty with mode 0600 when nothing is there; return whether it did.

    A symlink (dangling or not) or any other non-regular file at ``path`` is refused; an
    existing regular file is left as it is.

    :raises ConfigError: one line naming ``path``.
    """
    if os.path.lexists(path):
        if os.path.islink(path):
            raise ConfigError(
                f"{what} {path} is a symbolic link; dm does not follow it (remove it)"
            )
        if not path.is_file():
            raise ConfigError(f"{what} {path} is not a regular file; dm refuses to use it")
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, PRIVATE)
    except FileExistsError:  # created meanwhile: check it as an existing one
        return create_private(path, what)
    except OSError:
        return False  # let the caller's own open report a missing or read-only directory
    os.close(fd)
    return True


def write_new(path: Path, text: str) -> None:
    """Write ``text`` to a new file at ``path`` (mode 0644 under the umask).

    :raises UsageError: something (a file, a symlink, even a dangling one) is already at
        ``path``; it is left untouched.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except FileExistsError:
        raise UsageError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def append_regular(path: Path, text: str) -> None:
    """Append ``text`` to the existing regular file at ``path`` (not through a symlink).

    :raises UsageError: ``path`` is a symlink or not a regular file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"{path} is a symbolic link; dm does not follow it") from None
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file; refusing to write it")
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(text)
