"""Text from the tracker and the environment, made safe to print on a terminal.

Reasons, pod names, ``run_by`` (``$USER``) and error messages are stored as given; a control
character, a terminal escape sequence or a bidirectional override in them could rewrite
what an operator sees (erase a line, recolour it, reverse its text). dm escapes them when
it prints: ``\\x1b``, ``\\u202e``. Newlines and tabs of multi-line output are kept.
"""

from __future__ import annotations

import unicodedata

_KEPT = frozenset("\n\t")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """Return ``text`` with control and format characters (terminal escapes, ``\\r``,
    bidirectional overrides, zero-width characters) escaped; newlines and tabs kept."""
    if text.isprintable():
        return text
    return "".join(
        _escape(char)
        if char not in _KEPT and unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        else char
        for char in text
    )
