"""The text of one completion as its tokens arrive: pieces safe to send now, and where a stop string ends it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from epas_lightning.data.tokenizer import REPLACEMENT, decode_continuation


class TextStream:
    """Turn tokens into text deltas whose concatenation is the decoded completion, cut before the first stop string.

    A delta never ends in half a character (a byte-level token may carry part of one) nor in text that could be the
    start of a stop string; both are held back until the next token decides them, or until :meth:`finish`. The text
    is what the tokens add after ``context``, the prompt (see :func:`decode_continuation`).
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), context: Sequence[int] = ()
    ) -> None:
        self.decode, self.stop, self.context = decode, tuple(s for s in stop if s), list(context)
        self.tokens: list[int] = []
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
        return decode_continuation(self.decode, self.context, self.tokens)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
