"""SIGTERM while ``fit`` sets up: one line and exit status 143, where the signal's default action ended the process
with nothing said (a scheduler's preemption in a job's first seconds read as a crash).

From the start of ``python -m epas_lightning fit`` (:func:`answering_sigterm_in_setup`) SIGTERM raises
:class:`~epas_lightning.interrupted.Interrupted` wherever it lands, as Ctrl+C does (the config checks, the data
preparation and checks, the model build, ``init_from``'s read, the resume): the command line says "interrupted: fit
stopped (SIGTERM during setup, ...)" and exits with 143. Until the config is read the signal is only remembered: with
``interrupt.enabled: false`` (:func:`answer_sigterm_in_setup`) the run keeps Lightning's behaviour, the signal's
default action, taken then for a signal that came. Once Lightning registers its own handler (before the sanity
validation), which calls this one too, and ``GracefulStop`` from the first step, they answer it: this one does nothing
there, and takes the default action after training (:func:`training_started`) and in a process forked meanwhile.
This module imports neither torch nor Lightning, so that the command installs it before the slow imports.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from epas_lightning.interrupted import Interrupted

STOPPED_IN_SETUP = (
    "SIGTERM during setup, before any training step: nothing was trained or saved; run the same command again"
)


class _Setup:
    """This command's state: its process, whether the config said to answer SIGTERM, whether one came before it
    said, whether training started."""

    def __init__(self, owner: int | None = None) -> None:
        self.owner, self.answering, self.received, self.training = owner, False, False, False


_setup = _Setup()


@contextmanager
def answering_sigterm_in_setup() -> Iterator[None]:
    """Within, SIGTERM before training stops the command with one line (see the module). A handler of the caller's own
    is kept, as is SIGTERM's handling outside the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    _setup.__init__(os.getpid())
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _setup.__init__()


def answer_sigterm_in_setup(enabled: bool) -> None:
    """The config is read: with ``interrupt.enabled`` SIGTERM stops the command from now on (now if it came), else it
    takes its default action, as without this handler (now if it came)."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    if not enabled:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if _setup.received:
            signal.raise_signal(signal.SIGTERM)
        return
    _setup.answering = True
    if _setup.received:
        raise Interrupted(signal.SIGTERM, STOPPED_IN_SETUP)


def training_started() -> None:
    """``GracefulStop`` answers SIGTERM from the first step; after training this handler takes the default action."""
    _setup.training = True


def _on_sigterm(signum: int, frame: Any) -> None:
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:  # Lightning's handler calls the one it found: it answers
        return
    if os.getpid() != _setup.owner or _setup.training:  # a forked process, or training is over: the default action
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    if not _setup.answering:  # the config is not read yet: is the signal to be answered at all?
        _setup.received = True
        return
    raise Interrupted(signum, STOPPED_IN_SETUP)
