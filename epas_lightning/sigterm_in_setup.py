"""SIGTERM while ``fit`` (or ``validate``, ``test``) sets up: one line and exit status 143, where the signal's default
action ended the process with nothing said (a scheduler's preemption in a job's first seconds read as a crash), and
``validate``'s and ``test``'s left the run folder they had just made.

From the start of ``python -m epas_lightning fit`` (:func:`answering_sigterm_in_setup`) SIGTERM raises
:class:`~epas_lightning.interrupted.Interrupted` wherever it lands, as Ctrl+C does (the config checks, the data
preparation and checks, the model build, ``init_from``'s read, the resume): the command line says "interrupted: fit
stopped (SIGTERM during setup, ...)" and exits with 143. Until the config is read the signal is only remembered: with
``interrupt.enabled: false`` (:func:`answer_sigterm_in_setup`) the run keeps Lightning's behaviour, the signal's
default action, taken then for a signal that came. Once Lightning registers its own handler (before the sanity
validation), which calls this one too, and ``GracefulStop`` from the first step, they answer it: this one does nothing
there, and takes the default action after training (:func:`training_started`) and in a process forked meanwhile.
Where the main thread waits in native code, in which no Python handler runs (a rank in ``init_process_group`` waiting
for ranks that never join, up to its timeout), a watching thread takes the default action instead after
:data:`NATIVE_WAIT_GRACE_S`, with the line, ending the processes it started (the ranks Lightning launched). In
``validate`` and ``test`` ``GracefulStop`` answers it from Lightning's registration on, and the line says "interrupted:
validate stopped (SIGTERM during setup, before any held-out batch: ...)". This module imports neither torch nor
Lightning, so that the command installs it before the slow imports.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from epas_lightning.interrupted import Interrupted, stopped_line

STOPPED_IN_SETUP = (
    "SIGTERM during setup, before any training step: nothing was trained or saved; run the same command again"
)
EVALUATION_STOPPED_IN_SETUP = "SIGTERM during setup, before any held-out batch: run the same command again"
"""What ``validate`` and ``test`` say instead of :data:`STOPPED_IN_SETUP`."""
NATIVE_WAIT_GRACE_S = 5.0
"""How long a SIGTERM the handler has not run for (the main thread in native code) waits before the default action."""


class _Setup:
    """This command's state: its process, whether the config said to answer SIGTERM, whether one came before it
    said, whether training started."""

    def __init__(self, owner: int | None = None, command: str = "fit") -> None:
        self.owner, self.answering, self.received, self.training = owner, False, False, False
        self.command = command
        self.handled = 0  # the SIGTERMs the handler ran for


_setup = _Setup()


@contextmanager
def answering_sigterm_in_setup(command: str = "fit") -> Iterator[None]:
    """Within, SIGTERM before training (``command`` ``validate`` or ``test``: before the evaluation) stops the command
    with one line (see the module). A handler of the caller's own is kept, as is SIGTERM's handling outside the main
    thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    _setup.__init__(os.getpid(), command)
    signal.signal(signal.SIGTERM, _on_sigterm)
    watch = _NativeWaitWatch()
    try:
        yield
    finally:
        watch.stop()
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
        raise Interrupted(signal.SIGTERM, _stopped_in_setup())


def training_started() -> None:
    """``GracefulStop`` answers SIGTERM from the first step; after training this handler takes the default action."""
    _setup.training = True


def _on_sigterm(signum: int, frame: Any) -> None:
    _setup.handled += 1
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:  # Lightning's handler calls the one it found: it answers
        return
    if os.getpid() != _setup.owner or _setup.training:  # a forked process, or training is over: the default action
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    if not _setup.answering:  # the config is not read yet: is the signal to be answered at all?
        _setup.received = True
        return
    raise Interrupted(signum, _stopped_in_setup())


def _stopped_in_setup() -> str:
    return STOPPED_IN_SETUP if _setup.command == "fit" else EVALUATION_STOPPED_IN_SETUP


class _NativeWaitWatch:
    """A thread told of each signal as it arrives (the interpreter's wakeup fd, written outside Python code): where the
    handler has not run within :data:`NATIVE_WAIT_GRACE_S` of a SIGTERM while it answers one (the config read,
    training not begun), it prints the command's line and ends the process with 143, as the default action would, and
    the processes it started."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._stopped = False
        os.register_at_fork(after_in_child=self._give_back_wakeup_fd)  # a forked process's signals are its own
        threading.Thread(target=self._watch, name="sigterm-in-setup", daemon=True).start()

    def _watch(self) -> None:
        seen = _setup.handled
        try:
            while (received := os.read(self._read, 64)) and not self._stopped:
                if signal.SIGTERM not in received:
                    continue
                deadline = time.monotonic() + NATIVE_WAIT_GRACE_S
                while _setup.handled == seen and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _setup.handled == seen and self._answering():
                    print(stopped_line(_setup.command, _stopped_in_setup()), file=sys.stderr, flush=True)
                    _kill_child_processes()  # the ranks Lightning started wait for this one: as it ends them on Ctrl+C
                    os._exit(128 + signal.SIGTERM)
                seen = _setup.handled
        finally:
            os.close(self._read)

    def _answering(self) -> bool:
        answering = _setup.answering and not _setup.training and os.getpid() == _setup.owner
        return answering and not self._stopped and signal.getsignal(signal.SIGTERM) is _on_sigterm

    def _give_back_wakeup_fd(self) -> None:
        """Put back the wakeup fd found, unless another replaced this one since (that one stays)."""
        if self._stopped:
            return
        self._stopped = True
        with suppress(ValueError):  # not the main thread (a fork from another thread): left as it is
            if (current := signal.set_wakeup_fd(self._previous)) != self._write:
                signal.set_wakeup_fd(current)

    def stop(self) -> None:
        """Give the wakeup fd back and end the thread (the command ends)."""
        self._give_back_wakeup_fd()
        with suppress(OSError):
            os.write(self._write, b"\0")  # wakes the thread, which finds itself stopped
        os.close(self._write)


def _kill_child_processes() -> None:
    """SIGKILL the processes this one started that still run (Linux's ``/proc``; elsewhere none are found)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids = [int(pid) for pid in children.read().split()]
        except OSError:
            continue
        for pid in pids:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
