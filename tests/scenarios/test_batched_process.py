"""Resumable batches under real crashes: ``dm upgrade`` SIGKILLed and SIGTERMed mid-run.

A ``transactional = False`` revision walks a 200,000-row table in batches of 1,000 and adds
one to every row's counter. It is killed several times at random instants (found by
polling the checkpoint it commits, plus a random delay so the kill lands anywhere in a
batch), alternately with SIGKILL and SIGTERM, then resumed to the end. Every row's counter
must be exactly 1: no batch lost, none applied twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import random
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest

from conftest import Project
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for

pytestmark = [pytest.mark.process, pytest.mark.slow]

ROWS = 200_000
SIZE = 1_000
ROUNDS = 4
REV = "b47c4e5d0a11"

BODY = f"""
query = sa.select(items.c.id)
async for batch in batched(session, query, key=items.c.id, size={SIZE}):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    await asyncio.sleep(0.02)  # the batch's write is made but not committed yet
"""

EXTRA = """
import asyncio
from dm import batched

transactional = False
items = sa.table("items", sa.column("id"), sa.column("hits"))
"""

TRACKER_EXISTS = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE name = 'script_run_tracker'",
    "postgresql": "SELECT 1 FROM pg_tables WHERE tablename = 'script_run_tracker'",
}


def make_items(project: Project) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    if project.db.kind == "postgresql":
        fill = f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) AS g"
    else:
        fill = (
            f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS}) "
            "INSERT INTO items SELECT x, 0 FROM c"
        )
    project.db.query(fill)


def running_checkpoint(project: Project, after_id: int) -> dict[str, Any] | None:
    """The checkpoint of the attempt running now (pending, newer than ``after_id``), if any."""
    if not project.db.query(TRACKER_EXISTS[project.db.kind]):
        return None
    rows = project.db.query(
        "SELECT checkpoint FROM script_run_tracker WHERE status = 'pending' AND id > :after",
        after=after_id,
    )
    if not rows or rows[0].checkpoint is None:
        return None
    value = rows[0].checkpoint
    return json.loads(value) if isinstance(value, str) else dict(value)


def last_attempt_id(project: Project) -> int:
    if not project.db.query(TRACKER_EXISTS[project.db.kind]):
        return 0
    return int(project.db.query("SELECT max(id) AS id FROM script_run_tracker")[0].id or 0)


def rows_done(project: Project, after_id: int) -> int:
    return int((running_checkpoint(project, after_id) or {}).get("rows_done", 0))


def counters(project: Project) -> dict[int, int]:
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    return {r.hits: r.n for r in rows}


def test_every_row_is_processed_exactly_once_across_kills(project: Project) -> None:
    seed = int(os.environ.get("DM_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    make_items(project)
    project.write(REV, None, BODY, extra=EXTRA)
    kills = [signal.SIGKILL if i % 2 == 0 else signal.SIGTERM for i in range(ROUNDS)]
    context = f"seed {seed}"

    for number, kill in enumerate(kills):
        # Each kill comes a random number of batches after the work already committed.
        target = counters(project).get(1, 0) + rng.randrange(5, 30) * SIZE
        context += f", round {number + 1} target {target}"
        after = last_attempt_id(project)
        process = spawn_dm(project, "upgrade", "heads", "--lock-timeout", "30")
        try:
            wait_for(
                lambda t=target, a=after, p=process: (
                    p.poll() is not None or rows_done(project, a) >= t
                ),
                timeout=60,
            )
            if process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"{context}: dm ended before the kill: {stderr}")
            if number == 0:
                status = run_dm(project, "status", "--json")
                (row,) = json.loads(status.stdout)
                assert row["status"] == "pending", context
                assert row["checkpoint"]["rows_done"] >= target, context
            time.sleep(rng.uniform(0, 0.025))  # lands anywhere in a batch; not a sync point
            process.send_signal(kill)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        if kill is signal.SIGTERM:
            assert process.returncode == 143, f"{context}: {stderr}"
            assert "interrupted by SIGTERM" in stderr, context
        else:
            assert process.returncode == -signal.SIGKILL, context
            if number == 0:  # what an operator sees before the next run: where it resumes
                shown = run_dm(project, "status").stdout
                assert "its run died" in shown, (context, shown)
                assert "rows done, last key" in shown and "resumes there" in shown, shown
        done = counters(project)
        assert set(done) <= {0, 1}, f"{context}: a row was processed twice: {done}"
        assert done.get(1, 0) < ROWS, f"{context}: the run ended before the kill"

    final = run_dm(project, "upgrade", "heads", "--lock-timeout", "30")
    assert final.returncode == 0, f"{context}: {final.stderr}"
    assert "resuming after key" in final.stderr, context
    assert counters(project) == {1: ROWS}, context
    statuses = [r.status for r in project.db.tracker()]
    assert statuses == ["failed"] * ROUNDS + ["success"], context


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_sigterm_during_the_throttle_pause_stops_at_once(project: Project) -> None:
    make_items(project)
    body = BODY.replace(f"size={SIZE})", f"size={SIZE}, throttle=30)")
    project.write(REV, None, body, extra=EXTRA)
    process = spawn_dm(project, "upgrade", "heads")
    try:
        wait_for(lambda: rows_done(project, 0) == SIZE)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)  # long before the 30 s pause ends
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    assert counters(project) == {1: SIZE, 0: ROWS - SIZE}


def run_in_terminal(project: Project, columns: int) -> tuple[int, str]:
    """Run ``dm upgrade heads`` with stderr on a real pseudo-terminal ``columns`` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    with subprocess.Popen(
        [sys.executable, "-m", "dm", "upgrade", "heads"],
        cwd=project.root,
        env={**os.environ, **project.env()},
        stdout=subprocess.DEVNULL,
        stderr=follower,
    ) as process:
        os.close(follower)
        seen = b""
        with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
            while chunk := os.read(leader, 4096):
                seen += chunk
        os.close(leader)
    return process.returncode, seen.decode()


def screen(output: str, columns: int) -> tuple[list[str], int]:
    """Play ``output`` on a minimal terminal; return its lines and the widest write.

    Handles what the bar uses: carriage return, newline and "clear to end of line".
    The widest write is the furthest column the cursor reached on any line.
    """
    lines: list[str] = []
    line: list[str] = []
    cursor = widest = 0
    output = output.replace("\r\n", "\n")  # the terminal's own newline translation
    i = 0
    while i < len(output):
        if output.startswith("\x1b[K", i):
            del line[cursor:]
            i += 3
            continue
        char = output[i]
        i += 1
        if char == "\r":
            cursor = 0
        elif char == "\n":
            lines.append("".join(line))
            line, cursor = [], 0
        else:
            if cursor < len(line):
                line[cursor] = char
            else:
                line.append(char)
            cursor += 1
            widest = max(widest, cursor)
    if line:
        lines.append("".join(line))
    return lines, widest


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("columns", [80, 200])
def test_a_terminal_gets_a_progress_bar_that_fits(project: Project, columns: int) -> None:
    """The bar used to draw about 98 characters (a new line per redraw at 80 columns) and
    to leave stale characters (``... done:00:00``) on a wide terminal."""
    make_items(project)
    body = BODY.replace(f"size={SIZE})", f"size={SIZE}, count=True)")
    project.write(REV, None, body.replace("await asyncio.sleep(0.02)", "pass"), extra=EXTRA)

    code, output = run_in_terminal(project, columns)

    assert code == 0, output
    draws = [part for part in output.split("\r") if part.startswith(f"upgrade {REV}: ")]
    assert len(draws) > 2, output  # redrawn in place, more than once
    for draw in draws:
        visible = draw.split("\x1b[K")[0]
        assert len(visible) < columns, draw
    lines, _ = screen(output, columns)
    bar_lines = [line for line in lines if line.startswith(f"upgrade {REV}: ")]
    pattern = rf"upgrade {REV}: (\[#+\] )?200,000/200,000 rows \(100%\), [\d,]+ rows/s, done"
    assert len(bar_lines) == 1, lines  # one line, redrawn in place
    assert re.fullmatch(pattern, bar_lines[0]), bar_lines[0]  # nothing stale after "done"
    if columns >= 120:
        assert f"[{'#' * 24}]" in bar_lines[0]
    assert counters(project) == {1: ROWS}
