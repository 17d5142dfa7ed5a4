"""A database role without a right dm needs: one line naming the object and the right.

PostgreSQL reports ``permission denied for table script_run_tracker`` (SQLSTATE 42501,
``InsufficientPrivilege``) without the right that is missing; the statement dm sent says
which: ``INSERT`` on a table, ``USAGE`` on a sequence or schema, ``CREATE`` on the schema
(a new table) or the database (a new schema). The grants each of dm's roles needs are in
``docs/security.md``.
"""

from __future__ import annotations

import re

from dm.core.errors import UsageError
from dm.core.transient import exception_chain

INSUFFICIENT_PRIVILEGE = "42501"
_DENIED = re.compile(r"permission denied for (?P<kind>[a-z ]+?) (?P<name>\"[^\"]+\"|\S+)")
_VERBS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


class PrivilegeMissing(UsageError):
    """The database role lacks a right dm needs; nothing was changed by the statement."""


def privilege_problem(exc: BaseException) -> PrivilegeMissing | None:
    """Return the missing right ``exc`` reports, or None when it is not a permission error."""
    denied = None
    statement = None
    for link in exception_chain(exc):
        statement = statement or getattr(link, "statement", None)
        sqlstate = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if sqlstate == INSUFFICIENT_PRIVILEGE or type(link).__name__ in (
            "InsufficientPrivilegeError",
            "InsufficientPrivilege",
        ):
            denied = link
    if denied is None:
        return None
    text = " ".join(str(getattr(denied, "orig", None) or denied).split())
    match = _DENIED.search(text)
    if match is None:
        return PrivilegeMissing(f"the database role lacks a right dm needs: {text}")
    kind, name = match["kind"], match["name"].strip('"')
    right = _right(kind, str(statement or ""))
    return PrivilegeMissing(
        f"the database role lacks {right} on {kind} {name} (grant it, or run this command "
        "as a role that has it; see 'Grants dm needs' in docs/security.md)"
    )


def _right(kind: str, statement: str) -> str:
    """Return the right a statement needs on an object of ``kind``."""
    words = statement.lstrip().split(None, 2)
    verb = words[0].upper() if words else ""
    if kind == "sequence":
        return "USAGE"
    if kind == "database":
        return "CREATE" if verb == "CREATE" else "CONNECT"
    if kind == "schema":
        return "CREATE" if verb == "CREATE" else "USAGE"
    if verb == "WITH":  # a CTE: the statement's first write names the right
        found = re.search(r"\b(INSERT|UPDATE|DELETE)\b", statement, re.IGNORECASE)
        verb = found.group(1).upper() if found else "SELECT"
    if verb in _VERBS:
        return verb
    if verb in ("ALTER", "DROP", "CREATE"):
        return "ownership"
    return "a right"
