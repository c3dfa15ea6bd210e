"""The global batch of a ``fit``: sequences (and tokens) per optimizer step, recorded in its checkpoints.

Sequences per step are ``batch_size x accumulate_grad_batches x`` the data-parallel processes; a resume on another
number of devices or nodes, or with another ``data.batch_size`` or ``trainer.accumulate_grad_batches``, changes them,
while the learning-rate schedule, its warmup and the sharing schedule count optimizer steps. Changing it is allowed;
the resumed run says so once, and how to keep the checkpoint's.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

from lightning.pytorch import Trainer

GLOBAL_BATCH_KEY = "global_batch"
"""Checkpoint entry of ``fit``: ``{"batch_size", "accumulate_grad_batches", "world_size", "seq_len"}`` of the run that
saved it (``world_size``: its data-parallel processes)."""
FACTORS = ("batch_size", "accumulate_grad_batches", "world_size")


def global_batch(trainer: Trainer, seq_len: int) -> dict[str, int] | None:
    """This fit's record (:data:`GLOBAL_BATCH_KEY`), ``seq_len`` tokens a sequence; ``None`` where the training loader
    (or the datamodule) states no batch size."""
    batch_size = _positive(getattr(trainer.train_dataloader, "batch_size", None))
    if batch_size is None:
        batch_size = _positive(getattr(trainer.datamodule, "batch_size", None))
    if batch_size is None:
        return None
    replicas = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas")
    return {
        "batch_size": batch_size,
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "world_size": _positive(replicas) or trainer.world_size,
        "seq_len": int(seq_len),
    }


def global_batch_change(saved: Any, current: dict[str, int] | None) -> str | None:
    """What a resume says when its tokens per optimizer step (``current``'s) are not the checkpoint's (``saved``'s):
    old -> new, why it matters and how to keep the old ones; ``None`` where they are equal, or either record is
    unknown (an older checkpoint, a loader without a batch size, a foreign record)."""
    if current is None or not isinstance(saved, dict) or any(_positive(saved.get(k)) is None for k in current):
        return None
    if tokens(saved) == tokens(current):
        return None
    factors = " -> ".join(" x ".join(str(record[k]) for k in FACTORS) for record in (saved, current))
    return (
        f"resumed with another global batch: {sequences(saved):,} -> {sequences(current):,} sequences "
        f"({tokens(saved):,} -> {tokens(current):,} tokens) an optimizer step (data.batch_size x "
        f"trainer.accumulate_grad_batches x processes: {factors}); the LR schedule, its warmup and the sharing "
        f"schedule count optimizer steps, so each step now trains {tokens(current) / tokens(saved):.3g}x the tokens "
        f"it did; {_how_to_keep(saved, current)}"
    )


def sequences(record: dict[str, int]) -> int:
    """Sequences an optimizer step trains, all processes together."""
    return record["batch_size"] * record["accumulate_grad_batches"] * record["world_size"]


def tokens(record: dict[str, int]) -> int:
    """Tokens an optimizer step trains, all processes together."""
    return sequences(record) * record["seq_len"]


def _how_to_keep(saved: dict[str, int], current: dict[str, int]) -> str:
    """The ``accumulate_grad_batches`` that gives back the checkpoint's tokens per step, where a whole one does."""
    accumulate, rest = divmod(tokens(saved), tokens(current) // current["accumulate_grad_batches"])
    if not rest:
        return f"--trainer.accumulate_grad_batches {accumulate} keeps the checkpoint's"
    product = "data.batch_size x trainer.accumulate_grad_batches x processes"
    if saved["seq_len"] == current["seq_len"]:
        return f"to keep the checkpoint's, make {product} {sequences(saved):,} again"
    return f"to keep the checkpoint's, make {product} x seq_len {tokens(saved):,} again"


def _positive(value: Any) -> int | None:
    """``value`` as an int if it is a positive whole number (not a bool), else ``None``."""
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) and value > 0 else None
