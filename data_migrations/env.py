"""Run dm's revisions when Alembic itself is invoked (`alembic -n <section> upgrade heads`).

dm's own CLI does not use this file; it is here so Alembic's commands that need an
environment go through the same runner and tracker as `dm`.
"""

from alembic import context

from dm.alembic.env import run

run(context)
