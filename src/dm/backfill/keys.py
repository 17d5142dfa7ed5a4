"""Keys in checkpoints: JSON values, each readable back as the key it was.

Integers and strings are stored as they are; other key types as ``{"<type>": "<text>"}``.
"""

from __future__ import annotations

import decimal
import uuid
from collections.abc import Callable
from datetime import date
from datetime import datetime
from typing import Any

from dm.backfill.errors import BatchingError

_TAGGED: dict[str, Callable[[str], Any]] = {
    "uuid": uuid.UUID,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "decimal": decimal.Decimal,
}


def encode_key(value: Any, revision: str) -> Any:
    """Return ``value`` as it is stored in a checkpoint (JSON).

    :raises BatchingError: the key's type cannot be stored.
    """
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | str):
        return value
    elif isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    elif isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    elif isinstance(value, date):
        return {"date": value.isoformat()}
    elif isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    raise BatchingError(
        f"revision {revision}: a key of type {type(value).__name__} cannot be stored in a "
        "checkpoint; use an integer, string, UUID, date, datetime or numeric key"
    )


def decode_key(stored: Any) -> Any:
    """Return the key value ``encode_key`` stored as ``stored``."""
    if isinstance(stored, dict):
        ((tag, text),) = stored.items()
        return _TAGGED[tag](text)
    if isinstance(stored, int | str) and not isinstance(stored, bool):
        return stored
    raise ValueError(f"not a stored key: {stored!r}")
