"""The process chat templates render in: a bound on the memory and time of one render that holds even inside a single
C call (``'a'|center(10**9)``, a string doubled with ``~``), which no check in the rendering process can interrupt.

One persistent worker, a fresh interpreter (``sys.executable -I``, never a fork of this process, which may hold CUDA or
threads) that imports only jinja2 and :mod:`epas_lightning.serve.chat`, renders one request at a time (a lock; renders
take milliseconds). Its address space is limited to :data:`RENDER_MEMORY` above its size at start (``RLIMIT_AS`` on
Linux: the allocation past it fails; elsewhere it ends itself after a render whose peak resident size went past that).
A worker that does not answer within the render's time (counted from when it is ready: its start is not) is killed,
as is one that died or whose caller was interrupted mid-request; the next render starts a new one. Requests and replies
are JSON, never pickles. The worker ends when this process closes its pipe (exit, death), and by itself when a render
runs well past its time (this process died mid-render, so nothing kills it); it ignores SIGINT (a Ctrl-C in ``chat``
is this process's).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from epas_lightning.serve.chat import TemplateFailure, TemplateRefusal, template_task

START_SECONDS = 60.0
"""How long a new worker may take to start (a fresh interpreter importing jinja2: a fraction of a second, seconds on a
loaded machine); a render's own time starts once it is ready."""

RENDER_MEMORY = 2 * 2**30
"""Bytes of address space a render may use beyond the worker's own at start (a real one needs a few MB; a request of
the longest context, its rendered text and their JSON, some hundreds)."""

WORKER_CODE = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from epas_lightning.serve.template_process import serve_renders; serve_renders(*map(int, sys.argv[2:]))"
)


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self) -> None:
        to_worker, from_worker = os.pipe(), os.pipe()
        ends, self.memory = (to_worker[0], from_worker[1]), RENDER_MEMORY
        try:
            path = json.dumps([entry for entry in sys.path if isinstance(entry, str)])  # imports skip the others
            argv = [sys.executable, "-I", "-c", WORKER_CODE, path, *map(str, ends), str(self.memory)]
            self.process = subprocess.Popen(argv, pass_fds=ends, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            os.close(to_worker[1])
            os.close(from_worker[0])
            raise
        finally:
            for fd in ends:
                os.close(fd)
        self.requests = Connection(to_worker[1], readable=False)
        self.replies = Connection(from_worker[0], writable=False)

    def wait_ready(self) -> None:
        """Wait for the worker to say it is ready (imports done, memory bounded), so that its start-up does not count
        against a render's time; a :class:`TemplateFailure` (the worker killed) if it dies or takes past
        :data:`START_SECONDS`."""
        try:
            if self.replies.poll(START_SECONDS) and _decode(self.replies.recv_bytes()) == ["ready", ""]:
                return
            problem = f"did not start within {START_SECONDS:g} s"
        except (EOFError, OSError):
            problem = "ended as it started"
        self.close(wait=1.0)
        raise TemplateFailure(f"the process to render it in {problem} (exit status {self.process.returncode})")

    def close(self, wait: float = 0.0) -> None:
        """Close the pipes (the worker ends on them), kill it if it has not ended within ``wait`` s, and reap it."""
        self.requests.close()
        self.replies.close()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_lock = threading.Lock()
_worker: _Worker | None = None


def run_bounded(task: str, args: Sequence[Any], seconds: float) -> str:
    """:func:`~epas_lightning.serve.chat.template_task` in the worker, within ``seconds`` and :data:`RENDER_MEMORY`;
    :class:`TemplateRefusal` or :class:`TemplateFailure` as there, or past a bound."""
    request = _encode([seconds, task, *args])
    with _lock:
        kind, said = _exchange(request, seconds)
    if kind == "text":
        return said
    raise (TemplateRefusal if kind == "refusal" else TemplateFailure)(said)


def _exchange(request: bytes, seconds: float) -> list[str]:
    """The worker's reply to ``request`` (``[kind, text]``); the worker killed and a :class:`TemplateFailure` if it
    does not answer within ``seconds`` or dies, and killed if this thread is interrupted while it waits."""
    global _worker
    if _worker is not None and (_worker.process.poll() is not None or _worker.memory != RENDER_MEMORY):
        _worker.close()  # it died while idle (killed from outside), or its bound changed
        _worker = None
    if _worker is None:
        try:
            worker = _Worker()
        except OSError as e:
            raise TemplateFailure(f"the process to render it in did not start: {e}") from None
        worker.wait_ready()
        _worker = worker
    worker, answered, died = _worker, False, False
    try:
        worker.requests.send_bytes(request)
        if worker.replies.poll(seconds):
            reply, answered = _decode(worker.replies.recv_bytes()), True
            return reply
    except (EOFError, OSError):
        died = True
    finally:
        if not answered:  # a late reply would answer the next request
            _worker = None
            worker.close(wait=1.0 if died else 0.0)
    if not died:
        raise TemplateFailure(f"it ran longer than {seconds:g} s")
    raise TemplateFailure(f"the process rendering it ended (exit status {worker.process.returncode})")


def _encode(value: Any) -> bytes:
    """JSON as UTF-8, lone surrogates (a JSON ``\\ud800`` in a message) passed through."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> Any:
    return json.loads(data.decode("utf-8", "surrogatepass"))


def _close_worker() -> None:
    if _worker is not None:
        _worker.close(wait=1.0)


atexit.register(_close_worker)


def serve_renders(requests_fd: int, replies_fd: int, memory: int) -> None:
    """The worker: render each request until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests, replies = Connection(requests_fd, writable=False), Connection(replies_fd, readable=False)
    peak_bound = _limit_memory(memory)
    replies.send_bytes(_encode(["ready", ""]))  # the caller's clock for a render starts now
    while True:
        try:
            seconds, *request = _decode(requests.recv_bytes())
        except EOFError:
            return
        # the caller kills a render past `seconds`; one it no longer waits for (killed itself mid-render) ends here,
        # by SIGALRM's default action, which stops even a single C call
        signal.alarm(orphan_alarm(seconds))
        try:
            reply = ["text", template_task(*request)]
        except TemplateRefusal as e:
            reply = ["refusal", str(e)]
        except TemplateFailure as e:
            reply = ["failure", str(e)]
        except MemoryError:
            reply = ["failure", out_of_memory(memory)]
        except Exception as e:  # a template too deeply nested to parse, ...
            reply = ["failure", f"{type(e).__name__}: {e}"]
        signal.alarm(0)
        over = peak_bound is not None and _peak_resident() > peak_bound
        replies.send_bytes(_encode(["failure", out_of_memory(memory)] if over else reply))
        if over:
            return  # its peak stays: a new worker renders the next request


def orphan_alarm(seconds: float) -> int:
    """Whole seconds after which a render ends its worker: well past the ``seconds`` its caller waits."""
    return math.ceil(2 * seconds) + 1


def out_of_memory(memory: int) -> str:
    """The failure of a render past ``memory`` bytes."""
    return f"it needed more than the {memory / 2**30:g} GiB of memory a render may use"


def _limit_memory(memory: int) -> int | None:
    """Limit this process's address space to ``memory`` bytes above its size now (Linux); elsewhere, where
    ``RLIMIT_AS`` is not enforced, the peak resident size past which a render fails."""
    import resource

    if sys.platform != "linux":
        return _peak_resident() + memory
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + memory if hard == resource.RLIM_INFINITY else min(size + memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return None


def _peak_resident() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
