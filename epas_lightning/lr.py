"""Learning-rate schedules per optimizer step: linear warmup, then a cosine decay (:class:`WarmupCosineLR`) or a
constant peak followed by a short decay (:class:`WarmupStableDecayLR`, "WSD")."""

from __future__ import annotations

import logging
import math
from typing import Literal, get_args

from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from epas_lightning.errors import ConfigError

log = logging.getLogger(__name__)

DecayShape = Literal["linear", "cosine", "1-sqrt"]
DECAY_SHAPES = get_args(DecayShape)


class WarmupSchedule(LRScheduler):
    """What the schedules here share: a linear warmup, a ``max_steps`` that ``EPASModule`` fills in from the trainer
    when it is ``None``, and resuming under the configured shape.

    On resume the schedule's shape (``SHAPE``) comes from the current configuration, not the checkpoint: a run resumed
    with another ``max_steps`` (or warmup, decay, floor or learning rate) follows the new schedule from the resumed
    step, and says so, with the learning rate before and after (extending a finished run raises it from the floor).
    Only the position (``last_epoch``) is restored, and a warmup the run had finished stays finished: a longer warmup
    (the default one grows with ``max_steps``) would drop the learning rate back towards 0 mid-run.
    """

    SHAPE: tuple[str, ...] = ("base_lrs", "warmup_steps", "max_steps", "min_lr_ratio")
    """What defines the schedule, as opposed to how far along it a run is (``last_epoch``)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, max_steps: int | None, min_lr_ratio: float) -> None:
        if warmup_steps < 0:
            raise _bad("warmup_steps", f"must be at least 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise _bad("min_lr_ratio", f"must be between 0 and 1, got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` as a fraction of the base learning rate."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "schedule": type(self).__name__}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = {k: state_dict.get(k) for k in self.SHAPE}
        mine = vars(self)  # another schedule's shape (a WSD's decay_steps) is no attribute of this one
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self.SHAPE and k in mine})
        done = saved["warmup_steps"]
        if done is not None and done <= self.last_epoch < self.warmup_steps:  # never warm up twice
            _say("LR schedule: warmup_steps %d kept, the run finished its warmup at step %d", done, done)
            self.warmup_steps = done
        for group, base_lr, lr in zip(self.optimizer.param_groups, self.base_lrs, self.get_lr(), strict=True):
            group["initial_lr"], group["lr"] = base_lr, lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        current = {k: getattr(self, k) for k in self.SHAPE}
        schedule, name = saved_schedule(state_dict), type(self).__name__
        if saved != current or schedule not in (None, name):
            changed = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in self.SHAPE if saved[k] != current[k])
            before, after = (state_dict.get("_last_lr") or [None])[0], self._last_lr[0]
            moves = f": the learning rate goes from {before:.2e} to {after:.2e}" if before not in (None, after) else ""
            which, keep = "schedule", ""
            if schedule not in (None, name):  # e.g. the run's --model.lr_scheduler flag left out of the resume
                which = f"{name}, not the checkpoint's {schedule}"
                keep = f"; to keep the {schedule}, set model.lr_scheduler as the run did"
            changed = f" ({changed})" if changed else ""
            _say(
                "LR schedule: resumed at step %d with the configured %s%s%s%s.",
                self.last_epoch,
                which,
                changed,
                moves,
                keep,
            )


class WarmupCosineLR(WarmupSchedule):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * base_lr`` at ``max_steps``.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Optimizer steps of linear warmup: step s < warmup_steps runs at
            ``(s + 1) / (warmup_steps + 1)`` of the base learning rate (never 0, so the first step trains).
        max_steps: Step at which the cosine reaches its floor; ``None`` lets ``EPASModule`` fill in the trainer's
            total number of optimizer steps.
        min_lr_ratio: Final learning rate as a fraction of the base learning rate.

    Resuming follows the configured schedule (see :class:`WarmupSchedule`).
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 100, max_steps: int | None = None, min_lr_ratio: float = 0.1
    ) -> None:
        super().__init__(optimizer, warmup_steps, max_steps, min_lr_ratio)

    def after_warmup(self, step: int) -> float:
        if self.max_steps is None or self.max_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupStableDecayLR(WarmupSchedule):
    """Warmup-stable-decay ("WSD"): linear warmup, the peak held, then a decay over the last steps before max_steps.

    The decay ends at ``min_lr_ratio * base_lr`` at ``max_steps`` and lasts ``decay_steps`` (or ``decay_fraction``
    of ``max_steps``).

    The stable phase does not depend on when the run will end, so a run can be extended (resumed with a larger
    ``max_steps``) without the learning rate jumping, and annealed from any of its checkpoints: resume with
    ``max_steps`` = that step + ``decay_steps``.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Optimizer steps of linear warmup, as in :class:`WarmupCosineLR`.
        max_steps: Step at which the decay reaches its floor; ``None`` lets ``EPASModule`` fill in the trainer's
            total number of optimizer steps (with none, the peak is held for good).
        decay_steps: Length of the decay, in optimizer steps (at most ``max_steps - warmup_steps``: a longer one
            starts at the end of warmup).
        decay_fraction: The decay's length as a fraction of ``max_steps``, instead of ``decay_steps``; with neither
            given, 0.2.
        decay_shape: ``linear``, ``cosine`` or ``1-sqrt`` (the factor falls as ``1 - sqrt(progress)``).
        min_lr_ratio: Final learning rate as a fraction of the base learning rate.
    """

    SHAPE = (*WarmupSchedule.SHAPE, "decay_steps", "decay_fraction", "decay_shape")

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        decay_steps: int | None = None,
        decay_fraction: float | None = None,
        decay_shape: DecayShape = "linear",
        min_lr_ratio: float = 0.0,
    ) -> None:
        if decay_steps is not None and decay_fraction is not None:
            raise _bad("decay_steps", "and decay_fraction both set", "set one of them")
        if decay_steps is not None and decay_steps < 0:
            raise _bad("decay_steps", f"must be at least 0, got {decay_steps}")
        if decay_steps is None:
            decay_fraction = 0.2 if decay_fraction is None else decay_fraction
            if not 0.0 <= decay_fraction <= 1.0:
                raise _bad("decay_fraction", f"must be between 0 and 1, got {decay_fraction}")
        if decay_shape not in DECAY_SHAPES:
            raise _bad("decay_shape", f"is {decay_shape!r}", f"use one of {', '.join(DECAY_SHAPES)}")
        self.decay_steps, self.decay_fraction, self.decay_shape = decay_steps, decay_fraction, decay_shape
        super().__init__(optimizer, warmup_steps, max_steps, min_lr_ratio)

    def decay_length(self) -> int:
        """The decay's length in optimizer steps, within the steps after warmup."""
        if self.max_steps is None:
            return 0
        wanted = self.decay_steps if self.decay_steps is not None else round(self.decay_fraction * self.max_steps)
        return max(0, min(wanted, self.max_steps - self.warmup_steps))

    def after_warmup(self, step: int) -> float:
        length = self.decay_length()
        if length == 0 or step < self.max_steps - length:
            return 1.0
        progress = min(1.0, (step - (self.max_steps - length)) / length)
        if self.decay_shape == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay_shape == "1-sqrt":
            remaining = 1.0 - math.sqrt(progress)
        else:
            remaining = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * remaining


def saved_schedule(state_dict: dict) -> str | None:
    """The class of the schedule whose ``state_dict`` this is (inferred from its keys for checkpoints that predate the
    ``schedule`` entry), or ``None`` for a scheduler of another kind."""
    if "schedule" in state_dict:
        return state_dict["schedule"]
    if "decay_shape" in state_dict:
        return WarmupStableDecayLR.__name__
    return WarmupCosineLR.__name__ if "min_lr_ratio" in state_dict else None


def _bad(name: str, what: str, fix: str = "fix the scheduler's arguments") -> ConfigError:
    return ConfigError(f"{name} {what}", f"model.lr_scheduler.init_args.{name}", fix)


def _say(message: str, *args: object) -> None:
    """Log ``message`` on the first rank only: every rank of a distributed run loads the same schedule."""
    if rank_zero_only.rank == 0:
        log.info(message, *args)
