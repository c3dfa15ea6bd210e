"""The metrics the run's ``ReduceLROnPlateau`` schedulers step on, kept in checkpoints for the resumed run.

Lightning does not save ``trainer.callback_metrics``: a plateau scheduler stepped after a resume, before the next
validation, found no metric (``strict``: an error; else a warning, and no step), where the uninterrupted run stepped on
the last validation's value.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch import Trainer

PLATEAU_METRICS_KEY = "plateau_metrics"
"""The values, as saved, of the metrics the checkpoint's plateau schedulers monitor (``{"val/loss": 5.3}``)."""


def plateau_monitors(trainer: Trainer) -> set[str]:
    """The metrics the trainer's ``ReduceLROnPlateau`` schedulers step on."""
    return {config.monitor for config in trainer.lr_scheduler_configs if config.reduce_on_plateau and config.monitor}


def save_plateau_metrics(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Put the current values of :func:`plateau_monitors` into ``checkpoint`` (those logged so far; none yet: an empty
    record, which tells a checkpoint before any validation from one of a version that saved none)."""
    metrics = trainer.callback_metrics
    if monitors := plateau_monitors(trainer):
        checkpoint[PLATEAU_METRICS_KEY] = {name: float(metrics[name]) for name in sorted(monitors) if name in metrics}


def restore_plateau_metrics(trainer: Trainer, saved: Any) -> None:
    """Put the values a checkpoint saved (``saved``: what it holds under :data:`PLATEAU_METRICS_KEY`) of
    :func:`plateau_monitors` back into ``trainer.callback_metrics``, where no newer one is there (float64: the saved
    value exactly)."""
    if not isinstance(saved, dict):
        return
    metrics = trainer.callback_metrics
    for name in plateau_monitors(trainer) - metrics.keys():
        if isinstance(value := saved.get(name), float):
            metrics[name] = torch.tensor(value, dtype=torch.float64)


def hold_plateau_steps(configs: list[Any]) -> list[tuple[Any, int]]:
    """Make the ``ReduceLROnPlateau`` scheduler ``configs`` never due (a frequency no step or epoch count reaches; the
    schedulers themselves are untouched) until :func:`release_plateau_steps` is given what this returns."""
    held = [(config, config.frequency) for config in configs]
    for config in configs:
        config.frequency = sys.maxsize
    return held


def release_plateau_steps(held: list[tuple[Any, int]]) -> None:
    for config, frequency in held:
        config.frequency = frequency
