"""``python -m epas_lightning``: :func:`~epas_lightning.console.entry_point`, as the ``epas`` script runs it."""

from epas_lightning.console import entry_point

entry_point()
