"""The seeds each command takes, decided here once and refused in one wording.

Training seeds (``--seed_everything``, ``data.seed``) go to numpy's generators (Lightning's ``seed_everything``,
litdata's shuffle), which take 0..2**32-1. Sampling seeds (``--seed`` of ``generate``/``chat``, serve's ``seed``) go to
a torch generator: any signed 64-bit integer, as OpenAI-style clients send them.
"""

from __future__ import annotations

TRAINING_SEEDS = range(0, 2**32)
"""What numpy's generators take: the seeds of ``fit`` (``seed_everything``, ``data.seed``)."""
SAMPLING_SEEDS = range(-(2**63), 2**63)
"""A signed 64-bit integer: the seeds of sampling (``generate``, ``chat``, ``serve``)."""
GENERATOR_SEEDS = range(-(2**63), 2**64)
"""What ``torch.Generator.manual_seed`` takes: the library's ``generate(seed=...)`` (serve's ``n`` choices of a
sampling seed count on from it, past 2**63 - 1)."""

SEED_FIX = "give a seed in that range"


def seed_out_of_range(seed: int, seeds: range) -> str | None:
    """What is wrong with ``seed`` outside ``seeds``, as every command says it; ``None`` where it lies in them."""
    if seeds.start <= seed < seeds.stop:  # not `in`: a range scans every number for a value not an int
        return None
    return f"seed must lie in {_bound(seeds.start)}..{_bound(seeds.stop - 1)}, got {seed}"


def _bound(number: int) -> str:
    """A range's end as the messages write it: ``2**32-1``, ``-2**63``; a small one as it is."""
    size = abs(number)
    if size > 2**16 and size & (size - 1) == 0:
        return f"{'-' if number < 0 else ''}2**{size.bit_length() - 1}"
    if size > 2**16 and size & (size + 1) == 0:
        return f"{'-' if number < 0 else ''}2**{size.bit_length()}-1"
    return str(number)
