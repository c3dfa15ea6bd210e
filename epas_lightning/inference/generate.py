"""KV-cache generation with any sharing region: ``generate`` for Python, ``set_region`` to pick the region.

One trained EPAS model serves several compute budgets ("many-in-one"): run it with the first ``N`` layers of its
trained region (in growth order) sharing, for any ``N`` from 0 up to the whole region. With attention reuse (``qk``
mode), sharing layers decode a token with one P @ V each: no Q/K projection, no RoPE, no Q K^T, no softmax and no K
cache.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from epas_lightning.errors import ConfigError, DataError
from epas_lightning.inference.sampling import check_sampling, sample
from epas_lightning.model import Llama
from epas_lightning.model.llama import check_has_weights, check_is_llama
from epas_lightning.region import TrainedRegion
from epas_lightning.runtime import activations_overflow, is_whole_number
from epas_lightning.seeds import GENERATOR_SEEDS, SEED_FIX, seed_out_of_range

DEFAULT_NEW_TOKENS = 100


def fit_new_tokens(
    prompt_tokens: int,
    max_new_tokens: int | None,
    context_length: int,
    flags: tuple[str, str] = ("--prompt", "--max-new-tokens"),
) -> int:
    """``--max-new-tokens``, or its default cut to the room the longest prompt leaves in the model's context. The
    errors name ``flags``: the prompt's and the new-token count's (the arguments' names from Python)."""
    prompt_flag, new_tokens_flag = flags
    room = context_length - prompt_tokens
    if room < 1:
        raise ConfigError(
            f"the longest prompt is {prompt_tokens} tokens (with BOS): no room left in the model's context length "
            f"{context_length}",
            prompt_flag,
            f"shorten it to at most {context_length - 1} tokens",
        )
    if max_new_tokens is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if max_new_tokens > room:
        raise ConfigError(
            f"the longest prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens exceeds the model's "
            f"context length {context_length}",
            new_tokens_flag,
            f"ask for at most {room}, or shorten the prompt",
        )
    return max_new_tokens


EOS_CHECK_EVERY = 8
"""Decode steps between checks whether every row has finished (each check waits for the device)."""


def deepest_layers(n_layer: int, n_shared: int) -> list[int]:
    """The deepest ``n_shared`` layers of an ``n_layer`` model: the region EPAS trains (layer 0 never shares)."""
    if not 0 <= n_shared < n_layer:
        raise ValueError(f"A {n_layer}-layer model can share 0..{n_layer - 1} layers, not {n_shared}.")
    return list(range(n_layer - n_shared, n_layer))


def set_region(
    model: Llama,
    n_shared: int,
    region: TrainedRegion | None = None,
    force: bool = False,
    flags: tuple[str, str] = ("n_shared", "force=True"),
) -> list[int]:
    """Make the first ``n_shared`` layers of the trained ``region`` (in its growth order) share; return them.

    ``region`` is what the checkpoint trained (``LoadedModel.region``; by default the one recorded in the model,
    ``model.trained_region``, by ``load_model``, ``EPASModule.load_from_checkpoint`` or the fit that trained it):
    asking for more layers is refused unless ``force`` (the layers beyond it never learned to work without their own
    Q/K, so quality drops sharply). A model built without a checkpoint has none: the deepest ``n_shared`` layers
    share, unchecked. The errors name ``flags`` (see :meth:`TrainedRegion.first`).
    """
    check_is_llama(model)
    if region is None:
        region = getattr(model, "trained_region", None)  # a Llama pickled before it had one
    if region is None:
        region, force = TrainedRegion(model.config.n_layer), True
    if not isinstance(region, TrainedRegion):  # a list of layers failed with "no attribute 'first'"
        raise ConfigError(
            f"region must be a TrainedRegion, not a {type(region).__name__}",
            "region",
            "pass load_model(path).region, or leave it unset for the one the model was loaded with",
        )
    layers = region.first(n_shared, force, flags)
    model.set_shared_layers(layers)
    return layers


def per_second(count: float, seconds: float) -> float | None:
    """``count`` per second over ``seconds``: ``None`` when there was nothing to time (no decode step: a single new
    token comes from the prefill), NaN when no time was measured."""
    if count == 0:
        return None
    return count / seconds if seconds > 0 else float("nan")


@dataclass
class GenerationResult:
    """New tokens per prompt (stopped after an end token, which is kept) and how long each phase took."""

    tokens: list[list[int]]
    prompt_tokens: int
    """Real (unpadded) prompt tokens, summed over the batch."""
    decode_steps: int
    """Forward passes after the prefill; each produces one token per row."""
    batch_size: int
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int
    dense_cache_bytes: int

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return per_second(self.prompt_tokens, self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """``None`` without decode steps (``max_new_tokens`` 1): no decode speed was measured, which is not 0."""
        return per_second(self.decode_steps * self.batch_size, self.decode_seconds)

    @property
    def cache_saving(self) -> float:
        """Fraction of the dense KV cache that sharing saves."""
        return 1.0 - self.cache_bytes / self.dense_cache_bytes


def token_lists(prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """Prompts as lists of ints: a list of token-id lists (or of 1-D tensors), or a 2-D tensor or array of them."""
    if hasattr(prompts, "tolist"):
        prompts = prompts.tolist()
    try:
        return [[operator.index(token) for token in prompt] for prompt in prompts]
    except TypeError:
        raise DataError(
            "prompts must be a list of prompts, each a list of token ids",
            "prompts",
            "encode text with the tokenizer first; wrap one prompt as [ids]",
        ) from None


def seed_number(seed: object) -> int | None:
    """``seed`` as the Python int ``manual_seed`` takes (numpy's ints too), or ``None``; a :class:`ConfigError`
    naming ``seed`` otherwise (``"3"`` was a bare TypeError)."""
    if seed is None:
        return None
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ConfigError(f"seed must be a whole number, got {seed!r}", "seed", "pass an int, or None") from None
    if problem := seed_out_of_range(seed, GENERATOR_SEEDS):  # serve's n choices of a seed 2**63 - 1 reach 2**63
        raise ConfigError(problem, "seed", SEED_FIX)
    return seed


def cuda_graph_setting(cuda_graph: object, device: torch.device) -> bool:
    """``cuda_graph`` as a bool (``None``: on for CUDA); a :class:`ConfigError` for another value (``"off"`` turned
    graphs on), or for graphs on another device than CUDA (a ValueError from the capture, after the prefill)."""
    fix = "leave it None (on for CUDA) or pass False"
    if cuda_graph is None:
        return device.type == "cuda"
    if not isinstance(cuda_graph, bool):
        raise ConfigError(f"cuda_graph must be True, False or None, got {cuda_graph!r}", "cuda_graph", fix)
    if cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph=True needs a model on a CUDA device, not {device.type}", "cuda_graph", fix)
    return cuda_graph


def emitted_vocabulary(vocab_size: object, model_vocab_size: int) -> int:
    """The ids a decoder may emit, ``0..vocab_size - 1``: the tokenizer's size (default: the model's ``vocab_size``);
    a :class:`ConfigError` naming ``vocab_size`` for another value than a whole number in ``1..model_vocab_size``."""
    if vocab_size is None:
        return model_vocab_size
    if not is_whole_number(vocab_size) or not 1 <= vocab_size <= model_vocab_size:
        raise ConfigError(
            f"vocab_size must be a whole number in 1..{model_vocab_size} (the model's vocab_size), got {vocab_size!r}",
            "vocab_size",
            "pass the tokenizer's vocab_size (a tokenizer larger than the model does not fit it: check_fits)",
        )
    return int(vocab_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """One left-padded batch decoded token by token with the KV cache: the loop behind :func:`generate`, for callers
    that need each token as it comes (a server streaming completions).

    ``prefill()`` runs the prompts and returns the first new token of every row (B,); each ``step(tokens)`` feeds the
    tokens just chosen and returns the next ones. Call them under ``torch.inference_mode()`` with the model in eval
    mode and its sharing region set (the cache is built for the region the model has when the decoder is made).
    At most ``max_new_tokens`` tokens per row: the prefill's and ``max_new_tokens - 1`` steps. Every token chosen is
    below ``vocab_size`` (see :func:`generate`).
    """

    def __init__(
        self,
        model: Llama,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        pad_id: int = 0,
        cuda_graph: bool | None = None,
        vocab_size: int | None = None,
    ) -> None:
        check_is_llama(model)
        check_has_weights(model)
        prompts = token_lists(prompts)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DataError(
                "give at least one prompt, each with at least one token",
                "prompts",
                "drop empty prompts, or start each with the tokenizer's bos_id",
            )
        if not is_whole_number(max_new_tokens) or max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}",
                "max_new_tokens",
                "pass 1 or more",
            )
        max_new_tokens = int(max_new_tokens)  # numpy's, a tensor's too
        check_sampling(temperature, top_k, top_p)  # before anything runs: the model keeps its mode
        config = model.config
        longest = max(len(p) for p in prompts)
        fit_new_tokens(longest, max_new_tokens, config.context_length, ("prompts", "max_new_tokens"))
        config.check_token_ids(min(map(min, prompts)), max(map(max, prompts)), "prompts")
        if not 0 <= pad_id < config.vocab_size:  # the padding is embedded, then masked out
            raise ConfigError(
                f"pad_id must be a token id in 0..{config.vocab_size - 1}, got {pad_id}",
                "pad_id",
                "any id will do (the padding is masked out): leave the default 0",
            )
        self.vocab_size = emitted_vocabulary(vocab_size, config.vocab_size)
        """Ids at or past it are never chosen (the tokenizer's size; the padded rows of the embedding never are)."""
        self.model, self.max_new_tokens = model, max_new_tokens
        self.device = device = model.embed_tokens.weight.device
        B = len(prompts)
        ids = torch.full((B, longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        self.ids, self.attention_mask = ids.to(device), attention_mask.to(device)
        self.padded = any(len(p) != longest for p in prompts)
        self.prompt_tokens = sum(len(p) for p in prompts)
        """Real (unpadded) prompt tokens, summed over the rows in the batch."""
        seed = seed_number(seed)
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.cuda_graph = cuda_graph_setting(cuda_graph, device) and max_new_tokens > 1
        self.cache = model.new_cache(B, longest + max_new_tokens, static=self.cuda_graph)
        self._step_logits = None
        self.finite = torch.ones(B, dtype=torch.bool, device=device)
        """Per row: every logit it was decoded from so far was finite (no overflow at the model's dtype)."""

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V_padded) -> (B,)
        logits = logits[:, : self.vocab_size]  # nor the padded rows of the embedding, nor ids the tokenizer lacks
        finite = torch.isfinite(logits).all(dim=-1)  # (B,); no wait for the device: callers check `finite`
        self.finite &= finite
        logits = logits.masked_fill(~finite[:, None], 0.0)  # sampling never sees NaN (torch.multinomial raises)
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def overflow_error(self) -> ConfigError:
        """The one-line error for a row decoded from NaN or inf logits (activations past the range of the model's
        dtype): its tokens mean nothing."""
        return activations_overflow("the logits", self.model.embed_tokens.weight.dtype)

    def check_finite(self) -> None:
        """Raise :meth:`overflow_error` if any row was decoded from NaN or inf logits. Waits for the device."""
        if not bool(self.finite.all()):
            raise self.overflow_error()

    def prefill(self) -> torch.Tensor:
        """The first new token of every row (B,)."""
        mask = self.attention_mask if self.padded else None
        return self._choose(self.model(self.ids, self.cache, mask)[:, -1])

    def prepare_steps(self) -> None:
        """Build the decode step (with ``cuda_graph``, capture it); ``step`` does it on first use otherwise."""
        if self._step_logits is not None:
            return
        if self.cuda_graph:
            from epas_lightning.inference.cuda_graph import GraphedDecodeStep

            self._step_logits = GraphedDecodeStep(self.model, self.cache)
        else:
            model, cache = self.model, self.cache

            def step_logits(token: torch.Tensor) -> torch.Tensor:
                return model(token[:, None], cache)[:, -1]

            self._step_logits = step_logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the last tokens (B,) and return the next ones (B,)."""
        self.prepare_steps()
        return self._choose(self._step_logits(tokens))

    def keep_rows(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Decode only the batch rows ``rows`` from now on (indices, in their new order): the others leave the batch
        and the KV cache, and ``step`` takes and returns the kept rows' tokens (B',).

        A greedy row decodes exactly as it would have. Sampled rows draw from one generator, so after rows leave the
        others draw other (equally distributed) tokens than they would have. Not with ``cuda_graph`` (a captured
        step has a fixed batch).
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)  # (B',)
        self.cache.keep_rows(index)
        self.ids, self.attention_mask = self.ids[index], self.attention_mask[index]  # (B', T): for a prefill to come
        self.finite = self.finite[index]
        self.padded = not bool(self.attention_mask.all())
        self.prompt_tokens = int(self.attention_mask.sum())


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    pad_id: int = 0,
    cuda_graph: bool | None = None,
    vocab_size: int | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids, or a row of a 2-D tensor) by up to ``max_new_tokens`` tokens, with
    the model's current sharing region and attention-reuse setting. Prompts of different lengths are left-padded into
    one batch (with ``pad_id``, any token id: the padding is masked out).

    Greedy when ``temperature == 0``; otherwise sampled (``top_k``/``top_p``), reproducibly when ``seed`` is given.
    A row stops after it emits ``eos_id`` (one id, or any of several: a tokenizer's ``stop_ids``); generation ends
    when every row has stopped. Logits that come out NaN or inf (activations past the range of the model's dtype,
    e.g. float16) are a one-line error.
    ``cuda_graph`` (default: on for CUDA) replays each decode step from a CUDA graph (same results, fewer launches).
    ``vocab_size``: no id at or past it is emitted; pass the tokenizer's ``vocab_size`` where the model's vocabulary
    is larger (padded), so that every token decodes to text (default: the model's ``vocab_size``). Greedy tokens stay
    the same wherever the most likely one is below it.
    """
    decoder = Decoder(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, pad_id=pad_id,
        cuda_graph=cuda_graph, vocab_size=vocab_size,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        return _decode(decoder, eos_id, pad_id)
    finally:
        model.train(was_training)


def _decode(decoder: Decoder, eos_id: int | Sequence[int] | None, pad_id: int) -> GenerationResult:
    """:func:`generate`'s loop, the model in eval mode."""
    device, B, max_new_tokens = decoder.device, decoder.batch_size, decoder.max_new_tokens
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = stop_id_list(eos_id)
    vocab_size = decoder.vocab_size
    if outside := [i for i in stop_ids if not 0 <= i < vocab_size]:  # never sampled: no row would stop
        raise ConfigError(
            f"eos_id must be token ids in 0..{vocab_size - 1}, got {outside}",
            "eos_id",
            "pass the tokenizer's EOS id (its eos_id), or None",
        )
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    token = decoder.prefill()
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    if max_new_tokens > 1:
        decoder.prepare_steps()  # capture time is not counted as decoding
    start = time.perf_counter()
    steps = 0
    for step in range(max_new_tokens):
        out[:, step] = token
        if stop_ids:
            finished |= torch.isin(token, stop)
            if (step + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        token = decoder.step(token)
        steps += 1
    _sync(device)
    decode_seconds = time.perf_counter() - start
    decoder.check_finite()
    cache = decoder.cache
    return GenerationResult(
        tokens=[_until_eos(row, stop_ids) for row in out[:, : steps + 1].tolist()],
        prompt_tokens=decoder.prompt_tokens,
        decode_steps=steps,
        batch_size=B,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        cache_bytes=cache.nbytes,
        dense_cache_bytes=cache.dense_nbytes(),
    )


def stop_id_list(eos_id: int | Sequence[int] | None) -> list[int]:
    """The ids an ``eos_id`` argument stops at: none, one, or several (ints, or numpy or torch integers)."""
    if eos_id is None:
        return []
    if hasattr(eos_id, "tolist"):  # a numpy or torch integer, or an array of them
        eos_id = eos_id.tolist()
    try:
        several = isinstance(eos_id, Iterable) and not isinstance(eos_id, str | bytes)  # a set, a range too
        return [operator.index(i) for i in (eos_id if several else [eos_id])]
    except TypeError:
        raise ConfigError(
            f"eos_id must be a token id or a list of them, got {eos_id!r}",
            "eos_id",
            "pass an int, a list of ints, or None",
        ) from None


def _until_eos(tokens: list[int], stop_ids: list[int]) -> list[int]:
    end = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
    return tokens if end is None else tokens[: end + 1]
