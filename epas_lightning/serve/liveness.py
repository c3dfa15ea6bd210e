"""The server's processes live and end together.

LitServe never notices its HTTP process (uvicorn) ending: killed for memory, it left the main process waiting for ever
while nothing answered. An inference worker that ends, LitServe's monitor notices: it shuts the server down under the
main process, whose wait then fails with an ``EOFError``. Here both stop ``serve`` with one line that says which
process ended and how. An inference worker whose device has failed for good (a device-side assert) says so
(:class:`DeviceFailure`): ``/health`` answers 503 and ``serve`` stops with one line, so that whatever runs it
restarts it. And the main process killed (SIGKILL, the OOM killer) left the others serving on, LitServe's
manager holding the port: on Linux they end with it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from epas_lightning.errors import UserError
from epas_lightning.serve.startup import ending

WATCH_INTERVAL = 0.5
HTTP_PROCESS = "LitServer-"
"""How LitServe names its HTTP processes."""


@contextmanager
def watching_processes(server, stopping: list[int], device: DeviceFailure) -> Iterator[list[str]]:
    """While the server runs (inside the ``with``): the first of its processes to end, unless ``stopping`` (the
    signals received) asked for it, is said in the list yielded, and an HTTP process that ended shuts the server
    down (an inference worker that ended, LitServe's monitor does), as does the worker's ``device`` failing."""
    ended: list[str] = []
    done = threading.Event()
    args = (server, stopping, device, done, ended)
    watcher = threading.Thread(target=_watch, args=args, daemon=True, name="epas-processes")
    watcher.start()
    try:
        yield ended
    finally:
        done.set()


def _watch(server, stopping: list[int], device: DeviceFailure, done: threading.Event, ended: list[str]) -> None:
    http: dict[int, multiprocessing.Process] = {}  # kept: active_children() forgets a process once it has ended
    while not done.wait(WATCH_INTERVAL) and not stopping:
        if device.reason:  # the worker has failed every request in flight; each later one would fail too
            server._shutdown_event.set()
            return
        http.update((p.pid, p) for p in multiprocessing.active_children() if p.name.startswith(HTTP_PROCESS))
        if said := first_ended(server, http.values()):
            ended.append(said)
            if said.startswith("the HTTP"):
                server._shutdown_event.set()  # LitServe's run returns and shuts the other processes down
            return


def first_ended(server, http) -> str:
    """Which of the server's processes has ended and how (the inference workers first: when one ends, LitServe ends
    the HTTP process), or ''."""
    for kind, processes in (("inference worker", getattr(server, "inference_workers", [])), ("HTTP process", http)):
        for process in processes:
            if process.exitcode is not None:
                return f"the {kind} ended while serving ({ending(process)})"
    return ""


def server_ended(said: str) -> UserError:
    return UserError(said, "serve", "the requests in flight were cut off; see the log above and restart serve")


class DeviceFailure:
    """Whether the inference worker's device has failed for good, and how, in one line: set by the worker, read by
    the HTTP process (``/health`` answers 503) and the main process (it stops the server). Shared memory, made in the
    main process and carried to the others with the ``LitAPI``."""

    SIZE = 1024
    """Bytes of the line kept."""

    def __init__(self) -> None:
        self._line = multiprocessing.get_context("spawn").Array("c", self.SIZE)

    def set(self, line: str) -> None:
        self._line.value = line.encode()[: self.SIZE - 1]

    @property
    def reason(self) -> str:
        """The line the worker set, or ''."""
        return self._line.value.decode(errors="replace")


def device_failed(reason: str) -> UserError:
    return UserError(
        f"the inference worker's device failed ({reason})",
        "serve",
        "nothing more runs on it in this process: the requests in flight got an error; restart serve (the log above "
        "has the traceback)",
    )


PR_SET_PDEATHSIG = 1
_owner: int | None = None
"""The process whose forks end with it (:func:`ending_with_this_process`), in it and in the children it forks."""
_fork_hook_registered = False


def end_with_parent(parent: int) -> None:
    """Linux: this process is killed when ``parent``, the process that started it, ends (even by SIGKILL), or at once
    if it has already ended; elsewhere nothing."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


@contextmanager
def ending_with_this_process() -> Iterator[None]:
    """Inside: the processes this one forks (LitServe's HTTP processes and its manager, from the main thread) end with
    it (:func:`end_with_parent`); their own forks do not."""
    global _owner, _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    _owner = os.getpid()
    try:
        yield
    finally:
        _owner = None


def _after_fork_in_child() -> None:
    global _owner
    owner, _owner = _owner, None
    if owner is not None:
        end_with_parent(owner)
