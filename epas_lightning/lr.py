"""Learning-rate schedule: linear warmup then cosine decay to a floor."""

from __future__ import annotations

import logging
import math

from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)

SHAPE = ("base_lrs", "warmup_steps", "max_steps", "min_lr_ratio")
"""What defines the schedule, as opposed to how far along it a run is (``last_epoch``)."""


class WarmupCosineLR(LRScheduler):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * base_lr`` at ``max_steps``.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Optimizer steps of linear warmup: step s < warmup_steps runs at
            ``(s + 1) / (warmup_steps + 1)`` of the base learning rate (never 0, so the first step trains).
        max_steps: Step at which the cosine reaches its floor; ``None`` lets ``EPASModule`` fill in the trainer's
            total number of optimizer steps.
        min_lr_ratio: Final learning rate as a fraction of the base learning rate.

    On resume the schedule's shape comes from the current configuration, not the checkpoint: a run resumed with
    another ``max_steps`` (or warmup, floor or learning rate) follows the new schedule from the resumed step, and
    says so, with the learning rate before and after (extending a finished run raises it from the floor). Only the
    position (``last_epoch``) is restored, and a warmup the run had finished stays finished: a longer warmup (the
    default one grows with ``max_steps``) would drop the learning rate back towards 0 mid-run.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 100, max_steps: int | None = None, min_lr_ratio: float = 0.1
    ) -> None:
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"Need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}.")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.max_steps is None or self.max_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        saved = {k: state_dict.get(k) for k in SHAPE}
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in SHAPE})
        done = saved["warmup_steps"]
        if done is not None and done <= self.last_epoch < self.warmup_steps:  # never warm up twice
            _say("LR schedule: warmup_steps %d kept, the run finished its warmup at step %d", done, done)
            self.warmup_steps = done
        for group, base_lr, lr in zip(self.optimizer.param_groups, self.base_lrs, self.get_lr(), strict=True):
            group["initial_lr"], group["lr"] = base_lr, lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        current = {k: getattr(self, k) for k in SHAPE}
        if saved != current:
            changed = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in SHAPE if saved[k] != current[k])
            before, after = (state_dict.get("_last_lr") or [None])[0], self._last_lr[0]
            moves = f": the learning rate goes from {before:.2e} to {after:.2e}" if before not in (None, after) else ""
            _say(
                "LR schedule: resumed at step %d with the configured schedule (%s)%s.", self.last_epoch, changed, moves
            )


def _say(message: str, *args: object) -> None:
    """Log ``message`` on the first rank only: every rank of a distributed run loads the same schedule."""
    if rank_zero_only.rank == 0:
        log.info(message, *args)
