"""The held-out loss as a metric: summed over the real target tokens of every batch and rank, then divided."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class HeldOutLoss(Metric):
    """The mean loss over the real target tokens of the batches it is updated with (``update(*token_losses(model,
    batch))``), reduced across ranks by ``compute()``: the tokens' summed losses over their count, so a pad row
    (:data:`~epas_lightning.loss.PAD`) adds nothing and a batch of nothing but pad rows is no NaN, while a real NaN or
    inf loss makes it NaN or inf (torchmetrics' ``MeanMetric`` dropped a NaN batch with a warning by default, and with
    ``nan_strategy="disable"`` ignores its weights)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # float64: a float32 count stops at 2**24 tokens (adding 1 no longer changes it), and its sum drifts before
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, real: torch.Tensor) -> None:
        """``losses``: each target's loss (0 where not ``real``); ``real``: which targets are real."""
        self.loss_sum += losses.sum(dtype=self.loss_sum.dtype)
        self.tokens += real.sum(dtype=self.tokens.dtype)

    def compute(self) -> torch.Tensor:
        return self.loss_sum / self.tokens

    def total_tokens(self) -> torch.Tensor:
        """The real target tokens counted, over every rank (a collective where several run, as ``compute()`` is)."""
        with self.sync_context():
            return self.tokens.clone()
