"""fp16 loss scaling (``16-mixed``): the trainer's ``GradScaler``, and unscaling for optimizers that unscale in step."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer


def loss_scaler(trainer: Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's ``GradScaler`` (``16-mixed``), else ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def unscale_fused_gradients(trainer: Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Under fp16 loss scaling, unscale the gradients of an optimizer that would unscale them inside its step (fused
    AdamW, the default on GPUs), so they can be read, clipped or dropped; ``True`` if it did. Lightning unscales other
    optimizers' gradients before ``on_before_optimizer_step``; ``GradScaler.step`` then passes the fused step no scale
    and the overflow it found. Nothing to do once the gradients are gone (a skipped step)."""
    scaler = loss_scaler(trainer)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if all(p.grad is None for group in optimizer.param_groups for p in group["params"]):
        return False
    scaler.unscale_(optimizer)
    return True
