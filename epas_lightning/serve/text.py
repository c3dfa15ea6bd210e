"""The text of one completion as its tokens arrive: pieces safe to send now, and where a stop string ends it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from epas_lightning.data.tokenizer import CONTEXT_TOKENS, REPLACEMENT, decode_continuation

SETTLE_TOKENS = 16
"""Tokens decoded since the text was last settled after which it is settled again (when it ends in a whole
character): each token decodes at most about this many, plus :data:`CONTEXT_TOKENS` before them."""


class TextStream:
    """Turn tokens into text deltas whose concatenation is the decoded completion, cut before the first stop string.

    A delta never ends in half a character (a byte-level token may carry part of one) nor in text that could be the
    start of a stop string; both are held back until the next token decides them, or until :meth:`finish`. The text
    is what the tokens add after ``context``, the prompt (see :func:`decode_continuation`). It is decoded in windows:
    text that ends in a whole character is settled, and only the tokens after it are decoded again (with the few
    before them), so a token costs the same at the end of a long completion as at its start.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), context: Sequence[int] = ()
    ) -> None:
        self.decode, self.stop, self.context = decode, tuple(s for s in stop if s), list(context[-CONTEXT_TOKENS:])
        self.tokens: list[int] = []
        self.settled, self.settled_text = 0, ""
        """The first ``settled`` tokens decode to ``settled_text``, whatever follows them."""
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that can be sent now (``stopped`` turns true when a stop string appeared)."""
        self.tokens.append(token)
        text = self._decoded().rstrip(REPLACEMENT)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        return self._advance(text[: len(text) - self._held(text)])

    def finish(self) -> str:
        """The rest of the text once no token follows (EOS or the token limit)."""
        text = self._decoded()
        cut = self._stop_at(text)
        self.stopped = self.stopped or cut is not None
        return self._advance(text if cut is None else text[:cut])

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return self.sent

    def _decoded(self) -> str:
        """The text of every token: the settled text, then what the tokens after it add (decoded after the last
        tokens before them); it is settled in turn once it is long enough and ends in a whole character."""
        start = self.settled
        before = (self.context + self.tokens[max(0, start - CONTEXT_TOKENS) : start])[-CONTEXT_TOKENS:]
        text = decode_continuation(self.decode, before, self.tokens[start:])
        if len(self.tokens) - start >= SETTLE_TOKENS and not text.endswith(REPLACEMENT):
            self.settled, self.settled_text = len(self.tokens), self.settled_text + text
            return self.settled_text
        return self.settled_text + text

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string. It lies in the text not sent yet (what was
        sent ended in no such beginning, or it would have been held back), and starts with the stop string's first
        character: a long stop string costs a token no more than a short one."""
        longest = 0
        for s in self.stop:
            start = text.find(s[0], max(len(self.sent), len(text) - len(s) + 1))
            while start >= 0 and len(text) - start > longest:
                if s.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start = text.find(s[0], start + 1)
        return longest
