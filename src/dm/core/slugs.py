"""Revision messages and their slugs, checked before ``dm revision`` writes a file.

A revision file is named ``<date>_<time>_<rev>_<slug>.py``, the slug being the message in
snake_case (Alembic's rule: the message's words joined by ``_``, truncated), spelt in
ASCII. dm refuses a message whose slug is unreadable, too short, a Python keyword, contains
a path separator, or repeats an existing revision's slug (unless explicitly allowed).
"""

from __future__ import annotations

import keyword
import re
import unicodedata
from collections.abc import Iterable

from dm.core.errors import UsageError

MIN_LENGTH = 3
_WORD = re.compile(r"\w+")
_SNAKE_CASE = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*_?")
_LETTER = re.compile(r"[a-z]")


def slugify(message: str, limit: int = 40) -> str:
    """Return the file-name slug of ``message``: Alembic's rule (its words joined by ``_``,
    lower case, truncated) on the message spelt in ASCII (``überprüfen Kunden`` gives
    ``uberprufen_kunden``; ``ß`` gives ``ss``)."""
    return alembic_slug(to_ascii(message), limit)


def alembic_slug(message: str, limit: int = 40) -> str:
    """Return the slug Alembic itself puts in the file name for ``message`` (any script)."""
    slug = "_".join(_WORD.findall(message)).lower()
    if len(slug) > limit:
        slug = slug[:limit].rsplit("_", 1)[0] + "_"
    return slug


def to_ascii(message: str) -> str:
    """Return ``message`` with accents dropped and letters spelt in ASCII where Unicode
    says how; what cannot be spelt so is left out."""
    decomposed = unicodedata.normalize("NFKD", message.replace("ß", "ss").replace("ẞ", "SS"))
    return decomposed.encode("ascii", "ignore").decode("ascii")


def check_message(
    message: str,
    existing: Iterable[str] = (),
    *,
    limit: int = 40,
    allow_duplicate: bool = False,
) -> str:
    """Return the slug of ``message``, or refuse it.

    :param existing: the messages (descriptions) of the revisions already there.
    :raises UsageError: naming the rule the message breaks.
    """
    if "/" in message or "\\" in message:
        raise UsageError(f"revision message {message!r} must not contain a path separator")
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in message):
        raise UsageError(
            f"revision message {message!r} must be one line of printable text "
            "(no control characters, terminal escapes or bidirectional overrides)"
        )
    slug = slugify(message, limit)
    if not slug or not _SNAKE_CASE.fullmatch(slug) or not _LETTER.search(slug):
        raise UsageError(
            f"revision message {message!r} gives the slug {slug!r}: use words of ASCII "
            "letters and digits, with at least one letter, e.g. 'backfill display names'"
        )
    if len(slug.replace("_", "")) < MIN_LENGTH:
        raise UsageError(
            f"revision message {message!r} is too short: its slug {slug!r} needs at least "
            f"{MIN_LENGTH} letters or digits"
        )
    if keyword.iskeyword(slug.rstrip("_")):
        raise UsageError(f"revision message {message!r}: {slug!r} is a Python keyword")
    if not allow_duplicate:
        for other in existing:
            if slugify(other, limit) == slug:
                raise UsageError(
                    f"revision message {message!r}: an existing revision ({other!r}) has "
                    f"the same slug {slug!r}; describe the difference, or pass "
                    "--allow-duplicate-slug"
                )
    return slug


def docstring_safe(message: str) -> str:
    """Return ``message`` escaped for a revision template's docstring.

    Templates paste the message raw between triple quotes: a quote in it could end the
    docstring and turn the rest into code run at every import. Every quote and backslash
    is escaped, so the docstring's value (the description dm shows) is the message itself.
    """
    return message.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
