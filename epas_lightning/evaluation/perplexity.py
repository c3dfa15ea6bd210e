"""Held-out loss and perplexity over a prepared data directory's validation split.

The held-out loss is the one ``fit`` validates with and ``test`` reports (:func:`epas_lightning.loss.token_losses`:
token-weighted mean next-token cross-entropy, softmax over the real vocabulary), on sequences of ``block_size + 1``
tokens read from the ``val`` split in stored order. Each result says how many tokens it scored: two numbers are the
same measurement only when their token counts (and regions) agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epas_lightning.loss import token_losses
from epas_lightning.model import Llama
from epas_lightning.model.llama import check_has_weights, check_is_llama
from epas_lightning.runtime import activations_overflow, check_counts

if TYPE_CHECKING:
    from epas_lightning.data.token_data import HeldOut


@torch.no_grad()
def perplexity_of_batches(model: Llama, batches, max_batches: int | None = None) -> dict[str, float]:  # noqa: ANN001
    """Token-weighted loss and perplexity of ``model`` over token batches (B, T + 1), and the tokens scored; a loss
    that comes out NaN or inf (activations past the range of the model's dtype) is a one-line error."""
    device = model.embed_tokens.weight.device
    total, tokens, sequences = 0.0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        losses, real = token_losses(model, batch.to(device).long())  # pad rows (none here) would not count
        loss = losses.sum(dtype=torch.float64).item()
        if not math.isfinite(loss):
            raise activations_overflow("the held-out loss", model.embed_tokens.weight.dtype)
        total += loss
        tokens += int(real.sum())
        sequences += int(real.view(batch.shape[0], -1).any(1).sum())
    if tokens == 0:
        raise ValueError("No held-out batches to evaluate (is the validation split empty?).")
    loss = total / tokens
    return {"loss": loss, "ppl": perplexity(loss), "tokens": tokens, "sequences": sequences}


def perplexity(loss: float) -> float:
    """``exp(loss)``; infinite past what a float holds (a loss above ~709.8 nats), where ``math.exp`` raises."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_perplexity(
    model: Llama,
    data_dir: str | Path | HeldOut | None,
    batch_size: int = 8,
    max_batches: int | None = None,
    seq_len: int | None = None,
) -> dict[str, float]:
    """Perplexity on the ``val`` split of a prepared data directory (``None``: the built-in corpus), or on the held-out
    data a checkpoint's run validated on (``load_model(path).own_heldout()``, what ``evaluate`` reads without --data).

    Sequences are ``seq_len`` (default: the model's ``block_size``) tokens; the order is fixed, so every region
    length of one model is scored on the same tokens.
    """
    from epas_lightning.data import heldout_loader
    from epas_lightning.data.token_data import check_seq_len

    check_is_llama(model)
    check_has_weights(model)
    seq_len = model.config.block_size if seq_len is None else seq_len  # 0 is refused, not taken for the default
    check_counts({"batch_size": batch_size, "max_batches": max_batches, "seq_len": seq_len})
    check_seq_len(seq_len, model.config, where="seq_len")
    loader = heldout_loader(data_dir, seq_len, batch_size, model.config.vocab_size)
    return perplexity_of_batches(model, loader, max_batches)
