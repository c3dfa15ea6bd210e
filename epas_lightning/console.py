"""The ``epas`` script and ``python -m epas_lightning``: :func:`entry_point` imports the CLI itself, so that a Ctrl+C
while the CLI's modules import (before :func:`~epas_lightning.cli.main` answers it) ends in one line with status 130,
as it does once a command runs: it printed a traceback. This module imports nothing slow."""

import sys

PROG = "python -m epas_lightning"
"""How the one-line messages name the program (the ``epas`` script is the same one)."""


def entry_point() -> None:
    """:func:`epas_lightning.cli.entry_point`, imported here; a Ctrl+C during that import says which command stopped
    (``--debug``: after its traceback)."""
    try:
        from epas_lightning.cli import entry_point as run
    except KeyboardInterrupt:
        from epas_lightning.interrupted import stopped_line

        if "--debug" in sys.argv[1:]:
            import traceback

            traceback.print_exc()
        print(stopped_line(command_named(sys.argv[1:]), "Ctrl+C"), file=sys.stderr)
        sys.exit(130)
    run()


def command_named(argv: list[str]) -> str:
    """The command a command line runs, as its one-line messages name it: its first argument but ``--debug``, or
    :data:`PROG` where that is a flag (``--help``, ``--version``) or there is none."""
    first = next((arg for arg in argv if arg != "--debug"), "-")
    return PROG if first.startswith("-") else first
