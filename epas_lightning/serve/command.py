"""``python -m epas_lightning serve --checkpoint ...``: the OpenAI completions and chat APIs, at every budget.

This module stays importable without the ``serve`` extra (the command list imports it for ``--help``); LitServe is
imported when the command runs.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from epas_lightning.checkpoint import describe_checkpoint
from epas_lightning.data.tokenizer import check_tokenizer_flag
from epas_lightning.errors import ConfigError, UserError
from epas_lightning.inference.generate_cli import resolve_tokenizer
from epas_lightning.region import sharing_layers_text
from epas_lightning.runtime import DType, check_counts, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from epas_lightning.serve.model_card import ServedModel

Host = Literal["127.0.0.1", "0.0.0.0", "::"]
"""The addresses LitServe listens on: its run refuses any other."""
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
INSTALL = "pip install 'epas_lightning[serve]'"
HOST_FIX = "give an address of this machine: 127.0.0.1, 0.0.0.0, ::"
REPEAT_WINDOW_S = 0.25
"""The same signal again within this time is one stop delivered twice (``timeout`` signals the command and then its
process group), not the second signal that cuts requests off."""


def require_litserve() -> None:
    """A :class:`ConfigError` naming the extra to install when LitServe is missing."""
    try:
        import litserve  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"serving needs LitServe, which is not installed ({e})", "serve", INSTALL) from e


@contextmanager
def signals_stop_server(first: Callable[[], None] = lambda: None) -> Iterator[list[int]]:
    """SIGTERM and Ctrl+C stop the server: LitServe then shuts its processes down and ``run`` returns. The list
    yielded holds the signals received; ``first`` is called on the first one, before it stops the server. The same
    signal again within ``REPEAT_WINDOW_S`` is not counted.

    The server's forked processes inherit the handler; there it does nothing, so that uvicorn's own handlers (which
    re-raise the signal once uvicorn has shut down) end them quietly instead of with a traceback.
    """
    owner = os.getpid()
    received: list[int] = []
    counted_at = [0.0]  # when the last signal counted came

    def interrupt(signum, frame) -> None:
        if os.getpid() == owner:
            now = time.monotonic()
            if received and signum == received[-1] and now - counted_at[0] < REPEAT_WINDOW_S:
                return
            received.append(signum)
            counted_at[0] = now
            if len(received) == 1:
                first()
            stop = KeyboardInterrupt()
            stop.signum = signum  # the command line says which signal (during startup, where LitServe lets it out)
            raise stop

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class HTTPProcessStart:
    """ASGI middleware: what LitServe's HTTP process (uvicorn, forked once the worker has loaded the model) does as it
    starts serving (the app's lifespan startup, after uvicorn has installed its signal handlers).

    It prints ``banner``: the server answers from now on. And it ignores Ctrl+C, which the terminal sends to every
    process of the server: the main process stops it, with SIGTERM on the first signal (the requests in flight finish)
    and SIGKILL on a second one (uvicorn's own second Ctrl+C cancelled every request with a traceback each).
    """

    def __init__(self, app, banner: str) -> None:
        self.app, self.banner = app, banner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print(self.banner, file=sys.stderr, flush=True)
        await self.app(scope, receive, send)


def serve_command(
    checkpoint: Path,
    host: Host = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    sharing_layers: int | None = None,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    attention_reuse: bool = True,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    max_tokens: int | None = None,
    max_choices: int = 16,
    max_request_mb: float = 8,
    log_level: LogLevel = "warning",
) -> None:
    """Serve a checkpoint over the OpenAI completions and chat APIs; each request may pick its sharing region.

    Endpoints: POST /v1/completions and POST /v1/chat/completions (streamed or not; chat renders the messages with the
    tokenizer's chat template, in a sandbox), GET /v1/models, GET /health. A request picks its region with
    the extra field sharing_layers (the first N layers of the trained region) or budget (a fraction of dense FLOPs,
    resolved like bench --budget); responses report it under "epas", with the KV cache the request held (a sharing
    layer caches only V). Requests with the same region and sampling settings are decoded together in one
    left-padded batch; a sequence leaves it when it finishes or its client goes away. SIGTERM or Ctrl+C stops the
    server.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        host: 127.0.0.1 (this machine only), or 0.0.0.0 or :: (every interface); LitServe listens on no other.
        port: TCP port (1024..65535).
        model_name: The model id clients name (default: the checkpoint's file or folder name).
        sharing_layers: The region of requests that name none: the first N layers of the trained region (in its
            growth order); default: all of it (an export's folder: the N it was exported with).
        tokenizer: Tokenizer file or folder (default: the one the checkpoint records).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        attention_reuse: Sharing layers reuse the source layer's attention probabilities (the same model, less work).
        max_batch_size: Sequences decoded at the same time (over all regions).
        batch_timeout: Seconds a request waits for others to share its forward (at most; none when the batch fills).
        max_tokens: The largest max_tokens a request may ask for (default: the model's context length minus one).
        max_choices: Prompts x n one request may ask for.
        max_request_mb: The largest request body, in MiB; a larger one is refused (413) before it is parsed.
        log_level: LitServe and uvicorn logging (info logs every request).
    """
    require_litserve()
    if not 1024 <= port <= 65535:
        raise ConfigError(
            f"port must lie in 1024..65535, not {port}", "--port", "pick a free one in that range, e.g. 8000"
        )
    check_counts({"--max-batch-size": max_batch_size})
    if batch_timeout < 0:
        raise ConfigError(
            f"must be at least 0, got {batch_timeout}", "--batch-timeout", "give 0 (no wait) or more seconds, e.g. 0.05"
        )
    where = resolve_device(device)
    resolve_dtype(dtype, where)
    check_tokenizer_flag(tokenizer)
    recorded = describe_checkpoint(checkpoint)  # checked before any process starts; only the worker reads weights
    text_tokenizer = resolve_tokenizer(recorded, tokenizer)
    name = model_name or (checkpoint.stem if checkpoint.is_file() else checkpoint.name)

    from epas_lightning.serve.api import CompletionsAPI
    from epas_lightning.serve.model_card import ServedModel

    served = ServedModel.build(recorded, text_tokenizer, name, sharing_layers, max_tokens, max_choices, max_request_mb)
    if note := recorded.unrun_region_note(checkpoint, "serve"):
        print(note, file=sys.stderr)
    run_server(
        CompletionsAPI(served, checkpoint, dtype, attention_reuse, max_batch_size, batch_timeout),
        where.type,
        where.index,
        host,
        port,
        log_level,
    )


def check_port_free(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when ``port`` is taken on ``host`` (bound the way uvicorn binds
    it, then released); uvicorn says so only after the worker has loaded the model, in two lines."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host!r} port {port} ({e.strerror})", "--host", HOST_FIX) from e
            raise ConfigError(
                f"port {port} is already in use on {host}", "--port", "stop what listens there or pick another port"
            ) from e


def lit_server(api, accelerator: str, devices, banner: str):
    """The LitServer of ``api``, not started: our endpoints, middlewares and OpenAI-shaped errors on its app."""
    import litserve as ls

    from epas_lightning.serve.api import BodyLimit, add_openai_errors

    middlewares = [(HTTPProcessStart, {"banner": banner}), (BodyLimit, {"limit": api.served.max_request_bytes})]
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, timeout=False, middlewares=middlewares)
    add_openai_errors(server.app)
    return server


def ready_banner(served: ServedModel, host: str, port: int) -> str:
    """The line the server prints once it answers: the model, its region, the default one, chat, the address."""
    chat = "chat" if served.chat_template else f"no chat: {served.no_chat}"  # an unreadable template is no missing one
    return (
        f"serving {served.name!r} ({served.region.summary()}; default {sharing_layers_text(served.default_sharing)}; "
        f"{chat}) at http://{host}:{port}/v1 — ready; SIGTERM or Ctrl+C stops it"
    )


def run_server(api, accelerator: str, index: int | None, host: str, port: int, log_level: str) -> None:
    """Run LitServe until SIGTERM or Ctrl+C; returns after a clean shutdown."""
    from epas_lightning.serve.liveness import (
        device_failed,
        ending_with_this_process,
        first_ended,
        server_ended,
        watching_processes,
    )
    from epas_lightning.serve.startup import watching_startup

    check_port_free(host, port)
    served = api.served
    devices = [index or 0] if accelerator == "cuda" else "auto"
    server = lit_server(api, accelerator, devices, ready_banner(served, host, port))
    print(f"loading the model from {api.checkpoint}", file=sys.stderr, flush=True)
    # kept after run returns: the monitor thread outlives it and may log the race until the process exits
    logging.getLogger("litserve.server").addFilter(_shutdown_race)
    logging.getLogger("litserve.server").addFilter(_forced_stop)
    in_flight, grace = api.spec.in_flight, server.uvicorn_graceful_timeout
    unfinished: list[int] = []  # the requests in flight when the grace period ended: LitServe cuts them off

    def stopping() -> None:
        if count := in_flight.value:
            print(
                f"stopping: waiting up to {grace} s for {_requests(count)} in flight to finish; a second Ctrl+C or "
                f"SIGTERM cuts {'it' if count == 1 else 'them'} off",
                file=sys.stderr,
                flush=True,
            )
            deadline = threading.Timer(grace, lambda: unfinished.append(in_flight.value))
            deadline.daemon = True
            deadline.start()

    with (
        signals_stop_server(stopping) as received,
        watching_startup(server) as died,
        watching_processes(server, received, api.device_failure) as ended,
        ending_with_this_process(),
        our_handler_only(),
    ):
        try:
            server.run(host=host, port=port, log_level=log_level, generate_client_file=False, num_api_servers=1)
        except KeyboardInterrupt as stop:
            if len(received) < 2:  # during startup, LitServe lets the first one out
                raise
            cut_off = in_flight.value
            _kill_server_processes(server)  # and watching_startup shuts LitServe's manager down
            what = "Ctrl+C" if received[-1] == signal.SIGINT else signal.Signals(received[-1]).name
            stop.reason = f"second {what}: {_cut_off(cut_off)}"
            raise
        except RuntimeError as e:  # LitServe's "One or more workers failed to start"
            if died:
                raise UserError(
                    f"the inference worker ended while loading the model ({died[0]})",
                    f"--checkpoint {api.checkpoint}",
                    "free memory or serve on a machine with more",
                ) from e
            failure = api.startup.failure()
            if failure is None:
                raise
            raise failure from None
        except (EOFError, OSError):  # LitServe's monitor shut the server down under run: its worker ended
            ended.append(first_ended(server, []))
            if not ended[0] and not api.device_failure.reason:
                raise
    if api.device_failure.reason and not received:
        raise device_failed(api.device_failure.reason)
    if ended and not received:
        raise server_ended(ended[0])
    cut_off = f" after the {grace} s grace period: {_cut_off(unfinished[0])}" if unfinished and unfinished[0] else ""
    print(f"server stopped{cut_off}", file=sys.stderr, flush=True)


@contextmanager
def our_handler_only() -> Iterator[None]:
    """Our log lines are printed by our handler alone while LitServe runs: its first ``logging.debug`` gives the root
    logger a stderr handler (``basicConfig``) before it forks the HTTP process, which printed each of our lines twice
    (the inference worker, spawned, does the same in its setup)."""
    from epas_lightning.cli import show_package_logs

    show_package_logs()
    package = logging.getLogger("epas_lightning")
    propagate, package.propagate = package.propagate, False
    try:
        yield
    finally:
        package.propagate = propagate


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _cut_off(count: int) -> str:
    return "no request was cut off" if count == 0 else f"{_requests(count)} {'was' if count == 1 else 'were'} cut off"


def _kill_server_processes(server) -> None:
    """End LitServe's HTTP processes (uvicorn) and inference workers at once, with the requests in flight."""
    http = [process for process in multiprocessing.active_children() if process.name.startswith("LitServer-")]
    for process in [*http, *server.inference_workers]:  # the HTTP processes as LitServe names them
        process.kill()
        process.join()


def _forced_stop(record: logging.LogRecord) -> bool:
    """Drop LitServe's warnings that it killed a process still busy when the grace period ended: the line that ends
    ``serve`` says how many requests were cut off."""
    return "Did not terminate gracefully" not in record.getMessage()


def _shutdown_race(record: logging.LogRecord) -> bool:
    """Drop LitServe's "Monitoring worker crashed" traceback when its monitor thread finds the process manager already
    gone (a broken pipe or closed connection): that happens only while the server shuts down, at random."""
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith("Monitoring worker crashed") and isinstance(error, OSError | EOFError))
