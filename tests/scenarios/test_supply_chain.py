"""The supply chain (issue #22, section 5): the locked dependencies are checked against a
vulnerability database read offline from a file (``requirements/scan.py``), which refuses a
stale copy. The image by digest is in test_deploy.py; the image's contents in test_image.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

SCAN = REPO / "requirements" / "scan.py"
LOCK = (REPO / "requirements" / "image.txt").read_text()


def pinned(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)", LOCK, re.M)
    assert match, name
    return match[1]


def record(
    osv_id: str, name: str, *, events: list[dict[str, str]] | None = None, **extra: Any
) -> dict[str, Any]:
    affected: dict[str, Any] = {"package": {"ecosystem": "PyPI", "name": name}}
    if events is not None:
        affected["ranges"] = [{"type": "ECOSYSTEM", "events": events}]
    affected.update(extra.pop("affected_extra", {}))
    return {"id": osv_id, "affected": [affected], **extra}


def scan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCAN), *args], capture_output=True, text=True, timeout=60
    )


def write_db(directory: Path, *records: dict[str, Any]) -> Path:
    directory.mkdir()
    for item in records:
        (directory / f"{item['id']}.json").write_text(json.dumps(item))
    return directory


def test_a_known_vulnerability_in_the_lock_files_fails_the_scan(tmp_path: Path) -> None:
    alembic, sqlalchemy = pinned("alembic"), pinned("sqlalchemy")
    db = write_db(
        tmp_path / "osv",
        record(
            "PYSEC-0001",
            "Alembic",
            events=[{"introduced": "0"}, {"fixed": "999.0"}],
            aliases=["CVE-2099-0001"],
        ),
        record("GHSA-0002", "SQLAlchemy", affected_extra={"versions": [sqlalchemy]}),
        record("PYSEC-0003", "alembic", events=[{"introduced": "0"}, {"fixed": "0.1"}]),
        record("PYSEC-0004", "alembic", events=[{"introduced": "0"}], withdrawn="2026-01-01"),
        record("PYSEC-0005", "click", events=[{"introduced": "0"}, {"last_affected": "1.0"}]),
    )
    ran = scan("--db", str(db))
    assert ran.returncode == 1, ran.stderr
    assert ran.stdout.splitlines() == [
        f"alembic {alembic}: PYSEC-0001 (CVE-2099-0001); fixed in 999.0",
        f"sqlalchemy {sqlalchemy}: GHSA-0002; no fixed version",
    ]
    assert "2 known vulnerabilities" in ran.stderr


def test_a_clean_scan_from_a_zip_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "all.zip"
    with zipfile.ZipFile(db, "w") as archive:
        old = record("PYSEC-0003", "alembic", events=[{"introduced": "0"}, {"fixed": "0.1"}])
        archive.writestr("PYSEC-0003.json", json.dumps(old))
    ran = scan("--db", str(db))
    assert (ran.returncode, ran.stdout) == (0, ""), ran.stderr
    assert "no known vulnerability" in ran.stderr


def test_installed_list_is_scanned_too(tmp_path: Path) -> None:
    installed = tmp_path / "installed.txt"
    installed.write_text("pip==23.0.1\nDm==0.1.0\n")
    db = write_db(
        tmp_path / "osv",
        record("PYSEC-0006", "pip", events=[{"introduced": "0"}, {"fixed": "23.3"}]),
    )
    ran = scan("--db", str(db), "--installed", str(installed))
    assert ran.returncode == 1
    assert ran.stdout.splitlines() == ["pip 23.0.1: PYSEC-0006; fixed in 23.3"]


@pytest.mark.parametrize("problem", ["missing", "stale", "not a zip"])
def test_no_usable_database_is_one_line_and_exit_2(tmp_path: Path, problem: str) -> None:
    db = tmp_path / "osv.zip"
    if problem == "stale":
        with zipfile.ZipFile(db, "w"):
            pass
        old = time.time() - 30 * 86400
        os.utime(db, (old, old))
    elif problem == "not a zip":
        db.write_text("not a zip")
    ran = scan("--db", str(db))
    assert ran.returncode == 2
    (line,) = ran.stderr.splitlines()
    assert line.startswith(f"scan: error: {db}: ")
    if problem == "stale":
        assert "30 days old" in line
