"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from epas_lightning.errors import ConfigError
from epas_lightning.runtime import is_real_number, is_whole_number

MIN_TEMPERATURE = 1e-6
"""Smaller positive temperatures divide the logits as this one does: a quotient by a float32-subnormal (or zero)
temperature overflows to inf and the distribution to NaN, while at this one all the mass already lies on the top
logit unless another is within float32 rounding of it."""

TEMPERATURE_FIX = "use 0 (greedy) or more; 1 samples from the model's distribution"
TOP_K_FIX = "use 1 or more (1 is greedy), or leave it unset to sample from every token"
TOP_P_FIX = "use a fraction, e.g. 0.9 (0 is greedy), or leave it unset for no nucleus cut"
"""What to do about each setting :func:`check_sampling` refuses (from Python; a command's flag and serve's field
take the same values)."""


class SamplingError(ConfigError):
    """A sampling setting ``sample`` cannot use: what is wrong, the setting (``where``, also ``setting``) and what to
    do. A command names its flag instead (``--top-p``); ``serve`` answers it with HTTP 400."""

    @property
    def setting(self) -> str:
        return self.where


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise :class:`SamplingError` for the first setting out of range (or not a number: ``"0.7"`` failed comparing
    str and int, a float ``top_k`` in ``torch.topk``)."""
    if not is_real_number(temperature):
        raise SamplingError(f"temperature must be a number, got {temperature!r}", "temperature", TEMPERATURE_FIX)
    if top_k is not None and not is_whole_number(top_k):
        raise SamplingError(f"top_k must be a whole number, got {top_k!r}", "top_k", TOP_K_FIX)
    if top_p is not None and not is_real_number(top_p):
        raise SamplingError(f"top_p must be a number, got {top_p!r}", "top_p", TOP_P_FIX)
    if not temperature >= 0:  # NaN too
        raise SamplingError(f"temperature must be >= 0, got {temperature}", "temperature", TEMPERATURE_FIX)
    if top_k is not None and top_k < 1:
        raise SamplingError(f"top_k must be >= 1, got {top_k}", "top_k", TOP_K_FIX)
    if top_p is not None and not 0.0 <= top_p <= 1.0:  # NaN too
        raise SamplingError(f"top_p must lie in [0, 1], got {top_p}", "top_p", TOP_P_FIX)


def decoded_sampling(
    temperature: float, top_k: int | None = None, top_p: float | None = None
) -> tuple[float, int | None, float | None]:
    """``(temperature, top_k, top_p)`` as they are decoded with, once checked (:func:`check_sampling`): a ``top_p`` of 0
    keeps the most likely token alone, which is greedy decoding (as OpenAI's API and transformers' nucleus cut read
    it), and is said as greedy, ``(0.0, None, None)``; one of 1 cuts nothing (``None``). Every command and ``serve``
    read the settings through it (``serve`` batches the greedy requests together however they asked for it)."""
    if top_p == 0:
        return 0.0, None, None
    return temperature, top_k, None if top_p == 1 else top_p


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids (B,) from logits (B, V). ``temperature == 0`` (or ``top_p == 0``: :func:`decoded_sampling`) is greedy;
    otherwise sample from :func:`filtered_logits`."""
    check_sampling(temperature, top_k, top_p)
    temperature, top_k, top_p = decoded_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def filtered_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The float32 logits (B, V) ``sample`` draws from: divided by ``temperature`` (> 0), then ``-inf`` outside the
    ``top_k`` most likely tokens (ties with the k-th kept) and then outside the smallest set whose probability reaches
    ``top_p``; as transformers' temperature, top-k and top-p warpers (and vLLM's) filter them."""
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p), float("-inf"))
    return logits


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens (B, V) after the smallest set of the most likely ones whose probability reaches ``top_p``.

    The mass is summed from the least likely token up, as transformers sums it: summed from the most likely down,
    float32 rounding made it reach ``top_p`` early over a large vocabulary, and a 128k vocabulary at ``top_p`` 0.999
    dropped hundreds of tokens of the nucleus.
    """
    ascending, order = torch.sort(logits, dim=-1)
    below = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the mass up to this token leaves top_p above it
    below[..., -1] = False  # the most likely token stays, even for a top_p that is 0 in float32
    return below.scatter(-1, order, below)
