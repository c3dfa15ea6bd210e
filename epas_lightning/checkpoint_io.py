"""``AtomicCheckpointIO``: each checkpoint file is written beside its name and renamed into place.

Lightning's ``TorchCheckpointIO`` stages the file in the system temp folder and moves it; across file systems (a
local ``/tmp``, the run on a network disk) that move copies into the target, rewriting the previous checkpoint in
place, so a kill or a full disk mid-copy leaves none that loads (and a large checkpoint needs as much room in
``/tmp``). ``fit`` uses this one instead; sharded checkpoints have their own staging (``FSDP2Strategy``). A full disk
(or quota) is a one-line :class:`~epas_lightning.errors.OutputError`: torch reported it as ``RuntimeError: unexpected
pos ...`` after a traceback; so is a folder that stopped taking files (permissions, a read-only remount). A
``Trainer`` of one's own gets it from ``EPASModule.setup`` (:func:`load_safely`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from epas_lightning.errors import RESUME_AFTER_A_FAILED_FIT, CheckpointError, OutputError, os_reason
from epas_lightning.outputs import out_of_space
from epas_lightning.run_summary import say
from epas_lightning.safe_load import is_sharded_checkpoint, load_torch_file, verify_checkpoint
from epas_lightning.strategy import STAGING, FSDP2Strategy, hidden_beside


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``.<name>.saving`` beside the target (a long name shortened: see
    :func:`~epas_lightning.strategy.hidden_beside`), syncs it and renames it over the target (never writing through it:
    a link there is replaced, not followed). Remote paths keep Lightning's way.
    A sharded checkpoint folder (which ``FSDP2Strategy`` reads without it) is refused in one line."""

    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Always with ``weights_only=True`` (``trainer.fit(..., weights_only=False)`` ran a malicious file's code); a
        missing, unsafe or corrupt local file is a one-line :class:`CheckpointError`."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        where = f"ckpt_path {path}"
        if is_sharded_checkpoint(Path(path)):
            raise sharded_needs_fsdp2(path, "this Trainer's", where, "give the Trainer strategy=FSDP2Strategy()")
        if not Path(path).is_file():
            verify_checkpoint(path, "ckpt_path")  # what is there instead: nothing, a run folder, a model folder
        return load_torch_file(path, map_location=map_location, where=where)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        staging = hidden_beside(path, STAGING)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(staging, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, path)
        except BaseException as e:
            with contextlib.suppress(OSError):  # not there, or its folder unreadable: the error below says why
                staging.unlink(missing_ok=True)
            if out_of_space(e):
                raise OutputError(
                    "no space left on the device (or quota) while writing this checkpoint",
                    path,
                    f"free space (or set checkpoint.save_top_k); {RESUME_AFTER_A_FAILED_FIT}",
                ) from e
            if isinstance(e, OSError) and e.errno in NOT_WRITABLE:
                raise OutputError(
                    f"cannot write this checkpoint ({os_reason(e)})",
                    path,
                    f"make its folder writable again; {RESUME_AFTER_A_FAILED_FIT}",
                ) from e
            raise
        return None


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
"""A checkpoint folder that stopped taking files mid-run: its permissions changed, or its file system was remounted
read-only after an error."""


def load_safely(strategy: Strategy) -> None:
    """Have ``strategy`` read checkpoints without running code from them, whatever ``weights_only`` a ``Trainer`` call
    gives (``trainer.fit(module, ckpt_path=path, weights_only=False)`` unpickled anything with a plain ``Trainer``).
    Lightning's own ``TorchCheckpointIO`` (also inside an ``AsyncCheckpointIO``) becomes :class:`AtomicCheckpointIO`;
    a ``CheckpointIO`` of the user's own is kept, and every load asks it for ``weights_only=True`` (what it does with
    that is its code's); ``FSDP2Strategy`` reads its own way, always safely, and Lightning's ``ModelParallelStrategy``
    as it does. Called before Lightning restores a checkpoint; called again, it changes nothing."""
    io = strategy._checkpoint_io  # None: Lightning makes a TorchCheckpointIO when it is first used
    wrapper = io if isinstance(io, _WrappingCheckpointIO) else None
    inner = wrapper.checkpoint_io if wrapper is not None else io
    if inner is None or type(inner) is TorchCheckpointIO:
        if wrapper is None:
            strategy.checkpoint_io = AtomicCheckpointIO()
        else:  # its setter keeps a base already set
            wrapper._checkpoint_io, wrapper._base_checkpoint_io_configured = AtomicCheckpointIO(), True
    if not isinstance(strategy.load_checkpoint, WeightsOnlyLoad):
        strategy.load_checkpoint = WeightsOnlyLoad(strategy)


def reads_files_as_saved(strategy: Strategy) -> bool:
    """Whether ``strategy`` reads a checkpoint as it lies on disk (what an early read of its metadata sees):
    Lightning's ``TorchCheckpointIO`` or :class:`AtomicCheckpointIO` (also inside an ``AsyncCheckpointIO``), or
    ``ModelParallelStrategy``'s own reading; not a ``CheckpointIO`` or ``load_checkpoint`` of one's own, which may
    keep a checkpoint otherwise (inside a dict of its own, say)."""
    load = type(strategy).load_checkpoint
    if load in (ModelParallelStrategy.load_checkpoint, FSDP2Strategy.load_checkpoint):
        return True
    if load is not Strategy.load_checkpoint:
        return False
    io = strategy._checkpoint_io  # None: Lightning makes a TorchCheckpointIO when it is first used
    inner = io.checkpoint_io if type(io) is AsyncCheckpointIO else io
    return inner is None or type(inner) in (TorchCheckpointIO, AtomicCheckpointIO)


class WeightsOnlyLoad:
    """A strategy's ``load_checkpoint`` that always passes ``weights_only=True`` (to its ``CheckpointIO``, or to the
    strategy's own loading), whatever it is given. Lightning's ``ModelParallelStrategy`` reads as ``FSDP2Strategy``
    does: its own unpickles a sharded folder's metadata whatever ``weights_only`` says."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __call__(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        load = type(self.strategy).load_checkpoint
        if load is ModelParallelStrategy.load_checkpoint:
            load = FSDP2Strategy.load_checkpoint
        return load(self.strategy, checkpoint_path, weights_only=True)


UNFINISHED_AFTER_S = 600
"""A staging file unwritten for this long is a save that ended; a younger one may be another process's save."""


def remove_unfinished_saves(folder: Path) -> None:
    """Delete the staging files (``.<name>.ckpt.saving``) that saves killed midway (SIGKILL, a lost node) left in
    ``folder``, saying so: hidden, each as large as a checkpoint, and written again only by a save of the same name.
    One written to in the last :data:`UNFINISHED_AFTER_S` seconds is left (a requeued job's predecessor may still be
    saving). Sharded staging folders are the strategy's (it starts them again)."""
    for stale in sorted(folder.glob(f".*{ModelCheckpoint.FILE_EXTENSION}{STAGING}")):
        if stale.is_file() and not stale.is_symlink():
            status = stale.stat()
            if time.time() - status.st_mtime < UNFINISHED_AFTER_S:
                continue
            stale.unlink()
            say(f"removed {stale} ({status.st_size:,} bytes): a checkpoint save killed before it finished")


def sharded_needs_fsdp2(path: _PATH, strategy: str, where: str, to_fsdp2: str) -> CheckpointError:
    """The error for a sharded FSDP2 checkpoint ``path`` given to a ``strategy`` that cannot read it."""
    return CheckpointError(
        f"a sharded FSDP2 checkpoint loads only under the fsdp2 strategy, not {strategy}",
        where,
        f"{to_fsdp2} (it reads the shards on any number of devices); "
        f"`python -m epas_lightning evaluate --checkpoint {path}` also scores it as it is",
    )
