"""Before training: does the checkpoint folder have room for the checkpoints the run keeps at once?

An estimate from element counts and sizes only (no pass over tensors): the weights in their dtype plus the optimizer's
two moments per parameter (AdamW's ``exp_avg`` and ``exp_avg_sq``, in the parameter's dtype), times the checkpoints
kept at once. A sharded (FSDP2) checkpoint's ranks all write their share into the one folder, so its size on that
folder is the whole model's (a sharded parameter counts its global elements).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

OPTIMIZER_STATES_PER_PARAM = 2
"""AdamW's ``exp_avg`` and ``exp_avg_sq``, each the size of its parameter."""


def checkpoint_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of one checkpoint of ``module`` and ``optimizers``: weights, buffers and optimizer moments."""
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    optimized = {id(p): p for opt in optimizers for group in opt.param_groups for p in group["params"]}
    moments = sum(p.numel() * p.element_size() for p in optimized.values()) * OPTIMIZER_STATES_PER_PARAM
    return weights + moments


def checkpoints_kept(checkpoint: ModelCheckpoint, max_steps: int) -> int:
    """Checkpoints ``checkpoint`` holds at once while it saves: the top k (every save with ``save_top_k: -1``), a
    ``last.ckpt`` file, and the new one written beside the old before the old goes."""
    if checkpoint.save_top_k >= 0:
        top_k = checkpoint.save_top_k
    else:
        interval = checkpoint._every_n_train_steps
        top_k = max_steps // interval if interval and max_steps > 0 else 1  # unknown count: at least one
    last = 1 if checkpoint.save_last is True else 0  # "link" is a link to a top-k file
    return top_k + last + 1


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (checkpoints a resumed run will replace), 0 when there is none."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def warn_if_disk_too_small(trainer: Trainer, module: LightningModule, checkpoint: ModelCheckpoint) -> None:
    """A warning (rank 0) when the free space where ``checkpoint`` saves, plus the checkpoints already there, is less
    than the run's checkpoints need at once. Only a warning: other jobs may free space before the first save."""
    if checkpoint.dirpath is None or not trainer.is_global_zero:
        return
    folder = Path(checkpoint.dirpath)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    kept = checkpoints_kept(checkpoint, trainer.max_steps)
    needed = kept * checkpoint_bytes(module, trainer.optimizers)
    available = shutil.disk_usage(existing).free + folder_bytes(folder)
    if needed > available:
        rank_zero_warn(
            f"the checkpoints may not fit: {kept} of ~{_size(needed // kept)} each at once need ~{_size(needed)}, and "
            f"{_size(available)} is free in {folder}; free space, save elsewhere (checkpoint.dirpath) or keep fewer "
            "(checkpoint.save_top_k)"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB" if n_bytes >= 1024**3 else f"{n_bytes / 1024**2:.1f} MiB"
