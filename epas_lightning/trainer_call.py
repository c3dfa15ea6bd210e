"""The checkpoint a ``Trainer`` call (``fit``, ``validate``, ``test``, ``predict``) restores, known before it reads it.

Lightning resolves ``ckpt_path`` (``"last"`` included) before its first hook, but keeps it in ``Trainer._run``'s
arguments until it opens the file, after ``prepare_data``, the loggers' folders and ``setup``: ``trainer.ckpt_path``
is still the previous call's. Checks that must come first (a fit that starts from ``init_from`` rather than a resume,
a scored checkpoint's region) read it here; where it cannot be read (:data:`NOT_KNOWN`), they wait for the restore.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Trainer

from epas_lightning.checkpoint_formats import read_lightning_metadata
from epas_lightning.errors import UserError
from epas_lightning.safe_load import release_kept_read

NOT_KNOWN: Any = object()
"""What :func:`restored_checkpoint` gives outside a ``Trainer`` call, or where Lightning keeps the path otherwise:
neither ``None`` (no checkpoint) nor a path, so no early check runs on a guess (the previous call's path)."""


def restored_checkpoint(trainer: Trainer) -> Any:
    """The ``ckpt_path`` the running call of ``trainer`` restores (``None``: none), as Lightning resolved it; called
    from one of its hooks. Outside a call (a hook called by hand), or where ``Trainer._run`` holds no ``ckpt_path``
    (another Lightning), :data:`NOT_KNOWN`."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is Trainer._run.__code__ and frame.f_locals.get("self") is trainer:
            return frame.f_locals.get("ckpt_path", NOT_KNOWN)
        frame = frame.f_back
    return NOT_KNOWN


def restored_metadata(trainer: Trainer) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint the running call of ``trainer`` restores and its Lightning metadata, read without a weight
    (:func:`~epas_lightning.checkpoint_formats.read_lightning_metadata`), for the checks that refuse it before
    Lightning loads it (a large checkpoint takes minutes); called from one of its hooks. ``None`` where it restores
    none, where that is not known (:data:`NOT_KNOWN`), for a remote one (an fsspec URL: only Lightning reads it), and
    where the strategy reads checkpoints its own way (a ``CheckpointIO`` of one's own:
    :func:`~epas_lightning.checkpoint_io.reads_files_as_saved`), and where its metadata does not read: the load refuses
    such a checkpoint as it always did."""
    ckpt_path = restored_checkpoint(trainer)
    if ckpt_path is None or ckpt_path is NOT_KNOWN or not _is_local_file_protocol(ckpt_path):
        return None
    from epas_lightning.checkpoint_io import reads_files_as_saved  # noqa: PLC0415 - an import cycle otherwise

    if not reads_files_as_saved(trainer.strategy):  # a CheckpointIO of one's own: only it knows how it keeps one
        return None
    try:
        metadata = read_lightning_metadata(ckpt_path, flag="ckpt_path")
    except UserError:
        return None
    return None if metadata is None else (str(ckpt_path), metadata)


def check_restored(trainer: Trainer, check: Callable[[str, dict[str, Any]], None]) -> None:
    """Run ``check(ckpt_path, metadata)`` on the checkpoint the running call of ``trainer`` restores
    (:func:`restored_metadata`), where its metadata reads. A legacy file's whole read, kept for the next look until the
    restore frees it, is freed at once where ``check`` refuses it: no restore follows."""
    if (restored := restored_metadata(trainer)) is None:
        return
    try:
        check(*restored)
    except BaseException:
        release_kept_read(Path(restored[0]).expanduser())
        raise
