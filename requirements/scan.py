"""Check locked or installed Python packages against a vulnerability database, offline.

The database is OSV's export for the PyPI ecosystem, a file downloaded beforehand (e.g. in a
CI step that has network access, or mirrored internally) and passed with ``--db``: the zip
of JSON records (``PyPI/all.zip`` of the OSV export) or a directory of them. Nothing is
fetched; a database older than ``--max-age-days`` (default 7, by the file's time) is refused,
so a stale copy cannot pass silently.

Inputs are ``name==version`` pins: the lock files (``requirements/image.txt`` and
``requirements/build.txt`` by default, hashes and comments ignored) or ``--installed FILE``,
a list such as ``pip freeze`` prints or ``importlib.metadata`` gives from inside an image::

    python requirements/scan.py --db osv-pypi.zip
    docker run --rm --entrypoint python IMAGE -c "import importlib.metadata as m; \\
      [print(f'{d.name}=={d.version}') for d in m.distributions()]" > installed.txt
    python requirements/scan.py --db osv-pypi.zip --installed installed.txt

Exit codes: 0 nothing known affects the packages, 1 at least one finding (one line each:
package, version, advisory id and aliases, fixed versions), 2 bad input (no database, a stale
one, an unreadable file). Needs ``packaging`` (installed with pip, pytest and dm's dev extras).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zipfile
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion
from packaging.version import Version

HERE = Path(__file__).resolve().parent
DEFAULT_LOCKS = (HERE / "image.txt", HERE / "build.txt")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


class BadInput(Exception):
    """One line naming the file at fault."""


def normalise(name: str) -> str:
    """Return the PEP 503 form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(paths: Iterable[Path]) -> dict[str, str]:
    """Return ``{normalised name: version}`` of every ``name==version`` line in ``paths``."""
    pins: dict[str, str] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
        for line in text.splitlines():
            match = _PIN.match(line.strip())
            if match:
                pins[normalise(match[1])] = match[2]
    return pins


def records(db: Path, max_age_days: float) -> Iterator[dict[str, Any]]:
    """Yield the OSV records of the database file or directory ``db``."""
    if not db.exists():
        raise BadInput(f"{db}: no vulnerability database there (download OSV's PyPI export)")
    age_days = (time.time() - db.stat().st_mtime) / 86400
    if age_days > max_age_days:
        raise BadInput(
            f"{db}: the vulnerability database is {age_days:.0f} days old (more than "
            f"{max_age_days:g}); download a fresh copy"
        )
    if db.is_dir():
        for path in sorted(db.rglob("*.json")):
            yield _load(path.read_bytes(), str(path))
        return
    try:
        with zipfile.ZipFile(db) as archive:
            for name in archive.namelist():
                if name.endswith(".json"):
                    yield _load(archive.read(name), f"{db}:{name}")
    except zipfile.BadZipFile:
        raise BadInput(f"{db}: not a zip of OSV records nor a directory of them") from None


def _load(data: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        raise BadInput(f"{where}: not a JSON OSV record") from None
    if not isinstance(record, dict):
        raise BadInput(f"{where}: not a JSON OSV record")
    return record


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _in_range(version: Version, events: list[dict[str, str]]) -> bool:
    """Evaluate one OSV ``ECOSYSTEM`` range's events (introduced/fixed/last_affected)."""

    def key(event: dict[str, str]) -> tuple[int, Version]:
        value = next(iter(event.values()))
        if value == "0":
            return (0, Version("0"))
        return (1, _version(value) or Version("0"))

    affected = False
    for event in sorted(events, key=key):
        if "introduced" in event:
            start = event["introduced"]
            if start == "0" or ((bound := _version(start)) is not None and version >= bound):
                affected = True
        elif "fixed" in event:
            bound = _version(event["fixed"])
            if bound is not None and version >= bound:
                affected = False
        elif "last_affected" in event:
            bound = _version(event["last_affected"])
            if bound is not None and version > bound:
                affected = False
    return affected


def affects(record: dict[str, Any], name: str, version_text: str) -> list[str] | None:
    """Return the fixed versions when ``record`` affects ``name==version`` (None: it does not)."""
    if record.get("withdrawn"):
        return None
    version = _version(version_text)
    for affected in record.get("affected", []):
        package = affected.get("package", {})
        if package.get("ecosystem") != "PyPI" or normalise(package.get("name", "")) != name:
            continue
        fixed = [
            event["fixed"]
            for span in affected.get("ranges", [])
            for event in span.get("events", [])
            if "fixed" in event
        ]
        if version_text in affected.get("versions", []):
            return fixed
        if version is None:
            continue
        for span in affected.get("ranges", []):
            if span.get("type") == "ECOSYSTEM" and _in_range(version, span.get("events", [])):
                return fixed
    return None


def scan(pins: dict[str, str], db: Path, max_age_days: float) -> list[str]:
    """Return one line per advisory that affects a pinned package."""
    findings = []
    for record in records(db, max_age_days):
        for name, version in pins.items():
            fixed = affects(record, name, version)
            if fixed is None:
                continue
            aliases = ", ".join(record.get("aliases", []))
            ids = f"{record.get('id', '?')}" + (f" ({aliases})" if aliases else "")
            fix = f"fixed in {', '.join(fixed)}" if fixed else "no fixed version"
            findings.append(f"{name} {version}: {ids}; {fix}")
    return sorted(findings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="OSV PyPI export (zip or dir)")
    parser.add_argument("--max-age-days", type=float, default=7.0)
    parser.add_argument("--installed", type=Path, action="append", default=[])
    parser.add_argument("requirements", type=Path, nargs="*")
    args = parser.parse_args(argv)
    paths = [*args.requirements, *args.installed] or list(DEFAULT_LOCKS)
    try:
        pins = read_pins(paths)
        if not pins:
            raise BadInput(f"{', '.join(map(str, paths))}: no name==version pins found")
        findings = scan(pins, args.db, args.max_age_days)
    except BadInput as exc:
        print(f"scan: error: {exc}", file=sys.stderr)
        return 2
    for line in findings:
        print(line)
    scanned = f"{len(pins)} packages from {', '.join(map(str, paths))}"
    if findings:
        print(f"scan: {len(findings)} known vulnerabilities in {scanned}", file=sys.stderr)
        return 1
    print(f"scan: no known vulnerability in {scanned}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
