"""Command-line arguments: global options accepted after the command, one-line usage errors.

``dm upgrade --verbose`` and ``dm status --log-format json`` mean what ``dm --verbose
upgrade`` and ``dm --log-format json status`` mean: a global option given after the
command moves before it, unless the command has an option of that name itself (``dm
history --verbose``). Usage errors become one line naming the command's help.
"""

from __future__ import annotations

from collections.abc import Sequence

import click


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _names(command: click.Command) -> tuple[set[str], set[str]]:
    """Return the option names of ``command``: all of them, and those that take a value."""
    every: set[str] = set()
    valued: set[str] = set()
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        names = {*param.opts, *param.secondary_opts}
        every |= names
        if _takes_value(param):
            valued |= names
    return every, valued


def hoist_global_options(group: click.Group, args: Sequence[str]) -> list[str]:
    """Return ``args`` with the group's options found after the command moved before it."""
    args = list(args)
    global_every, global_valued = _names(group)
    global_every -= {"--help", "-h", "--version"}
    # Find the command: the first argument that is not a global option or its value.
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or not arg.startswith("-"):
            break
        index += 2 if arg in global_valued else 1
    if index >= len(args) or args[index] == "--":
        return args
    command = group.commands.get(args[index])
    if command is None:
        return args
    own_every, own_valued = _names(command)
    head, tail = args[: index + 1], args[index + 1 :]
    kept: list[str] = []
    moved: list[str] = []
    position = 0
    while position < len(tail):
        arg = tail[position]
        if arg == "--":
            kept.extend(tail[position:])
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if name in own_every or name not in global_every:
            kept.append(arg)
            if name in own_valued and "=" not in arg and position + 1 < len(tail):
                kept.append(tail[position + 1])
                position += 1
            position += 1
            continue
        moved.append(arg)
        if name in global_valued and "=" not in arg and position + 1 < len(tail):
            moved.append(tail[position + 1])
            position += 1
        position += 1
    return [*head[:index], *moved, *head[index:], *kept]


def one_line(exc: click.ClickException) -> str:
    """Return ``exc`` as one line, pointing to the help of the command it concerns."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    if message[:2].istitle():  # click's "No such option" reads as the rest of dm's lines
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message
