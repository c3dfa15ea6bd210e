"""The decoding engine behind ``serve``: sequences that can share a forward are decoded together, one token per step.

A *sequence* is one choice of one prompt. Sequences with the same sharing region and the same sampling settings form a
*group*: one left-padded batch with its own KV cache (:class:`~epas_lightning.inference.generate.Decoder`, the loop
behind ``generate``). A sampled sequence with a ``seed`` decodes alone, so it gets exactly what ``generate`` gives for
that prompt and seed, whoever else is being served (a greedy one, seed or not, joins the greedy batch: the same
tokens). Every :meth:`Engine.step` advances each running group by one token (switching the model's region in between
is a flag flip) and admits waiting sequences into new groups, up to ``max_batch_size`` sequences in flight; waiting
sequences are admitted once they fill the free places or the oldest has waited ``batch_timeout`` seconds, so requests
that arrive together share a forward. A sequence that finishes (or is cancelled) leaves its group's batch and KV cache
at once, so every row computed is a sequence in flight and ``max_batch_size`` bounds the rows each step computes.

A group whose batched work fails (its KV cache, its prefill, a decode step, dropping a finished or cancelled row: one
bad sequence, out of memory) fails nobody else: each of its sequences goes on alone from where it is (its prompt and
the tokens it has made prefilled again), and only one that fails alone ends with an error; once they have made a
token alone, the others share a batch again (prefilled again together; if that batch fails too, they go on alone for
good). Other groups, and sequences still waiting, never notice. A device error after which nothing runs (a
device-side assert, an illegal memory access) is retried by none: the sequences it hit end with an error that says
so, and every step from then on raises :class:`~epas_lightning.serve.failures.DeviceLost` (the server stops).
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from epas_lightning.data.tokenizer import TextTokenizer
from epas_lightning.inference.generate import Decoder, emitted_vocabulary, stop_id_list
from epas_lightning.model import Llama
from epas_lightning.region import TrainedRegion
from epas_lightning.serve.failures import DeviceLost, FailureLog, described, device_lost, failed_alone, lost_device
from epas_lightning.serve.text import TextStream

logger = logging.getLogger("epas_lightning.serve")


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens: greedy at temperature 0."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class SequenceRequest:
    """One sequence to decode: prompt token ids, its region (the first ``n_shared`` trained layers) and limits.
    ``reply``: a chat reply, whose text is its tokens' alone (as transformers decodes a reply's ids: a
    sentencepiece-style reply has no space before its first word); else a completion, whose text goes on from its
    prompt's (:func:`~epas_lightning.data.tokenizer.decode_continuation`)."""

    prompt: list[int]
    max_tokens: int
    n_shared: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stream: bool = False
    reply: bool = False


@dataclass
class Output:
    """What a step produced for one sequence: text to send, and, when ``finish_reason`` is set, its last message."""

    key: Hashable
    text: str
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string), ``length`` (max_tokens reached) or ``error`` (``text`` says what went wrong:
    the activations overflowed the model's dtype, or its work failed alone, the cause in the log); ``None`` while it
    runs."""
    info: dict[str, Any] | None = None
    """On the last output: ``completion_tokens``; ``kv_cache_bytes``, the KV cache this sequence's row held (its
    group's longest prompt plus largest ``max_tokens`` positions of every layer it caches), and
    ``dense_kv_cache_bytes``, the same with no sharing layer; ``batch_size``, the sequences its group started with
    (that shared its prefill; the batch shrinks as they finish)."""


class StepFailed(Exception):
    """:meth:`Engine.step` failed part-way (its cause says why): ``outputs`` are what it made before, among them the
    last ones of sequences that have left the engine (which :meth:`Engine.abort` does not find)."""

    def __init__(self, outputs: list[Output]) -> None:
        super().__init__("a decode step failed")
        self.outputs = outputs


Member = tuple[Hashable, SequenceRequest, TextStream | None]
"""A sequence of a group: its key, its request, and its text so far (``None``: it starts now)."""


class _Group:
    """Sequences decoded as one left-padded batch with one KV cache, in one region; each leaves when it finishes.
    A member with text so far goes on from there: its prompt and the tokens it has made are its prefill."""

    def __init__(self, engine: Engine, members: list[Member], alone: bool = False, rejoined: bool = False) -> None:
        first = members[0][1]
        self.alone, self.rejoined = alone, rejoined
        """``alone``: its sequence went on alone after its batch failed, and may share a batch again once it has made a
        token (:meth:`Engine._rejoin`); ``rejoined``: its sequences did, and go on alone for good if it fails too."""
        self.engine, self.keys = engine, [key for key, _, _ in members]
        self.requests = [request for _, request, _ in members]
        self.texts = [
            TextStream(engine.decode, r.stop, () if r.reply else r.prompt) if t is None else t for _, r, t in members
        ]
        self.size = len(members)
        """The batch the group started with (it shrinks as sequences leave)."""
        self.layers = engine.region.first(first.n_shared)
        engine.model.set_shared_layers(self.layers)
        s = first.sampling
        made = [t.tokens for t in self.texts]
        self.decoder = Decoder(
            engine.model, [[*r.prompt, *m] for r, m in zip(self.requests, made, strict=True)],
            max(r.max_tokens - len(m) for r, m in zip(self.requests, made, strict=True)),
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, cuda_graph=False,
            vocab_size=engine.vocab_size,
        )  # fmt: skip
        self.tokens: torch.Tensor | None = None  # (B,): each row's last token, fed to the next step

    @property
    def done(self) -> bool:
        return not self.keys

    def close(self) -> None:
        """Let go of the batch's KV cache and tokens (the group failed; its members go on elsewhere)."""
        self.decoder = self.tokens = None

    def members(self, rows: list[int] | None = None) -> list[Member]:
        """The sequences in ``rows`` (all by default) with their text so far, to go on in another group."""
        rows = range(len(self.keys)) if rows is None else rows
        return [(self.keys[row], self.requests[row], self.texts[row]) for row in rows]

    def next_tokens(self) -> tuple[list[int], list[bool]]:
        """The batched work of a step: one token for every row (the prefill's on the first call), and whether each
        row's logits were finite. No row's text has changed when it fails."""
        self.engine.model.set_shared_layers(self.layers)
        self.tokens = self.decoder.prefill() if self.tokens is None else self.decoder.step(self.tokens)
        return self.tokens.tolist(), self.decoder.finite.tolist()

    def outputs(self, tokens: list[int], finite: list[bool]) -> list[Output]:
        """Each row's output of its token: its text, or its end; a row whose output fails ends with an error."""
        outputs = []
        for row, token in enumerate(tokens):
            try:
                outputs.append(self._take(row, token) if finite[row] else self._overflowed(row))
            except Exception as error:
                outputs.append(self.engine.failed(self.keys[row], error))
        return outputs

    def keep(self, rows: list[int]) -> None:
        """Go on decoding only the sequences in ``rows``; the others leave the batch and the KV cache."""
        if len(rows) == len(self.keys):
            return
        if rows:  # a group is advanced when admitted, so it has tokens
            index = torch.tensor(rows, device=self.decoder.device)  # (B',)
            self.decoder.keep_rows(index)
            self.tokens = self.tokens.index_select(0, index)
        self.keys = [self.keys[row] for row in rows]
        self.requests = [self.requests[row] for row in rows]
        self.texts = [self.texts[row] for row in rows]

    def _take(self, row: int, token: int) -> Output:
        text, request, key = self.texts[row], self.requests[row], self.keys[row]
        if token in self.engine.stop_ids:
            return self._finish(row, text.finish(), "stop", len(text.tokens) + 1)
        delta = text.push(token)
        if text.stopped:
            return self._finish(row, delta, "stop", len(text.tokens))
        if len(text.tokens) == request.max_tokens:
            delta += text.finish()
            return self._finish(row, delta, "stop" if text.stopped else "length", len(text.tokens))
        return Output(key, delta)

    def _overflowed(self, row: int) -> Output:
        """A row decoded from NaN or inf logits ends with the one-line error (its token means nothing)."""
        error = str(self.decoder.overflow_error())
        logger.warning("sequence %s stopped: %s", self.keys[row], error)
        return Output(self.keys[row], error, "error")

    def _finish(self, row: int, text: str, reason: str, completion_tokens: int) -> Output:
        cache = self.decoder.cache
        info = {
            "completion_tokens": completion_tokens,
            "kv_cache_bytes": cache.nbytes // cache.batch_size,
            "dense_kv_cache_bytes": cache.dense_nbytes() // cache.batch_size,
            "batch_size": self.size,
        }
        return Output(self.keys[row], text, reason, info)


class Engine:
    """Decode many sequences at once, grouped by region and sampling settings (see the module docstring).

    Args:
        model: The model in eval mode, on its device.
        region: The trained region; a sequence's ``n_shared`` picks ``region.first(n_shared)`` (already validated).
        decode: Token ids -> text (the tokenizer's decode).
        eos_id: A sequence stops after emitting it, or any of several (a tokenizer's ``stop_ids``); it is not part of
            the text.
        max_batch_size: Sequences decoded at the same time, over all groups.
        batch_timeout: Seconds the oldest waiting sequence waits for others to share its forward.
        vocab_size: No id at or past it is emitted: the tokenizer's size, where the model's vocabulary is larger
            (default: the model's).
    """

    def __init__(
        self,
        model: Llama,
        region: TrainedRegion,
        decode,
        eos_id: int | Sequence[int] | None,
        max_batch_size: int = 8,
        batch_timeout: float = 0.0,
        vocab_size: int | None = None,
    ) -> None:
        self.model, self.region, self.decode, self.stop_ids = model, region, decode, stop_id_list(eos_id)
        self.vocab_size = emitted_vocabulary(vocab_size, model.config.vocab_size)
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.waiting: list[tuple[Hashable, SequenceRequest, float]] = []
        self.groups: list[_Group] = []
        self.restarts: list[Member] = []
        """Sequences whose batch failed between steps (dropping a cancelled row): each goes on alone next step."""
        self._alone = itertools.count()
        self.failures = FailureLog()
        self.lost: BaseException | None = None
        """The device error after which nothing more is decoded (:meth:`step` raises ``DeviceLost``)."""

    @classmethod
    def for_tokenizer(
        cls, model: Llama, region: TrainedRegion, tokenizer: TextTokenizer, max_batch_size: int = 8,
        batch_timeout: float = 0.0,
    ) -> Engine:  # fmt: skip
        """An engine whose text is ``tokenizer``'s: its ``decode``, its end tokens (``stop_ids``), and no id past its
        ``vocab_size`` (the model's vocabulary may be larger: such an id decodes to nothing)."""
        decode, stop_ids, vocab_size = tokenizer.decode, tokenizer.stop_ids, tokenizer.vocab_size
        return cls(model, region, decode, stop_ids, max_batch_size, batch_timeout, vocab_size)

    def add(self, key: Hashable, request: SequenceRequest) -> None:
        """Queue a sequence; it is admitted by a later :meth:`step`."""
        self.waiting.append((key, request, time.monotonic()))

    @property
    def busy(self) -> bool:
        return bool(self.groups or self.restarts or self.waiting)

    def wait_time(self) -> float | None:
        """Seconds until :meth:`step` has work: 0 while groups run, the admission delay, or ``None`` when idle."""
        if self.groups or self.restarts:
            return 0.0
        if not self.waiting:
            return None
        if len(self.waiting) >= self._free():
            return 0.0
        return max(0.0, self.waiting[0][2] + self.batch_timeout - time.monotonic())

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Advance every running group by one token and start the sequences that may start now (a group that fails
        leaves its sequences to go on alone: :meth:`_one_by_one`); a :class:`StepFailed` (caused by the error) if
        anything else fails part-way."""
        outputs: list[Output] = []
        try:
            running = list(self.groups)  # not the groups its failures or rejoins start: they make this step's token
            outputs += self._rejoin() if self.lost is None else []
            for group in running:
                if self.lost is None and group in self.groups:  # the others stay in their groups, for abort
                    outputs += self._advance(group)
            while self.restarts and self.lost is None:
                outputs += self._start([self.restarts.pop(0)])
            for members in self._admit() if self.lost is None else []:
                outputs += self._start(members)
            if self.lost is not None:
                raise DeviceLost(described(self.lost)) from self.lost
        except Exception as e:
            raise StepFailed(outputs) from e
        finally:
            self.groups = [group for group in self.groups if not group.done]
        return outputs

    def _start(self, members: list[Member], alone: bool = False, rejoined: bool = False) -> list[Output]:
        """Start a group of ``members`` with its first token (see :class:`_Group` for ``alone`` and ``rejoined``);
        where that fails, each member alone."""
        if self.lost is not None:  # the device failed for good while the step started groups before this one
            return [self.failed(key, self.lost) for key, _, _ in members]
        try:
            group = _Group(self, members, alone, rejoined)
        except Exception as error:  # its KV cache (out of memory), its prompts (a bad one that passed the checks)
            return self._one_by_one(members, error, len(members), rejoin=not rejoined)
        self.groups.append(group)
        return self._advance(group)

    def _advance(self, group: _Group) -> list[Output]:
        """One token of ``group``; the finished rows leave it. Where its batched work fails, each of its sequences
        goes on alone; where a row's output fails, that row ends with an error."""
        try:
            tokens, finite = group.next_tokens()
        except Exception as error:
            return self._instead_of(group, group.members(), error)
        outputs = group.outputs(tokens, finite)
        running = [row for row, output in enumerate(outputs) if output.finish_reason is None]
        try:
            group.keep(running)
        except Exception as error:  # the rows that go on have this step's token: alone, from there
            return outputs + self._instead_of(group, group.members(running), error)
        return outputs

    def _instead_of(self, group: _Group, members: list[Member], error: Exception) -> list[Output]:
        """``group`` failed with ``error``: it leaves the engine, its KV cache freed, and its ``members`` go on."""
        batch = len(group.keys)
        self._drop(group)
        return self._one_by_one(members, error, batch, rejoin=not group.rejoined)

    def _drop(self, group: _Group) -> None:
        """A failed ``group`` leaves the engine, its KV cache freed (its members go on elsewhere)."""
        self.groups.remove(group)
        group.close()

    def _one_by_one(self, members: list[Member], error: Exception, batch: int, rejoin: bool) -> list[Output]:
        """After a batch of ``batch`` sequences failed with ``error``: each of its ``members`` still running goes on in
        a group of its own, so only one that fails alone gets an error (a batch of one: it ends with this error); the
        others share a batch again once they have made a token alone, if ``rejoin``. After a device error that nothing
        survives, each ends with it at once."""
        if batch == 1 or device_lost(error):
            return [self.failed(key, error) for key, _, _ in members]
        self.failures.log(
            logging.WARNING, error, "a batch of %d sequences failed (%s); %d go on alone", batch, described(error),
            len(members),
        )  # fmt: skip
        traceback.clear_frames(error.__traceback__)  # the tensors its frames hold (a KV cache) go before any is built
        return [output for member in members for output in self._start([member], alone=rejoin)]

    def _rejoin(self) -> list[Output]:
        """The sequences that went on alone after their batch failed, and have made a token alone since, share a
        batch again where their kind and the context allow (as on admission): the new batch's prefill (their prompts
        and the tokens they have made) makes their token of this step."""
        alone = {group.keys[0]: group for group in self.groups if group.alone and group.tokens is not None}
        outputs = []
        for members in self._batches([member for group in alone.values() for member in group.members()]):
            if len(members) > 1:
                for key, _, _ in members:
                    self._drop(alone[key])
                outputs += self._start(members, rejoined=True)
        return outputs

    def failed(self, key: Hashable, error: BaseException) -> Output:
        """The end of a sequence whose work failed alone: an error that says so, the cause logged (a device error
        that nothing survives: the step raises it, and its caller logs it)."""
        if device_lost(error):
            self.lost = self.lost or error
            return Output(key, lost_device(self.lost), "error")
        self.failures.log(logging.ERROR, error, "sequence %s failed alone (%s); it ends with an error", key,
                          described(error))  # fmt: skip
        return Output(key, failed_alone(error), "error")

    def cancel(self, key: Hashable) -> bool:
        """Drop a sequence, waiting or running (it leaves its batch); no output follows. False if it is not here."""
        for i, (waiting, _, _) in enumerate(self.waiting):
            if waiting == key:
                del self.waiting[i]
                return True
        for i, (restarting, _, _) in enumerate(self.restarts):
            if restarting == key:
                del self.restarts[i]
                return True
        for group in self.groups:
            if key in group.keys:
                others = [row for row, running in enumerate(group.keys) if running != key]
                try:
                    group.keep(others)
                except Exception as error:  # the others go on alone from the next step
                    if device_lost(error):  # they end there with it; the next step raises it
                        self.lost = self.lost or error
                    else:
                        self.failures.log(logging.WARNING, error, "dropping cancelled sequence %s from its batch "
                                          "failed (%s); the others go on alone", key, described(error))  # fmt: skip
                    self.restarts += group.members(others)
                    self._drop(group)
                    return True
                if group.done:
                    self.groups.remove(group)
                return True
        return False

    def abort(self) -> list[Hashable]:
        """Drop every sequence (after an unexpected error); return their keys."""
        keys = [key for group in self.groups for key in group.keys] + [key for key, _, _ in self.restarts]
        keys += [key for key, _, _ in self.waiting]
        self.groups, self.restarts, self.waiting = [], [], []
        return keys

    def _free(self) -> int:
        running = sum(len(group.keys) for group in self.groups) + len(self.restarts)
        return self.max_batch_size - running  # the rows the next step computes

    def _admit(self) -> list[list[Member]]:
        free = self._free()
        if not self.waiting or free <= 0:
            return []
        if len(self.waiting) < free and time.monotonic() < self.waiting[0][2] + self.batch_timeout:
            return []  # room for more: wait for them until the oldest has waited batch_timeout
        batches = self._batches([(key, request, None) for key, request, _ in self.waiting[:free]])
        self.waiting = self.waiting[free:]  # only now: if grouping fails, abort finds them
        return batches

    def _batches(self, members: list[Member]) -> list[list[Member]]:
        """``members`` in batches of one kind each, whose longest prefill (prompt and tokens made) and most tokens
        still to make fit the context together (each fits alone: checked on arrival)."""
        context_length = self.model.config.context_length
        open_groups: dict[Hashable, list[Member]] = {}
        closed = []
        for member in members:
            kind = self._kind(member[1])
            batch = open_groups.setdefault(kind, [])
            made = [0 if text is None else len(text.tokens) for _, _, text in [*batch, member]]
            requests = [request for _, request, _ in [*batch, member]]
            length = max(len(r.prompt) + m for r, m in zip(requests, made, strict=True))
            length += max(r.max_tokens - m for r, m in zip(requests, made, strict=True))
            if batch and length > context_length:  # each fits alone (checked on arrival), not padded to all
                closed.append(batch)
                batch = open_groups[kind] = []
            batch.append(member)
        return [*closed, *open_groups.values()]

    def _kind(self, request: SequenceRequest) -> Hashable:
        """Sequences of the same kind can share a forward and a sampler."""
        s = request.sampling
        if s.temperature == 0 or s.top_k == 1:  # greedy: a seed changes nothing
            return (request.n_shared, "greedy")
        if s.seed is not None:
            return ("alone", next(self._alone))
        return (request.n_shared, s.temperature, s.top_k, s.top_p)
