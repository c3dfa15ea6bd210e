"""The language-modelling loss: one definition for training, validation, benchmarks and experiments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The loss of ``model`` on a token batch (B, T + 1): it reads ``batch[:, :-1]`` and predicts ``batch[:, 1:]``."""
    input_ids, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
    return lm_loss(model(input_ids), targets)
