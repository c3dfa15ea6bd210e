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
TOP_P_FIX = "use a fraction in (0, 1], e.g. 0.9, or leave it unset for no nucleus cut"
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
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}", "top_p", TOP_P_FIX)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids (B,) from logits (B, V). ``temperature == 0`` is greedy; otherwise sample from the tempered
    distribution restricted to the ``top_k`` most likely tokens and then to the smallest set whose probability
    reaches ``top_p``."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False  # the most likely token stays, even for a top_p that is 0 in float32
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
