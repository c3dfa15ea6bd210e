"""``serve``: the engine in-process, then the server in a subprocess driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import train_tiny_sentencepiece
from model_dirs import save_consolidated, save_scripted

from epas_lightning import Llama, LlamaConfig
from epas_lightning.checkpoint import load_model
from epas_lightning.cli import main as cli_main
from epas_lightning.data.tokenizer import load_tokenizer, train_byte_level_bpe
from epas_lightning.inference import generate, set_region
from epas_lightning.serve.engine import Engine, Sampling, SequenceRequest
from epas_lightning.serve.text import TextStream

REPO = Path(__file__).resolve().parents[1]
TRAINED = [2, 3]  # the deepest 2 of 4 layers
CHATML = (  # Qwen2.5-Instruct's, without tools; blocks on lines of their own (trim_blocks, lstrip_blocks)
    "{% for message in messages %}\n"
    "    {% if loop.first and messages[0]['role'] != 'system' %}\n"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {% endif %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "{{ '<|im_start|>assistant\\n' }}\n"
    "{% endif %}\n"
)
LLAMA3 = (  # Llama-3.2-Instruct's, shortened: BOS, strftime_now, raise_exception, trim, whitespace control
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{%- set date_string = strftime_now('%Y') %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today: ' + (date_string | length | string) + ' ' + system_message + '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "def main"},
    {"role": "assistant", "content": "return 0"},
    {"role": "user", "content": "Quote <|im_end|> for me"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("serve"))


def chat_checkpoint(root: Path, block_size: int = 64) -> Path:
    """A random 4-layer model whose trained region is layers [3, 2], consolidated with a small byte-level BPE that
    has chat control tokens, and a ChatML chat template (in ``root``)."""
    texts = ["def main():\n    return 0\n", "import os\nprint('hello world')\n"] * 20
    tokenizer = train_byte_level_bpe(texts, 300)
    tokenizer.add_special_tokens(CHAT_TOKENS)
    tokenizer.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("debug", n_layer=4, block_size=block_size))
    model.set_shared_layers(TRAINED)
    path = save_consolidated(model, root / "tiny", root / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint loaded in this process, to compute what ``generate`` gives (never an id past the tokenizer)."""
    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")

    def complete(prompt: str | list[int], n_shared: int, max_tokens: int, **sampling) -> str:
        set_region(loaded.model, n_shared, loaded.region)
        ids = prompt if isinstance(prompt, list) else [tokenizer.bos_id, *tokenizer.encode(prompt)]
        out = generate(
            loaded.model, [ids], max_tokens, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size, **sampling
        ).tokens[0]
        return tokenizer.decode([t for t in out if t != tokenizer.eos_id])

    return complete


# ---------------------------------------------------------------------------------------------------------------------
# In-process: text deltas and the engine
# ---------------------------------------------------------------------------------------------------------------------


def test_text_stream_holds_back_half_characters_and_stop_prefixes():
    pieces = ["ab", "\xe2", "\x82\xac", "c", "ST", "O", "P", "tail"]  # "€" arrives in two byte tokens

    def decode(ids: list[int]) -> str:
        raw = "".join(pieces[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    stream = TextStream(decode, stop=["STOP"])
    deltas = [stream.push(i) for i in range(7)]
    assert deltas == ["ab", "", "€", "c", "", "", ""] and stream.stopped and stream.text == "ab€c"
    stream = TextStream(decode, stop=["STOX"])
    assert "".join(stream.push(i) for i in range(6)) == "ab€c" and stream.finish() == "STO"


def test_text_stream_decodes_the_last_tokens_not_the_whole_completion_at_each_token():
    """Each token decoded the whole completion again: four sequences of 3,000 tokens spent a third of their time in
    the tokenizer (CPU, a tiny model), a cost that grew with the square of their length."""
    pieces = ["a", "\xe2", "\x82\xac", " b", "\xf0\x9f", "\x98\x80"]  # "€" and "😀" in two byte tokens each
    decoded: list[int] = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(pieces[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")

    ids = [(i * 7) % 6 for i in range(600)] + [4]  # ends in half a character
    expected = decode([0, 3, *ids])[len("a b") :]
    decoded.clear()
    stream = TextStream(decode, stop=["€€"], context=[0, 3])
    assert "".join(stream.push(token) for token in ids) + stream.finish() == expected
    assert max(decoded) < 40  # the tokens since the text was last settled, after the 8 before them


def test_long_stop_strings_cost_a_text_stream_no_more_than_short_ones():
    """Each token looked for a stop string's beginning at every end of the whole text: one request's four stop strings
    of 100,000 characters took the worker (which decodes every client's sequences) seconds per thousand tokens, a cost
    that grew with the cube of the text's length."""
    pieces = ["ab", "cd", "xy", "\xe2", "\x82\xac"]
    decode = lambda ids: "".join(pieces[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")  # noqa: E731
    ids = [i % 5 for i in range(1000)]
    stops = ["q" * 100_000, "x" + "z" * 100_000, "cdxy" * 25_000, "\u20acab" * 30_000]
    start = time.perf_counter()
    stream = TextStream(decode, stop=stops)
    text = "".join(stream.push(token) for token in ids)
    assert time.perf_counter() - start < 1.0
    assert text + stream.finish() == decode(ids)
    stream = TextStream(decode, stop=["cdxy\u20acac", "dxy\u20acabcdxy\u20aca"])  # held back, sent, then a stop
    assert [stream.push(token) for token in ids[:11]] == ["ab", "", "", "", "", "c", "", "", "", "", ""]
    assert stream.stopped and stream.text == "abc"


def test_engine_matches_generate_for_every_region_and_seed(checkpoint):
    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    engine = Engine(loaded.model, loaded.region, tokenizer.decode, eos_id=None, max_batch_size=8)
    prompts = [[0, 5, 9, 12], [0, 7], [0, 3, 3]]
    requests = {("greedy", n, i): SequenceRequest(prompt, 6, n) for n in (0, 1, 2) for i, prompt in enumerate(prompts)}
    requests["seeded"] = SequenceRequest(prompts[0], 6, 2, Sampling(temperature=0.9, top_k=20, seed=7))
    for key, request in requests.items():
        engine.add(key, request)
    texts, infos = {key: "" for key in requests}, {}
    while engine.busy:
        for output in engine.step():
            texts[output.key] += output.text
            if output.finish_reason:
                assert output.finish_reason == "length"
                infos[output.key] = output.info
    for key, request in requests.items():
        set_region(loaded.model, request.n_shared, loaded.region)
        s = request.sampling
        out = generate(loaded.model, [request.prompt], 6, temperature=s.temperature, top_k=s.top_k, seed=s.seed)
        assert texts[key] == tokenizer.decode(out.tokens[0]), key
    assert infos[("greedy", 0, 0)]["batch_size"] == 3 and infos["seeded"]["batch_size"] == 1  # grouped by region
    saving = {n: 1 - infos[("greedy", n, 0)]["kv_cache_bytes"] / infos[("greedy", n, 0)]["dense_kv_cache_bytes"]
              for n in (0, 1, 2)}  # fmt: skip
    assert saving == pytest.approx({0: 0.0, 1: 1 / 8, 2: 2 / 8})  # a sharing layer caches only V


def test_a_served_completion_holds_no_id_the_tokenizer_lacks(checkpoint):
    """The tiny model's vocabulary (512) is larger than its tokenizer's, as a padded one is: served completions went
    on with ids past the tokenizer, which decode to nothing (text lost, completion_tokens counting tokens nobody
    sees). The engine serve builds masks them: its completion is ``generate``'s with the tokenizer's vocab_size."""
    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    prompt = [tokenizer.bos_id, *tokenizer.encode("def main")]
    set_region(loaded.model, 2, loaded.region)
    assert max(generate(loaded.model, [prompt], 12).tokens[0]) >= tokenizer.vocab_size  # the case
    kept = generate(loaded.model, [prompt], 12, vocab_size=tokenizer.vocab_size).tokens[0]
    engine = Engine.for_tokenizer(loaded.model, loaded.region, tokenizer)
    engine.add("a", SequenceRequest(prompt, 12, 2))
    outputs = [output for _ in range(12) for output in engine.step()]
    assert "".join(o.text for o in outputs) == tokenizer.decode(kept) and outputs[-1].finish_reason == "length"
    assert max(kept) < tokenizer.vocab_size


def test_a_sentencepiece_completion_keeps_the_space_of_its_first_word(tmp_path):
    """The text of a completion was its tokens decoded alone, and sentencepiece drops the space of a text's first
    token: "hello" went on with "lo ka", not " lo ka". It is now what the tokens add after the prompt."""
    model = train_tiny_sentencepiece(tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(model)
    words = tokenizer.encode(" lo ka")[-2:]
    loaded = load_model(save_scripted(tmp_path / "ckpt", model, tokenizer.vocab_size, words))
    engine = Engine(loaded.model, loaded.region, tokenizer.decode, eos_id=None)
    hello = [tokenizer.bos_id, *tokenizer.encode("hello")]
    engine.add("hello", SequenceRequest(hello, 4, 0))
    engine.add("start", SequenceRequest([tokenizer.bos_id], 4, 0))
    engine.add("stop", SequenceRequest(hello, 4, 0, stop=("a l",)))  # across two tokens
    texts = {"hello": "", "start": "", "stop": ""}
    while engine.busy:
        for output in engine.step():
            texts[output.key] += output.text
    assert texts == {"hello": " lo ka lo ka", "start": "lo ka lo ka", "stop": " lo k"}
    engine = Engine(loaded.model, loaded.region, tokenizer.decode, eos_id=(tokenizer.eos_id, words[1]))  # end of turn
    engine.add("turn", SequenceRequest(hello, 4, 0))
    outputs = [output for _ in range(2) for output in engine.step()]
    assert "".join(o.text for o in outputs) == " lo" and outputs[-1].finish_reason == "stop" and not engine.busy


def token_text(ids: list[int]) -> str:
    """A "decode" that spells the token ids out, so that a sequence's text is its exact tokens."""
    return "".join(f"{t}," for t in ids)


def test_finished_rows_leave_the_batch_and_the_others_decode_as_alone(checkpoint):
    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    prompts = {"a": [0, 5, 9, 12, 4, 4], "b": [0, 7], "c": [0, 3, 3], "d": [0, 8, 2, 6]}
    max_tokens = {"a": 2, "b": 9, "c": 4, "d": 6}
    for key, prompt in prompts.items():
        engine.add(key, SequenceRequest(prompt, max_tokens[key], 2))
    texts, running, infos = {}, set(prompts), {}
    step = 0
    while engine.busy:
        outputs = engine.step()
        step += 1
        if step == 1:
            assert len(engine.groups) == 1  # all four greedy in one region: one batch
            engine.add("e", SequenceRequest([0, 11, 12], 3, 2))  # admitted once a place is free
            running.add("e")
        for output in outputs:
            texts[output.key] = texts.get(output.key, "") + output.text
            if output.finish_reason:
                running.discard(output.key)
                infos[output.key] = output.info
        computed = sum(group.decoder.batch_size for group in engine.groups)  # rows the next step computes
        assert computed == len(running) - len(engine.waiting) <= engine.max_batch_size
    set_region(loaded.model, 2, loaded.region)
    for key, prompt in {**prompts, "e": [0, 11, 12]}.items():
        alone = generate(loaded.model, [prompt], {**max_tokens, "e": 3}[key]).tokens[0]
        assert texts[key] == token_text(alone), key  # token for token, whoever left the batch before it
    assert {key: info["batch_size"] for key, info in infos.items()} == {"a": 4, "b": 4, "c": 4, "d": 4, "e": 1}
    per_row = {key: info["kv_cache_bytes"] for key, info in infos.items()}
    assert per_row["a"] == per_row["b"] == loaded.model.new_cache(1, 6 + 9).nbytes  # one row: longest prompt + 9


def test_greedy_requests_with_a_seed_share_a_batch(checkpoint):
    """A seed changes nothing at temperature 0 (or top_k 1), yet such a sequence decoded alone: clients that always
    send a seed (eval harnesses) got one forward per request and step instead of one per step."""
    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    prompts = {"a": [0, 5, 9], "b": [0, 7], "c": [0, 3, 3, 8]}
    sampling = {"a": Sampling(seed=1), "b": Sampling(), "c": Sampling(temperature=0.7, top_k=1, seed=2)}
    for key, prompt in prompts.items():
        engine.add(key, SequenceRequest(prompt, 3, 2, sampling[key]))
    texts, infos = dict.fromkeys(prompts, ""), {}
    while engine.busy:
        for output in engine.step():
            texts[output.key] += output.text
            infos[output.key] = output.info
    set_region(loaded.model, 2, loaded.region)
    assert texts == {key: token_text(generate(loaded.model, [p], 3).tokens[0]) for key, p in prompts.items()}
    assert {key: info["batch_size"] for key, info in infos.items()} == {"a": 3, "b": 3, "c": 3}  # one batch


def test_cancel_drops_waiting_and_running_sequences(checkpoint):
    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=3)
    prompts = {"a": [0, 5, 9], "b": [0, 7, 1, 2], "c": [0, 3], "d": [0, 4]}
    for key, prompt in prompts.items():
        engine.add(key, SequenceRequest(prompt, 8, 2))
    texts = {key: "" for key in prompts}
    for output in engine.step():  # a, b and c run in one batch, d waits for a place
        texts[output.key] += output.text
    assert [key for key, _, _ in engine.waiting] == ["d"]
    assert engine.cancel("d") and not engine.waiting  # waiting
    assert engine.cancel("b") and engine.groups[0].decoder.batch_size == 2  # running: it leaves the batch
    assert not engine.cancel("b") and not engine.cancel("nobody")
    for _ in range(3):
        for output in engine.step():
            texts[output.key] += output.text
    assert engine.cancel("c") and engine.cancel("a") and not engine.busy  # the group's last rows: it is gone
    assert not engine.step()
    set_region(loaded.model, 2, loaded.region)
    for key, n in {"a": 4, "b": 1, "c": 4, "d": 0}.items():  # tokens made before their cancel, and nothing after
        expected = generate(loaded.model, [prompts[key]], 8).tokens[0][:n]
        assert texts[key] == token_text(expected), key


class SentStatuses:
    """The transport of the worker's loop, in-process: ``sent`` holds ``(uid, status)`` of each message it sends, or
    ``(uid, data, status)`` ``with_data``."""

    def __init__(self, with_data: bool = False) -> None:
        self.sent: list[tuple] = []
        self.with_data = with_data

    def send(self, item, consumer_id: int) -> None:
        uid, (data, status, _, _) = item
        self.sent.append((uid, data, status) if self.with_data else (uid, status))


def test_engine_loop_forgets_cancelled_sequences(checkpoint):
    """The worker's loop, in-process: a cancel stops a streamed or buffered sequence; nothing more is sent for it."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.serve.api import CANCEL, EngineLoop

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=8)
    loop, inbox, transport = EngineLoop(), queue.Queue(), SentStatuses()
    sent = transport.sent
    for uid, stream, max_tokens in (("streamed", True, 20), ("buffered", False, 20), ("short", False, 3)):
        inbox.put((0, uid, 0.0, SequenceRequest([0, 5, 9], max_tokens, 2, stream=stream)))
    loop._receive(engine, inbox)
    loop._send(engine, transport)
    assert sent == [("streamed", LitAPIStatus.OK)] and set(loop.routes) == {"streamed", "buffered", "short"}
    for uid in ("streamed", "buffered", "never-sent"):
        inbox.put((0, uid, 0.0, CANCEL))
    sent.clear()
    while engine.busy:
        loop._receive(engine, inbox)
        loop._send(engine, transport)
    assert {uid for uid, _ in sent} == {"short"} and sent[-1] == ("short", LitAPIStatus.FINISH_STREAMING)
    assert loop.routes == loop.streams == loop.pieces == {}


def test_sequences_whose_activations_overflow_get_the_one_line_error_and_the_engine_goes_on(checkpoint):
    """float16 activations past 65504: a sampled sequence died in torch.multinomial, and the worker failed every
    sequence in flight; a greedy one streamed garbage."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.serve.api import EngineLoop

    loaded = load_model(checkpoint)
    loaded.model.half().norm.weight.data.fill_(3e4)  # finite weights, activations past 65504
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=8)
    loop, transport = EngineLoop(), SentStatuses(with_data=True)
    sent = transport.sent
    for key, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=1.0)), ("after", Sampling())):
        loop.routes[key], loop.streams[key], loop.pieces[key] = 0, False, []
        engine.add(key, SequenceRequest([0, 5], 3, 2, sampling))
        if key == "sampled":
            loop._send(engine, transport)
            assert not engine.busy
            loaded.model.norm.weight.data.fill_(1.0)
    while engine.busy:
        loop._send(engine, transport)
    says = "the logits came out NaN or inf: the activations overflow float16; float16 holds at most 65504 — --dtype"
    assert [(uid, status) for uid, data, status in sent if data.startswith(says)] == [
        ("greedy", LitAPIStatus.ERROR),
        ("sampled", LitAPIStatus.ERROR),
    ]
    assert [status for uid, _, status in sent if uid == "after"] == [LitAPIStatus.OK, LitAPIStatus.FINISH_STREAMING]


@pytest.mark.parametrize("failing", ["cache", "prefill"])
def test_a_group_that_fails_to_start_ends_its_own_sequence_alone(checkpoint, monkeypatch, failing):
    """Out of memory building the third group's KV cache, or in the first group's prefill: that group's sequence gets
    an error (none is lost between the waiting list and the running groups, none hangs); the two others admitted in
    that step, in groups of their own, finish (every sequence admitted in the step had the error)."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.inference.generate import Decoder
    from epas_lightning.serve.api import EngineLoop

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=8)
    calls = []

    def out_of_memory(original):
        def fail(*args, **kwargs):
            calls.append(1)
            if len(calls) == (3 if failing == "cache" else 1):
                raise torch.OutOfMemoryError("CUDA out of memory")
            return original(*args, **kwargs)

        return fail

    if failing == "cache":
        monkeypatch.setattr(loaded.model, "new_cache", out_of_memory(loaded.model.new_cache))
    else:
        monkeypatch.setattr(Decoder, "prefill", out_of_memory(Decoder.prefill))
    loop, inbox, transport = EngineLoop(), queue.Queue(), SentStatuses()
    sent = transport.sent
    for uid, n_shared in (("a", 0), ("b", 1), ("c", 2)):  # three regions: three groups
        inbox.put((0, uid, 0.0, SequenceRequest([0, 5, 9], 4, n_shared)))
    loop._receive(engine, inbox)
    while engine.busy:
        loop._send(engine, transport)
    failed = "c" if failing == "cache" else "a"
    assert sorted((uid, status) for uid, status in sent if status != LitAPIStatus.OK) == [
        (uid, LitAPIStatus.ERROR if uid == failed else LitAPIStatus.FINISH_STREAMING) for uid in "abc"
    ]


POISON = [77, 78, 79]
"""A prompt holding these tokens makes every batch it is in fail (in the tests that inject it)."""


def poisoned(decoder) -> bool:  # noqa: ANN001
    return any(row[i : i + 3] == POISON for row in decoder.ids.tolist() for i in range(len(row)))


def _out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise torch.OutOfMemoryError("CUDA out of memory")


def _batches_built_failing_steps(monkeypatch, error_for) -> list[int]:  # noqa: ANN001
    """The sizes of the decoders built from now on, in order; a batch's (not a sequence alone's) step raises what
    ``error_for(sizes so far)`` gives, where it gives an error."""
    from epas_lightning.inference.generate import Decoder

    built, init, step = [], Decoder.__init__, Decoder.step

    def recording_init(self, model, prompts, *args, **kwargs):  # noqa: ANN001, ANN202
        built.append(len(prompts))
        init(self, model, prompts, *args, **kwargs)

    def failing_step(self, *args):  # noqa: ANN001, ANN002, ANN202
        if self.batch_size > 1 and (error := error_for(built)) is not None:
            raise error
        return step(self, *args)

    monkeypatch.setattr(Decoder, "__init__", recording_init)
    monkeypatch.setattr(Decoder, "step", failing_step)
    return built


def _run_to_end(engine: Engine, texts: dict[str, str]) -> dict[str, str]:
    """Step ``engine`` until it is idle, adding each output's text to ``texts``: each sequence's finish reason."""
    ends = {}
    while engine.busy:
        for output in engine.step():
            texts[output.key] += "" if output.finish_reason == "error" else output.text  # an error's text: its message
            if output.finish_reason:
                ends[output.key] = output.finish_reason
    return ends


@pytest.mark.parametrize("failing", ["prefill", "step", "output"])
def test_a_sequence_that_fails_its_batch_ends_alone_and_the_others_go_on(checkpoint, monkeypatch, failing):
    """One sequence made its batch's prefill, or every second decode step of a batch it is in, fail: every sequence
    of the batch got an error, and the other groups' and the waiting ones too. Each of the batch goes on alone from
    where it is: the others make the tokens they make alone (those of generate), only the culprit ends with an error
    (after the tokens it made: two in the batch, one alone, two in the batch they share again, two more alone for
    good). Where its text fails to take its first token (``output``), it ends at once, and the batch goes on without
    it."""
    from epas_lightning.inference.generate import Decoder

    loaded = load_model(checkpoint)

    def failing_when_poisoned(original):
        def run(self, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            if poisoned(self) and (failing == "prefill" or self.calls == 2):
                raise RuntimeError("a bad sequence")
            return original(self, *args, **kwargs)

        return run

    if failing == "output":
        push = TextStream.push

        def failing_push(self, token):  # noqa: ANN001, ANN202
            if self.context[1:] == POISON:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a bad token")
            return push(self, token)

        monkeypatch.setattr(TextStream, "push", failing_push)
    else:
        monkeypatch.setattr(Decoder, failing, failing_when_poisoned(getattr(Decoder, failing)))
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    prompts = {"a": [0, 5, 9], "bad": [0, *POISON], "b": [0, 7], "other": [0, 3, 3], "waiting": [0, 8]}
    for key, prompt in prompts.items():  # a, bad, b: one greedy batch; other: its region's; waiting: no place yet
        engine.add(key, SequenceRequest(prompt, 8, 1 if key == "other" else 2))
    texts = dict.fromkeys(prompts, "")
    ends = _run_to_end(engine, texts)
    assert ends == {"a": "length", "bad": "error", "b": "length", "other": "length", "waiting": "length"}
    monkeypatch.undo()
    for key in ("a", "b", "other", "waiting"):
        set_region(loaded.model, 1 if key == "other" else 2, loaded.region)
        assert texts[key] == token_text(generate(loaded.model, [prompts[key]], 8).tokens[0]), key
    made = 7 if failing == "step" else 0
    assert texts["bad"] == token_text(generate(loaded.model, [prompts["bad"]], 8).tokens[0][:made])


@pytest.mark.parametrize("failing", ["step", "keep_rows"])
def test_a_failed_batch_frees_its_kv_cache_before_its_sequences_go_on_alone(checkpoint, monkeypatch, failing):
    """A batch's decode step (or dropping its finished rows) ran out of memory: its sequences went on alone while the
    failed batch's KV cache was still held (by the group, and by the error's traceback), so on a full device each
    cache of one needed more memory still and failed too. The failed batch's cache is gone before the first one
    alone is built."""
    import weakref

    from epas_lightning.inference.generate import Decoder

    caches, alive_then = [], []
    init, original = Decoder.__init__, getattr(Decoder, failing)

    def recording_init(self, model, prompts, *args, **kwargs):  # noqa: ANN001, ANN202
        if len(prompts) == 1:  # a sequence alone: which batch caches are still held
            alive_then.append([ref() is not None for ref in caches])
        init(self, model, prompts, *args, **kwargs)
        if len(prompts) > 1:
            caches.append(weakref.ref(self.cache))

    def out_of_memory(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, *args, **kwargs)

    loaded = load_model(checkpoint)
    monkeypatch.setattr(Decoder, "__init__", recording_init)
    monkeypatch.setattr(Decoder, failing, out_of_memory)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    engine.add("short", SequenceRequest([0, 5, 9], 2 if failing == "keep_rows" else 4, 2))
    engine.add("long", SequenceRequest([0, 7], 4, 2))
    ends = {}
    while engine.busy:
        ends |= {output.key: output.finish_reason for output in engine.step() if output.finish_reason}
    assert ends == {"short": "length", "long": "length"}
    assert len(caches) == (2 if failing == "step" else 1), caches  # step: the batch they share again fails too
    assert alive_then and not any(any(alive) for alive in alive_then), alive_then


@pytest.mark.parametrize("failing", ["once", "always"])
def test_sequences_that_went_on_alone_share_a_batch_again_once_re_prefilled(checkpoint, monkeypatch, failing):
    """One out of memory in a batch's step left each of its sequences decoding alone until it finished: a batch of B
    cost B forwards per step from then on. Those that went on alone (and made a token alone) now share a batch again,
    with the tokens they make alone. A batch that fails again after they rejoined is not rejoined a second time."""
    loaded = load_model(checkpoint)
    batches = _batches_built_failing_steps(
        monkeypatch,
        lambda built: (
            torch.OutOfMemoryError("CUDA out of memory") if failing == "always" or built.count(3) == 1 else None
        ),
    )
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    prompts = {"a": [0, 5, 9], "b": [0, 7], "c": [0, 3, 3, 4]}
    for key, prompt in prompts.items():
        engine.add(key, SequenceRequest(prompt, 8, 2))
    texts = dict.fromkeys(prompts, "")
    assert _run_to_end(engine, texts) == dict.fromkeys(prompts, "length")
    # the batch; alone (its step failed); rejoined (once: it decodes to the end; always: it fails, alone to the end)
    assert batches == [3, 1, 1, 1, 3] + ([1, 1, 1] if failing == "always" else [])
    monkeypatch.undo()
    set_region(loaded.model, 2, loaded.region)
    for key, prompt in prompts.items():
        assert texts[key] == token_text(generate(loaded.model, [prompt], 8).tokens[0]), key


def test_a_batch_that_fails_to_drop_a_finished_row_goes_on_alone(checkpoint, monkeypatch):
    """Dropping a finished row from the batch's KV cache failed: the finished sequence gets its answer, and the one
    still running goes on alone with the tokens it makes alone (it got an error)."""
    from epas_lightning.inference.generate import Decoder

    loaded = load_model(checkpoint)
    monkeypatch.setattr(Decoder, "keep_rows", _out_of_memory)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    engine.add("short", SequenceRequest([0, 5, 9], 2, 2))
    engine.add("long", SequenceRequest([0, 7], 5, 2))
    texts = {"short": "", "long": ""}
    ends = _run_to_end(engine, texts)
    assert ends == {"short": "length", "long": "length"}
    set_region(loaded.model, 2, loaded.region)
    assert texts["long"] == token_text(generate(loaded.model, [[0, 7]], 5).tokens[0])
    assert texts["short"] == token_text(generate(loaded.model, [[0, 5, 9]], 2).tokens[0])


def test_a_cancel_that_fails_to_drop_its_row_leaves_the_others_to_go_on_alone(checkpoint, monkeypatch):
    """Dropping a cancelled sequence's row from its batch's KV cache ran out of memory: the error left ``cancel``
    and ended the inference worker's loop, every request in flight with it. The batch-mates now go on alone from
    where they are, with the tokens they make alone, and a later cancel finds them there."""
    from epas_lightning.inference.generate import Decoder

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    prompts = {"gone": [0, 5, 9], "a": [0, 7], "b": [0, 3, 3], "later": [0, 4]}
    for key, prompt in prompts.items():
        engine.add(key, SequenceRequest(prompt, 5, 2))
    texts = dict.fromkeys(prompts, "")
    for output in engine.step():  # one batch of four, one token each
        texts[output.key] += output.text
    with monkeypatch.context() as patched:
        patched.setattr(Decoder, "keep_rows", _out_of_memory)
        assert engine.cancel("gone") and engine.busy
    assert engine.cancel("later") and not engine.cancel("gone")
    ends = _run_to_end(engine, texts)
    assert ends == {"a": "length", "b": "length"}
    set_region(loaded.model, 2, loaded.region)
    for key, n in {"a": 5, "b": 5, "gone": 1, "later": 1}.items():
        assert texts[key] == token_text(generate(loaded.model, [prompts[key]], 5).tokens[0][:n]), key


def test_a_sequence_that_finishes_in_a_step_that_then_fails_still_gets_its_answer(checkpoint, monkeypatch):
    """A running sequence finished (and left the engine) in the step where a new group then failed to start: its
    output was lost with the step's and it was in no group to abort, so its client waited for ever."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.serve.api import EngineLoop

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=8)
    loop, inbox, transport = EngineLoop(), queue.Queue(), SentStatuses()
    sent = transport.sent
    inbox.put((0, "done", 0.0, SequenceRequest([0, 5, 9], 2, 0)))
    loop._receive(engine, inbox)
    loop._send(engine, transport)  # its first token

    monkeypatch.setattr(loaded.model, "new_cache", _out_of_memory)
    inbox.put((0, "new", 0.0, SequenceRequest([0, 5], 2, 1)))
    loop._receive(engine, inbox)
    loop._send(engine, transport)  # its last token, then the new group fails
    assert [status for uid, status in sent if uid == "done"][-2:] == [LitAPIStatus.OK, LitAPIStatus.FINISH_STREAMING]
    assert [status for uid, status in sent if uid == "new"] == [LitAPIStatus.ERROR] and not engine.busy


@contextlib.contextmanager
def serve_log_records():
    """The records the engine logs (``epas_lightning.serve``, every level) while inside."""
    records, log = [], logging.getLogger("epas_lightning.serve")
    handler, level = logging.Handler(logging.DEBUG), log.level
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_a_failed_batch_logs_the_errors_type_and_its_traceback_once_per_place(checkpoint, monkeypatch):
    """A batch's step failed and each sequence then finished alone: the log held only the error's text ('failed ()'
    for an error without one) and no traceback anywhere, so the cause (a bug in the batched path) was lost. The line
    names the type; the first failure from a place logs its traceback, the same failure again does not."""
    from epas_lightning.inference.generate import Decoder

    loaded = load_model(checkpoint)
    prefill, step = Decoder.prefill, Decoder.step

    def failing_step(self, *args):  # noqa: ANN001, ANN002, ANN202
        if self.batch_size > 1:
            raise RuntimeError("")
        return step(self, *args)

    def failing_prefill(self):  # noqa: ANN001, ANN202 - another place
        if self.batch_size > 1:
            raise RuntimeError("a batched prefill bug")
        return prefill(self)

    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    with serve_log_records() as records:
        monkeypatch.setattr(Decoder, "step", failing_step)
        for round_ in range(2):  # the same failure twice: one traceback
            for key in ("a", "b"):
                engine.add(f"{key}{round_}", SequenceRequest([0, 5, 9], 3, 2))
            assert set(_run_to_end(engine, dict.fromkeys(("a0", "b0", "a1", "b1"), "")).values()) == {"length"}
        monkeypatch.setattr(Decoder, "prefill", failing_prefill)
        for key in ("c", "d"):
            engine.add(key, SequenceRequest([0, 5, 9], 3, 2))
        assert set(_run_to_end(engine, dict.fromkeys("cd", "")).values()) == {"length"}
    failures = [r for r in records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in failures] == [  # the prefill fails again when the two share a batch again
        *["a batch of 2 sequences failed (RuntimeError); 2 go on alone"] * 2,
        *["a batch of 2 sequences failed (RuntimeError: a batched prefill bug); 2 go on alone"] * 2,
    ]
    assert [r.exc_info is not None for r in failures] == [True, False, True, False]
    assert all(r.levelno == logging.WARNING for r in failures)


def test_a_request_that_fails_alone_is_told_what_happened_to_it_not_that_the_worker_failed(checkpoint, monkeypatch):
    """A sequence that failed alone sent an empty error, which the HTTP side read as 'the inference worker failed
    while decoding this request', though the worker went on serving. Its client is told its request's decoding
    failed, with the error's type but not its text nor a traceback."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.serve.api import EngineLoop

    loaded = load_model(checkpoint)

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyError("/secret/path")

    monkeypatch.setattr(loaded.model, "new_cache", failing)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=8)
    loop, transport = EngineLoop(), SentStatuses(with_data=True)
    loop.routes["a"], loop.streams["a"], loop.pieces["a"] = 0, False, []
    engine.add("a", SequenceRequest([0, 5], 3, 2))
    loop._send(engine, transport)
    assert transport.sent == [
        ("a", "decoding this request failed (KeyError; the server's log has the cause); the server goes on serving",
         LitAPIStatus.ERROR),
    ]  # fmt: skip


def test_device_errors_after_which_nothing_runs_are_told_apart_from_those_a_retry_survives():
    from epas_lightning.serve.failures import device_lost

    accelerator = getattr(torch, "AcceleratorError", RuntimeError)
    lost = [
        accelerator("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: unspecified launch failure"),
    ]
    survived = [torch.OutOfMemoryError("CUDA out of memory"), accelerator("CUDA error: out of memory"), KeyError("x")]
    assert [device_lost(error) for error in lost + survived] == [True] * 3 + [False] * 3
    wrapped = ValueError("in the sampler")
    wrapped.__cause__ = lost[1]
    assert device_lost(wrapped)


DEVICE_LOST = (
    "the server's device failed ({}) and can decode nothing more; the server is stopping: retry once it has restarted"
)


@pytest.mark.parametrize(
    "error",
    [
        getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: device-side assert triggered\nCompile with..."),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
    ids=["accelerator-error", "message"],
)
def test_a_device_error_fails_every_request_in_flight_and_the_next_ones_and_marks_the_server_dead(
    checkpoint, monkeypatch, error
):
    """After a device-side assert or an illegal memory access every later CUDA call fails: the engine retried each
    sequence of the batch alone (each failing again), then every later request failed while /health said 200. Now no
    sequence is retried: every one in flight (running, waiting) gets an error that says the server is stopping, and
    the worker marks the device failed (for /health and the main process); a request that comes later gets the same
    error without a decode."""
    pytest.importorskip("litserve")
    from litserve.utils import LitAPIStatus

    from epas_lightning.serve.api import EngineLoop

    loaded = load_model(checkpoint)
    built = _batches_built_failing_steps(monkeypatch, lambda built: error)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=3)
    loop, transport = EngineLoop(), SentStatuses(with_data=True)
    for key, n_shared in (("a", 2), ("b", 2), ("other", 1), ("waiting", 2)):  # a, b: one batch; other: its region's
        loop.routes[key], loop.streams[key], loop.pieces[key] = 0, False, []
        engine.add(key, SequenceRequest([0, 5, len(key)], 5, n_shared))
    loop._send(engine, transport)  # the prefills
    assert built == [2, 1] and not transport.sent
    loop._send(engine, transport)
    says = DEVICE_LOST.format(type(error).__name__)
    assert sorted(transport.sent) == [(key, says, LitAPIStatus.ERROR) for key in ("a", "b", "other", "waiting")]
    assert built == [2, 1] and not engine.busy  # none retried alone
    assert loop.device_failure.reason == f"{type(error).__name__}: {str(error).splitlines()[0]}"
    transport.sent.clear()
    loop.routes["late"], loop.streams["late"], loop.pieces["late"] = 0, True, []
    engine.add("late", SequenceRequest([0, 5], 5, 2))
    loop._send(engine, transport)
    assert transport.sent == [("late", says, LitAPIStatus.ERROR)] and built == [2, 1]


def test_a_device_error_dropping_a_cancelled_row_ends_its_batch_mates_at_the_next_step(checkpoint, monkeypatch):
    """Dropping a cancelled row failed with a device error: its batch-mates were restarted alone, on a device that
    runs nothing more. The next step now decodes nothing and raises DeviceLost; abort finds them."""
    from epas_lightning.inference.generate import Decoder
    from epas_lightning.serve.engine import StepFailed
    from epas_lightning.serve.failures import DeviceLost

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.region, token_text, eos_id=None, max_batch_size=4)
    for key in "abc":
        engine.add(key, SequenceRequest([0, 5, 9], 5, 2))
    engine.step()
    monkeypatch.setattr(Decoder, "keep_rows", failing)
    assert engine.cancel("a")
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert isinstance(failed.value.__cause__, DeviceLost) and failed.value.outputs == []
    assert sorted(engine.abort()) == ["b", "c"]


def test_health_answers_503_once_the_device_has_failed(checkpoint, monkeypatch):
    """/health said 200 while every request failed on a device that could run nothing more."""
    from fastapi.testclient import TestClient
    from litserve.utils import WorkerSetupStatus

    from epas_lightning.serve.command import lit_server

    api = built_api(checkpoint, monkeypatch)
    server = lit_server(api, "cpu", "auto", "")
    server.workers_setup_status = {0: WorkerSetupStatus.READY}
    client = TestClient(server.app)
    assert (client.get("/health").status_code, client.get("/health").text) == (200, "ok")
    api.device_failure.set("AcceleratorError: CUDA error: device-side assert triggered")
    assert client.get("/health").status_code == 503


def test_a_failed_device_stops_serve_in_one_line_with_a_non_zero_exit(checkpoint, monkeypatch, capsys):
    """The worker marks its device failed: serve shuts the server down and says why in one line (an orchestrator
    restarts it), instead of serving on with every request failing."""
    from epas_lightning.serve import liveness

    monkeypatch.setattr(liveness, "WATCH_INTERVAL", 0.1)

    def device_fails(server) -> None:
        server.api.device_failure.set("AcceleratorError: CUDA error: device-side assert triggered")
        assert server._shutdown_event.wait(10)

    assert run_with_fake_litserver(checkpoint, monkeypatch, device_fails) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the inference worker's device failed (AcceleratorError: CUDA error: device-side assert triggered) — "
        "serve — nothing more runs on it in this process: the requests in flight got an error; restart serve (the log "
        "above has the traceback)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sharing-layers", "3"], "trained with at most 2 sharing layers"),  # serve has no --force to offer
        (["--sharing-layers", "-1"], "error: -1 sharing layers were asked for; a 4-layer model can share at most 3"),
        (["--port", "80"], "1024..65535"),
        (["--host", "localhost"], "--host takes one of 127.0.0.1, 0.0.0.0, ::, not 'localhost'"),  # LitServe's three
    ],
)
def test_startup_mistakes_are_one_line_errors(checkpoint, capsys, args, message):
    assert cli_main(["serve", "--checkpoint", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_run_folder_as_checkpoint_names_the_checkpoints_it_holds(tmp_path, capsys):
    """fit's run folder (or its checkpoints/ folder) was just 'not a checkpoint'."""
    (tmp_path / "checkpoints").mkdir()
    for name in ("epoch=0-step=8.ckpt", "last.ckpt"):
        (tmp_path / "checkpoints" / name).touch()
    for folder in (tmp_path, tmp_path / "checkpoints"):
        assert cli_main(["serve", "--checkpoint", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: not a checkpoint — --checkpoint {folder} — pass one of the checkpoints it holds: "
            f"{tmp_path / 'checkpoints' / 'last.ckpt'}, {tmp_path / 'checkpoints' / 'epoch=0-step=8.ckpt'}\n"
        ), err


def test_a_folder_of_runs_as_checkpoint_names_its_newest_last_ckpt(tmp_path, capsys):
    """The logger's folder (runs/<name>, holding version_N folders) or runs/ itself was just 'not a checkpoint'."""
    for version in ("version_0", "version_1"):
        (tmp_path / "demo" / version / "checkpoints").mkdir(parents=True)
        (tmp_path / "demo" / version / "checkpoints" / "last.ckpt").touch()
    newest = tmp_path / "demo" / "version_1" / "checkpoints" / "last.ckpt"
    os.utime(newest, (2e9, 2e9))
    for folder in (tmp_path / "demo", tmp_path):
        assert cli_main(["serve", "--checkpoint", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: not a checkpoint — --checkpoint {folder} — pass a checkpoint under it, e.g. the newest last.ckpt "
            f"{newest} (`python -m epas_lightning inspect --checkpoint {folder}` lists them all)\n"
        ), err


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert cli_main(["serve", "--checkpoint", str(checkpoint), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} is already in use") and err.count("\n") == 1, err


def test_models_endpoint_finds_a_model_id_with_a_slash(checkpoint, monkeypatch):
    """``--model-name org/name`` (as Hugging Face names models): GET /v1/models/org/name was a 404."""
    pytest.importorskip("litserve")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from epas_lightning.serve import command

    started = []
    monkeypatch.setattr(command, "run_server", lambda api, *args: started.append(api))
    assert cli_main(["serve", "--checkpoint", str(checkpoint), "--model-name", "org/tiny"]) == 0
    app = FastAPI()
    for path, endpoint, methods in started[0].spec.endpoints:
        app.add_api_route(path, endpoint, methods=methods)
    client = TestClient(app)
    assert client.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
    assert client.get("/v1/models/org").json()["error"]["code"] == "model_not_found"


def test_serve_of_a_stock_export_says_the_region_its_weights_trained(checkpoint, tmp_path, monkeypatch, capsys):
    """serve of a stock export listed only its dense ``trained_region`` and said "trained region: dense, no sharing
    layers": /v1/models gives the region its weights trained, and serve says it as the other commands do."""
    pytest.importorskip("litserve")
    from epas_lightning.hf.export import export
    from epas_lightning.serve import command

    stock = export(checkpoint, tmp_path / "hf", sharing_layers=0)
    capsys.readouterr()  # its warning that the stock folder runs dense
    started = []
    monkeypatch.setattr(command, "run_server", lambda api, *args: started.append(api.served))
    assert cli_main(["serve", "--checkpoint", str(stock)]) == 0
    assert capsys.readouterr().err == (
        "serve: the region is dense: a stock export of weights that trained 2 sharing layers (layers [3, 2], "
        "deep-first); our commands and transformers run it dense (export the checkpoint again with --remote-code for "
        "the region)\n"
    )
    record = started[0].model_record()["epas"]
    assert (record["trained_region"]["layers"], record["weights_trained_region"]) == (
        [],
        {"layers": [3, 2], "order": "deep_first"},
    )
    banner = command.ready_banner(started[0], "127.0.0.1", 8000)
    assert banner.startswith("serving 'hf' (runs dense; its weights trained layers [3, 2], deep-first; default 0 "), (
        banner
    )
    assert cli_main(["serve", "--checkpoint", str(checkpoint)]) == 0  # not a stock export: its own region, no note
    assert started[1].model_record()["epas"]["weights_trained_region"] is None and not capsys.readouterr().err
    assert command.ready_banner(started[1], "::", 1).startswith("serving 'tiny' (trained region: layers [3, 2], ")


def http_client(checkpoint: Path, monkeypatch, *args: str):
    """A test client of the HTTP app ``serve --checkpoint ... *args`` runs (LitServe's, with our endpoints,
    middlewares and error handlers), no process started: for requests refused before they reach the model."""
    from fastapi.testclient import TestClient

    from epas_lightning.serve.command import lit_server

    server = lit_server(built_api(checkpoint, monkeypatch, *args), "cpu", "auto", "")
    return TestClient(server.app, raise_server_exceptions=False)


def test_http_errors_have_openai_error_bodies(checkpoint, monkeypatch):
    """FastAPI's own errors were {"detail": "Not Found"} (the openai SDK finds no message in it), and a JSON body
    nested deeper than Python's parser recurses was a plain-text 500, with a traceback in the log."""
    client = http_client(checkpoint, monkeypatch)
    for method, path, status in [("GET", "/v1/chat/complete", 404), ("GET", "/v1/completions", 405)]:
        response = client.request(method, path)
        error = response.json()["error"]
        assert response.status_code == status and error["type"] == "invalid_request_error", response.text
        assert error["message"].startswith(f"Invalid URL ({method} {path}): this server answers POST /v1/completions")
    assert response.headers["allow"] == "POST"
    nested = b'{"model": "tiny", "prompt": "hi", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post("/v1/completions", content=nested)
    assert response.status_code == 400 and response.json()["error"]["message"].endswith("nested too deeply")


def test_a_client_gone_before_its_request_is_read_is_no_error(checkpoint, monkeypatch):
    """A client that closed its connection before the server read its body (it timed out while the server was busy)
    raised ClientDisconnect out of the endpoint: a 500 and a 70-line traceback in the log per such client."""
    from epas_lightning.serve.command import lit_server

    app = lit_server(built_api(checkpoint, monkeypatch), "cpu", "auto", "").app
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    for path in ("/v1/completions", "/v1/chat/completions"):
        scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b"", "root_path": ""}
        asyncio.run(app(scope, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499, 499]


def test_a_request_body_past_max_request_mb_is_a_413_before_it_is_read(checkpoint, monkeypatch):
    """No body was too large: a 200 MB prompt was read, parsed and tokenized whole, which took the HTTP process past
    20 GB (killed for memory) before the prompt was found longer than the context."""
    client = http_client(checkpoint, monkeypatch, "--max-request-mb", "0.5")
    body = json.dumps({"model": "tiny", "prompt": "a " * 2**18, "max_tokens": 2}).encode()  # just over 0.5 MiB
    for content in (body, iter([body[: len(body) // 2], body[len(body) // 2 :]])):  # Content-Length, then chunks
        response = client.post("/v1/completions", content=content)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"] == (
            "the request body is larger than the 0.5 MiB this server accepts (serve --max-request-mb)"
        )
    assert client.post("/v1/completions", content=body[:-100] + b'"}').status_code == 400  # under it: read


def built_api(checkpoint: Path, monkeypatch, *args: str):
    """The API object ``serve --checkpoint`` builds (its ``served`` model and HTTP endpoints), no server started."""
    from epas_lightning.serve import command

    started = []
    monkeypatch.setattr(command, "run_server", lambda api, *rest: started.append(api))
    assert cli_main(["serve", "--checkpoint", str(checkpoint), *args]) == 0
    return started[0]


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_chat_prompts_render_and_tokenize_as_transformers_apply_chat_template(checkpoint, template):
    """The text of transformers' apply_chat_template(add_generation_prompt=True), and its control tokens as their
    ids (those in a message's text too, as transformers reads them), while completion prompts keep reading them as
    text."""
    from transformers import PreTrainedTokenizerFast

    from epas_lightning.serve.chat import control_token_encoder, render_chat

    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token="<|bos|>", eos_token="<|eos|>"
    )
    text = render_chat(template, MESSAGES, "<|bos|>", "<|eos|>")
    assert text == hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    ids = control_token_encoder(tokenizer)(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    control = [hf.convert_tokens_to_ids(token) for token in ("<|im_start|>", "<|eot_id|>", "<|bos|>")]
    assert control[0 if template is CHATML else 1] in ids and (control[2] in ids) == (template is LLAMA3)
    assert control[0] not in tokenizer.encode("<|im_start|>")  # training data and completion prompts: text


def test_a_sentencepiece_chat_reads_its_control_text_as_transformers_reads_the_export(tmp_path):
    """A sentencepiece tokenizer's chat (a LLaMA-2 style template writing '<s>' and '</s>' as text) renders and reads
    as transformers' apply_chat_template reads it with the tokenizer ``export`` ships: '</s>' is EOS's id."""
    from transformers import AutoTokenizer

    from epas_lightning.hf.export import export_tokenizer
    from epas_lightning.serve.chat import control_token_encoder, render_chat, token_text

    template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    (tmp_path / "sp").mkdir()
    model = train_tiny_sentencepiece(tmp_path / "sp" / "tokenizer.model")
    (model.parent / "chat_template.jinja").write_text(template)
    (tmp_path / "hf").mkdir()
    export_tokenizer(model, tmp_path / "hf", 64, None, None)
    hf, tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer(model)
    messages = [
        {"role": "user", "content": "ka lo"},
        {"role": "assistant", "content": "mine su"},
        {"role": "user", "content": "tari </s> po"},
    ]
    bos, eos = token_text(tokenizer, tokenizer.bos_id), token_text(tokenizer, tokenizer.eos_id)
    assert (bos, eos) == ("<s>", "</s>")
    text = render_chat(template, messages, bos, eos)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = control_token_encoder(tokenizer)(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.bos_id) == 2 and ids.count(tokenizer.eos_id) == 2  # the template's and the message's
    assert tokenizer.eos_id not in tokenizer.encode("</s>")  # training data and completion prompts: text


def test_a_char_sentencepiece_chat_reads_bos_and_eos_text_as_their_ids(tmp_path):
    """A sentencepiece model no tokenizer.json mirrors (a char or word model) encoded the rendered chat with
    sentencepiece alone, which reads control text as text: a template's '<s>' became '<unk> s <unk>' (BOS lost, an
    unknown token in its place). Its control pieces' text is their ids now, as transformers' slow tokenizer reads it.
    """
    from epas_lightning.serve.chat import chat_prompt_ids

    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    model = train_tiny_sentencepiece(tmp_path / "tokenizer.model", model_type="char", vocab_size=30,
                                     byte_fallback=False, hard_vocab_limit=False)  # fmt: skip
    tokenizer = load_tokenizer(model)
    messages = [{"role": "user", "content": "ka lo"}, {"role": "user", "content": "po"}]
    ids = chat_prompt_ids(template, messages, tokenizer)
    ka_lo, po = tokenizer.encode("ka lo"), tokenizer.encode("po")
    assert ids == [tokenizer.bos_id, *ka_lo, tokenizer.eos_id, *po, tokenizer.eos_id], ids


def test_chat_requests_without_a_template_or_with_a_bad_one_are_refused_in_one_message(
    checkpoint, tmp_path, monkeypatch
):
    """No template: 400 (and the model list says so); a template that reaches for Python internals is stopped by the
    sandbox (500: the operator must fix it); the template's own raise_exception is a 400 with its message."""
    pytest.importorskip("litserve")
    from dataclasses import replace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from epas_lightning.serve.protocol import RequestError, parse_chat

    def app_client(api) -> TestClient:
        app = FastAPI()
        for path, endpoint, methods in api.spec.endpoints:
            app.add_api_route(path, endpoint, methods=methods)
        return TestClient(app)

    plain = shutil.copytree(checkpoint, tmp_path / "plain", ignore=shutil.ignore_patterns("tokenizer_config.json"))
    client = app_client(built_api(plain, monkeypatch))
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("this model has no chat template (none beside") and "--tokenizer" in message, message
    assert client.get("/v1/models").json()["data"][0]["epas"]["chat"] is False
    from epas_lightning.serve.command import ready_banner

    missing = ready_banner(built_api(plain, monkeypatch).served, "::", 1)
    assert "; no chat: this model has no chat template (none beside" in missing, missing
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    said = ready_banner(built_api(broken, monkeypatch).served, "::", 1)  # not "the model has no chat template"
    assert "; no chat: the chat template beside" in said and "is not a valid template" in said, said
    assert built_api(plain, monkeypatch, "--tokenizer", str(checkpoint)).served.chat_template == CHATML  # the fix
    served = built_api(checkpoint, monkeypatch).served
    assert served.model_record()["epas"]["chat"] is True
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(RequestError) as error:
        parse_chat({**body, "model": "tiny"}, replace(served, chat_template=escape), served.tokenizer())
    assert (
        error.value.status == 500 and "the sandbox stopped it: access to attribute '__class__'" in error.value.message
    )
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(RequestError) as error:
        parse_chat({**body, "model": "tiny"}, replace(served, chat_template=refusing), served.tokenizer())
    assert error.value.status == 400 and error.value.message.endswith(
        "refuses these messages: Conversation roles must alternate user/assistant"
    )


def refused(parse, body: dict, served) -> tuple[int, str]:
    """The status and message of the RequestError that ``parse`` raises for ``body``."""
    from epas_lightning.serve.protocol import RequestError

    with pytest.raises(RequestError) as error:
        parse(body, served, served.tokenizer())
    return error.value.status, error.value.message


def test_prompts_that_cannot_fit_are_refused_before_they_are_tokenized(checkpoint, monkeypatch):
    """A text prompt is refused by its length in characters, and a list of prompts by its count, before the tokenizer
    sees them (tokenizing 5 million tokens to find them over the context took the HTTP process 3 GB); a lone
    surrogate (a JSON "\\ud800") in a prompt or message is a 400 naming it, not a tokenizer's TypeError (500)."""
    from epas_lightning.serve.protocol import MAX_TOKEN_CHARS, parse_chat, parse_completion

    served = built_api(checkpoint, monkeypatch).served
    tokenized = []
    monkeypatch.setattr(type(served.tokenizer()), "encode_batch", lambda self, texts: tokenized.append(texts))
    body = {"model": "tiny", "max_tokens": 2}
    too_long = "a" * (served.config.context_length * MAX_TOKEN_CHARS + 1)
    assert refused(parse_completion, {**body, "prompt": ["a", too_long]}, served) == (
        400,
        f"the prompt holds {len(too_long)} characters, more than the model's context length of 64 tokens can hold: "
        "shorten it",
    )
    assert refused(parse_completion, {**body, "prompt": ["a"] * 17}, served)[1].startswith(
        "17 prompt(s) x n=1 is more than the 16 completions"
    )
    assert not tokenized
    assert refused(parse_completion, {**body, "prompt": "x\ud800"}, served) == (
        400,
        "prompt holds a lone surrogate ('\\ud800' at character 1), which is not text: send valid Unicode",
    )
    chat = {**body, "messages": [{"role": "user", "content": "x\udfff"}]}
    assert refused(parse_chat, chat, served) == (
        400,
        "messages.0.content holds a lone surrogate ('\\udfff' at character 1), which is not text: send valid Unicode",
    )


def test_token_id_prompts_hold_only_ids_the_tokenizer_has(checkpoint, monkeypatch):
    """The tiny model's vocabulary (512) is larger than its tokenizer's (301), as a padded one is: a prompt of token ids
    at or past the tokenizer's size (rows no text ever trained, which a completion never emits) was served; it is a
    400, as vLLM refuses it. An id the tokenizer has is taken as it is."""
    from epas_lightning.serve.protocol import parse_completion

    served = built_api(checkpoint, monkeypatch).served
    size = served.tokenizer().vocab_size
    assert size < served.config.vocab_size  # the case
    body = {"model": "tiny", "max_tokens": 2}
    said = f"prompt token ids must lie in 0..{size - 1} (the tokenizer's ids), got {size}"
    assert refused(parse_completion, {**body, "prompt": [1, size]}, served) == (400, said)
    assert refused(parse_completion, {**body, "prompt": [[1], [size, 2]]}, served) == (400, said)
    assert parse_completion({**body, "prompt": [1, size - 1]}, served, served.tokenizer()).prompts == [[1, size - 1]]


def test_sampling_settings_out_of_range_are_a_400_that_says_what_to_do(checkpoint, monkeypatch):
    """The checks generate runs (the same messages, with the fix the error carries); temperature stops at OpenAI's 2,
    top_p takes OpenAI's [0, 1] (0, a 400 once, keeps the most likely token alone: greedy decoding) and top_k reads as
    vLLM reads it."""
    from epas_lightning.serve.protocol import parse_completion

    served = built_api(checkpoint, monkeypatch).served
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for top_p in (-0.1, 1.5):
        assert refused(parse_completion, {**body, "top_p": top_p}, served) == (
            400,
            f"top_p must lie in [0, 1], got {top_p}: use a fraction, e.g. 0.9 (0 is greedy), or leave it unset for no "
            "nucleus cut",
        )
    nucleus_of_one = {**body, "top_p": 0.0, "temperature": 0.7, "top_k": 5, "seed": 3}
    sampling = parse_completion(nucleus_of_one, served, served.tokenizer()).sequences[0].sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.0, None, None)
    assert refused(parse_completion, {**body, "top_p": 0.0, "top_k": -2}, served)[1].startswith("top_k must be >= 1")
    assert refused(parse_completion, {**body, "top_k": -2}, served)[1].startswith("top_k must be >= 1, got -2: use 1")
    for every_token in (-1, 0):  # vLLM's top_k for no top-k cut (its clients send it): was a 400
        sequence = parse_completion({**body, "top_k": every_token}, served, served.tokenizer()).sequences[0]
        assert sequence.sampling.top_k is None
    assert refused(parse_completion, {**body, "temperature": -1}, served)[1].startswith("temperature must be >= 0")
    assert refused(parse_completion, {**body, "temperature": 2.5}, served)[1] == (
        "temperature must lie in [0, 2], got 2.5"
    )


def test_chat_content_parts_read_as_text_and_fields_that_change_the_output_are_refused(checkpoint, monkeypatch):
    """Content as a list of text parts (LangChain, the openai SDK's typed messages) is the parts' text joined by
    newlines, an image part a 400; a field this server does not implement (a vLLM sampling extension, the deprecated
    functions, audio output) is a 400 naming it, as OpenAI refuses unknown fields; fields that do not change the
    output (user, metadata, store) are accepted."""
    pytest.importorskip("litserve")
    from epas_lightning.serve.protocol import parse_chat, parse_completion

    served = built_api(checkpoint, monkeypatch).served
    tokenizer = served.tokenizer()

    def prompt(content, **fields) -> list[int]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}
        return parse_chat(body, served, tokenizer).prompts[0]

    assert prompt([{"type": "text", "text": "def main"}]) == prompt("def main")
    assert prompt([{"type": "text", "text": "def"}, {"type": "text", "text": "main"}]) == prompt("def\nmain")
    assert prompt("x", user="u1", metadata={"a": "b"}, store=False, parallel_tool_calls=False) == prompt("x")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    cases = [
        ({**chat, "messages": [{"role": "user", "content": image}]}, "messages.0.content.0 is a 'image_url' part"),
        ({**chat, "messages": [{"role": "user", "content": None}]}, "content must be a string or a list of text"),
        ({**chat, "repetition_penalty": 1.2}, "unrecognized request argument supplied: repetition_penalty"),
        ({**chat, "functions": [{"name": "f"}]}, "functions is not supported"),
        ({**chat, "modalities": ["text", "audio"]}, "modalities is not supported"),
        ({**chat, "tool_choice": "required"}, "tool_choice is not supported"),
    ]
    for body, message in cases:
        status, said = refused(parse_chat, body, served)
        assert status == 400 and message in said, said
    completion = {"model": "tiny", "prompt": "hi", "min_p": 0.1}
    assert refused(parse_completion, completion, served) == (
        400, "unrecognized request argument supplied: min_p (this server does not implement it)"
    )  # fmt: skip


def test_a_refusal_names_the_field_the_request_sent(checkpoint, monkeypatch):
    """An error's ``param`` is the request field to change, as OpenAI names it: a chat request's ``top_logprobs``
    alone was refused as ``logprobs``, and more prompts than ``--max-choices`` (n left at 1) as ``n``."""
    pytest.importorskip("litserve")
    from epas_lightning.serve.protocol import RequestError, parse_chat, parse_completion

    served = built_api(checkpoint, monkeypatch).served
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    cases = [
        (parse_chat, {**chat, "top_logprobs": 2}, "top_logprobs"),
        (parse_chat, {**chat, "logprobs": True}, "logprobs"),
        (parse_chat, {**chat, "max_completion_tokens": 0}, "max_completion_tokens"),
        (parse_chat, {**chat, "n": 17}, "n"),
        (parse_completion, {**completion, "prompt": ["a"] * 17}, "prompt"),
        (parse_completion, {**completion, "prompt": ["a"] * 2, "n": 9}, "n"),
        (parse_completion, {**completion, "logprobs": 1}, "logprobs"),
        (parse_completion, {**completion, "top_p": 2.0}, "top_p"),
        (parse_completion, {**completion, "stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for parse, body, param in cases:
        with pytest.raises(RequestError) as error:
            parse(body, served, served.tokenizer())
        assert error.value.param == param, (body, error.value.message)


def test_an_assistant_message_sent_back_whole_is_read_and_its_tool_calls_refused(checkpoint, monkeypatch):
    """A response's message sent back as the openai SDK dumps it (``message.model_dump()``: refusal, tool_calls,
    function_call, audio and annotations all null) was a 400 'unrecognized request argument' once messages refused
    unknown fields; null, they are read as absent; set, they are a 400 (this server implements no tools)."""
    pytest.importorskip("litserve")
    from dataclasses import replace

    from epas_lightning.serve.protocol import parse_chat

    template = "{% for m in messages %}{{ m.role }}: {{ m.content }} {{ m.keys() | list }}\n{% endfor %}"
    served = replace(built_api(checkpoint, monkeypatch).served, chat_template=template)
    unset = dict.fromkeys(("refusal", "tool_calls", "function_call", "audio", "annotations"))
    reply = {"role": "assistant", "content": "y"}

    def prompt(answer: dict) -> list[int]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}, answer], "max_tokens": 1}
        return parse_chat(body, served, served.tokenizer()).prompts[0]

    assert prompt({**reply, **unset}) == prompt(reply)  # the template sees the same message
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}, {**reply, "tool_calls": call}]}
    status, said = refused(parse_chat, body, served)
    assert status == 400 and said.startswith("messages.1.tool_calls is not supported by this server"), said


def test_chat_templates_that_run_long_or_write_too_much_are_stopped(checkpoint, monkeypatch):
    """A checkpoint's template that loops without end, writes without end or builds a huge value with one '*' is
    stopped within its bounds (a 500 naming the bound; it ran for hours, or took all memory, blocking the server);
    messages longer than the context can hold are a 400 before the template renders them."""
    pytest.importorskip("litserve")
    from dataclasses import replace

    from epas_lightning.serve import chat
    from epas_lightning.serve.protocol import parse_chat

    served = built_api(checkpoint, monkeypatch).served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    bounded = {  # the time limit of each: short for the one it stops, ample where another bound must stop it first
        loop: (0.2, "it ran longer than 0.2 s"),
        "{% for i in range(100000) %}{{ messages }}{% endfor %}": (5.0, "it wrote more than 32768 characters"),
        "{{ 'x' * 10**10 }}": (5.0, "its '*' would build a value of 10000000000 characters, items or bits"),
    }
    for template, (seconds, bound) in bounded.items():
        monkeypatch.setattr(chat, "RENDER_SECONDS", seconds)
        start = time.monotonic()
        status, message = refused(parse_chat, body, replace(served, chat_template=template))
        assert status == 500 and f"failed on these messages ({bound})" in message, message
        assert time.monotonic() - start < seconds + 2
    long = {**body, "messages": [{"role": "user", "content": "x" * 20_000}]}
    assert refused(parse_chat, long, replace(served, chat_template=loop)) == (
        400, "the messages hold 20004 characters, more than the model's context length of 64 tokens can hold: "
        "shorten them",
    )  # fmt: skip


def test_a_chat_templates_product_of_two_large_integers_is_bounded_too():
    """'*' of two integers built a number of their bits together in one C call, which the time limit cannot interrupt
    and which holds the GIL (the HTTP process's event loop): squaring a 10M-bit number took seconds, and each squaring
    after it three times as long. It is bounded as a '**' is."""
    from epas_lightning.serve.chat import TemplateFailure, render_chat

    template = "{% set x = 2 ** 4900000 %}{% set y = x * x * x %}ok"
    with pytest.raises(TemplateFailure, match=r"its '\*' would build a value of 14700002 characters, items or bits"):
        render_chat(template, [{"role": "user", "content": "hi"}], "<s>", "</s>")
    assert render_chat("{{ 3 * 4 }}", [], "<s>", "</s>") == "12"


def peak_resident_bytes() -> int:
    """This process's peak resident size."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


SLOW = "{{ 3 ** 4000000 // 7 ** 2000000 }}"  # one C call of seconds: a long division is quadratic
DOUBLED = "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"


def test_a_chat_template_cannot_take_the_servers_memory_or_time_in_one_c_call(monkeypatch):
    """One C call that no in-process check interrupts: a filter allocating 4 GB, a string doubled with '~' (576M
    characters in 0.7 s), an integer division of seconds. They ran in the server's process (its memory taken, the
    time limit overrun); they run in the render process, bounded, and fail naming the bound."""
    from epas_lightning.serve import chat, template_process
    from epas_lightning.serve.chat import TemplateFailure, render_chat

    monkeypatch.setattr(template_process, "RENDER_MEMORY", 2**28)
    memory = "it needed more than the 0.25 GiB of memory a render may use"
    bounded = {  # the time limit of each: short for the one it stops, ample where the memory bound must stop it first
        "{{ 'a'|center(4000000000) }}": (5.0, memory),
        DOUBLED: (5.0, memory),
        SLOW: (0.3, "it ran longer than 0.3 s"),
    }
    peak = peak_resident_bytes()
    for template, (seconds, bound) in bounded.items():
        monkeypatch.setattr(chat, "RENDER_SECONDS", seconds)
        start = time.monotonic()
        with pytest.raises(TemplateFailure) as failure:
            render_chat(template, [{"role": "user", "content": "hi"}], "<s>", "</s>")
        assert str(failure.value) == bound
        assert time.monotonic() - start < seconds + 1.2
    assert peak_resident_bytes() - peak < 2**28


def test_a_killed_render_process_is_replaced_for_the_next_render(monkeypatch):
    """A render past its time kills its process (reaped: no zombie); the next render starts a new one, as it does
    when the idle one was killed from outside."""
    from epas_lightning.serve import chat, template_process
    from epas_lightning.serve.chat import TemplateFailure, render_chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 1.0)  # SLOW runs for seconds; an echo on a loaded machine in < 1 s
    messages, echo = [{"role": "user", "content": "hi"}], "{{ messages[0]['content'] }}"
    assert render_chat(echo, messages, "<s>", "</s>") == "hi"
    first = template_process._worker
    with pytest.raises(TemplateFailure, match=r"it ran longer than 1 s"):
        render_chat(SLOW, messages, "<s>", "</s>")
    assert first.process.returncode == -signal.SIGKILL
    assert render_chat(echo, messages, "<s>", "</s>") == "hi"
    second = template_process._worker
    os.kill(second.process.pid, signal.SIGKILL)
    second.process.wait()
    assert render_chat(echo, messages, "<s>", "</s>") == "hi"
    assert len({id(first), id(second), id(template_process._worker)}) == 3


def test_a_render_s_time_starts_once_its_process_is_ready(monkeypatch):
    """A new render process's start (an interpreter importing jinja2: seconds on a loaded machine) counted against the
    render's time: the first render after a killed one failed with 'it ran longer than ...'. A process that dies as it
    starts is one failure naming that."""
    from epas_lightning.serve import chat, template_process
    from epas_lightning.serve.chat import TemplateFailure, render_chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    monkeypatch.setattr(template_process, "_worker", None)
    slow_start = "import time; time.sleep(0.8); " + template_process.WORKER_CODE
    monkeypatch.setattr(template_process, "WORKER_CODE", slow_start)
    messages, echo = [{"role": "user", "content": "hi"}], "{{ messages[0]['content'] }}"
    assert render_chat(echo, messages, "<s>", "</s>") == "hi"
    template_process._worker.close()
    monkeypatch.setattr(template_process, "_worker", None)
    monkeypatch.setattr(template_process, "WORKER_CODE", "raise SystemExit(3)")
    with pytest.raises(TemplateFailure, match=r"the process to render it in ended as it started \(exit status 3\)"):
        render_chat(echo, messages, "<s>", "</s>")
    assert template_process._worker is None


def test_a_render_nobody_waits_for_ends_its_process():
    """A caller killed mid-render (SIGKILL: nothing kills its worker) left the worker running the template; it ends
    itself well past the render's time, even inside one C call."""
    from epas_lightning.serve.template_process import _encode, _Worker, orphan_alarm

    worker = _Worker()
    try:
        worker.wait_ready()
        messages = [{"role": "user", "content": "hi"}]
        worker.requests.send_bytes(_encode([0.3, "render", SLOW, messages, "<s>", "</s>", 10**6]))  # never read
        start = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(orphan_alarm(0.3) + 2)
        assert worker.process.returncode == -signal.SIGALRM and time.monotonic() - start < orphan_alarm(0.3) + 1
    finally:
        worker.close()


def test_a_chat_template_is_compiled_in_the_bounded_process_too(tmp_path, monkeypatch):
    """Compiling a template runs its filters of constants ('a'|center(300000000) written into Python source): the
    check at serve's and chat's start took seconds and a gigabyte in their process. It runs where renders do."""
    from epas_lightning.serve import chat
    from epas_lightning.serve.chat import checked_chat_template

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    (tmp_path / "chat_template.jinja").write_text("{{ 'a'|center(300000000) }}")
    start, peak = time.monotonic(), peak_resident_bytes()
    template, why = checked_chat_template(tmp_path / "tokenizer.json")
    assert template is None and why.endswith("could not be compiled (it ran longer than 0.3 s)"), why
    assert time.monotonic() - start < 2 and peak_resident_bytes() - peak < 2**28


def test_a_slow_chat_template_does_not_hold_up_other_requests(checkpoint, monkeypatch):
    """Requests are parsed (chats rendered, prompts tokenized) off the HTTP process's event loop: while a template
    runs to its time limit, the model list answers at once (it waited for the render)."""
    pytest.importorskip("litserve")
    from dataclasses import replace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from epas_lightning.serve import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 1.0)
    api = built_api(checkpoint, monkeypatch)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    api.spec.served = replace(api.spec.served, chat_template=loop)
    app = FastAPI()
    for path, endpoint, methods in api.spec.endpoints:
        app.add_api_route(path, endpoint, methods=methods)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/chat/completions", json=body)
        time.sleep(0.3)
        start = time.monotonic()
        assert client.get("/v1/models").status_code == 200
        assert time.monotonic() - start < 0.5
        assert slow.result().status_code == 500


def test_a_chat_request_too_long_for_the_context_names_the_fields_it_sent(checkpoint, monkeypatch):
    """The length errors of a chat request named 'max_tokens=63' and the param 'prompt' for a request that sent
    max_completion_tokens and messages."""
    pytest.importorskip("litserve")
    from epas_lightning.serve.protocol import RequestError, parse_chat

    served = built_api(checkpoint, monkeypatch).served
    message = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(RequestError) as error:
        parse_chat({**message, "max_completion_tokens": 63}, served, served.tokenizer())
    assert error.value.param == "max_completion_tokens" and "plus max_completion_tokens=63 exceeds" in str(error.value)
    with pytest.raises(RequestError) as error:
        parse_chat({**message, "messages": [{"role": "user", "content": "x" * 200}]}, served, served.tokenizer())
    assert error.value.param == "messages"


def test_more_messages_than_the_context_can_hold_are_a_400_not_the_templates_fault(checkpoint, monkeypatch):
    """Two thousand empty messages, or a role of 40,000 characters, rendered past the bound on what a template writes:
    a 500 that told the client the server's operator must fix the template, for a conversation too long for the
    model."""
    pytest.importorskip("litserve")
    from epas_lightning.serve.protocol import parse_chat

    served = built_api(checkpoint, monkeypatch).served
    body = {"model": "tiny", "messages": [{"role": "user", "content": ""}] * 2000}
    assert refused(parse_chat, body, served) == (
        400, "messages holds 2000 messages, more than the model's context length of 64 tokens can hold (each takes a "
        "token at least): send fewer",
    )  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "u" * 40_000, "content": ""}]}
    assert refused(parse_chat, body, served) == (
        400, "the messages hold 40000 characters, more than the model's context length of 64 tokens can hold: "
        "shorten them",
    )  # fmt: skip


def test_chat_templates_none_of_them_default_are_named_not_said_to_be_missing(tmp_path):
    """Named templates without a 'default' (transformers: 'multiple chat templates with no default'): chat is off and
    the reason names them; it said the model had no chat template."""
    from epas_lightning.serve.model_card import _chat_template

    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    template, why = _chat_template(tmp_path / "tokenizer.json")
    assert template is None and "(tool_use) include none named 'default'" in why, why


def checkpoint_forms(consolidated: Path, root: Path) -> dict[str, Path]:
    """The consolidated checkpoint also as a Lightning ``.ckpt`` file and as an FSDP2-style sharded directory."""
    from torch.distributed.checkpoint import save as dcp_save

    loaded = load_model(consolidated)
    state = {"model." + key: t for key, t in loaded.model.state_dict().items()}
    tokenizer = {"path": str(consolidated / "tokenizer.json"), "bos_id": loaded.bos_id, "eos_id": loaded.eos_id}
    meta = {"model_config": loaded.model.config.to_dict(), "tokenizer": tokenizer}
    torch.save({"state_dict": state, **meta}, root / "tiny.ckpt")
    dcp_save({"state_dict": state}, checkpoint_id=root / "sharded", no_dist=True)
    torch.save(meta, root / "sharded" / "meta.pt")
    return {"consolidated": consolidated, "file": root / "tiny.ckpt", "sharded": root / "sharded"}


def test_serve_checks_the_checkpoint_without_reading_its_weights(checkpoint, tmp_path, monkeypatch):
    """The main process reads what load_model reports (config, region, tokenizer) but no weight: only the inference
    worker loads them. Of the tensors, only the sharing mask is read (an HF folder has none: headers only)."""
    pytest.importorskip("litserve")
    from epas_lightning import checkpoint as checkpoint_module
    from epas_lightning import checkpoint_formats, safe_dcp
    from epas_lightning.hf import convert
    from epas_lightning.hf.export import export
    from epas_lightning.serve import command

    forms = {**checkpoint_forms(checkpoint, tmp_path), "hf": export(checkpoint, tmp_path / "hf")}
    loaded = {form: load_model(path) for form, path in forms.items()}
    started, read = [], []
    monkeypatch.setattr(command, "run_server", lambda api, *args: started.append(api.served))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    def load_mask_only(state, **kwargs):
        read.extend(state)
        return dcp_load(state, **kwargs)

    def mapped_only(path, *args, mmap=False, **kwargs):
        assert mmap or Path(path).name == "meta.pt", path  # a .ckpt file is mapped, its weights never read
        return load_torch_file(path, *args, mmap=mmap, **kwargs)

    dcp_load, load_torch_file = safe_dcp.dcp_load, checkpoint_formats.load_torch_file
    monkeypatch.setattr(checkpoint_module, "stored_weights", no_weights)  # what load_model reads weights with
    monkeypatch.setattr(convert, "load_file", no_weights)
    monkeypatch.setattr(safe_dcp, "dcp_load", load_mask_only)
    monkeypatch.setattr(checkpoint_formats, "load_torch_file", mapped_only)
    monkeypatch.setattr(Llama, "to_empty", no_weights)  # no whole model is materialised
    for form, path in forms.items():
        assert cli_main(["serve", "--checkpoint", str(path)]) == 0, form
        served = started.pop()
        assert served.config == loaded[form].model.config and served.region == loaded[form].region, form
        tokenizer = (forms[form] if form == "hf" else checkpoint) / "tokenizer.json"
        assert served.tokenizer_path == loaded[form].tokenizer_path == tokenizer, form
    assert read == ["state_dict.model.sharing.mask"]  # the sharded form: the mask's bytes only


def test_serve_wraps_requests_in_the_bos_and_eos_the_checkpoint_recorded(checkpoint, tmp_path, monkeypatch):
    """As generate, evaluate and lm-eval do: the server re-read the tokenizer file alone and guessed its own."""
    pytest.importorskip("litserve")
    from epas_lightning.serve import command

    copy = shutil.copytree(checkpoint, tmp_path / "ckpt")
    record = json.loads((copy / "config.json").read_text())
    record["tokenizer"].update(bos_id=5, eos_id=6)
    (copy / "config.json").write_text(json.dumps(record))
    started = []
    monkeypatch.setattr(command, "run_server", lambda api, *args: started.append(api))
    assert cli_main(["serve", "--checkpoint", str(copy), "--device", "cpu"]) == 0
    api = started.pop()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cuda_seeds, rng_state = [], torch.get_rng_state()
    torch.manual_seed(0)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    try:
        api.setup("cpu")  # the worker's side (it sets the worker process's SIGINT and SIGTERM handlers)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        seeded, _ = torch.initial_seed(), torch.set_rng_state(rng_state)
    assert api.engine.stop_ids == [6] and api.served.tokenizer().bos_id == 5  # the HTTP side's prompts start with it
    # unseeded requests: CUDA's default generator starts at one fixed seed in every process (restarts repeated answers)
    assert cuda_seeds == [seeded] and seeded != 0


def test_serve_refuses_weights_that_do_not_fit_their_config_before_starting(checkpoint, tmp_path, capsys):
    pytest.importorskip("litserve")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    record = json.loads((bad / "config.json").read_text())
    record["model"]["n_embd"] *= 2
    (bad / "config.json").write_text(json.dumps(record))
    assert cli_main(["serve", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the weights do not fit the model config it records") and err.count("\n") == 1, err


def free_port() -> str:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return str(free.getsockname()[1])


def test_a_user_error_loading_the_model_in_the_worker_is_one_line(checkpoint, tmp_path, capfd):
    """Only the inference worker reads the weights: its error was buried in LitServe's traceback, exit status 1."""
    pytest.importorskip("litserve")
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(checkpoint, tmp_path / "nan")
    weights = load_file(bad / "model.safetensors")
    weights["embed_tokens.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors")
    assert cli_main(["serve", "--checkpoint", str(bad), "--device", "cpu", "--port", free_port()]) == 2
    err = capfd.readouterr().err  # the worker's output too
    assert err.endswith(
        f"error: the weights hold NaN or inf (embed_tokens.weight) — --checkpoint {bad} — use another "
        "checkpoint, e.g. an earlier one of the run (fit's divergence guard never writes such weights)\n"
    )
    assert "Traceback" not in err and err.count("\n") == 2, err  # "loading the model ...", then the error
    assert "ready" not in err and "serving" not in err, err  # said once the worker has loaded the model


def test_a_worker_that_dies_while_loading_stops_serve_and_an_interrupt_stops_the_worker():
    """LitServe waited forever for a worker killed while loading (the OOM killer); interrupted while the worker
    loaded, serve waited for the load to finish."""
    pytest.importorskip("litserve")
    from types import SimpleNamespace

    from epas_lightning.serve.startup import watching_startup

    def server(target, *args):
        worker = multiprocessing.get_context("fork").Process(target=target, args=args)
        worker.start()
        return SimpleNamespace(inference_workers=[worker], workers_setup_status={"completions_0": "starting"})

    def killed_for_memory() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    killed = server(killed_for_memory)
    with watching_startup(killed) as died:
        deadline = time.monotonic() + 10
        while killed.workers_setup_status["completions_0"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)  # as LitServe waits
    assert died == ["killed by SIGKILL: the system may have run out of memory"]
    assert killed.workers_setup_status["completions_0"] == "error"
    loading = server(time.sleep, 60)
    with pytest.raises(KeyboardInterrupt), watching_startup(loading):
        raise KeyboardInterrupt
    assert not loading.inference_workers[0].is_alive()
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # serve's own SIGTERM handler, inherited through fork
    try:
        deaf = server(time.sleep, 60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(KeyboardInterrupt), watching_startup(deaf):
        raise KeyboardInterrupt
    assert not deaf.inference_workers[0].is_alive()  # killed, and reaped


def test_running_out_of_device_memory_while_loading_is_one_line_about_the_model():
    """The worker ran out of memory loading the model: a traceback; the advice on requests would not help."""
    pytest.importorskip("litserve")
    from epas_lightning.serve.startup import StartupReport

    report = StartupReport()
    with pytest.raises(torch.OutOfMemoryError), report.reporting():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.02 GiB free. More")
    error = report.failure()
    assert str(error) == (
        "out of device memory (CUDA out of memory; Tried to allocate 2.00 GiB; GPU 0 has 1.02 GiB free) — loading the "
        "model — free the device or pick one with more memory (--device)"
    )
    assert "torch.OutOfMemoryError" in error.__notes__[-1]  # the worker's traceback, for --debug (on Python 3.10 too)


def test_serve_without_litserve_names_the_extra(monkeypatch, checkpoint, capsys):
    monkeypatch.setitem(sys.modules, "litserve", None)
    assert cli_main(["serve", "--checkpoint", str(checkpoint)]) == 2
    assert "pip install 'epas_lightning[serve]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The server in a subprocess
# ---------------------------------------------------------------------------------------------------------------------


class Server:
    def __init__(
        self,
        checkpoint: Path,
        cwd: Path,
        *extra: str,
        wait: bool = True,
        program: tuple[str, ...] = ("-m", "epas_lightning"),
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.checkpoint = f"http://127.0.0.1:{self.port}", checkpoint
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        args = ["serve", "--checkpoint", str(checkpoint), "--port", str(self.port), "--batch-timeout", "0.2", *extra]
        self.stderr = open(cwd / "server.err", "w+")  # noqa: SIM115 - read back after the process ends
        self.process = subprocess.Popen(  # its own process group: a "Ctrl+C" reaches its processes only
            [sys.executable, *program, *args], cwd=cwd, env=env, stdout=self.stderr, stderr=self.stderr,
            start_new_session=True,
        )  # fmt: skip
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + 120
        while self.get("/health")[0] != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.3)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def signal_all(self, signum: int) -> None:
        """``signum`` to every process of the server, as a terminal sends Ctrl+C (SIGINT) or systemd SIGTERM."""
        os.killpg(self.process.pid, signum)

    def wait_for_log(self, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 30
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory, request):
    pytest.importorskip("litserve")
    if any("long_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("long_server_started")  # starts beside this one (on the other core), not after it
    server = Server(checkpoint, tmp_path_factory.mktemp("cwd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_health_and_models_list_every_region(server, client):
    assert server.get("/health") == (200, "ok")
    (model,) = client.models.list().data
    assert model.id == "tiny" and client.models.retrieve("tiny").id == "tiny"
    regions = model.epas["regions"]
    assert [r["shared_layers"] for r in regions] == [[], [3], [3, 2]]  # in growth order
    assert regions[0]["flops_ratio"] == 1.0 > regions[1]["flops_ratio"] > regions[2]["flops_ratio"]


@pytest.mark.parametrize("region", [{"sharing_layers": 0}, {"sharing_layers": 1}, {}, {"budget": 0.99}])
def test_greedy_completion_equals_generate_at_the_region_asked_for(client, reference, region):
    response = client.completions.create(
        model="tiny", prompt="def main", max_tokens=12, temperature=0, extra_body=region
    )
    expected_n = {"sharing_layers": region.get("sharing_layers")}.get("sharing_layers")
    if expected_n is None:
        expected_n = 2 if "budget" not in region else 1  # the trained region by default; 0.99 x dense needs 1 layer
    assert response.epas["sharing_layers"] == expected_n
    assert response.epas["shared_layers"] == TRAINED[::-1][:expected_n]  # in growth order
    assert response.epas["kv_cache_saving"] == pytest.approx(expected_n / 8)  # |S| / (2 L): V-only cache
    assert response.choices[0].text == reference("def main", expected_n, 12)
    assert response.usage.prompt_tokens > 1 and response.usage.completion_tokens <= 12


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_streaming_equals_non_streaming(client, reference, sampling):
    kwargs = dict(model="tiny", prompt=["import os", "def"], max_tokens=10, extra_body={"sharing_layers": 1})
    whole = client.completions.create(**kwargs, **sampling)
    stream = client.completions.create(**kwargs, **sampling, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = ["", ""], [None, None], None
    for piece in stream:
        for choice in piece.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        usage = piece.usage or usage
        assert piece.epas["sharing_layers"] == 1
    assert texts == [c.text for c in whole.choices] and reasons == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    if "seed" in sampling:  # a seeded request decodes alone: what generate gives for that seed
        assert texts[0] == reference("import os", 1, 10, temperature=0.8, top_p=0.9, seed=3)


def test_eight_concurrent_requests_share_forwards(client, reference):
    def ask(i: int):
        return client.completions.create(
            model="tiny", prompt=f"print({i})", max_tokens=8, temperature=0, extra_body={"sharing_layers": i % 2 * 2}
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(8)))
    for i, response in enumerate(responses):
        assert response.epas["sharing_layers"] == i % 2 * 2
        assert response.choices[0].text == reference(f"print({i})", i % 2 * 2, 8)
    assert max(r.epas["batch_size"] for r in responses) > 1


def test_stop_strings_cut_the_text(client, reference):
    full = reference("def main", 2, 12)
    stop = full[3:5]
    response = client.completions.create(model="tiny", prompt="def main", max_tokens=12, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)] and response.choices[0].finish_reason == "stop"


def test_concurrent_requests_keep_their_own_settings(client, reference):
    """Requests decoded at the same time with different regions, max_tokens, stop strings and sampling, streamed or
    not, each get what they get alone: a greedy or seeded one what generate gives, cut before a stop string that spans
    two tokens (none of it streamed), with its own finish reason."""
    full = reference("def main", 2, 12)
    ends = [len(reference("def main", 2, k)) for k in range(1, 12)]  # the text's length after each token
    end = next(e for e in ends if 1 < e < len(full) and "\ufffd" not in full[e - 1 : e + 1])
    stop = full[end - 1 : end + 1]  # the last character of one token and the first of the next
    sampled = dict(temperature=0.8, top_p=0.9, seed=7)
    asks = [  # (prompt, sharing_layers, max_tokens, stop, sampling, stream), expected text or None (unseeded)
        (("def main", 2, 12, [stop, "\x00\x01"], {"temperature": 0}, True), full[: full.index(stop)]),
        (("def main", 2, 12, [stop], {"temperature": 0}, False), full[: full.index(stop)]),
        (("import os", 0, 5, None, {"temperature": 0}, True), reference("import os", 0, 5)),
        (("import os", 1, 3, None, {"temperature": 0}, False), reference("import os", 1, 3)),
        (("x", 1, 9, None, sampled, True), reference("x", 1, 9, **sampled)),
        (("def main", 2, 7, None, {"temperature": 1.5, "top_k": 5}, False), None),
        (("print(", 2, 10, None, {"temperature": 0}, False), reference("print(", 2, 10)),
        (("print(", 0, 4, None, {"temperature": 0, "seed": 3}, True), reference("print(", 0, 4)),
    ]

    def ask(prompt, n_shared, max_tokens, stop, sampling, stream):
        sampling = {**sampling}
        extra = {"sharing_layers": n_shared, **({"top_k": sampling.pop("top_k")} if "top_k" in sampling else {})}
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, stop=stop, extra_body=extra, **sampling)
        if not stream:
            response = client.completions.create(**kwargs)
            return response.choices[0].text, response.choices[0].finish_reason, response.usage.completion_tokens
        pieces = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        reasons = [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason]
        return "".join(p.choices[0].text for p in pieces if p.choices), *reasons, pieces[-1].usage.completion_tokens

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: ask(*a[0]), asks))
    for ((prompt, n_shared, max_tokens, stop, *_), expected), (text, reason, tokens) in zip(asks, answers, strict=True):
        assert text == expected or expected is None, (prompt, n_shared, max_tokens, stop)
        assert reason == ("stop" if stop else "length") or expected is None  # unseeded: it may sample EOS
        assert tokens == max_tokens or (reason == "stop" and tokens < max_tokens)


def test_chat_completions_stream_or_not_continue_the_chat_template_prompt(server, client, checkpoint, reference):
    """The ids fed to the model are the rendered template's, control ids included; streamed: the role, the deltas,
    the finish reason and the usage, then [DONE] (the openai client ends there)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    messages = [{"role": "system", "content": "main"}, {"role": "user", "content": "def"}]  # the context is 64
    ids = hf.encode(hf.apply_chat_template(messages, chat_template=CHATML, tokenize=False, add_generation_prompt=True))
    kwargs = dict(model="tiny", messages=messages, max_completion_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs, extra_body={"sharing_layers": 1})
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content == reference(ids, 1, 8)
    assert whole.usage.prompt_tokens == len(ids) and whole.epas["sharing_layers"] == 1
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant" and {p.object for p in pieces} == {"chat.completion.chunk"}
    deltas = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert deltas == reference(ids, 2, 8)
    assert [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason] == ["length"]
    assert pieces[-1].usage.prompt_tokens == len(ids) and pieces[-1].usage.completion_tokens == 8
    assert "sharing layers; chat) at http://" in server.log()  # the start-up line says chat is served


BAD_REQUESTS = [
    ({"temperature": "hot"}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"max_tokens": -3}, 400, "max_tokens must be at least 1"),
    ({"prompt": "x" * 200}, 400, "context length is 64"),
    ({"max_tokens": 63}, 400, "exceeds the model's context length 64"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"sharing_layers": 3}, 400, "trained with at most 2 sharing layers"),
    ({"budget": 0.5}, 400, "raise budget to at least"),
    ({"budget": 0.9, "sharing_layers": 1}, 400, "not both"),
    ({"n": 20}, 400, "more than the 16 completions"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
    ({"logprobs": 2}, 400, "logprobs is not supported"),
    ({"seed": 2**64}, 400, f"seed must lie in -2**63..2**63-1, got {2**64}"),
    ({"min_p": 0.1}, 400, "unrecognized request argument supplied: min_p"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options is only allowed when stream is true"),
]


@pytest.mark.parametrize(("change", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, change, status, message):
    import openai

    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **change}
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(**{k: body.pop(k) for k in ("model", "prompt")}, extra_body=body)
    assert error.value.status_code == status and message in error.value.message, error.value.message
    assert error.value.body["message"]  # the openai client found the OpenAI error object
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_malformed_json_is_a_400(server):
    status, body = server.post("/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]


@pytest.fixture(scope="module")
def long_server_started(checkpoint, tmp_path_factory):
    """``long_server`` before it is ready: ``server`` starts it too, so that the two load at the same time."""
    pytest.importorskip("openai")
    pytest.importorskip("litserve")
    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("debug", n_layer=2, block_size=4096))  # 4,000 tokens take seconds
    model.set_shared_layers([1])
    server = Server(save_consolidated(model, root / "long", checkpoint / "tokenizer.json"), root, wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_server(long_server_started):
    """A server of a model with a 4,096-token context: requests that take seconds."""
    long_server_started.wait_until_ready()
    return long_server_started


def test_clients_that_go_away_are_cancelled_and_the_others_go_on(checkpoint, long_server):
    """A streamed client that closes its connection after one chunk, and one that stops waiting for a whole response:
    the worker cancels both (its log says so) while a request decoded in the same batch gets its exact text."""
    import openai

    server = long_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(client.completions.create, model="long", prompt="import os", max_tokens=300, temperature=0)
        stream = client.completions.create(model="long", prompt="def", max_tokens=4000, temperature=0, stream=True)
        assert next(iter(stream)).choices[0].index == 0
        stream.close()  # mid-stream: the server sees the connection close
        # "def": no end token in 1,500 greedy tokens of this model ("def main" ends at 49 since 5f3b9c9 cuts ids
        # past the tokenizer), so the request is still decoding when its client goes
        body = json.dumps({"model": "long", "prompt": "def", "max_tokens": 4000, "temperature": 0}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(head.encode() + body)
            time.sleep(0.3)  # then it stops waiting
        server.wait_for_log("client went away", 2)
        answer = other.result()
    expected = load_model(server.checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    prompt = [tokenizer.bos_id, *tokenizer.encode("import os")]
    out = generate(expected.model, [prompt], 300, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
    assert answer.choices[0].text == tokenizer.decode([t for t in out.tokens[0] if t != tokenizer.eos_id])
    log = server.log()
    assert log.count("client went away") == 2 and "Traceback" not in log, log


def test_sigterm_to_every_process_lets_requests_finish_and_a_second_signal_cuts_them_off(long_server):
    """SIGTERM to every process of the server (as systemd stops a service) killed the worker at once: the requests in
    flight hung until the HTTP process's graceful timeout (30 s) cut them off. Ctrl+C pressed twice, to quit at once,
    printed uvicorn's traceback of every request it cancelled."""
    import openai

    server = long_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    ask = dict(model="long", temperature=0, stream=True)
    long = client.completions.create(prompt="def", max_tokens=4000, **ask)
    short = client.completions.create(prompt="import sys", max_tokens=200, **ask)  # no end token in 200 (greedy)
    assert next(iter(long)).choices[0].index == next(iter(short)).choices[0].index == 0
    server.signal_all(signal.SIGTERM)
    server.wait_for_log("stopping: waiting up to 30 s for 2 requests in flight to finish")
    assert [piece.choices[0].finish_reason for piece in short][-1] == "length"  # it went on to its end
    server.signal_all(signal.SIGINT)
    assert server.process.wait(timeout=30) == 130
    log = server.log()
    assert log.endswith("interrupted: serve stopped (second Ctrl+C: 1 request was cut off)\n"), log
    assert "Traceback" not in log, log
    with pytest.raises(openai.APIConnectionError):
        list(long)


def test_sigterm_shuts_down_cleanly(server):
    assert server.stop() == 0
    log = server.log()
    assert log.startswith(f"loading the model from {server.checkpoint}\nserving 'tiny' "), log
    assert "Traceback" not in log and "server stopped" in log, log


def run_with_fake_litserver(checkpoint: Path, monkeypatch, run) -> int:
    """``serve`` through the command line, with ``run(server)`` in place of ``LitServer.run`` (no process starts)."""
    ls = pytest.importorskip("litserve")

    class FakeServer:
        uvicorn_graceful_timeout = 0.2

        def __init__(self, api, *args, **kwargs) -> None:
            from fastapi import FastAPI

            self.api, self.app = api, FastAPI()
            self.inference_workers, self._shutdown_event = [], threading.Event()

        def run(self, **kwargs) -> None:
            run(self)

    monkeypatch.setattr(ls, "LitServer", FakeServer)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    return cli_main(["serve", "--checkpoint", str(checkpoint), "--port", port])


def test_sigterm_while_the_server_starts_is_named_sigterm(checkpoint, monkeypatch, capsys):
    """LitServe lets the interrupt out while its workers start: it said '(Ctrl+C)' and exited 130."""
    assert run_with_fake_litserver(checkpoint, monkeypatch, lambda _: signal.raise_signal(signal.SIGTERM)) == 143
    assert capsys.readouterr().err.endswith("interrupted: serve stopped (SIGTERM)\n")


def test_requests_still_in_flight_when_the_grace_period_ends_are_said_to_be_cut_off(checkpoint, monkeypatch, capsys):
    """After the grace period LitServe killed the HTTP process with the request: two raw LitServe warnings, then
    "server stopped" as after a clean stop."""

    def run(server) -> None:
        server.api.spec.in_flight.value = 1
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # LitServe shuts down; the request does not finish within the grace period
            time.sleep(server.uvicorn_graceful_timeout + 0.3)
            logging.getLogger("litserve.server").warning("LitServer-0 (PID: 1): Did not terminate gracefully. ...")

    records, litserve_log = [], logging.getLogger("litserve.server")
    handler = logging.Handler()
    handler.emit = records.append
    litserve_log.addHandler(handler)
    try:
        assert run_with_fake_litserver(checkpoint, monkeypatch, run) == 0
    finally:
        litserve_log.removeHandler(handler)
    err = capsys.readouterr().err
    assert (
        "stopping: waiting up to 0.2 s for 1 request in flight to finish; a second Ctrl+C or SIGTERM cuts it off" in err
    )
    assert err.endswith("\nserver stopped after the 0.2 s grace period: 1 request was cut off\n")
    assert not records  # said once, by the line above


def test_one_sigterm_delivered_twice_is_one_stop(checkpoint, monkeypatch, capsys):
    """`timeout` signals serve and then its process group: SIGTERM came twice, at random, and the second one cut the
    requests in flight off at once (no grace period), or, idle, exited 143 saying "0 requests were cut off"."""

    def run(server) -> None:
        server.api.spec.in_flight.value = 1
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # LitServe shuts down, and the same SIGTERM comes again
            signal.raise_signal(signal.SIGTERM)
        server.api.spec.in_flight.value = 0  # the request finishes within the grace period

    assert run_with_fake_litserver(checkpoint, monkeypatch, run) == 0
    assert capsys.readouterr().err.endswith("a second Ctrl+C or SIGTERM cuts it off\nserver stopped\n")


def test_a_line_logged_in_the_http_process_is_printed_once(checkpoint, monkeypatch, capfd):
    """LitServe's first ``logging.debug`` in the main process gives the root logger a stderr handler (``basicConfig``)
    before it forks its HTTP process: each of our lines there was printed by our handler and again by that one, as
    'WARNING:epas_lightning...'. The inference worker stopped it for itself; the HTTP process did not."""
    fork = multiprocessing.get_context("fork")

    def run(server) -> None:
        root = logging.StreamHandler(sys.stderr)
        logging.root.addHandler(root)  # what logging.debug's basicConfig adds in LitServe's run
        try:
            log = logging.getLogger("epas_lightning.serve")
            http = fork.Process(target=lambda: log.warning("a line of the HTTP process"), name="http-process")
            http.start()
            http.join()
        finally:
            logging.root.removeHandler(root)

    assert run_with_fake_litserver(checkpoint, monkeypatch, run) == 0
    err = capfd.readouterr().err
    assert err.count("a line of the HTTP process") == 1, err


def test_a_server_process_that_ends_while_serving_stops_serve_in_one_line(checkpoint, monkeypatch, capsys):
    """The HTTP process killed (for memory) left serve waiting for ever while nothing answered; the inference worker
    killed ended serve with LitServe's EOFError traceback."""
    from epas_lightning.serve import liveness

    monkeypatch.setattr(liveness, "WATCH_INTERVAL", 0.1)
    fork = multiprocessing.get_context("fork")

    def killed(server, http: bool) -> None:
        name = "LitServer-0" if http else "inference-worker"
        process = fork.Process(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGKILL)), name=name)
        process.start()
        if http:  # the watcher sets LitServe's shutdown event: its run returns
            assert server._shutdown_event.wait(10)
        else:  # LitServe's monitor shuts its manager down under the main process
            server.inference_workers.append(process)
            process.join()
            raise EOFError

    for http, kind in [(True, "HTTP process"), (False, "inference worker")]:
        assert run_with_fake_litserver(checkpoint, monkeypatch, lambda server, http=http: killed(server, http)) == 2
        assert capsys.readouterr().err.splitlines()[-1] + "\n" == (
            f"error: the {kind} ended while serving (killed by SIGKILL: the system may have run out of memory) — "
            "serve — the requests in flight were cut off; see the log above and restart serve\n"
        )


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_processes_serve_forks_end_when_it_is_killed():
    """serve's main process SIGKILLed (the OOM killer, kill -9) left LitServe's HTTP process serving and its manager
    holding the port, so that serve could not start again."""
    from epas_lightning.serve.liveness import ending_with_this_process

    read, write = os.pipe()
    main = os.fork()
    if main == 0:  # serve's main process: forks a process, then is killed
        try:
            with ending_with_this_process():
                forked = os.fork()
                if forked == 0:
                    time.sleep(30)
                    os._exit(0)
            os.write(write, str(forked).encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    forked = int(os.read(read, 32))
    os.waitpid(main, 0)
    deadline = time.monotonic() + 5
    while running(forked):
        assert time.monotonic() < deadline, "the forked process outlived serve's main process"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_server_whose_device_fails_answers_the_requests_in_flight_then_stops_in_one_line(checkpoint, tmp_path):
    """The real server, its batched steps failing as after a device-side assert: it served on with every later
    request failing and /health 200. The request in flight gets the error, /health stops answering 200, and serve
    exits with one line."""
    pytest.importorskip("litserve")
    server = Server(checkpoint, tmp_path, program=(str(REPO / "tests" / "scripts" / "serve_failing_device.py"),))
    try:
        assert (
            server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "def", "max_tokens": 3}).encode())[0]
            == 200
        )
        body = json.dumps(
            {"model": "tiny", "prompt": ["def", "import os"], "max_tokens": 3}
        ).encode()  # two sequences: one batch
        assert server.post("/v1/completions", body) == (
            500,
            {"error": {"message": DEVICE_LOST.format("AcceleratorError"), "type": "server_error", "param": None,
                       "code": None}},
        )  # fmt: skip
        assert server.get("/health")[0] in (503, 0)  # 0: it has already stopped listening
        assert server.process.wait(timeout=60) == 2
    finally:
        server.stop()
    assert server.log().splitlines()[-1] == (
        "error: the inference worker's device failed (AcceleratorError: CUDA error: device-side assert triggered) — "
        "serve — nothing more runs on it in this process: the requests in flight got an error; restart serve (the log "
        "above has the traceback)"
    )


def test_the_shutdown_race_stays_filtered_after_the_server_returns(checkpoint, monkeypatch):
    """LitServe's monitor thread outlives ``server.run``: its broken-pipe traceback came after 'server stopped'."""
    assert run_with_fake_litserver(checkpoint, monkeypatch, lambda _: None) == 0
    records, monitor_log = [], logging.getLogger("litserve.server")
    handler = logging.Handler()
    handler.emit = records.append
    monitor_log.addHandler(handler)
    try:
        monitor_log.error("Monitoring worker crashed", exc_info=BrokenPipeError(32, "Broken pipe"))
    finally:
        monitor_log.removeHandler(handler)
    assert not records


def test_litserves_shutdown_race_traceback_is_dropped_and_nothing_else():
    from epas_lightning.serve.command import _shutdown_race

    def record(message, error):
        return logging.LogRecord("litserve.server", logging.ERROR, "", 0, message, (), (type(error), error, None))

    assert not _shutdown_race(record("Monitoring worker crashed", BrokenPipeError(32, "Broken pipe")))
    assert _shutdown_race(record("Monitoring worker crashed", RuntimeError("a real failure")))
    assert _shutdown_race(record("Worker crashed", BrokenPipeError(32, "Broken pipe")))


def test_the_render_process_starts_with_a_path_object_on_sys_path(tmp_path, monkeypatch):
    """Python's imports skip a sys.path entry that is not a string (a pathlib.Path a script appended); the render
    process is given sys.path as JSON, which a Path made a TypeError traceback at every chat render."""
    from epas_lightning.serve import template_process
    from epas_lightning.serve.chat import render_chat

    monkeypatch.setattr(template_process, "RENDER_MEMORY", template_process.RENDER_MEMORY + 1)  # a new worker
    monkeypatch.setattr(sys, "path", [*sys.path, tmp_path])
    assert render_chat("{{ messages[0]['content'] }}", [{"role": "user", "content": "hi"}], "<s>", "</s>") == "hi"
