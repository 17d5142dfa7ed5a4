"""``python -m dm``: the dm command line."""

from dm.cli import main

main(prog_name="dm")
