"""Before training: is the checkpoint folder one folder for every node, and does it have room for the checkpoints the
run keeps at once?

Every rank reads the checkpoint it resumes (and looks for it, with ``--ckpt_path auto``), and every rank writes its
shard of a sharded one, which rank 0 then renames into place: on several nodes the folder must be on a filesystem they
share, at the same path. On node-local disks each node kept only its own ranks' part, rank 0's checkpoints missed the
other nodes' shards, and the run learnt it when it failed to resume. :func:`check_folder_shared_by_nodes` refuses to
start instead.

The space is an estimate from element counts and sizes only (no pass over tensors): the weights in their dtype plus
the optimizer's two moments per parameter (AdamW's ``exp_avg`` and ``exp_avg_sq``, in the parameter's dtype), times
the checkpoints kept at once. A sharded (FSDP2) checkpoint's ranks all write their share into the one shared folder,
so its size on that folder is the whole model's (a sharded parameter counts its global elements).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from epas_lightning.errors import CheckpointError
from epas_lightning.runtime import folder_bytes, size_text

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


def check_folder_shared_by_nodes(trainer: Trainer, folder: Path, wait_s: float = 2.0) -> None:
    """On several nodes, a ``CheckpointError`` on every rank unless all of them see a file rank 0 writes where
    ``folder`` is (in its nearest existing folder: a folder not made yet will be on that one's filesystem). A rank
    that does not see it looks again for ``wait_s`` seconds. Rank 0 removes the file; nothing else is written."""
    if trainer.num_nodes <= 1:
        return
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None) if trainer.is_global_zero else None
    marker = existing / f".epas-shared-{uuid.uuid4().hex}" if existing else None
    try:
        if marker is not None:
            marker.touch(exist_ok=False)
    except OSError:
        marker = None  # not writable here: the first save says so
    marker = trainer.strategy.broadcast(marker)
    if marker is None:
        return
    deadline = time.monotonic() + wait_s
    while not (seen := marker.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    shared = trainer.strategy.reduce_boolean_decision(seen, all=True)  # every rank has looked once this returns
    if trainer.is_global_zero:
        marker.unlink(missing_ok=True)
    if not shared:
        error = CheckpointError(
            f"the checkpoint folder is not one folder for all {trainer.num_nodes} nodes (a node-local disk?): a file "
            "rank 0 wrote there is missing on another node, so each node would keep only its own ranks' part of every "
            "checkpoint, and none would resume",
            folder,
            "put checkpoint.dirpath (or the logger's save_dir) on a filesystem every node mounts at the same path",
        )
        error.announce = trainer.is_global_zero  # every rank raises it; the command line says it once
        raise error


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
        each, total, free = size_text(needed // kept), size_text(needed), size_text(available)
        rank_zero_warn(
            f"the checkpoints may not fit: {kept} of ~{each} each at once need ~{total}, and {free} is free in "
            f"{folder}; free space, save elsewhere (checkpoint.dirpath) or keep fewer (checkpoint.save_top_k)"
        )
