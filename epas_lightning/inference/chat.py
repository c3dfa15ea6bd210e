"""A conversation with an instruct model: its history rendered with the model's chat template, fitted to the context,
and one streamed reply at a time (the pieces behind the ``chat`` command).

The prompt of a turn is the whole history rendered anew, as ``serve``'s chat renders a request's messages
(:func:`~epas_lightning.serve.chat.chat_prompt_ids`), and each reply is prefilled from scratch: a template renders the
history anew (it may trim or rewrite earlier turns, and a reply's text need not tokenize back to the ids generated),
so the previous turn's KV cache is not an exact prefix of the next prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from epas_lightning.data.tokenizer import TextTokenizer
from epas_lightning.errors import ConfigError, not_utf8
from epas_lightning.inference.generate import Decoder
from epas_lightning.model import Llama
from epas_lightning.serve.chat import MAX_TOKEN_CHARS, TemplateFailure, TemplateRefusal, chat_prompt_ids
from epas_lightning.serve.text import TextStream

Message = dict[str, str]


@dataclass
class Conversation:
    """The history of a chat: the system message (if any), then user and assistant turns, the user's last.

    ``prompt(text)`` adds a user message and returns the ids of the whole conversation, its oldest turns dropped
    (the system message stays) until it leaves ``reply_tokens`` of the context for the reply.
    """

    template: str
    tokenizer: TextTokenizer
    context_length: int
    reply_tokens: int
    system: str | None = None
    turns: list[Message] = field(default_factory=list)
    """User and assistant messages, alternating; no system message."""

    def messages(self, turns: list[Message] | None = None) -> list[Message]:
        """What the template renders: the system message, then ``turns`` (default: the history)."""
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + (self.turns if turns is None else turns)

    def ids(self, turns: list[Message]) -> list[int]:
        """The prompt ids of ``turns`` after the system message; a :class:`ConfigError` if the template refuses them
        or fails on them."""
        try:
            return chat_prompt_ids(self.template, self.messages(turns), self.tokenizer, self.max_chars)
        except TemplateRefusal as e:
            raise ConfigError(
                f"the model's chat template refuses this conversation: {e}",
                f"the chat template beside {self.tokenizer.path}",
                "change what it refuses (a template without a system role refuses --system)",
            ) from None
        except TemplateFailure as e:
            raise ConfigError(
                f"the model's chat template failed on this conversation ({e})",
                f"the chat template beside {self.tokenizer.path}",
                "fix the template, or chat with --tokenizer <a folder holding this tokenizer and a working template>",
            ) from None

    @property
    def max_chars(self) -> int:
        """The characters a render may write: the history (the last prompt fitted the context), a message of at most
        what the context holds (:meth:`prompt` checks it), and the template's own text, not as much again."""
        return 3 * self.context_length * MAX_TOKEN_CHARS

    def check_fits(self, what: str, text: str, where: str) -> None:
        """A :class:`ConfigError` where ``text`` has more characters than the context can hold tokens (none stands for
        more than ``MAX_TOKEN_CHARS``): refused before the template renders it, as serve refuses it."""
        if len(text) > self.context_length * MAX_TOKEN_CHARS:
            raise ConfigError(
                f"{what} holds {len(text)} characters, more than the model's context length of "
                f"{self.context_length} tokens can hold",
                where,
                "shorten it",
            )

    def check_room(self) -> None:
        """A :class:`ConfigError` if the template refuses the system message, or leaves no room for a message with it
        and a reply of ``reply_tokens``; it names a fix that leaves room (a shorter system message, a shorter reply),
        or says that the template itself is too long for the model's context."""
        if self.system is not None:  # before a render
            self.check_fits("the system message", self.system, "--system")
        empty = len(self.ids([{"role": "user", "content": ""}]))
        if empty + self.reply_tokens < self.context_length:
            return
        system, fixes = self.system is not None, self.room_fixes(empty)
        if not fixes:
            raise ConfigError(
                f"the chat template makes a prompt of {self.bare_length()} tokens by itself (with an empty system "
                "message, where it takes one), which leaves no room for a message and a reply in the model's context "
                f"length of {self.context_length}",
                f"the chat template beside {self.tokenizer.path}",
                "chat with a model of a longer context, or pass --tokenizer <a folder holding this tokenizer and a "
                "shorter chat template>",
            )
        raise ConfigError(
            f"the chat template{' with the system message' if system else ''} makes a prompt of {empty} tokens "
            f"before any message is typed; with a reply of {self.reply_tokens} that leaves no room in the model's "
            f"context length of {self.context_length}",
            "--system" if "system" in fixes[0] else "--max-new-tokens",
            ", or ".join(fixes),
        )

    def room_fixes(self, empty: int) -> list[str]:
        """What leaves room for a message and a reply of at least one token, where the prompt before any message is
        ``empty`` tokens long: a shorter system message, a shorter reply, or neither."""
        fixes = []
        if self.bare_length() < min(empty, self.context_length - 1):
            short = "pass a short --system (it replaces the template's default system message)"
            fixes.append("shorten --system" if self.system is not None else short)
        if empty < self.context_length - 1:
            fixes.append("lower --max-new-tokens")
        return fixes

    def bare_length(self) -> int:
        """The prompt's length with an empty message and an empty system message (none, for a template that refuses
        one): the least any ``--system`` leaves."""
        message = {"role": "user", "content": ""}
        try:
            system = {"role": "system", "content": ""}
            return len(chat_prompt_ids(self.template, [system, message], self.tokenizer, self.max_chars))
        except (TemplateRefusal, TemplateFailure):
            return len(chat_prompt_ids(self.template, [message], self.tokenizer, self.max_chars))

    def prompt(self, text: str) -> tuple[list[int], int]:
        """Add the user message ``text``; return the conversation's prompt ids and how many of its oldest turns
        (a user message and its reply each) were dropped to fit. A message that does not fit even alone is a
        :class:`ConfigError`, and the history stays as it was (one longer than the context can hold is refused before
        the template renders it, as serve refuses it)."""
        check_text(text)
        self.check_fits("this message", text, "the message")
        turns, dropped = [*self.turns, {"role": "user", "content": text}], 0
        while True:
            ids = self.ids(turns)
            if len(ids) + self.reply_tokens <= self.context_length:
                self.turns = turns
                return ids, dropped
            if len(turns) == 1:
                raise ConfigError(
                    f"this message makes a prompt of {len(ids)} tokens (with the template"
                    f"{' and the system message' if self.system is not None else ''}), and the reply may take "
                    f"{self.reply_tokens}: more than the model's context length of {self.context_length}",
                    "the message",
                    "shorten it, or lower --max-new-tokens",
                )
            turns, dropped = turns[2:], dropped + 1

    def answer(self, text: str) -> None:
        """Add the assistant's reply to the last user message."""
        self.turns.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns = []


def check_text(text: str) -> None:
    """A :class:`ConfigError` for a message of input bytes that are not UTF-8 (read with ``surrogateescape``)."""
    if (where := not_utf8(text)) is not None:
        raise ConfigError(f"this message is not UTF-8 text ({where})", "the message", "send UTF-8 text")


@dataclass(frozen=True)
class Sampling:
    """How a reply's tokens are chosen (greedy at temperature 0, or top_p 0)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int


@torch.inference_mode()
def stream_reply(
    model: Llama,
    prompt: list[int],
    tokenizer: TextTokenizer,
    max_new_tokens: int,
    sampling: Sampling,
    write: Callable[[str], None],
) -> tuple[str, bool]:
    """Decode a reply to ``prompt`` with the model's current region, writing its text as it comes (never half a
    character; never an id the tokenizer lacks), until an end token of the model (``tokenizer.stop_ids``) or
    ``max_new_tokens``. Returns the text written and whether Ctrl+C stopped it (the text is then what was written
    until then). The text is the reply's tokens' alone, as transformers decodes a reply's ids (a sentencepiece-style
    reply has no space before its first word; a byte-level BPE one keeps its first token's)."""
    text = TextStream(tokenizer.decode)
    try:  # a Ctrl+C while the decoder is built (its KV cache allocated) stops the reply too
        decoder = Decoder(
            model, [prompt], max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=sampling.seed, cuda_graph=False, vocab_size=tokenizer.vocab_size,
        )  # fmt: skip
        token = decoder.prefill()
        while True:
            decoder.check_finite()
            if int(token) in tokenizer.stop_ids:
                break
            write(text.push(int(token)))
            if len(text.tokens) == max_new_tokens:
                break
            token = decoder.step(token)
        write(text.finish())
    except KeyboardInterrupt:
        return text.text, True
    return text.text, False
