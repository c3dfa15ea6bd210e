"""``RunCheckpoint``: the run's ``ModelCheckpoint``, whose ``last.ckpt`` holds the step training ended at.

Lightning writes ``last.ckpt`` only beside a scheduled save (every ``every_n_train_steps``, after a validation, at an
epoch end), so a run whose length is not a multiple of the interval ended with ``last.ckpt`` some steps behind: the
steps after the last scheduled save were lost, and ``--ckpt_path last`` trained them again.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from epas_lightning.checkpoint_space import warn_if_disk_too_small


def save_last_now(trainer: Trainer, checkpoint: ModelCheckpoint) -> Path | None:
    """Write the current state (weights, optimizer, loops) to ``last.ckpt`` in ``checkpoint``'s folder; every rank
    takes part. ``checkpoint`` then counts this step as saved, so no scheduled save writes the same step again.
    Returns the path, or ``None`` when ``checkpoint`` has no folder."""
    if checkpoint.dirpath is None:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    checkpoint.last_model_path = str(path)  # part of the state written below
    trainer.save_checkpoint(path, weights_only=False)  # a link here is replaced, never written through
    checkpoint._last_global_step_saved = trainer.global_step  # Lightning's own "this step is saved" record
    checkpoint._last_checkpoint_saved = str(path)
    return path


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose ``last.ckpt`` (with ``save_last``) holds the step training ended at.

    It is the ``checkpoint`` section of ``fit``, with ``ModelCheckpoint``'s arguments; when training ends at a step
    that no checkpoint holds yet, it writes ``last.ckpt`` then. Before training, it warns when its folder's disk
    looks too small for the checkpoints it keeps at once (see :mod:`epas_lightning.checkpoint_space`).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        warn_if_disk_too_small(trainer, pl_module, self)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            save_last_now(trainer, self)
        super().on_train_end(trainer, pl_module)
