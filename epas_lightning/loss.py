"""The language-modelling loss: one definition for training, validation, test, ``evaluate``, ``bench`` and experiments.

The softmax runs over the tokenizer's vocabulary (``config.vocab_size``), not over the rows the embedding table is
padded with (``padded_vocab_size``): the padded rows can never be a target, and leaving them out makes every number
equal to what an exported model (which has no padded rows) gives in ``transformers`` and lm-eval-harness.
``train_loss`` is the same cross-entropy computed without materialising the logits (``linear_cross_entropy``);
validation and evaluation use ``next_token_loss`` on the full logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from epas_lightning.linear_ce import linear_cross_entropy

if TYPE_CHECKING:
    from torchmetrics.aggregation import MeanMetric


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), computed in fp32, with the
    softmax over the first ``vocab_size`` logits (all of them when ``None``)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The loss of ``model`` on a token batch (B, T + 1): it reads ``batch[:, :-1]`` and predicts ``batch[:, 1:]``,
    over the real vocabulary (``model.config.vocab_size``)."""
    input_ids, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
    return lm_loss(model(input_ids), targets, model.config.vocab_size)


def train_loss(model: nn.Module, batch: torch.Tensor, compile: bool | str = False) -> torch.Tensor:
    """The training loss of a ``Llama`` on a token batch (B, T + 1): ``next_token_loss`` with the softmax over the
    first ``config.vocab_size`` rows of the head (padding rows left out), chunked so the (B, T, V) logits never exist;
    ``compile`` fuses each chunk's softmax and gradient (``linear_cross_entropy``'s ``compile``).
    """
    input_ids, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
    vocab_size = model.config.vocab_size

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, targets, vocab_size, compile=compile)

    return model(input_ids, head=head)


def heldout_mean(device: torch.device | str) -> MeanMetric:
    """A token-weighted mean of held-out batch losses (``update(loss, weight=tokens)``) that a NaN batch makes NaN:
    torchmetrics' default dropped it with a warning, and val/loss came out finite, from the other batches only."""
    from torchmetrics.aggregation import MeanMetric  # slow to import: evaluate's perplexity needs none

    return MeanMetric(nan_strategy="disable").to(device)
