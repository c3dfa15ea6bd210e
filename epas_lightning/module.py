"""The LightningModule: owns the LLaMA (and with it the sharing mask), the loss, metrics and optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from epas_lightning.flops import estimate_flops
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import Llama, LlamaConfig


class EPASModule(LightningModule):
    """Causal-LM training of a :class:`Llama` whose sharing region ``ProgressiveSharing`` grows.

    Args:
        config: The model shape; ``config: {name: demo}`` in YAML picks a preset.
        optimizer: Builds the optimizer from parameter groups (weight decay on matrices only).
            Default: ``AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)``.
        lr_scheduler: Builds a per-step LR scheduler from the optimizer. Default: ``WarmupCosineLR`` with
            ``warmup_steps=min(100, total // 10)``; a ``WarmupCosineLR`` with ``max_steps=None`` decays over the
            trainer's total number of optimizer steps.
    """

    def __init__(
        self,
        config: LlamaConfig,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: Llama | None = None
        self.val_loss = MeanMetric()
        self._tokens_shape: tuple[int, int] | None = None
        self._built_on_meta = False

    def configure_model(self) -> None:
        """Build the model (idempotent; under meta-device init it is materialised and initialised later)."""
        if self.model is not None:
            return
        self.model = Llama(self.config)
        self._built_on_meta = any(p.is_meta for p in self.model.parameters())

    def on_fit_start(self) -> None:
        # Runs after the strategy materialised a meta-device model and before a checkpoint is restored.
        if self._built_on_meta:
            self.model.init_weights()
            self._built_on_meta = False

    def set_shared_layers(self, layers: Iterable[int]) -> None:
        """Switch exactly ``layers`` to sharing (the ``ProgressiveSharing`` callback calls this)."""
        self.model.set_shared_layers(layers)

    @property
    def n_shared(self) -> int:
        return self.model.sharing.n_shared

    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs of the last batch shape under the current mask (read by ``ThroughputMonitor``)."""
        if self._tokens_shape is None or self.model is None:
            return None
        batch_size, seq_len = self._tokens_shape
        return batch_size * estimate_flops(self.config, self.n_shared, seq_len)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so the checkpoint stays loadable with ``weights_only=True``.
        checkpoint["model_config"] = self.config.to_dict()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        input_ids, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        logits = self.model(input_ids)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._tokens_shape = (batch.shape[0], batch.shape[1] - 1)
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.val_loss.update(loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_heldout("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_heldout("test")

    def _log_heldout(self, prefix: str) -> None:
        loss = self.val_loss.compute()  # token-weighted mean, reduced across ranks
        self.val_loss.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=False)
        self.log(f"{prefix}/ppl", loss.exp(), sync_dist=False)

    def configure_optimizers(self):  # noqa: ANN201
        optimizer = self._build_optimizer(self._param_groups())
        total_steps = int(self.trainer.estimated_stepping_batches)
        if self.lr_scheduler_factory is None:
            scheduler = WarmupCosineLR(optimizer, warmup_steps=min(100, total_steps // 10), max_steps=total_steps)
        else:
            scheduler = self.lr_scheduler_factory(optimizer)
            if isinstance(scheduler, WarmupCosineLR) and scheduler.max_steps is None:
                scheduler.max_steps = total_steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def _param_groups(self) -> list[dict]:
        """Weight decay on matrices (linear and embedding weights), none on norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
