"""Compare dm's command-line latency with plain Alembic's on linear chains of no-op revisions.

For each N in ``--sizes`` (default 10, 100, 1000, 5000) the script builds, in a temporary
directory:

* a dm project (``dm init``) with N linear revisions whose ``async def upgrade(session)``
  and ``async def downgrade(session)`` do nothing, run against PostgreSQL through
  ``DM_DATABASE_URL=postgresql://...``;
* the equivalent plain Alembic project (``alembic init -t async``) with N sync no-op
  revisions, ``sqlalchemy.url = postgresql+asyncpg://...``; by default Alembic runs every
  revision of an ``upgrade`` in one transaction and commits once at the end;
* the same Alembic project with ``transaction_per_migration=True`` in its ``env.py``
  (tool ``alembic-tpm``: Alembic with a transaction per revision, a commit after each one,
  as dm commits every revision with its tracker row). It is timed for ``upgrade heads``
  only (from base and at head): its ``current`` and ``history`` are plain Alembic's.

Each tool gets its own fresh PostgreSQL database per N, dropped and re-created before every
repetition so that ``upgrade heads`` always starts from base. It measures whole-process
wall time (``subprocess`` + ``time.perf_counter``, interpreter start-up and imports
included) of ``upgrade heads`` from base, ``upgrade heads`` again at head (a no-op),
``current`` and ``history``, running the tools alternately (the order is swapped every
repetition), and prints medians with their min-max, the dm/alembic ratio with its range
over the samples, the per-revision cost of upgrading ((t_upgrade - t_noop) / N), the
dm/alembic-tpm ratios of the per-revision cost and of the upgrade from base (how much of
dm's per-revision cost is its commit per revision), time/N and the marginal cost across
sizes, the import floor of each tool, and PASS/FAIL for dm's performance targets (all
against plain Alembic):

* ``dm current`` <= 0.8x alembic at the smallest N, <= 0.3x alembic at the largest N;
* dm's per-revision upgrade cost <= 1.2x Alembic's (N >= 100);
* ``dm upgrade heads`` at head (no-op) <= 0.9x alembic's, at every N;
* dm's marginal cost per revision does not grow with N (roughly linear): the slope
  between the two largest sizes is at most twice the slope from the smallest size to the
  second largest.

Run it with the project's virtualenv (it needs asyncpg and the ``dm`` and ``alembic``
executables next to the interpreter)::

    .venv/bin/python bench/compare_alembic.py                    # full run, several minutes
    .venv/bin/python bench/compare_alembic.py --sizes 10,100 --reps 2   # quick check
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from reporting import load_average
from reporting import print_table

DEFAULT_SIZES = (10, 100, 1000, 5000)
TOOLS = ("alembic", "dm")
ALEMBIC_TPM = "alembic-tpm"
"""The tool name of Alembic configured with ``transaction_per_migration=True``."""
ALEMBIC_TOOLS = {"alembic", ALEMBIC_TPM}
TOOL_LABELS = {ALEMBIC_TPM: "alembic, a transaction per revision"}
BEFORE = "dm-before"
"""The tool name of the dm given by ``--before-bin-dir`` (e.g. main's code), measured in the
same run for before/after figures."""
OPERATIONS = ("current", "upgrade_base", "upgrade_noop", "history", "check")
DM_ONLY = {"check"}
"""Operations Alembic has no equivalent of (``dm check``: the gate at every pod start)."""
TPM_OPERATIONS = {"upgrade_base", "upgrade_noop"}
"""The operations timed for ``alembic-tpm`` (its current and history are plain Alembic's)."""
IMPORT_ALEMBIC = 'python -c "import alembic.config"'
STACK_MODULES = (
    "click",
    "pydantic_settings",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "alembic.script",
)
"""What any dm command that reads the tracker imports whatever dm's own code does: the CLI,
the settings, SQLAlchemy's async engine with the asyncpg driver, and Alembic's revision
graph. Their import alone is the floor of ``dm current``, ``dm check`` and a no-op
``dm upgrade`` on this stack."""
IMPORT_STACK = 'python -c "import <dm\'s stack>"'
DM_VERSION = "dm --version"
LABELS = {
    "current": "current (at head)",
    "upgrade_base": "upgrade heads (from base)",
    "upgrade_noop": "upgrade heads (at head, no-op)",
    "history": "history",
    "check": "check (dm only)",
}

DM_REVISION = '''"""no-op revision {i}

Revision ID: {rev}
Revises: {down}
"""

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


async def upgrade(session):
    pass


async def downgrade(session):
    pass
'''

ALEMBIC_REVISION = '''"""no-op revision {i}

Revision ID: {rev}
Revises: {down}
"""

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
'''


class BenchError(RuntimeError):
    """A command failed or printed something unexpected."""


@dataclass(frozen=True)
class Postgres:
    """Where the throwaway databases live."""

    host: str
    port: int
    user: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        """Return the URL of ``database``."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self, *statements: str) -> None:
        """Run ``statements`` on the ``postgres`` maintenance database."""
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(
                host=self.host, port=self.port, user=self.user, database="postgres", timeout=10
            )
            try:
                for statement in statements:
                    await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(run())

    def recreate(self, *databases: str) -> None:
        """Drop (forcibly) and create each of ``databases``."""
        sql: list[str] = []
        for name in databases:
            sql += [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"']
        self.admin(*sql)

    def drop(self, *databases: str) -> None:
        """Drop each of ``databases`` if it exists."""
        self.admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in databases))


@dataclass
class Project:
    """One tool's project for one N: how to run its commands."""

    tool: str
    directory: Path
    database: str
    argv0: list[str]
    env: dict[str, str]
    head: str
    n: int

    def run(self, *args: str) -> tuple[float, str]:
        """Run the tool with ``args``; return wall seconds and stdout+stderr."""
        return timed([*self.argv0, *args], self.directory, self.env)


@dataclass
class Timings:
    """Samples in seconds: ``samples[n][tool][operation]``."""

    samples: dict[int, dict[str, dict[str, list[float]]]] = field(default_factory=dict)

    def add(self, n: int, tool: str, operation: str, seconds: float) -> None:
        """Record one sample."""
        per_tool = self.samples.setdefault(n, {})
        per_tool.setdefault(tool, {}).setdefault(operation, []).append(seconds)

    def has(self, n: int, tool: str, operation: str) -> bool:
        """Return whether ``operation`` was measured for ``tool`` at N."""
        return bool(self.samples.get(n, {}).get(tool, {}).get(operation))

    def median(self, n: int, tool: str, operation: str) -> float:
        """Return the median of the samples, in seconds."""
        return statistics.median(self.samples[n][tool][operation])

    def spread(self, n: int, tool: str, operation: str) -> tuple[float, float]:
        """Return the min and max of the samples, in seconds."""
        values = self.samples[n][tool][operation]
        return min(values), max(values)

    def per_revision(self, n: int, tool: str) -> float:
        """Return (t_upgrade_from_base - t_noop_upgrade) / N, in seconds."""
        return (self.median(n, tool, "upgrade_base") - self.median(n, tool, "upgrade_noop")) / n

    def per_revision_spread(self, n: int, tool: str) -> tuple[float, float]:
        """Return the min and max over repetitions of (t_upgrade - t_noop) / N."""
        per_tool = self.samples[n][tool]
        pairs = zip(per_tool["upgrade_base"], per_tool["upgrade_noop"], strict=True)
        values = [(base - noop) / n for base, noop in pairs]
        return min(values), max(values)


def timed(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Run ``argv`` to completion; return wall seconds and its combined output."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} (in {cwd}) exited {proc.returncode}:\n{output}")
    return elapsed, output


def base_env() -> dict[str, str]:
    """Return the environment without anything that would redirect either tool."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DM_")
        and key not in {"DATABASE_URL", "ENVIRONMENT", "POD_NAME", "PYTHONDONTWRITEBYTECODE"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def revision_ids(n: int) -> list[str]:
    """Return N deterministic 12-hex-digit revision ids."""
    return [hashlib.sha1(f"bench-{i}".encode()).hexdigest()[:12] for i in range(n)]


def write_revisions(versions: Path, template: str, n: int) -> str:
    """Write a linear chain of N revision files; return the head id."""
    ids = revision_ids(n)
    down: str | None = None
    for i, rev in enumerate(ids):
        text = template.format(i=i, rev=rev, down=down)
        (versions / f"{i:05d}_{rev}_noop_revision_{i}.py").write_text(text, encoding="utf-8")
        down = rev
    return ids[-1]


def make_dm_project(
    root: Path, bin_dir: Path, pg: Postgres, n: int, database: str, tool: str = "dm"
) -> Project:
    """``dm init`` a project under ``root`` and write N no-op revisions."""
    directory = root / f"{tool}_{n}"
    env = base_env()
    timed([str(bin_dir / "dm"), "init", str(directory)], root, env)
    head = write_revisions(directory / "data_migrations" / "versions", DM_REVISION, n)
    env["DM_DATABASE_URL"] = pg.url(database)
    return Project(tool, directory, database, [str(bin_dir / "dm")], env, head, n)


def substitute_once(path: Path, pattern: str, replacement: str, what: str) -> None:
    """Replace the one line of ``path`` matching ``pattern``; fail if there is not exactly one."""
    text, count = re.subn(pattern, lambda _m: replacement, path.read_text(encoding="utf-8"))
    if count != 1:
        raise BenchError(f"{path}: expected one {what} line, found {count}")
    path.write_text(text, encoding="utf-8")


def make_alembic_project(
    root: Path, bin_dir: Path, pg: Postgres, n: int, database: str, tool: str = "alembic"
) -> Project:
    """``alembic init -t async`` a project under ``root`` and write N no-op revisions.

    For ``alembic-tpm``, ``env.py`` configures the context with
    ``transaction_per_migration=True``: a transaction, and a commit, per revision.
    """
    directory = root / f"{tool}_{n}"
    directory.mkdir()
    env = base_env()
    timed([str(bin_dir / "alembic"), "init", "-t", "async", "migrations"], directory, env)
    substitute_once(
        directory / "alembic.ini",
        r"(?m)^sqlalchemy\.url\s*=.*$",
        f"sqlalchemy.url = {pg.url(database, 'postgresql+asyncpg')}",
        "sqlalchemy.url",
    )
    if tool == ALEMBIC_TPM:
        substitute_once(
            directory / "migrations" / "env.py",
            r"(?m)^    context\.configure\("
            r"connection=connection, target_metadata=target_metadata\)$",
            "    context.configure(\n"
            "        connection=connection,\n"
            "        target_metadata=target_metadata,\n"
            "        transaction_per_migration=True,\n"
            "    )",
            "context.configure(connection=connection, target_metadata=target_metadata)",
        )
    head = write_revisions(directory / "migrations" / "versions", ALEMBIC_REVISION, n)
    return Project(tool, directory, database, [str(bin_dir / "alembic")], env, head, n)


def check_output(project: Project, operation: str, output: str) -> None:
    """Fail loudly if a command did not do what it is being timed for."""
    alembic = project.tool in ALEMBIC_TOOLS
    if operation == "upgrade_base":
        ran = output.count("Running upgrade") if alembic else _dm_done(output)
        if ran != project.n:
            raise BenchError(f"{project.tool} upgrade ran {ran} revisions, expected {project.n}")
    elif operation == "upgrade_noop":
        ran = output.count("Running upgrade") if alembic else _dm_done(output)
        if ran:
            raise BenchError(f"{project.tool} no-op upgrade ran {ran} revisions:\n{output}")
    elif operation == "current" and project.head not in output:
        raise BenchError(f"{project.tool} current does not show head {project.head}:\n{output}")
    elif operation == "history" and project.head not in output:
        raise BenchError(f"{project.tool} history does not show head {project.head}")
    elif operation == "check" and "every revision is applied" not in output:
        raise BenchError(f"{project.tool} check did not pass:\n{output}")


def _dm_done(output: str) -> int:
    match = re.search(r"upgrade: (\d+) revision\(s\) done", output)
    return int(match.group(1)) if match else 0


def command_for(operation: str) -> tuple[str, ...]:
    """Return the CLI arguments of ``operation``."""
    if operation in ("upgrade_base", "upgrade_noop"):
        return ("upgrade", "heads")
    return (operation,)


def measured(tool: str, operation: str) -> bool:
    """Return whether ``operation`` is timed for ``tool``."""
    if tool in ALEMBIC_TOOLS and operation in DM_ONLY:
        return False
    return tool != ALEMBIC_TPM or operation in TPM_OPERATIONS


def bench_size(
    root: Path,
    bin_dirs: dict[str, Path],
    pg: Postgres,
    n: int,
    reps: int,
    timings: Timings,
    tag: str,
) -> None:
    """Build one project per tool for N and time every operation ``reps`` times."""
    databases = {tool: f"bench_{tool.replace('-', '_')}_{tag}_{n}" for tool in bin_dirs}
    projects = {
        tool: (
            make_alembic_project(root, bin_dir, pg, n, databases[tool], tool)
            if tool in ALEMBIC_TOOLS
            else make_dm_project(root, bin_dir, pg, n, databases[tool], tool)
        )
        for tool, bin_dir in bin_dirs.items()
    }
    tools = list(projects)
    try:
        # Untimed warm-up: compiles every revision file to __pycache__, warms the OS cache
        # and lets a dm that keeps a graph cache write it (as `dm revision` or an image
        # build would have).
        for project in projects.values():
            project.run("history")
        for rep in range(reps):
            pg.recreate(*databases.values())
            order = tools if rep % 2 == 0 else tools[::-1]
            # upgrade_base must come first (fresh databases); the rest run at head.
            for operation in ("upgrade_base", "upgrade_noop", "current", "history", "check"):
                for tool in order:
                    if not measured(tool, operation):
                        continue
                    project = projects[tool]
                    seconds, output = project.run(*command_for(operation))
                    check_output(project, operation, output)
                    timings.add(n, tool, operation, seconds)
            print(f"  N={n}: repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    finally:
        pg.drop(*databases.values())


def import_floor(bin_dir: Path, reps: int, before: Path | None) -> dict[str, list[float]]:
    """Return start-up seconds (every sample) of bare Python, Alembic's and dm's import paths."""
    python = str(bin_dir / "python")
    commands = {
        "python -c pass": [python, "-c", "pass"],
        IMPORT_ALEMBIC: [python, "-c", "import alembic.config"],
        IMPORT_STACK: [python, "-c", "; ".join(f"import {m}" for m in STACK_MODULES)],
        "alembic --version": [str(bin_dir / "alembic"), "--version"],
        DM_VERSION: [str(bin_dir / "dm"), "--version"],
        'python -c "import dm.cli"': [python, "-c", "import dm.cli"],
    }
    if before is not None:
        commands[f"{DM_VERSION} ({BEFORE})"] = [str(before / "dm"), "--version"]
        commands[f'python -c "import dm.cli" ({BEFORE})'] = [
            str(before / "python"),
            "-c",
            "import dm.cli",
        ]
    env = base_env()
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(reps):
        for name, argv in commands.items():
            samples[name].append(timed(argv, Path.cwd(), env)[0])
    return samples


# -- reporting ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    """Format seconds as milliseconds."""
    return f"{seconds * 1000:.1f} ms"


def us(seconds: float) -> str:
    """Format seconds as microseconds."""
    return f"{seconds * 1e6:.0f} us"


def ratio(a: float, b: float) -> str:
    """Format a / b."""
    return f"{a / b:.2f}x" if b > 0 and a >= 0 else "n/a"


def with_spread(median: float, spread: tuple[float, float], fmt: Callable[[float], str]) -> str:
    """Format ``median (min-max)``."""
    low, high = spread
    return f"{fmt(median)} ({fmt(low).split()[0]}-{fmt(high)})"


def ratio_with_spread(
    a: float, a_spread: tuple[float, float], b: float, b_spread: tuple[float, float]
) -> str:
    """Format a / b of the medians, with its range over the samples (lowest a / highest b
    to highest a / lowest b)."""
    (a_low, a_high), (b_low, b_high) = a_spread, b_spread
    low, high = ratio(a_low, b_high), ratio(a_high, b_low)
    return f"{ratio(a, b)} ({low.rstrip('x')}-{high})"


def ratio_of(timings: Timings, n: int, operation: str, tool: str, other: str) -> str:
    """Format tool / other for ``operation`` at N, with its range."""
    return ratio_with_spread(
        timings.median(n, tool, operation),
        timings.spread(n, tool, operation),
        timings.median(n, other, operation),
        timings.spread(n, other, operation),
    )


def per_revision_ratio(timings: Timings, n: int, tool: str, other: str) -> str:
    """Format tool / other of the per-revision upgrade cost at N, with its range."""
    return ratio_with_spread(
        timings.per_revision(n, tool),
        timings.per_revision_spread(n, tool),
        timings.per_revision(n, other),
        timings.per_revision_spread(n, other),
    )


def print_size(timings: Timings, n: int, reps: int, tools: Sequence[str]) -> None:
    """Print the table of one N: medians (min-max) per tool, then the ratios."""
    print(f"\n== N = {n} revisions (median (min-max) of {reps}) ==")
    for tool in tools:
        if tool in TOOL_LABELS:
            print(f"{tool}: {TOOL_LABELS[tool]}")
    others = [tool for tool in tools if tool != "alembic"]
    header = ["operation", *tools, *(f"{tool}/alembic" for tool in others)]
    tpm = ALEMBIC_TPM in tools
    if tpm:
        header.append(f"dm/{ALEMBIC_TPM}")
    if BEFORE in tools:
        header.append(f"dm/{BEFORE}")
    rows = [tuple(header)]
    for operation in OPERATIONS:
        cells = [LABELS[operation]]
        for tool in tools:
            if timings.has(n, tool, operation):
                median = timings.median(n, tool, operation)
                cells.append(with_spread(median, timings.spread(n, tool, operation), ms))
            else:
                cells.append("n/a")
        for tool in others:
            if timings.has(n, "alembic", operation) and timings.has(n, tool, operation):
                cells.append(ratio_of(timings, n, operation, tool, "alembic"))
            else:
                cells.append("n/a")
        if tpm:
            cells.append(
                ratio_of(timings, n, operation, "dm", ALEMBIC_TPM)
                if operation == "upgrade_base"
                else "n/a"
            )
        if BEFORE in tools:
            cells.append(ratio_of(timings, n, operation, "dm", BEFORE))
        rows.append(tuple(cells))
    cells = ["per-revision upgrade cost"]
    for tool in tools:
        median = timings.per_revision(n, tool)
        cells.append(with_spread(median, timings.per_revision_spread(n, tool), us) + "/rev")
    cells += [per_revision_ratio(timings, n, tool, "alembic") for tool in others]
    if tpm:
        cells.append(per_revision_ratio(timings, n, "dm", ALEMBIC_TPM))
    if BEFORE in tools:
        cells.append(per_revision_ratio(timings, n, "dm", BEFORE))
    rows.append(tuple(cells))
    print_table(rows)


def print_scaling(timings: Timings, sizes: Sequence[int], tools: Sequence[str]) -> None:
    """Print time/N for every operation across sizes, and the marginal cost per revision."""
    print("\n== Scaling: median time / N (us per revision), (min-max) ==")
    rows = [("operation", *(f"N={n}" for n in sizes))]
    for operation in OPERATIONS:
        for tool in tools:
            if not timings.has(sizes[0], tool, operation):
                continue
            per_n = (
                with_spread(
                    timings.median(n, tool, operation) / n,
                    per_revision_of(timings.spread(n, tool, operation), n),
                    us,
                )
                for n in sizes
            )
            rows.append((f"{tool} {LABELS[operation]}", *per_n))
    print_table(rows)
    if len(sizes) < 2:
        return
    print(
        "\n== Scaling: marginal cost between sizes, (t(N2) - t(N1)) / (N2 - N1), of the "
        "medians (range: lowest N2 sample - highest N1 sample to the reverse) =="
    )
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    rows = [("operation", *(f"{a}->{b}" for a, b in pairs))]
    for operation in OPERATIONS:
        for tool in tools:
            if not timings.has(sizes[0], tool, operation):
                continue
            rows.append(
                (
                    f"{tool} {LABELS[operation]}",
                    *(
                        with_spread(
                            marginal(timings, tool, operation, a, b),
                            marginal_spread(timings, tool, operation, a, b),
                            us,
                        )
                        for a, b in pairs
                    ),
                )
            )
    print_table(rows)


def per_revision_of(spread: tuple[float, float], n: int) -> tuple[float, float]:
    """Return a (min, max) pair of seconds divided by N."""
    return spread[0] / n, spread[1] / n


def marginal(timings: Timings, tool: str, operation: str, a: int, b: int) -> float:
    """Return the marginal seconds per revision of ``operation`` between sizes a and b."""
    return (timings.median(b, tool, operation) - timings.median(a, tool, operation)) / (b - a)


def marginal_spread(
    timings: Timings, tool: str, operation: str, a: int, b: int
) -> tuple[float, float]:
    """Return the lowest and highest marginal cost the samples of sizes a and b allow."""
    a_low, a_high = timings.spread(a, tool, operation)
    b_low, b_high = timings.spread(b, tool, operation)
    return (b_low - a_high) / (b - a), (b_high - a_low) / (b - a)


@dataclass(frozen=True)
class Verdict:
    """One target's outcome."""

    target: str
    passed: bool
    detail: str


def evaluate(timings: Timings, sizes: Sequence[int], stack_floor: float) -> list[Verdict]:
    """Check dm's targets against the measured medians.

    :param stack_floor: seconds to import dm's stack alone (``STACK_MODULES``), told beside
        the time each whole-command target allows.
    """
    verdicts: list[Verdict] = []
    small, large = sizes[0], sizes[-1]

    def compared(n: int, operation: str, share: float) -> str:
        d, a = (
            with_spread(timings.median(n, tool, operation), timings.spread(n, tool, operation), ms)
            for tool in ("dm", "alembic")
        )
        allowed = share * timings.median(n, "alembic", operation)
        return (
            f"dm {d} vs alembic {a} ({ratio_of(timings, n, operation, 'dm', 'alembic')}); "
            f"the target allows {ms(allowed)}, importing dm's stack takes {ms(stack_floor)}"
        )

    a, d = timings.median(small, "alembic", "current"), timings.median(small, "dm", "current")
    verdicts.append(
        Verdict(
            f"dm current <= 0.8x alembic current at N={small}",
            d <= 0.8 * a,
            compared(small, "current", 0.8),
        )
    )
    a, d = timings.median(large, "alembic", "current"), timings.median(large, "dm", "current")
    verdicts.append(
        Verdict(
            f"dm current <= 0.3x alembic current at N={large}",
            d <= 0.3 * a,
            compared(large, "current", 0.3),
        )
    )
    upgrade_sizes = [n for n in sizes if n >= 100] or [large]
    for n in upgrade_sizes:
        a, d = timings.per_revision(n, "alembic"), timings.per_revision(n, "dm")
        d_text, a_text = (
            with_spread(timings.per_revision(n, tool), timings.per_revision_spread(n, tool), us)
            for tool in ("dm", "alembic")
        )
        verdicts.append(
            Verdict(
                f"dm per-revision upgrade cost <= 1.2x alembic at N={n}",
                0 < a and 0 < d <= 1.2 * a,  # a cost at or below 0 is noise, not a pass
                f"dm {d_text}/rev vs alembic {a_text}/rev "
                f"({per_revision_ratio(timings, n, 'dm', 'alembic')})",
            )
        )
    for n in sizes:
        a = timings.median(n, "alembic", "upgrade_noop")
        d = timings.median(n, "dm", "upgrade_noop")
        verdicts.append(
            Verdict(
                f"dm no-op upgrade at head <= 0.9x alembic at N={n}",
                d <= 0.9 * a,
                compared(n, "upgrade_noop", 0.9),
            )
        )
    # Linear: the marginal cost per revision between the two largest sizes, compared with
    # the marginal cost from the smallest size to the second largest. Both spans are wide,
    # so the fixed start-up cost cancels out and its noise is divided by many revisions; a
    # linear command gives a ratio near 1, an O(N^2) one a ratio well above 2.
    if len(sizes) < 3:
        verdicts.append(Verdict("dm roughly linear in N", True, "skipped: needs 3 sizes"))
        return verdicts
    first, last = (sizes[0], sizes[-2]), (sizes[-2], sizes[-1])
    for operation in OPERATIONS:
        if operation in DM_ONLY:
            continue
        slopes = {
            tool: (
                marginal(timings, tool, operation, *first),
                marginal(timings, tool, operation, *last),
            )
            for tool in TOOLS
        }
        early, late = slopes["dm"]
        a_early, a_late = slopes["alembic"]
        verdicts.append(
            Verdict(
                f"dm {LABELS[operation]} roughly linear in N (late/early slope <= 2)",
                early > 0 and late <= 2 * early,
                f"{us(early)}/rev over {first[0]}->{first[1]}, "
                f"{us(late)}/rev over {last[0]}->{last[1]} ({ratio(late, early)}; "
                f"alembic {us(a_early)} -> {us(a_late)}, {ratio(a_late, a_early)})",
            )
        )
    return verdicts


# -- main -----------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """Parse ``10,100,1000``."""
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers, e.g. 10,100,1000")
    return sizes


def default_bin_dir() -> Path:
    """Return the directory holding ``python``, ``dm`` and ``alembic``."""
    here = Path(sys.executable).parent
    if (here / "dm").exists():
        return here
    return Path(__file__).resolve().parent.parent / ".venv" / "bin"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the report; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated revision counts (default: 10,100,1000,5000)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per size (default: 5, or 3 for N >= 5000)",
    )
    parser.add_argument("--pg-host", default=os.environ.get("PGHOST", "127.0.0.1"))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("PGPORT", "5432")))
    parser.add_argument("--pg-user", default=os.environ.get("PGUSER", "postgres"))
    parser.add_argument(
        "--bin-dir",
        type=Path,
        default=default_bin_dir(),
        help="directory with python, dm and alembic (default: this venv)",
    )
    parser.add_argument(
        "--before-bin-dir",
        type=Path,
        default=None,
        help=f"directory with python and dm of an earlier dm (e.g. a venv of main), measured "
        f"in the same run as {BEFORE!r}",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated projects (their path is printed)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)

    reps_for: Callable[[int], int] = (
        (lambda n: args.reps) if args.reps else (lambda n: 3 if n >= 5000 else 5)
    )
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    pg = Postgres(args.pg_host, args.pg_port, args.pg_user)
    bin_dir: Path = args.bin_dir
    for name in ("python", "dm", "alembic"):
        if not (bin_dir / name).exists():
            parser.error(f"{bin_dir / name} not found (pass --bin-dir)")
    before: Path | None = args.before_bin_dir
    bin_dirs = {"alembic": bin_dir, ALEMBIC_TPM: bin_dir, "dm": bin_dir}
    if before is not None:
        for name in ("python", "dm"):
            if not (before / name).exists():
                parser.error(f"{before / name} not found (--before-bin-dir)")
        bin_dirs[BEFORE] = before
    tools = list(bin_dirs)

    versions = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import sys, alembic, sqlalchemy, dm; "
            "print(f'python {sys.version.split()[0]}, alembic {alembic.__version__}, "
            "sqlalchemy {sqlalchemy.__version__}, dm {dm.__version__}')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"{versions}; PostgreSQL at {pg.host}:{pg.port}; sizes {args.sizes}")
    print(f"{os.cpu_count()} CPUs; load average at start {load_average()}")

    root = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    tag = f"{os.getpid()}"
    timings = Timings()
    try:
        floor = import_floor(bin_dir, reps_for(args.sizes[0]), before)
        for n in args.sizes:
            bench_size(root, bin_dirs, pg, n, reps_for(n), timings, tag)
    finally:
        if args.keep:
            print(f"projects kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print("\n== Import floor (wall time of the whole process, median (min-max)) ==")
    medians = {name: statistics.median(values) for name, values in floor.items()}
    print_table(
        [
            ("command", "median (min-max)"),
            *(
                (name, with_spread(medians[name], (min(v), max(v)), ms))
                for name, v in floor.items()
            ),
        ]
    )
    print(f"{DM_VERSION} / {IMPORT_ALEMBIC}: {ratio(medians[DM_VERSION], medians[IMPORT_ALEMBIC])}")
    print(f"{IMPORT_STACK}: {', '.join(STACK_MODULES)}")
    for n in args.sizes:
        print_size(timings, n, reps_for(n), tools)
    print_scaling(timings, args.sizes, tools)

    verdicts = evaluate(timings, args.sizes, medians[IMPORT_STACK])
    print("\n== Targets ==")
    for verdict in verdicts:
        print(f"{'PASS' if verdict.passed else 'FAIL'}  {verdict.target}: {verdict.detail}")
    failed = sum(not v.passed for v in verdicts)
    print(f"\n{len(verdicts) - failed} passed, {failed} failed")
    print(f"load average at end {load_average()} (other work on the machine adds noise)")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
