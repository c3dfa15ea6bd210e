"""``Interrupted``: the exception a signal that ends ``fit`` at once raises; it imports nothing, so that the handler
installed when the command starts (:mod:`epas_lightning.sigterm_in_setup`) can raise it before the slow imports."""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """``fit`` ended at once by ``signum``, without a checkpoint of the step it was in; ``reason``: what the command
    line says instead of the signal's name; ``announce``: whether this process says it (every rank stopped alike:
    the first one says so)."""

    def __init__(self, signum: int, reason: str | None = None, announce: bool = True) -> None:
        super().__init__(signum)
        self.signum = signal.Signals(signum)
        self.reason = reason
        self.announce = announce


def stopped_line(command: str, what: str) -> str:
    """The one line a command a signal ended at once prints: ``what`` says why (the signal, or ``reason``)."""
    return f"interrupted: {command} stopped ({what})"
