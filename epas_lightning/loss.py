"""The language-modelling loss: one definition for training, validation, test, ``evaluate``, ``bench`` and experiments.

The softmax runs over the tokenizer's vocabulary (``config.vocab_size``), not over the rows the embedding table is
padded with (``padded_vocab_size``): the padded rows can never be a target, and leaving them out makes every number
equal to what an exported model (which has no padded rows) gives in ``transformers`` and lm-eval-harness.
``train_loss`` is the same cross-entropy computed without materialising the logits (``linear_cross_entropy``);
validation and evaluation use ``token_losses`` on the full logits: a sum over the real target tokens and their count,
which pad rows (:data:`PAD`, a rank's last held-out batches) add nothing to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from epas_lightning.linear_ce import linear_cross_entropy

if TYPE_CHECKING:
    from epas_lightning.heldout_metric import HeldOutLoss

PAD = -100
"""The token id of the pad rows that fill held-out batches (``epas_lightning.data.heldout``): whole rows of it, never
data (the vocabulary check refuses it anywhere else), ``F.cross_entropy``'s ``ignore_index`` as a target, and read as
token 0 as an input."""


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


def token_losses(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token cross-entropy of each target of a token batch (B, T + 1) (``next_token_loss``'s, fp32,
    flattened to B * T), and which targets are real: a pad row's (:data:`PAD`) count 0 and are not real. The mean over
    the real ones is ``next_token_loss``."""
    input_ids, targets = batch[:, :-1], batch[:, 1:].flatten()
    logits = model(input_ids.masked_fill(input_ids == PAD, 0))[..., : model.config.vocab_size]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.long(), ignore_index=PAD, reduction="none")
    return losses, targets != PAD


def real_rows(batch: torch.Tensor) -> torch.Tensor:
    """The rows of a token batch (B, T + 1) that hold a sequence, not :data:`PAD` (a 0-d tensor on its device: reading
    it is a device sync)."""
    return (batch != PAD).any(dim=1).sum()


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


def heldout_mean(device: torch.device | str) -> HeldOutLoss:
    """The mean held-out loss over real target tokens (:class:`~epas_lightning.heldout_metric.HeldOutLoss`:
    ``update(*token_losses(model, batch))``), on ``device``."""
    from epas_lightning.heldout_metric import HeldOutLoss  # torchmetrics is slow to import: evaluate needs none

    return HeldOutLoss().to(device)
