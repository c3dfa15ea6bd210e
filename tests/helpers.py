"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from pathlib import Path

import lightning as L


def cpu_trainer(root: Path, max_steps: int, callbacks=(), **overrides) -> L.Trainer:
    """A quiet single-process CPU Trainer: no logger, progress bar, summary or validation unless overridden."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    return L.Trainer(**{**kwargs, **overrides})
