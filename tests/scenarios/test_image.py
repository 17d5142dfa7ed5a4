"""The container image, built from the Dockerfile and run for real against PostgreSQL.

Marked ``image`` and skipped, saying why, when no Docker engine answers or the base image
is missing. The base defaults to the Dockerfile's pinned ``BASE_IMAGE``; set
``DM_TEST_BASE_IMAGE`` to build on another one (e.g. a local stand-in). Containers use the
host's network and reach the test PostgreSQL server on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import dm
from conftest import REPO
from conftest import Database
from conftest import wait_for

pytestmark = [pytest.mark.image, pytest.mark.postgres]

DOCKERFILE_BASE = re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
EXAMPLES = sorted(
    re.search(r'^revision(?:: str)? = "(\w+)"', p.read_text(), re.M)[1]  # type: ignore[index]
    for p in (REPO / "data_migrations" / "versions").glob("*.py")
)
NO_DATABASE = (
    "dm: error: cannot create the SQLite lock file /app/dm.sqlite3.script_run_tracker.lock: "
    "{reason}; set DM_DATABASE_URL to the database to migrate"
)


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """Build the image once per module; skip when no Docker engine or base image is here."""
    if shutil.which("docker") is None or docker("info", timeout=30).returncode != 0:
        pytest.skip("no Docker engine answers (`docker info` failed): image tests need one")
    assert DOCKERFILE_BASE
    base = os.environ.get("DM_TEST_BASE_IMAGE", DOCKERFILE_BASE[1])
    if docker("image", "inspect", base, timeout=30).returncode != 0:
        pytest.skip(f"base image {base} is not available locally (set DM_TEST_BASE_IMAGE)")
    tag = f"dm:test-{uuid.uuid4().hex[:8]}"
    build = docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"VERSION={dm.__version__}",
        "-t",
        tag,
        str(REPO),
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    yield tag
    docker("image", "rm", "--force", tag)


def run(image: str, *args: str, options: tuple[str, ...] = (), timeout: float = 120) -> Any:
    """``docker run --rm --network host OPTIONS IMAGE ARGS``."""
    return docker("run", "--rm", "--network", "host", *options, image, *args, timeout=timeout)


def url_env(db: Database) -> tuple[str, ...]:
    return ("-e", f"DM_DATABASE_URL={db.url}")


def latest_rows(db: Database) -> dict[str, Any]:
    return {row.revision: row for row in db.tracker()}


def test_upgrade_applies_and_records_the_example_revisions(
    image: str, postgres_db: Database
) -> None:
    before = run(image, "check", options=url_env(postgres_db))
    assert before.returncode == 4, before.stdout + before.stderr
    result = run(image, "upgrade", "heads", options=url_env(postgres_db))
    assert result.returncode == 0, result.stderr
    rows = latest_rows(postgres_db)
    assert sorted(rows) == EXAMPLES
    assert {row.status for row in rows.values()} == {"success", "skipped"}
    assert {row.run_by.split("@")[0] for row in rows.values()} == {"dm"}
    assert {row.dm_version for row in rows.values()} == {dm.__version__}
    after = run(image, "check", options=url_env(postgres_db))
    assert after.returncode == 0, after.stdout + after.stderr


def test_job_manifest_runs_as_written(image: str, postgres_db: Database) -> None:
    """The container of deploy/kubernetes/job.yaml, its args, env and securityContext
    mapped onto docker: read-only root, no capabilities, no new privileges, its user."""
    job = yaml.safe_load((REPO / "deploy" / "kubernetes" / "job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    options = [
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--user={security['runAsUser']}:{security['runAsGroup']}",
        "--tmpfs=/tmp",  # the emptyDir volume
    ]
    for var in container["env"]:
        if "value" in var:
            options += ["-e", f"{var['name']}={var['value']}"]
        elif "secretKeyRef" in var["valueFrom"]:
            options += ["-e", f"{var['name']}={postgres_db.url}"]
        else:
            options += ["-e", f"{var['name']}=dm-upgrade-abcde"]
    result = run(image, *container["args"], options=tuple(options))
    assert result.returncode == 0, result.stderr
    logs = [line for line in result.stderr.splitlines() if line]
    assert logs and all(line.startswith('{"ts": ') for line in logs), logs
    assert {row.pod_name for row in postgres_db.tracker()} == {"dm-upgrade-abcde"}

    deployment = yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    gate = run(image, *init["args"], "--json", options=(*url_env(postgres_db), "--read-only"))
    assert gate.returncode == 0, gate.stderr
    assert '"ok": true' in gate.stdout


def test_random_uid_in_group_0_works(image: str, postgres_db: Database) -> None:
    """OpenShift runs images as an arbitrary uid in group 0, with no passwd entry."""
    options = ("--user=1000123456:0", "--read-only", *url_env(postgres_db))
    result = run(image, "upgrade", "heads", options=options)
    assert result.returncode == 0, result.stderr
    assert {row.run_by.split("@")[0] for row in postgres_db.tracker()} == {"1000123456"}
    home = run(
        image,
        "-c",
        'test -d "$HOME" && test -w "$HOME"',
        options=("--user=1000123456:0", "--entrypoint=sh"),
    )
    assert home.returncode == 0, home.stderr


def test_three_containers_at_once_do_the_work_once(image: str, postgres_db: Database) -> None:
    procs = [
        subprocess.Popen(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "host",
                *url_env(postgres_db),
                "-e",
                f"DM_POD_NAME=pod-{i}",
                image,
                "upgrade",
                "heads",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outcomes = [(proc.communicate(timeout=180)[1], proc.returncode) for proc in procs]
    assert [code for _, code in outcomes] == [0, 0, 0], outcomes
    rows = postgres_db.tracker()
    assert Counter(row.revision for row in rows) == Counter(dict.fromkeys(EXAMPLES, 1))
    assert len({row.pod_name for row in rows}) == 1  # one pod did all of it


def _blocking_project(tmp_path: Path) -> Path:
    """A project whose one revision writes a row, then waits (for docker stop)."""
    from dm import verbs

    root = tmp_path / "proj"
    verbs.init(root)
    (root / "data_migrations" / "versions" / "a1_block.py").write_text(
        textwrap.dedent(
            '''\
            """Wait for a signal"""
            import asyncio
            import sqlalchemy as sa
            revision = "a1"
            down_revision = None
            branch_labels = None
            depends_on = None

            async def upgrade(session):
                await session.execute(sa.text("CREATE TABLE marks (x INTEGER)"))
                await session.execute(sa.text("INSERT INTO marks VALUES (1)"))
                await asyncio.sleep(300)
            '''
        )
    )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_docker_stop_exits_143_and_records_the_attempt_interrupted(
    image: str, postgres_db: Database, tmp_path: Path
) -> None:
    root = _blocking_project(tmp_path)
    name = f"dm-stop-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "--name",
            name,
            *url_env(postgres_db),
            "-v",
            f"{root}:/proj:ro",
            "-e",
            "DM_CONFIG=/proj/alembic.ini",
            image,
            "upgrade",
            "heads",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or any(r.status == "pending" for r in _tracker_or_empty(postgres_db))
            ),
            timeout=120,
        )
        assert proc.poll() is None, proc.communicate()
        started = time.monotonic()
        stop = docker("stop", "--time", "30", name)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(30) == 143
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            docker("kill", name)
    _, stderr = proc.communicate()
    assert "dm: error: interrupted by SIGTERM" in stderr
    (row,) = postgres_db.tracker()
    assert (row.revision, row.status, row.reason) == ("a1", "failed", "interrupted")
    assert not postgres_db.query("SELECT 1 FROM pg_tables WHERE tablename = 'marks'")  # rolled back


def _tracker_or_empty(db: Database) -> list[Any]:
    try:
        return db.tracker()
    except Exception:  # the table does not exist yet
        return []


@pytest.mark.parametrize(
    ("options", "reason"),
    [((), "Permission denied"), (("--read-only",), "Read-only file system")],
    ids=["writable-root", "read-only-root"],
)
def test_no_database_url_says_what_to_set(
    image: str, options: tuple[str, ...], reason: str
) -> None:
    result = run(image, "upgrade", "heads", options=options)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(NO_DATABASE.format(reason=reason)), result.stderr


def test_image_is_lean_and_precompiled(image: str) -> None:
    python = ("--entrypoint=python",)
    no_pip = run(
        image,
        "-c",
        "import importlib.util as u; print(u.find_spec('pip'), u.find_spec('setuptools'))",
        options=python,
    )
    assert no_pip.stdout.strip() == "None None", no_pip.stdout + no_pip.stderr
    assert (
        run(image, "-c", "test ! -e /opt/dm/bin/pip", options=("--entrypoint=sh",)).returncode == 0
    )
    # The whole image, the base's system Python included: no pip, setuptools or wheel, no
    # ensurepip to bring pip back, no bundled wheel, no pip command.
    find = (
        "find / -xdev \\( -name pip -o -name 'pip-*' -o -name 'pip[0-9]*' -o -name setuptools"
        " -o -name 'setuptools-*' -o -name ensurepip -o -name '*.whl' \\) -print 2>/dev/null;"
        " for python in /usr/local/bin/python3 /usr/bin/python3 /opt/dm/bin/python; do"
        ' [ -x "$python" ] && "$python" -c "from importlib.util import find_spec as f;'
        " print('$python', f('pip'), f('setuptools'), f('ensurepip'))\";"
        " done; command -v pip pip3 || true"
    )
    leftovers = run(image, "-c", find, options=("--entrypoint=sh",))
    lines = leftovers.stdout.splitlines()
    found = [line for line in lines if not line.endswith(" None None None")]
    assert found == [], leftovers.stdout + leftovers.stderr
    assert any(line.startswith("/opt/dm/bin/python ") for line in lines), leftovers.stdout
    # Nothing dm imports to start is compiled at start: every module comes from a .pyc.
    verbose = run(image, "-v", "-m", "dm", "--version", options=python)
    assert verbose.returncode == 0, verbose.stderr
    loaded = re.findall(r"^# code object from '?([^'\n]+)'?$", verbose.stderr, re.M)
    assert len(loaded) > 50
    assert [path for path in loaded if not path.endswith(".pyc")] == []
    labels = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout
    assert f'"org.opencontainers.image.version":"{dm.__version__}"' in labels
    assert '"org.opencontainers.image.source"' in labels
