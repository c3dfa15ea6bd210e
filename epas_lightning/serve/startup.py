"""The inference worker's start-up, seen from the main process, which LitServe tells only that it failed.

LitServe loads the model in a spawned worker process: when ``setup`` raises, it logs the traceback there and raises
``RuntimeError`` in the main process; when the worker dies without a word (killed for memory), the main process waits
for it forever; when the start-up is interrupted, the worker goes on loading. Here the worker's user error comes back
to the main process as the one line (its traceback a note, for ``--debug``), a worker that dies while loading stops
``serve``, and an interrupted or failed start-up stops the worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from litserve.utils import WorkerSetupStatus

from epas_lightning.errors import UserError, is_out_of_memory, out_of_memory, process_ending

SETUP_LOGGER = "litserve.loops.loops"
"""Where LitServe logs the traceback of a worker whose ``setup`` raised."""
REPORT_TIMEOUT = 10.0
"""Seconds the main process waits for the failed worker's report (it is sent before LitServe learns of the failure)."""
WATCH_INTERVAL = 0.2
LOAD_OUT_OF_MEMORY_FIX = "free the device or pick one with more memory (--device)"


class StartupReport:
    """The worker's side of the start-up: made in the main process, carried to the worker with the ``LitAPI``."""

    def __init__(self) -> None:
        self.queue = multiprocessing.get_context("spawn").Queue()

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """In the worker: an error raised inside is sent to the main process, a user error (running out of device
        memory included) without its traceback in the worker's log; then it propagates, so that LitServe sees the
        setup fail."""
        try:
            yield
        except Exception as error:
            user_error = _model_does_not_fit(error) if is_out_of_memory(error) else error
            if isinstance(user_error, UserError):
                self.queue.put((user_error, traceback.format_exc()))
                logging.getLogger(SETUP_LOGGER).addFilter(_without_setup_traceback)
            else:
                self.queue.put(None)  # unexpected: its traceback stays in the log
            raise

    def failure(self, timeout: float = REPORT_TIMEOUT) -> UserError | None:
        """In the main process, once the start-up failed: the worker's user error, with the worker's traceback as a
        note; ``None`` when it failed otherwise or said nothing."""
        try:
            report = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if report is None:
            return None
        error, worker_traceback = report
        note = f"in the inference worker:\n{worker_traceback}"
        error.__notes__ = [*getattr(error, "__notes__", ()), note]  # add_note() is Python 3.11+
        return error


def _model_does_not_fit(error: BaseException) -> UserError:
    """Out of device memory while loading: the model does not fit (no request is decoded yet)."""
    return UserError(out_of_memory(error, "serve").what, "loading the model", LOAD_OUT_OF_MEMORY_FIX)


def _without_setup_traceback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Error setting up worker")


@contextmanager
def watching_startup(server) -> Iterator[list[str]]:
    """While LitServe waits for its workers (inside the ``with``): a worker that has ended before it was ready marks
    the start-up failed, so that LitServe stops waiting; the list yielded then says how it ended. When the ``with``
    raises (an interrupted or failed start-up), workers still running are stopped and LitServe's manager shut down."""
    died: list[str] = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(server, done, died), daemon=True, name="epas-startup")
    watcher.start()
    try:
        yield died
    except BaseException:
        done.set()
        watcher.join()
        _stop_workers(server)
        raise
    finally:
        done.set()


def _watch(server, done: threading.Event, died: list[str]) -> None:
    while not done.wait(WATCH_INTERVAL):
        statuses = dict(getattr(server, "workers_setup_status", None) or {})
        if WorkerSetupStatus.READY in statuses.values() or WorkerSetupStatus.ERROR in statuses.values():
            return
        starting = [key for key, status in statuses.items() if status == WorkerSetupStatus.STARTING]
        ended = [process for process in getattr(server, "inference_workers", []) if process.exitcode is not None]
        if starting and ended:
            died.append(ending(ended[0]))
            server.workers_setup_status[starting[0]] = WorkerSetupStatus.ERROR  # LitServe raises: failed to start
            return


def ending(process) -> str:
    """How a process ended: its exit status, or the signal that killed it."""
    ended = process_ending(process.exitcode)
    return ended + (": the system may have run out of memory" if ended == "killed by SIGKILL" else "")


def _stop_workers(server) -> None:
    """Stop the inference workers still running (LitServe's shutdown does not run when its start-up fails)."""
    for process in getattr(server, "inference_workers", []):
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
            if process.is_alive():  # it ignores SIGTERM (a handler inherited through fork)
                process.kill()
                process.join(timeout=5)
    manager = getattr(getattr(server, "transport_config", None), "manager", None)
    if manager is not None:
        manager.shutdown()
