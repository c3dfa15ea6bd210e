"""``python -m epas_lightning``: :func:`~epas_lightning.cli.entry_point`. A Ctrl+C while the CLI's own modules import
(before :func:`~epas_lightning.cli.main` answers it) ends in one line with status 130, as it does once a command runs:
it printed a traceback."""

import sys

try:
    from epas_lightning.cli import entry_point
except KeyboardInterrupt:
    from epas_lightning.interrupted import stopped_line

    print(stopped_line(sys.argv[1] if len(sys.argv) > 1 else "python -m epas_lightning", "Ctrl+C"), file=sys.stderr)
    sys.exit(130)

entry_point()
