[${section}]
# dm: data migrations and maintenance scripts, run with `dm upgrade heads`
# (or `alembic -n ${section} upgrade heads`). Every run is recorded in the tracker table.
script_location = %(here)s/data_migrations
prepend_sys_path = %(here)s
path_separator = os
# Files are named <date>_<time>_<rev>_<slug>.py (local time), so `ls` lists them in
# creation order; the order they run in is the down_revision chain (`dm history`).
file_template = %%(year)d%%(month).2d%%(day).2d_%%(hour).2d%%(minute).2d%%(second).2d_%%(rev)s_%%(slug)s
truncate_slug_length = 40

# The database. DM_DATABASE_URL, then DATABASE_URL, win over this value; when all are
# empty dm uses the embedded SQLite file dm.sqlite3 next to this file. Keep passwords out
# of this file: set the URL in the environment or a mounted secret instead.
sqlalchemy.url =

# The environment revisions' `environments` guards compare with: DM_ENVIRONMENT (set it in
# every deployment), then ENVIRONMENT, then .env beside this file, then this key; default
# production. dm.environments declares the names: any other one is refused (exit 2).
# dm.environment = production
# dm.environments = development, staging, production

# Where dm records every run (the schema applies to PostgreSQL only).
dm.tracker_table = script_run_tracker
# dm.tracker_schema =
# Seconds to wait for another dm run holding the migration lock.
# dm.lock_timeout = 600
# Seconds a run's first connections retry a refused/reset/timed-out connection (0 = none).
# dm.connect_retry_seconds = 20
# Default per-revision time limit in seconds (a revision's own `timeout` wins).
# dm.timeout =
# Seconds of PostgreSQL lock_timeout per revision; a transactional revision that hits it is
# rolled back and retried (lock_retries times, lock_timeout doubled each time, after a
# pause doubling from lock_retry_wait seconds).
# dm.pg_lock_timeout = 5
# dm.lock_retries = 3
# dm.lock_retry_wait = 1

# The application's Alembic schema migrations, for revisions that declare
# requires_schema = ("<schema revision id>",): its section (in this file, or in
# dm.schema_config) and its version table (dm.schema_version_table, dm.schema_version_schema).
% if schema_section:
dm.schema_alembic_section = ${schema_section}
% else:
# dm.schema_alembic_section = alembic
% endif
# dm.schema_version_table = alembic_version
