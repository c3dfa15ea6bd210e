"""The OpenAI completions and chat completions APIs as ``serve`` speaks them: the request schemas, their checks, and
the response objects.

A request is checked completely before anything reaches the model: a wrong type, a field this server does not
implement, an unknown model, a prompt longer than the model's context, ``max_tokens <= 0``, a region the checkpoint
never trained or a budget nothing meets is a :class:`RequestError` (HTTP 4xx with an OpenAI-style
``{"error": {...}}`` body). Two fields extend the API: the region a request runs with, ``sharing_layers`` (the first N
layers of the trained region) or ``budget`` (a fraction of dense FLOPs, resolved like ``bench --budget``); the openai
client sends them with ``extra_body=``. A chat request's messages become one prompt through the checkpoint's chat
template (:mod:`~epas_lightning.serve.chat`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from epas_lightning.inference.sampling import SamplingError, check_sampling, decoded_sampling
from epas_lightning.seeds import SAMPLING_SEEDS, seed_out_of_range
from epas_lightning.serve.chat import MAX_TOKEN_CHARS, TemplateFailure, TemplateRefusal, chat_prompt_ids
from epas_lightning.serve.engine import Sampling, SequenceRequest

if TYPE_CHECKING:
    from epas_lightning.data.tokenizer import TextTokenizer
    from epas_lightning.serve.model_card import ServedModel

MAX_STOP = 4
"""Stop strings per request, as OpenAI allows."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for completions."""
MAX_TEMPERATURE = 2.0
"""The highest ``temperature`` a request may ask for, as OpenAI allows."""
EVERY_TOKEN = (-1, 0)
"""The ``top_k`` values that mean no top-k cut, as vLLM (whose extension ``top_k`` is) reads them."""


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = False


class SamplingRequest(BaseModel):
    """The fields both endpoints take: OpenAI's (unsupported ones are refused when set) plus the region fields; a
    field no schema names is refused, as OpenAI refuses it (it may be one that changes the output)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted and unused, as the fields below that do not change the output
    sharing_layers: int | None = None
    budget: float | None = None
    # OpenAI fields this server does not implement: refused unless left at their defaults
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    """A message: its ``content`` text, or a list of content parts of which only text ones are read. The fields of
    :data:`UNREAD_MESSAGE_FIELDS` are accepted when null (a response's message sent back whole), refused when set."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[dict[str, Any]]
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None
    tool_call_id: str | None = None


UNREAD_MESSAGE_FIELDS = ("refusal", "tool_calls", "function_call", "audio", "annotations", "tool_call_id")
"""A message's fields for tools, refusals and audio, which this server does not implement (the openai SDK's
``message.model_dump()`` holds them, null)."""


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``: text messages; no tools, no logprobs, no audio."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # accepted and unused: they do not change the output
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


@dataclass
class Completion:
    """A checked request: its prompts as token ids, its region and one sequence per (prompt, choice)."""

    model: str
    prompts: list[list[int]]
    sequences: list[SequenceRequest]
    """Prompt-major: choice ``i`` of prompt ``p`` is ``sequences[p * n + i]``, the OpenAI choice index."""
    region: dict[str, Any]
    stream: bool
    include_usage: bool
    id: str
    created: int
    chat: bool = False
    """A chat completion: choices carry a ``message`` (streamed: a ``delta``) instead of ``text``."""


def parse_completion(body: Any, served: ServedModel, tokenizer: TextTokenizer) -> Completion:
    """Check a request body and turn it into sequences for the engine; :class:`RequestError` if it cannot run."""
    request = _validate(body, CompletionRequest, served)
    _refuse_unsupported(
        {
            "echo": bool(request.echo),
            "logprobs": request.logprobs is not None,
            "best_of": request.best_of not in (None, 1, request.n),
            "suffix": request.suffix is not None,
        },
        request,
    )
    max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    _check_max_tokens(max_tokens, "max_tokens", served)
    prompt = request.prompt
    prompt = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    _check_choices(len(prompt), request.n, served)  # before the prompts are tokenized
    prompts = _prompt_ids(prompt, tokenizer, served)
    return _completion(request, served, prompts, max_tokens, chat=False, field="max_tokens")


def parse_chat(body: Any, served: ServedModel, tokenizer: TextTokenizer) -> Completion:
    """Check a chat request body and turn its messages into one prompt (:func:`parse_completion`'s checks)."""
    request = _validate(body, ChatRequest, served)
    _refuse_unsupported(
        {
            "logprobs": bool(request.logprobs),
            "top_logprobs": request.top_logprobs is not None,
            "tools": bool(request.tools),
            "tool_choice": request.tool_choice not in (None, "none", "auto"),
            "functions": bool(request.functions),
            "function_call": request.function_call not in (None, "none", "auto"),
            "response_format": request.response_format not in (None, {"type": "text"}),
            "modalities": request.modalities not in (None, ["text"]),
            "audio": request.audio is not None,
            "web_search_options": request.web_search_options is not None,
        },
        request,
    )
    if served.chat_template is None:
        raise RequestError(served.no_chat_message, "messages")
    field = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
    if max_tokens is not None:
        _check_max_tokens(max_tokens, field, served)
    prompt = _chat_prompt(request.messages, served, tokenizer)
    if max_tokens is None:  # as OpenAI: as long as the context allows (this server's --max-tokens at most)
        max_tokens = max(1, min(served.max_tokens, served.config.context_length - len(prompt)))
    return _completion(request, served, [prompt], max_tokens, chat=True, field=field)


def _validate(body: Any, schema: type[SamplingRequest], served: ServedModel) -> Any:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        raise _schema_error(e) from None
    if request.model != served.name:
        raise RequestError(
            f"the model {request.model!r} does not exist: this server serves {served.name!r}", "model", 404,
            "model_not_found",
        )  # fmt: skip
    return request


def _check_max_tokens(max_tokens: int, field: str, served: ServedModel) -> None:
    if max_tokens < 1:
        raise RequestError(f"{field} must be at least 1, got {max_tokens}", field)
    if max_tokens > served.max_tokens:
        raise RequestError(f"{field} may be at most {served.max_tokens} on this server", field)


def _completion(
    request: SamplingRequest, served: ServedModel, prompts: list[list[int]], max_tokens: int, chat: bool, field: str
) -> Completion:
    """The checks both endpoints share, and the sequences of a request whose prompts are token ids; ``field`` is the
    request's name for ``max_tokens`` (chat: ``max_completion_tokens`` where it gave that)."""
    sampling = _sampling(request)
    n = _check_choices(len(prompts), request.n, served)
    n_shared = served.resolve_region(request.sharing_layers, request.budget)
    for ids in prompts:
        _check_length(ids, max_tokens, served.config.context_length, "messages" if chat else "prompt", field)
    stop = _stop_strings(request.stop)
    sequences = [
        SequenceRequest(
            prompt=ids,
            max_tokens=max_tokens,
            n_shared=n_shared,
            sampling=sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i),
            stop=stop,
            stream=bool(request.stream),
            reply=chat,
        )
        for ids in prompts
        for i in range(n)
    ]
    options = request.stream_options
    if options is not None and not request.stream:  # as OpenAI refuses it (it was taken and ignored)
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    return Completion(
        model=served.name,
        prompts=prompts,
        sequences=sequences,
        region={**served.region_record(n_shared), "budget": request.budget},
        stream=bool(request.stream),
        include_usage=bool(options and options.include_usage),
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        created=int(time.time()),
        chat=chat,
    )


def _check_choices(prompts: int, n: int | None, served: ServedModel) -> int:
    """``n``, checked: the sequences of ``prompts`` prompts x ``n`` fit ``--max-choices`` (the error names
    ``prompt`` where the prompts alone are too many)."""
    n = 1 if n is None else n
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}", "n")
    if prompts * n > served.max_choices:
        raise RequestError(
            f"{prompts} prompt(s) x n={n} is more than the {served.max_choices} completions one request may ask "
            "for on this server",
            "prompt" if prompts > served.max_choices else "n",
        )
    return n


def _check_text(text: str, field: str) -> None:
    """A lone surrogate (a JSON ``\\ud800``) is not text: no tokenizer encodes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"{field} holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not text: send "
            "valid Unicode",
            field.split(".")[0],
        ) from None


def _check_chars(chars: int, what: str, fix: str, field: str, served: ServedModel) -> None:
    """Text of ``chars`` characters may fit the context (checked before it is tokenized or rendered)."""
    context_length = served.config.context_length
    if chars > context_length * MAX_TOKEN_CHARS:
        raise RequestError(
            f"{what} {chars} characters, more than the model's context length of {context_length} tokens can hold: "
            f"{fix}",
            field,
        )


def _schema_error(error: ValidationError) -> RequestError:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"unrecognized request argument supplied: {where} (this server does not implement it)"
    elif field == "prompt" and first["type"] != "missing":
        message = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    elif field == "messages" and first["loc"][2:3] == ("content",) and first["type"] != "missing":
        message = f"messages.{first['loc'][1]}.content must be a string or a list of text parts"
    else:
        message = f"{where}: {first['msg']}" + (f" (got {first['input']!r})" if first["type"] != "missing" else "")
    return RequestError(message, field)


def _refuse_unsupported(unsupported: dict[str, bool], request: SamplingRequest) -> None:
    unsupported = {
        **unsupported,
        "logit_bias": bool(request.logit_bias),
        "presence_penalty": bool(request.presence_penalty),
        "frequency_penalty": bool(request.frequency_penalty),
    }
    for name, used in unsupported.items():
        if used:
            raise RequestError(f"{name} is not supported by this server; leave it at its default", name)


def _sampling(request: SamplingRequest) -> Sampling:
    """The request's sampling, checked as ``generate`` checks it, with OpenAI's ranges: ``temperature`` up to 2,
    ``top_p`` in [0, 1], where 0 keeps the most likely token alone (greedy decoding, as transformers reads it)."""
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    top_k = None if request.top_k in EVERY_TOKEN else request.top_k
    try:
        check_sampling(temperature, top_k, top_p)
    except SamplingError as e:
        raise RequestError(f"{e.what}: {e.fix}", e.setting) from None
    if temperature > MAX_TEMPERATURE:
        raise RequestError(f"temperature must lie in [0, {MAX_TEMPERATURE:g}], got {temperature}", "temperature")
    if request.seed is not None and (problem := seed_out_of_range(request.seed, SAMPLING_SEEDS)):
        raise RequestError(problem, "seed")
    return Sampling(*decoded_sampling(temperature, top_k, top_p), request.seed)  # top_p 0: decoded, batched as greedy


def _prompt_ids(prompt: Any, tokenizer: TextTokenizer, served: ServedModel) -> list[list[int]]:
    """Token ids of each prompt (a list of them): text gets BOS in front (as in ``generate``), token ids are taken as
    they are, each one the tokenizer has (as vLLM, and as a completion never emits another: a padded vocabulary's rows
    past it never trained)."""
    if not prompt:
        raise RequestError("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], str):
        for text in prompt:
            _check_text(text, "prompt")
            _check_chars(len(text), "the prompt holds", "shorten it", "prompt", served)
        return [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(prompt)]
    vocab = tokenizer.vocab_size  # at most the model's (check_fits)
    for ids in prompt:
        if not ids:
            raise RequestError("a prompt of token ids must hold at least one token", "prompt")
        if (outside := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
            raise RequestError(
                f"prompt token ids must lie in 0..{vocab - 1} (the tokenizer's ids), got {outside}", "prompt"
            )
    return [list(ids) for ids in prompt]


def _chat_prompt(messages: list[ChatMessage], served: ServedModel, tokenizer: TextTokenizer) -> list[int]:
    """The token ids of the chat template's text for ``messages``: its control tokens as their ids."""
    if not messages:
        raise RequestError("messages must hold at least one message", "messages")
    context_length = served.config.context_length
    if len(messages) > context_length:  # else many short ones render past the template's bound: its failure, a 500
        raise RequestError(
            f"messages holds {len(messages)} messages, more than the model's context length of {context_length} "
            "tokens can hold (each takes a token at least): send fewer",
            "messages",
        )
    records = [_template_message(i, m) for i, m in enumerate(messages)]
    chars = sum(len(text) for record in records for text in record.values())  # a role or a name is written too
    _check_chars(chars, "the messages hold", "shorten them", "messages", served)
    most = context_length * MAX_TOKEN_CHARS  # no longer text fits in the context
    try:  # the template may add its own text (headers, a system prompt), not as much again
        return chat_prompt_ids(served.chat_template, records, tokenizer, max_chars=2 * most)
    except TemplateRefusal as e:
        raise RequestError(f"the model's chat template refuses these messages: {e}", "messages") from None
    except TemplateFailure as e:
        raise RequestError(
            f"the model's chat template failed on these messages ({e}); the server's operator must fix the template "
            f"beside {served.tokenizer_path}",
            "messages",
            500,
            "chat_template_error",
        ) from None


def _template_message(index: int, message: ChatMessage) -> dict[str, str]:
    """A message as the template reads it: a list of text parts becomes their texts joined by newlines (as vLLM
    joins them); a part of another kind (image, audio, file) is refused, this model reads text only."""
    for name in UNREAD_MESSAGE_FIELDS:
        if getattr(message, name):
            raise RequestError(f"messages.{index}.{name} is not supported by this server; leave it unset", "messages")
    record = message.model_dump(include={"role", "content", "name"}, exclude_none=True)
    for name, value in record.items():
        if isinstance(value, str):
            _check_text(value, f"messages.{index}.{name}")
    if isinstance(message.content, str):
        return record
    texts = []
    for number, part in enumerate(message.content):
        where = f"messages.{index}.content.{number}"
        kind = part.get("type")
        if kind != "text":
            raise RequestError(f"{where} is a {kind!r} part: this model reads text parts only", "messages")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: a text part needs its 'text', a string", "messages")
        _check_text(part["text"], where)
        texts.append(part["text"])
    return {**record, "content": "\n".join(texts)}


def _check_length(ids: list[int], max_tokens: int, context_length: int, prompt_field: str, field: str) -> None:
    if len(ids) >= context_length:
        raise RequestError(
            f"the prompt is {len(ids)} tokens long; the model's context length is {context_length}: shorten it",
            prompt_field,
        )
    if len(ids) + max_tokens > context_length:
        raise RequestError(
            f"the prompt ({len(ids)} tokens) plus {field}={max_tokens} exceeds the model's context length "
            f"{context_length}: ask for at most {context_length - len(ids)} tokens",
            field,
        )


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP:
        raise RequestError(f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise RequestError("stop strings must not be empty", "stop")
    return tuple(stop)


# ---------------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------------


def _choice(completion: Completion, index: int, text: str, finish_reason: str | None, piece: bool) -> dict[str, Any]:
    """A choice, or one streamed ``piece`` of it: its ``text``, a chat's ``message`` or ``delta``."""
    if not completion.chat:
        content = {"text": text}
    elif piece:
        content = {"delta": {"content": text} if text or not finish_reason else {}}
    else:
        content = {"message": {"role": "assistant", "content": text}}
    return {"index": index, **content, "finish_reason": finish_reason, "logprobs": None}


def usage(completion: Completion, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in completion.prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def region_report(completion: Completion, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``epas`` field: the region that served the request and the KV cache its sequences held."""
    cache = sum(info["kv_cache_bytes"] for info in infos)
    dense = sum(info["dense_kv_cache_bytes"] for info in infos)
    return {
        **completion.region,
        "kv_cache_bytes": cache,
        "dense_kv_cache_bytes": dense,
        "kv_cache_saving": 1 - cache / dense if dense else 0.0,
        "batch_size": max((info["batch_size"] for info in infos), default=0),
    }


def _envelope(completion: Completion, piece: bool = False) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if piece else "chat.completion") if completion.chat else "text_completion"
    return {"id": completion.id, "object": kind, "created": completion.created, "model": completion.model}


def completion_response(
    completion: Completion, texts: list[str], finish_reasons: list[str], infos: list[dict[str, Any]]
) -> dict[str, Any]:
    """The whole response of a request that did not stream."""
    return {
        **_envelope(completion),
        "choices": [
            _choice(completion, i, text, reason, piece=False)
            for i, (text, reason) in enumerate(zip(texts, finish_reasons, strict=True))
        ],
        "usage": usage(completion, sum(info["completion_tokens"] for info in infos)),
        "epas": region_report(completion, infos),
    }


def chunk(
    completion: Completion, index: int, text: str, finish_reason: str | None, info: dict[str, Any] | None
) -> dict[str, Any]:
    """One streamed piece of choice ``index``; the last piece of a choice reports its KV cache in ``epas``."""
    return {
        **_envelope(completion, piece=True),
        "choices": [_choice(completion, index, text, finish_reason, piece=True)],
        "usage": None,
        "epas": region_report(completion, [info]) if info else completion.region,
    }


def role_chunk(completion: Completion, index: int) -> dict[str, Any]:
    """The first streamed piece of a chat choice: the assistant's role, as OpenAI sends it."""
    record = chunk(completion, index, "", None, None)
    record["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return record


def usage_chunk(completion: Completion, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The last streamed piece when ``stream_options.include_usage`` is set: no choices, the usage and the region."""
    return {
        **_envelope(completion, piece=True),
        "choices": [],
        "usage": usage(completion, sum(info["completion_tokens"] for info in infos)),
        "epas": region_report(completion, infos),
    }
