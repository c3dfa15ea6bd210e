"""When an optimizer step's logged values are read: by the loggers (every ``log_every_n_steps`` steps, and at a stop)
or by callbacks that decide on them (a ``monitor``) or name checkpoint files by them, so that a value is reduced over
the ranks only where it is."""

from __future__ import annotations

import re

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from epas_lightning.plateau_metrics import plateau_monitors


def step_is_logged(trainer: Trainer) -> bool:
    """Whether Lightning writes the on-step metrics of the optimizer step now running to the loggers, when it ends:
    ``log_every_n_steps`` says so, or ``should_stop`` (a stop's step), or ``fast_dev_run`` (Lightning's rule at the
    step's last micro-batch, read the same way before it; a stop set later in the step changes it). Whether this rank
    has a logger is left out: the answer decides a collective, and a logger may be made on rank zero alone."""
    return bool(getattr(trainer._logger_connector, "should_update_logs", True) or trainer.fast_dev_run)


def on_lightnings_progress_bar(trainer: Trainer) -> bool:
    """Whether ``train/loss`` goes to Lightning's progress-bar metrics (``prog_bar=True``). Lightning reads those back
    to the host after every batch, a device sync per step on CUDA, so only for a progress bar that shows them: not with
    no bar, nor with one that reads ``callback_metrics`` itself where it shows the loss (``reads_train_loss = True``,
    ``StepRunProgressBar``)."""
    bar = trainer.progress_bar_callback
    return bar is not None and not getattr(bar, "reads_train_loss", False)


def read_alike_on_every_rank(trainer: Trainer, name: str) -> bool:
    """Whether the metric ``name`` must hold the same value on every rank at every micro-batch (a validation may come
    inside an optimizer step): a callback decides on it (``ModelCheckpoint``, ``EarlyStopping``: their ``monitor``), or
    a ``ReduceLROnPlateau`` scheduler does, or a ``ModelCheckpoint`` names its files by it (``filename``, or its last
    checkpoint's; each rank keeps the name as its ``best_model_path``, and only rank zero's file is written)."""
    if name in plateau_monitors(trainer) or any(getattr(c, "monitor", None) == name for c in trainer.callbacks):
        return True
    return any(name in file_name_metrics(c) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint))


def file_name_metrics(checkpoint: ModelCheckpoint) -> set[str]:
    """The metrics ``checkpoint`` formats into its file names: the ``{name}`` or ``{name:format}`` groups of its
    ``filename`` and ``CHECKPOINT_NAME_LAST``, as ``ModelCheckpoint.format_checkpoint_name`` finds them."""
    names = (checkpoint.filename or "", checkpoint.CHECKPOINT_NAME_LAST or "")
    return {group[1:] for pattern in names for group in re.findall(r"(\{.*?)[:\}]", pattern)}


def mean_over_ranks(trainer: Trainer, value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks, as ``self.log(..., sync_dist=True)`` averages it (the same call): a
    collective every rank makes."""
    return trainer.strategy.reduce(value.detach().clone(), reduce_op="mean")  # in place


def replace_logged(trainer: Trainer, hook: str, name: str, value: torch.Tensor) -> None:
    """Replace the on-step value that ``hook`` logged as ``name`` in this batch, before the loggers read it (Lightning's
    results collection keys it ``"<hook>.<name>"``; ``self.log`` ends with the same update)."""
    trainer._results.update_metrics(f"{hook}.{name}", value, 1)
