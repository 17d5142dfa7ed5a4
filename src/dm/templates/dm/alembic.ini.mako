[${section}]
# dm: data migrations and maintenance scripts, run with `dm upgrade heads`
# (or `alembic -n ${section} upgrade heads`). Every run is recorded in the tracker table.
script_location = %(here)s/data_migrations
prepend_sys_path = .
path_separator = os
# Files are named <date>_<rev>_<slug>.py so `ls` shows them in creation order.
file_template = %%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s
truncate_slug_length = 40

# The database. DM_DATABASE_URL, then DATABASE_URL, win over this value; when all are
# empty dm uses the embedded SQLite file dm.sqlite3 next to this file. Keep passwords out
# of this file: set the URL in the environment or a mounted secret instead.
sqlalchemy.url =

# Where dm records every run (the schema applies to PostgreSQL only).
dm.tracker_table = script_run_tracker
# dm.tracker_schema =
# Seconds to wait for another dm run holding the migration lock.
# dm.lock_timeout = 600
# Seconds a run's first connections retry a refused/reset/timed-out connection (0 = none).
# dm.connect_retry_seconds = 20
# Default per-revision time limit in seconds (a revision's own `timeout` wins).
# dm.timeout =
