"""The server's processes while it serves, watched from the main process: one that ends stops ``serve``.

LitServe never notices its HTTP process (uvicorn) ending: killed for memory, it left the main process waiting for ever
while nothing answered. An inference worker that ends, LitServe's monitor notices: it shuts the server down under the
main process, whose wait then fails with an ``EOFError``. Here both stop ``serve`` with one line that says which
process ended and how.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from epas_lightning.errors import UserError
from epas_lightning.serve.startup import ending

WATCH_INTERVAL = 0.5
HTTP_PROCESS = "LitServer-"
"""How LitServe names its HTTP processes."""


@contextmanager
def watching_processes(server, stopping: list[int]) -> Iterator[list[str]]:
    """While the server runs (inside the ``with``): the first of its processes to end, unless ``stopping`` (the
    signals received) asked for it, is said in the list yielded, and an HTTP process that ended shuts the server
    down (an inference worker that ended, LitServe's monitor does)."""
    ended: list[str] = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(server, stopping, done, ended), daemon=True, name="epas-processes")
    watcher.start()
    try:
        yield ended
    finally:
        done.set()


def _watch(server, stopping: list[int], done: threading.Event, ended: list[str]) -> None:
    http: dict[int, multiprocessing.Process] = {}  # kept: active_children() forgets a process once it has ended
    while not done.wait(WATCH_INTERVAL) and not stopping:
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
