"""Held-out perplexity with ``torchmetrics`` over a prepared data directory's validation stream."""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.text import Perplexity

from epas_lightning.model import Llama


@torch.no_grad()
def perplexity_of_batches(model: Llama, batches, max_batches: int | None = None) -> dict[str, float]:  # noqa: ANN001
    """Token-weighted loss and perplexity of ``model`` over token batches (B, T + 1)."""
    device = model.embed_tokens.weight.device
    metric = Perplexity().to(device)
    tokens = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device).long()
        logits = model(batch[:, :-1])  # (B, T, V)
        metric.update(logits.float(), batch[:, 1:])
        tokens += batch[:, 1:].numel()
    if tokens == 0:
        raise ValueError("No held-out batches to evaluate (is the validation split empty?).")
    ppl = float(metric.compute())
    return {"loss": float(torch.log(torch.tensor(ppl))), "ppl": ppl, "tokens": tokens}


def evaluate_perplexity(
    model: Llama,
    data_dir: str | Path | None,
    batch_size: int = 8,
    max_batches: int | None = None,
    seq_len: int | None = None,
) -> dict[str, float]:
    """Perplexity on the ``val`` split of a prepared data directory (``None``: the built-in corpus).

    Sequences are ``seq_len`` (default: the model's ``block_size``) tokens; the order is fixed, so every region
    length of one model is scored on the same tokens.
    """
    from epas_lightning.data import heldout_loader

    loader = heldout_loader(data_dir, seq_len or model.config.block_size, batch_size, model.config.vocab_size)
    return perplexity_of_batches(model, loader, max_batches)
