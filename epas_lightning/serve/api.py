"""``serve`` on LitServe: the OpenAI completions endpoints, the inference worker's loop and its model.

LitServe runs the HTTP side (uvicorn) and one inference worker process, and passes requests and responses between them.
:class:`CompletionsSpec` adds ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` (a ``LitSpec`` with its
own endpoints; LitServe's ``OpenAISpec`` knows nothing of regions, token ids or our engine). A request is checked on the
HTTP side and sent to the worker as one :class:`~epas_lightning.serve.engine.SequenceRequest` per choice; the worker's
loop (:class:`EngineLoop`, a ``LitLoop``) feeds them to the :class:`~epas_lightning.serve.engine.Engine`, which decodes
every sequence in flight one token per step, so a request that arrives while others decode joins at the next step
instead of waiting for a whole batch to finish. A streamed sequence sends its text as it comes; the others send it once,
at the end. When a client goes away (it closes a stream, or stops waiting for a response), its sequences are cancelled:
a :data:`CANCEL` item follows them on the same queue and the worker drops them from the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import queue
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from epas_lightning.cli import show_package_logs
from epas_lightning.inference.generate_cli import load_for_inference
from epas_lightning.runtime import DType
from epas_lightning.serve.engine import Engine, Output, StepFailed
from epas_lightning.serve.failures import DeviceLost, lost_device, one_line
from epas_lightning.serve.liveness import DeviceFailure, end_with_parent
from epas_lightning.serve.model_card import ServedModel
from epas_lightning.serve.protocol import (
    Completion,
    RequestError,
    chunk,
    completion_response,
    parse_chat,
    parse_completion,
    role_chunk,
    usage_chunk,
)
from epas_lightning.serve.startup import StartupReport

logger = logging.getLogger("epas_lightning.serve")
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
WORKER_FAILED = "the inference worker failed while decoding this request (see the server log)"
CANCEL = "cancel"
"""Sent in place of a sequence on the request queue: stop decoding that uid, its client went away."""
DISCONNECT_POLL = 0.5
"""Seconds between checks whether the client of a request that does not stream is still there."""
CLIENT_GONE = 499
"""The status of a response nobody reads, its client having gone away (nginx's "client closed request")."""
ROUTES = f"POST {COMPLETIONS_PATH}, POST {CHAT_PATH}, GET {MODELS_PATH}, GET /health"


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def add_openai_errors(app: FastAPI) -> None:
    """The errors FastAPI answers itself (an unknown route, a wrong method, an unexpected failure) in OpenAI's error
    body, which the openai SDK reads, instead of FastAPI's ``{"detail": ...}`` or a plain-text 500; an unexpected
    failure keeps its traceback in the log."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestError, lambda request, error: _error_response(error))  # BodyLimit's
    app.add_exception_handler(Exception, _server_error)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = str(error.detail)
    if error.status_code in (404, 405):
        message = f"Invalid URL ({request.method} {request.url.path}): this server answers {ROUTES}"
    response = _error_response(RequestError(message, status=error.status_code))
    response.headers.update(error.headers or {})  # a 405's Allow
    return response


class BodyLimit:
    """ASGI middleware: a request body of more than ``limit`` bytes is a 413, refused by its Content-Length before it
    is read, or as soon as a body sent in chunks passes the limit (the rest is not read, nor parsed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _error_response(self.too_large())(scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large()
            return message

        await self.app(scope, receive_within_limit, send)

    def too_large(self) -> RequestError:
        return RequestError(
            f"the request body is larger than the {self.limit / 2**20:g} MiB this server accepts (serve "
            "--max-request-mb)",
            status=413,
        )


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return _error_response(RequestError("the server failed on this request (see the server log)", status=500))


def _sse(record: dict[str, Any]) -> str:
    return f"data: {json.dumps(record)}\n\n"


class CompletionsSpec(LitSpec):
    """``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` and
    ``GET /v1/models/{id}``."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__()
        self.served = served
        self.api_path = COMPLETIONS_PATH
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(MODELS_PATH, self.models, ["GET"])
        self.add_endpoint(MODELS_PATH + "/{model_id:path}", self.model, ["GET"])  # ids like org/name
        self.in_flight = multiprocessing.get_context("spawn").Value("i", 0)
        """Requests whose sequences are being decoded: counted in the HTTP process, read by the main one."""

    @property
    def stream(self) -> bool:
        return True  # responses come as a sequence of messages from the worker, streamed to the client or not

    def decode_request(self, request, context_kwargs=None):  # unused: EngineLoop decodes
        return request

    def encode_response(self, output, context_kwargs=None):  # unused: EngineLoop encodes
        return output

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self.served.model_record()]})

    async def model(self, model_id: str) -> JSONResponse:
        if model_id != self.served.name:
            error = RequestError(f"the model {model_id!r} does not exist", "model", 404, "model_not_found")
            return _error_response(error)
        return JSONResponse(self.served.model_record())

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, parse_chat)

    async def _complete(self, request: Request, parse: Callable[..., Completion]) -> Response:
        try:
            body = await request.json()
        except ClientDisconnect:  # it went away before its request was read: nobody reads a response
            return Response(status_code=CLIENT_GONE)
        except ValueError:
            return _error_response(RequestError("the request body is not valid JSON"))
        except RecursionError:  # Python's JSON parser recurses once per level
            return _error_response(RequestError("the request body is JSON nested too deeply"))
        try:  # in a thread: rendering a chat and tokenizing a long prompt do not hold up the other requests
            completion = await asyncio.to_thread(lambda: parse(body, self.served, self.served.tokenizer()))
        except RequestError as e:
            return _error_response(e)
        event = asyncio.Event()
        uids = [self._submit(sequence, event) for sequence in completion.sequences]
        if completion.stream:  # a client that goes away closes the stream, and so the messages
            return StreamingResponse(
                self._stream(completion, self._messages(uids, event)), media_type="text/event-stream"
            )
        messages = self._messages(uids, event, request.is_disconnected)
        texts, reasons, infos = [""] * len(uids), [""] * len(uids), [{}] * len(uids)
        async with aclosing(messages):
            async for index, message in messages:
                if "error" in message:
                    return _error_response(RequestError(message["error"], status=500))
                texts[index] += message["text"]
                if message.get("finish_reason"):
                    reasons[index], infos[index] = message["finish_reason"], message["info"]
        if "" in reasons:  # the client went away: nobody reads a response
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(completion_response(completion, texts, reasons, infos))

    def _submit(self, sequence: Any, event: asyncio.Event) -> str:
        """Queue one sequence for the worker; its messages arrive in its own deque and set the request's event."""
        uid = uuid.uuid4().hex
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=deque())
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), sequence))
        return uid

    async def _messages(
        self, uids: list[str], event: asyncio.Event, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(choice index, message) in the order the worker sends them, until every sequence has finished or
        ``disconnected`` (asked while no message comes) says the client is gone.

        The sequences still running when it ends (the client went away, the caller closed it) are cancelled.
        """
        queues = [self.response_buffer[uid].response_queue for uid in uids]
        running = set(range(len(uids)))
        self._count_in_flight(1)
        try:
            while running:
                if not await _next_message(event, disconnected):
                    return
                for index in sorted(running):
                    while queues[index]:
                        data, status = queues[index].popleft()
                        if status == LitAPIStatus.FINISH_STREAMING:
                            running.discard(index)
                            break
                        if status == LitAPIStatus.ERROR:
                            running.discard(index)
                            yield index, {"error": data or WORKER_FAILED}
                            break
                        yield index, json.loads(data)
        finally:
            for index, uid in enumerate(uids):
                self.response_buffer.pop(uid, None)  # LitServe drops the messages still on their way for it
                if index in running:
                    self.request_queue.put((self.response_queue_id, uid, time.monotonic(), CANCEL))
            self._count_in_flight(-1)

    def _count_in_flight(self, change: int) -> None:
        with self.in_flight.get_lock():
            self.in_flight.value += change

    async def _stream(self, completion: Completion, messages: AsyncIterator) -> AsyncIterator[str]:
        """Server-sent events: (a chat's role first,) one chunk per piece of text, the usage chunk if asked for, then
        ``[DONE]``."""
        infos = []
        if completion.chat:
            for index in range(len(completion.sequences)):
                yield _sse(role_chunk(completion, index))
        async with aclosing(messages):
            async for index, message in messages:
                if "error" in message:
                    yield _sse(RequestError(message["error"], status=500).body())
                    return
                if message["text"] or message.get("finish_reason"):
                    info = message.get("info")
                    infos += [info] if info else []
                    yield _sse(chunk(completion, index, message["text"], message.get("finish_reason"), info))
        if completion.include_usage:
            yield _sse(usage_chunk(completion, infos))
        yield "data: [DONE]\n\n"


async def _next_message(event: asyncio.Event, disconnected: Callable[[], Awaitable[bool]] | None) -> bool:
    """Wait until ``event`` is set (and clear it); False instead once ``disconnected`` is true (asked every
    :data:`DISCONNECT_POLL` seconds)."""
    while True:
        try:
            await asyncio.wait_for(event.wait(), None if disconnected is None else DISCONNECT_POLL)
        except asyncio.TimeoutError:
            if await disconnected():
                return False
            continue
        event.clear()
        return True


def _forward(request_queue, inbox: queue.Queue) -> None:
    """Move requests from LitServe's queue (another process: each read is a round trip) to the worker's own queue,
    so that decode steps never wait on it."""
    item = None
    while item != _SENTINEL_VALUE:
        try:
            item = request_queue.get()
        except (EOFError, OSError):  # the server is shutting down
            item = _SENTINEL_VALUE
        inbox.put(item)


class EngineLoop(LitLoop):
    """The inference worker's loop: take new sequences (and cancellations) between decode steps, step the engine,
    send what it made. Its tables hold the sequences in the engine: the response queue, whether it streams and the
    text not sent yet of each uid."""

    def __init__(self, device_failure: DeviceFailure | None = None) -> None:
        super().__init__()
        self.device_failure = device_failure or DeviceFailure()
        """Set when the device fails for good: ``/health`` and the main process read it."""
        self.routes: dict[Hashable, int] = {}
        self.streams: dict[Hashable, bool] = {}
        self.pieces: dict[Hashable, list[str]] = {}

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        engine: Engine = lit_api.engine
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_forward, args=(request_queue, inbox), daemon=True, name="epas-receive").start()
        while self._receive(engine, inbox):
            self._send(engine, transport)

    def _receive(self, engine: Engine, inbox: queue.Queue) -> bool:
        """Add the sequences that have arrived and cancel those asked for (waiting for an item while the engine is
        idle); False on shutdown."""
        wait = engine.wait_time()
        try:
            item = inbox.get(block=wait != 0, timeout=1.0 if wait is None else wait)
            while True:
                if item == _SENTINEL_VALUE:
                    return False
                response_queue_id, uid, _, sequence = item
                if sequence == CANCEL:
                    self._cancel(engine, uid)
                else:
                    self.routes[uid], self.streams[uid], self.pieces[uid] = response_queue_id, sequence.stream, []
                    engine.add(uid, sequence)
                item = inbox.get_nowait()
        except queue.Empty:
            return True

    def _cancel(self, engine: Engine, uid: Hashable) -> None:
        """Stop a sequence whose client went away; nothing more is sent for it. One that has finished is gone."""
        if uid in self.routes:
            engine.cancel(uid)
            self._forget(uid)
            logger.info("cancelled sequence %s: its client went away", uid)

    def _send(self, engine: Engine, transport) -> None:
        try:
            outputs = engine.step()
        except StepFailed as failed:  # what the step made still goes out: the sequences it finished are answered
            if isinstance(failed.__cause__, DeviceLost):
                message = self._device_lost(failed.__cause__.__cause__)
            else:
                logger.error("decoding failed; the sequences in flight get an error", exc_info=failed.__cause__)
                message = ""
            for output in failed.outputs:
                self._deliver(transport, output)
            for uid in engine.abort():
                self._put(transport, uid, message, LitAPIStatus.ERROR)
            return
        for output in outputs:
            self._deliver(transport, output)

    def _device_lost(self, error: BaseException) -> str:
        """The device failed for good: said once (the main process then stops the server); what each sequence in
        flight, and each that comes later, is told."""
        if not self.device_failure.reason:
            logger.critical(
                "the device failed (%s): nothing more runs on it in this process; the requests in flight get an "
                "error and serve stops",
                one_line(error),
                exc_info=error,
            )
            self.device_failure.set(one_line(error))
        return lost_device(error)

    def _deliver(self, transport, output: Output) -> None:
        uid, finished = output.key, output.finish_reason is not None
        if output.finish_reason == "error":  # its client gets the message, not the text held back
            self._put(transport, uid, output.text, LitAPIStatus.ERROR)
            return
        if not self.streams[uid] and not finished:
            self.pieces[uid].append(output.text)
            return
        text = "".join(self.pieces[uid]) + output.text
        if text or finished:
            message = {"text": text, "finish_reason": output.finish_reason, "info": output.info}
            self._put(transport, uid, json.dumps(message), LitAPIStatus.OK)
        self.pieces[uid] = []
        if finished:
            self._put(transport, uid, "", LitAPIStatus.FINISH_STREAMING)

    def _put(self, transport, uid: Hashable, data: str, status: str) -> None:
        self.put_response(transport, self.routes[uid], uid, data, status, LoopResponseType.STREAMING)
        if status != LitAPIStatus.OK:  # finished or failed: nothing more is sent for it
            self._forget(uid)

    def _forget(self, uid: Hashable) -> None:
        for table in (self.routes, self.streams, self.pieces):
            table.pop(uid, None)


class CompletionsAPI(ls.LitAPI):
    """The model behind the endpoints: loaded in the inference worker, decoded by :class:`EngineLoop`."""

    def __init__(
        self,
        served: ServedModel,
        checkpoint: Path,
        dtype: DType,
        attention_reuse: bool,
        max_batch_size: int,
        batch_timeout: float,
    ) -> None:
        device_failure = DeviceFailure()
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            spec=CompletionsSpec(served),
            loop=EngineLoop(device_failure),
        )
        self.device_failure = device_failure
        self.served, self.checkpoint, self.dtype, self.attention_reuse = served, checkpoint, dtype, attention_reuse
        self.startup = StartupReport()

    def setup(self, device: str) -> None:
        if (parent := multiprocessing.parent_process()) is not None:  # spawned: the main process's fork hook never ran
            end_with_parent(parent.pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every process: the main one shuts us down
        show_package_logs()  # this process was spawned: our INFO lines (cancellations) go to stderr as in the main one
        logging.getLogger("epas_lightning").propagate = False  # and not once more through LitServe's root handler
        # Requests without a seed sample from the default generators; CUDA's start at one fixed seed in every process,
        # so each restart of the server gave the same "random" answers again. A seed from the OS, for every device:
        torch.seed()
        with self.startup.reporting():  # a user error is said by the main process, in one line
            loaded = load_for_inference(self.checkpoint, device, self.dtype, self.attention_reuse)
            tokenizer = self.served.tokenizer()
            self.engine = Engine.for_tokenizer(
                loaded.model, loaded.region, tokenizer, self.max_batch_size, self.batch_timeout
            )
        self.stop_asked = False
        signal.signal(signal.SIGTERM, self._finish_then_stop)

    def _finish_then_stop(self, signum, frame) -> None:
        """SIGTERM while sequences are decoded: the first one is put off, so that they finish (sent to every process
        of the server, as systemd does, it cut them off at once and left their clients waiting until the HTTP
        process's graceful timeout); the main process ends this one once the HTTP process is done. Otherwise, or on a
        second SIGTERM, this process ends at once, as by default."""
        if self.engine.busy and not self.stop_asked:
            self.stop_asked = True
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    def health(self) -> bool:
        """``/health`` (in the HTTP process): 503 once the worker's device has failed for good."""
        return not self.device_failure.reason

    def predict(self, x: Any) -> Any:
        raise NotImplementedError("EngineLoop decodes; predict is not called")
