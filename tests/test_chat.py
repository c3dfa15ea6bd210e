"""``chat``: a piped conversation with serve's tiny checkpoint that has a chat template, against serve's chat."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from test_serve import CHATML, chat_checkpoint

from epas_lightning.checkpoint import describe_checkpoint
from epas_lightning.cli import main as cli_main
from epas_lightning.data.tokenizer import REPLACEMENT
from epas_lightning.errors import error_line
from epas_lightning.inference import chat as chat_module
from epas_lightning.inference.generate import generate
from epas_lightning.inference.generate_cli import load_for_inference, resolve_tokenizer
from epas_lightning.serve.chat import control_token_encoder, render_chat, token_text

CONTEXT = 128
SYSTEM = {"role": "system", "content": "x"}  # short (the template's default system message is not)
REPLY_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """serve's 4-layer checkpoint with a ChatML template, with a context of 128 tokens."""
    return chat_checkpoint(tmp_path_factory.mktemp("chat"), block_size=CONTEXT)


def chat(
    monkeypatch, capsys, checkpoint: Path, lines: str | bytes | io.StringIO, *flags: str
) -> tuple[int, str, str, list[list[int]]]:
    """Run ``chat`` greedily on ``lines`` as piped input (bytes: read as strict UTF-8, as a terminal's stdin may be):
    its exit status, stdout, stderr and the prompts it fed."""
    fed, decoder = [], chat_module.Decoder

    def recording(model, prompts, *args, **kwargs):
        fed.append(list(prompts[0]))
        return decoder(model, prompts, *args, **kwargs)

    monkeypatch.setattr(chat_module, "Decoder", recording)
    stdin = io.TextIOWrapper(io.BytesIO(lines), "utf-8", "strict") if isinstance(lines, bytes) else lines
    stdin = io.StringIO(stdin) if isinstance(stdin, str) else stdin
    monkeypatch.setattr(sys, "stdin", stdin)
    argv = ["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "--temperature", "0", "--system", "x"]
    rc = cli_main([*argv, "--max-new-tokens", str(REPLY_TOKENS), *flags])
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return rc, out.out, out.err, fed


def template_ids(checkpoint: Path, messages: list[dict]) -> list[int]:
    """The chat template's text for ``messages`` (with the generation prompt), its control tokens as their ids."""
    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    bos, eos = token_text(tokenizer, tokenizer.bos_id), token_text(tokenizer, tokenizer.eos_id)
    return control_token_encoder(tokenizer)(render_chat(CHATML, messages, bos, eos))


def serve_reply(checkpoint: Path, messages: list[dict], max_tokens: int) -> tuple[list[int], str]:
    """Serve's greedy chat completion of ``messages``: its prompt ids and its text (parsed and decoded as the server
    does it, without HTTP)."""
    from epas_lightning.serve.engine import Engine
    from epas_lightning.serve.model_card import ServedModel
    from epas_lightning.serve.protocol import parse_chat

    recorded = describe_checkpoint(checkpoint)
    tokenizer = resolve_tokenizer(recorded, None)
    served = ServedModel.build(recorded, tokenizer, "tiny", None, None, 16)
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_completion_tokens": max_tokens}
    completion = parse_chat(body, served, tokenizer)
    loaded = load_for_inference(checkpoint, "cpu")  # as serve's worker loads it
    engine = Engine.for_tokenizer(loaded.model, loaded.region, tokenizer)
    engine.add(0, completion.sequences[0])
    text = ""
    while engine.busy:
        text += "".join(output.text for output in engine.step())
    return completion.prompts[0], text


def test_a_piped_two_turn_chat_feeds_the_whole_history_and_replies_as_serve_does(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys):  # fmt: skip
    """Each line is a turn; the second prompt is the template's rendering of the system message, the first exchange
    and the new message (control tokens as ids); each greedy reply is serve's chat completion of the same messages,
    stopped at an end token of the model (here a token of the first reply past its second, named in
    generation_config.json)."""
    first = [SYSTEM, {"role": "user", "content": "hi"}]
    prompt = template_ids(checkpoint, first)
    loaded = load_for_inference(checkpoint, "cpu")
    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    greedy = generate(loaded.model, [prompt], REPLY_TOKENS, vocab_size=tokenizer.vocab_size).tokens[0]
    end = next(k for k, t in enumerate(greedy) if k >= 2 and t not in greedy[:k])
    stopping = shutil.copytree(checkpoint, tmp_path / "stopping")
    (stopping / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, greedy[end]]}))

    rc, out, err, fed = chat(monkeypatch, capsys, stopping, "hi\nhow are you\n")
    assert rc == 0 and err.startswith("chat: layers [3, 2] share (2/4;"), err
    served_prompt, reply = serve_reply(stopping, first, REPLY_TOKENS)
    assert fed[0] == prompt == served_prompt
    assert reply == tokenizer.decode(greedy[:end])  # stopped at the end token
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "how are you"}]
    served_prompt, second_reply = serve_reply(stopping, second, REPLY_TOKENS)
    assert len(fed) == 2 and fed[1] == template_ids(stopping, second) == served_prompt
    assert out == f"{reply}\n{second_reply}\n"


def test_reset_clears_the_history_and_exit_ends_the_chat(checkpoint, monkeypatch, capsys):
    rc, out, err, fed = chat(monkeypatch, capsys, checkpoint, "hi\n/reset\nhi\n/exit\nnever read\n")
    assert rc == 0 and "history cleared" in err
    assert fed == [template_ids(checkpoint, [SYSTEM, {"role": "user", "content": "hi"}])] * 2
    reply = out.split("\n")[0]
    assert out == f"{reply}\n{reply}\n"


@pytest.mark.parametrize("lines", ["hi\udcff\n", b"hi\xff\n"], ids=["escaped", "strict"])
def test_a_message_that_is_not_utf8_text_is_one_line(checkpoint, monkeypatch, capsys, lines):
    """Bytes that are not UTF-8 on stdin were a traceback: tokenizers' TypeError (stdin read with surrogateescape, as
    Python does in the C locale) or a UnicodeDecodeError (strict)."""
    rc, _, err, fed = chat(monkeypatch, capsys, checkpoint, lines)
    assert rc == 2 and fed == [], err
    assert err.splitlines()[-1] == (
        "error: this message is not UTF-8 text (byte 0xff at character 2) — the message on line 1 of the input — "
        "send UTF-8 text"
    ), err


def test_a_piped_message_too_long_for_the_context_ends_the_chat_naming_its_line(checkpoint, monkeypatch, capsys):
    """Piped, a message too long even alone ends the chat with exit status 2 after the replies before it (going on
    would shift every later reply against its line); the one line said "the message", not which of the lines."""
    long = "hello world " * 60
    rc, out, err, fed = chat(monkeypatch, capsys, checkpoint, f"hi\n\n{long}\nhi again\n")
    assert rc == 2 and len(fed) == 1 and out.count("\n") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("error: this message makes a prompt of ") and last.endswith(
        " — the message on line 3 of the input — shorten it, or lower --max-new-tokens"
    ), err


def test_startup_mistakes_are_one_line_before_the_weights_load(checkpoint, tmp_path, monkeypatch, capsys):
    """No chat template: what to do instead; a system message that leaves no room for a message: which flag."""
    plain = shutil.copytree(checkpoint, tmp_path / "plain", ignore=shutil.ignore_patterns("tokenizer_config.json"))
    monkeypatch.setattr("epas_lightning.inference.chat_cli.load_for_inference", lambda *a, **k: pytest.fail("loaded"))
    assert cli_main(["chat", "--checkpoint", str(plain)]) == 2
    assert capsys.readouterr().err == (
        f"error: this model has no chat template (none beside {plain / 'tokenizer.json'}) — --checkpoint {plain} — "
        "pass --tokenizer <a folder holding this tokenizer and its chat template>; a base model continues text with "
        "`generate`\n"
    )
    assert cli_main(["chat", "--checkpoint", str(checkpoint), "--system", "long " * 12]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the chat template with the system message makes a prompt of ") and err.endswith(
        f"tokens before any message is typed; with a reply of {CONTEXT // 2} that leaves no room in the model's "
        f"context length of {CONTEXT} — --system — shorten --system, or lower --max-new-tokens\n"
    ), err
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text('{"chat_template": ')  # was prepare's warning "it is not kept",
    assert cli_main(["chat", "--checkpoint", str(broken)]) == 2  # then "this model has no chat template"
    assert capsys.readouterr().err.startswith(
        f"error: the chat template beside {broken / 'tokenizer.json'} is unreadable (Expecting value: line 1 column "
        f"19 (char 18)) — --checkpoint {broken} — "
    )
    assert cli_main(["chat", "--checkpoint", str(checkpoint), "--seed", str(2**64)]) == 2  # was a traceback
    said = capsys.readouterr().err
    assert said.startswith(f"error: seed must lie in -2**63..2**63-1, got {2**64} — --seed — give a seed in that range")


@pytest.mark.parametrize(
    "template,flags,fix",
    [  # both advised "lower --max-new-tokens" / "shorten --system", which leave it too long at 1 token or at ""
        (
            CHATML.replace("You are a helpful assistant.", "You are a helpful assistant. " * 15),
            [],
            "— --system — pass a short --system (it replaces the template's default system message)\n",
        ),
        (
            "{{ 'Read this first. ' * 15 }}" + CHATML,
            ["--system", "x", "--max-new-tokens", "1"],
            "— chat with a model of a longer context, or pass --tokenizer <a folder holding this tokenizer and a "
            "shorter chat template>\n",
        ),
    ],
)
def test_a_template_too_long_for_the_context_says_what_leaves_room(
    checkpoint, tmp_path, monkeypatch, capsys, template, flags, fix
):
    """A chat template that fills the context by itself: the fix named is one that leaves room for a message."""
    long = shutil.copytree(checkpoint, tmp_path / "long")
    (long / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    monkeypatch.setattr("epas_lightning.inference.chat_cli.load_for_inference", lambda *a, **k: pytest.fail("loaded"))
    assert cli_main(["chat", "--checkpoint", str(long), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the chat template ") and err.count("\n") == 1 and err.endswith(fix), err


def test_a_long_chat_drops_its_oldest_turns_and_ctrl_c_stops_only_the_reply(checkpoint, monkeypatch, capsys):
    """Turns are dropped (said once) so that the prompt leaves the reply its room, the system message kept; Ctrl+C
    during a reply ends that reply, what was shown stays in the history, and the chat goes on."""
    step, answer = chat_module.Decoder.step, chat_module.Conversation.answer
    steps, replies = [], []

    def interrupted_once(self, tokens):
        steps.append(1)
        if len(steps) == 2:  # the first reply's third token
            raise KeyboardInterrupt
        return step(self, tokens)

    def recorded(self, text):
        replies.append(text)
        answer(self, text)

    monkeypatch.setattr(chat_module.Decoder, "step", interrupted_once)
    monkeypatch.setattr(chat_module.Conversation, "answer", recorded)
    rc, out, err, fed = chat(monkeypatch, capsys, checkpoint, "".join(f"m{i}\n" for i in range(6)))
    assert rc == 0 and err.count("reply stopped (Ctrl+C)") == 1, err
    assert err.count(f"note: the conversation outgrew the model's context length of {CONTEXT} tokens") == 1, err
    assert len(fed) == len(replies) == 6 and out == "".join(f"{reply}\n" for reply in replies)
    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    model = load_for_inference(checkpoint, "cpu").model
    shown = generate(model, [fed[0]], 2, vocab_size=tokenizer.vocab_size).tokens[0]  # before the Ctrl+C
    assert replies[0] == tokenizer.decode(shown).rstrip(REPLACEMENT)  # no half character

    def rendered(oldest: int, last: int) -> list[int]:  # the exchanges oldest..last-1, then message `last`
        turns = [[{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": replies[i]}]
                 for i in range(oldest, last)]  # fmt: skip
        return template_ids(checkpoint, [SYSTEM, *sum(turns, []), {"role": "user", "content": f"m{last}"}])

    oldest = 0
    for last, prompt in enumerate(fed):  # the fewest oldest exchanges dropped for the reply to fit, never the system
        while len(rendered(oldest, last)) + REPLY_TOKENS > CONTEXT:
            oldest += 1
        assert prompt == rendered(oldest, last), last
    assert oldest > 0


def test_the_note_on_dropped_turns_mentions_a_system_message_only_when_there_is_one():
    """Without --system the note said 'the system message stays' all the same."""
    from epas_lightning.inference.chat_cli import dropped_note

    assert dropped_note(32, 4, system=False).endswith("its oldest turns are dropped from now on")
    assert dropped_note(32, 4, system=True).endswith("dropped from now on; the system message stays")


def test_a_message_longer_than_the_context_can_hold_is_refused_before_the_template_renders(checkpoint, monkeypatch):
    """A line of more characters than the context can hold was rendered and tokenized whole (seconds for a line of a
    megabyte), and past the render's bound of characters blamed on the template ("fix the template"), as serve's
    check of a request's characters avoids; the history stays as it was. A conversation the context holds renders
    within a bound that grows with the context (a fixed 10**7 characters is less than 128k tokens can hold)."""
    from epas_lightning.serve.chat import MAX_TOKEN_CHARS

    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    bounds, render = [], chat_module.chat_prompt_ids

    def recorded(template, messages, tokenizer, max_chars=10**7):
        bounds.append(max_chars)
        return render(template, messages, tokenizer, max_chars)

    monkeypatch.setattr(chat_module, "chat_prompt_ids", recorded)
    conversation = chat_module.Conversation(CHATML, tokenizer, CONTEXT, REPLY_TOKENS, "x")
    conversation.prompt("hi")
    assert bounds == [3 * CONTEXT * MAX_TOKEN_CHARS]
    conversation.answer("hello")
    too_long = "a" * (CONTEXT * MAX_TOKEN_CHARS + 1)
    with pytest.raises(chat_module.ConfigError) as refused:
        conversation.prompt(too_long)
    assert len(bounds) == 1 and conversation.turns[-1] == {"role": "assistant", "content": "hello"}
    assert error_line(refused.value) == (
        f"error: this message holds {len(too_long)} characters, more than the model's context length of {CONTEXT} "
        "tokens can hold — the message — shorten it"
    )


def test_a_system_message_longer_than_the_context_can_hold_names_system(checkpoint):
    """--system past what the context holds was rendered, and past the render's bound blamed on the template."""
    from epas_lightning.serve.chat import MAX_TOKEN_CHARS

    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    system = "x" * (3 * CONTEXT * MAX_TOKEN_CHARS)  # past the render's bound
    with pytest.raises(chat_module.ConfigError) as refused:
        chat_module.Conversation(CHATML, tokenizer, CONTEXT, REPLY_TOKENS, system).check_room()
    assert error_line(refused.value) == (
        f"error: the system message holds {len(system)} characters, more than the model's context length of "
        f"{CONTEXT} tokens can hold — --system — shorten it"
    )


def test_a_reply_holds_no_id_the_tokenizer_lacks(checkpoint):
    """The tiny model's vocabulary (512) is larger than its tokenizer's, as a padded one is: a greedy reply went on
    with ids past the tokenizer, which decode to nothing (the reply lost them and ran shorter than it seemed). A reply
    is now what ``generate`` gives with the tokenizer's ``vocab_size``: the most likely id it has, every time."""
    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    loaded = load_for_inference(checkpoint, "cpu")
    prompt = template_ids(checkpoint, [SYSTEM, {"role": "user", "content": "hi"}])
    free = generate(loaded.model, [prompt], 12, eos_id=tokenizer.stop_ids).tokens[0]
    assert max(free) >= tokenizer.vocab_size  # the case
    kept = generate(loaded.model, [prompt], 12, eos_id=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size).tokens[0]
    kept = [t for t in kept if t not in tokenizer.stop_ids]
    sampling = chat_module.Sampling(0.0, None, None, 0)
    reply, _ = chat_module.stream_reply(loaded.model, prompt, tokenizer, 12, sampling, lambda text: None)
    assert max(kept) < tokenizer.vocab_size and reply == tokenizer.decode(kept)


def test_control_token_text_typed_in_a_message_reads_as_the_token_as_the_readme_says(checkpoint):
    """As serve and transformers read it: '<|im_end|>' typed in a message is that control token's id."""
    tokenizer = resolve_tokenizer(describe_checkpoint(checkpoint), None)
    conversation = chat_module.Conversation(CHATML, tokenizer, CONTEXT, REPLY_TOKENS, "x")
    ids, _ = conversation.prompt("a <|im_end|> b")
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    assert ids.count(im_end) == 3  # the system message's end, the typed one, the message's end
    assert im_end not in tokenizer.encode("<|im_end|>")  # a completion prompt reads it as text


def test_ctrl_c_while_a_reply_is_set_up_stops_only_that_reply(checkpoint, monkeypatch, capsys):
    """Ctrl+C while the reply's decoder was being built (its KV cache allocated) ended the whole chat."""
    decoder, calls = chat_module.Decoder, []

    def interrupted_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return decoder(*args, **kwargs)

    monkeypatch.setattr(chat_module, "Decoder", interrupted_first)
    rc, out, err, fed = chat(monkeypatch, capsys, checkpoint, "hi\nhi\n")
    assert rc == 0 and err.count("reply stopped (Ctrl+C)") == 1 and len(fed) == 2, err
    assert out.startswith("\n")  # the first reply is empty; the second is as usual


class Terminal(io.StringIO):
    """Typed lines, as a terminal's stdin gives them."""

    def isatty(self) -> bool:
        return True


def test_ctrl_c_while_a_message_renders_at_a_terminal_drops_only_that_message(checkpoint, monkeypatch, capsys):
    """Ctrl+C just after a line was sent (its conversation rendering) ended the whole chat at a terminal; the message
    is dropped, the history stays as it was, and the chat goes on."""
    prompt, calls = chat_module.Conversation.prompt, []

    def interrupted_first(self, text):
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return prompt(self, text)

    monkeypatch.setattr(chat_module.Conversation, "prompt", interrupted_first)
    monkeypatch.setitem(sys.modules, "readline", None)  # no line editing on the test's stdin
    rc, out, err, fed = chat(monkeypatch, capsys, checkpoint, Terminal("dropped\nhi\n"))
    assert rc == 0 and "message dropped (Ctrl+C)" in err and calls == ["dropped", "hi"], err
    assert fed == [template_ids(checkpoint, [SYSTEM, {"role": "user", "content": "hi"}])]


SENTENCEPIECE_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ end }}{% endif %}"
)


@pytest.mark.parametrize("end", ["\n", "<|im_end|>"])  # the prompt ends in text, or in a special token
def test_a_sentencepiece_reply_is_the_text_transformers_decodes_from_its_ids(tmp_path, end):
    """A reply's first word kept the space of its word-initial piece ('▁mine' after the prompt: ' mine'), where
    transformers' decode of the reply's ids (TextStreamer's skip_prompt text) gives 'mine'. chat's and serve's reply,
    streamed or not, is that text now; a character split across byte pieces streams whole."""
    transformers = pytest.importorskip("transformers")
    from helpers import train_tiny_sentencepiece
    from model_dirs import save_scripted

    from epas_lightning.checkpoint import load_model
    from epas_lightning.data.tokenizer import load_tokenizer
    from epas_lightning.serve.engine import Engine, SequenceRequest

    (tmp_path / "sp").mkdir()
    sp = train_tiny_sentencepiece(tmp_path / "sp" / "tokenizer.model")
    pieces = load_tokenizer(sp)
    words = [*pieces.encode(" mine"), pieces.token_id("<0xE6>"), pieces.token_id("<0x97>"), pieces.token_id("<0xA5>")]
    words += pieces.encode(" ka")
    ckpt = save_scripted(tmp_path / "ckpt", sp, pieces.vocab_size + 2, [*words, pieces.eos_id])
    decoder = {str(i): {"content": text, "special": True} for i, text in ((300, "<|im_end|>"), (301, "<|im_start|>"))}
    template = SENTENCEPIECE_CHATML.replace("{{ end }}", end)
    config = {"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": decoder, "chat_template": template}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer = resolve_tokenizer(describe_checkpoint(ckpt), None)
    expected = hf.decode(words, skip_special_tokens=True)
    assert expected == "mine日 ka"

    messages = [{"role": "user", "content": "ka lo"}]
    prompt, served = serve_reply(ckpt, messages, len(words) + 1)
    assert (prompt[-1] == 300) == (end == "<|im_end|>") and served == expected
    loaded = load_model(ckpt)
    deltas = []
    sampling = chat_module.Sampling(0.0, None, None, 0)
    reply, _ = chat_module.stream_reply(loaded.model, prompt, tokenizer, len(words) + 1, sampling, deltas.append)
    assert reply == "".join(deltas) == expected and REPLACEMENT not in "".join(deltas)
    engine = Engine(loaded.model, loaded.region, tokenizer.decode, eos_id=tokenizer.stop_ids)
    engine.add(0, SequenceRequest(prompt, len(words) + 1, 0, stream=True))
    streamed = [output.text for _ in range(len(words) + 2) for output in engine.step()]
    assert "".join(streamed) == " " + expected  # a completion goes on from its prompt's text, as before


def test_a_byte_level_reply_keeps_the_space_that_transformers_decodes_before_its_first_word(tmp_path):
    """A byte-level BPE token carries its word's space ('\u0120mine'): transformers' decode of a reply's ids keeps it,
    and so do chat's and serve's reply, streamed or not (only a sentencepiece-style reply has no space before its first
    word)."""
    transformers = pytest.importorskip("transformers")
    from model_dirs import save_scripted

    from epas_lightning.checkpoint import load_model
    from epas_lightning.data.tokenizer import load_tokenizer, train_byte_level_bpe

    bpe = train_byte_level_bpe(["ka lo mine su\n"] * 20, 300)
    bpe.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    (tmp_path / "bpe").mkdir()
    bpe.save(str(tmp_path / "bpe" / "tokenizer.json"))
    words = load_tokenizer(tmp_path / "bpe").encode(" mine ka")
    size = bpe.get_vocab_size()
    ckpt = save_scripted(tmp_path / "ckpt", tmp_path / "bpe" / "tokenizer.json", size, [*words, 1], bos_id=0, eos_id=1)
    template = SENTENCEPIECE_CHATML.replace("{{ end }}", "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    expected = transformers.AutoTokenizer.from_pretrained(ckpt).decode(words, skip_special_tokens=True)
    assert expected == " mine ka"

    prompt, served = serve_reply(ckpt, [{"role": "user", "content": "ka lo"}], len(words) + 1)
    assert served == expected
    deltas = []
    sampling = chat_module.Sampling(0.0, None, None, 0)
    tokenizer, model = resolve_tokenizer(describe_checkpoint(ckpt), None), load_model(ckpt).model
    reply, _ = chat_module.stream_reply(model, prompt, tokenizer, len(words) + 1, sampling, deltas.append)
    assert reply == "".join(deltas) == expected


def test_chat_top_p_0_is_greedy_as_serve_reads_it(checkpoint, monkeypatch, capsys):
    """chat refused --top-p 0, which serve takes as greedy (OpenAI's nucleus of one token): now the same reply as
    --temperature 0, at any temperature."""
    rc, greedy, err, _ = chat(monkeypatch, capsys, checkpoint, "hi\n")
    assert rc == 0, err
    rc, nucleus_of_one, err, _ = chat(monkeypatch, capsys, checkpoint, "hi\n", "--temperature", "1.5", "--top-p", "0")
    assert rc == 0 and nucleus_of_one == greedy, err
