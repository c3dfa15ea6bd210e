"""The run folders of ``fit``, ``validate`` and ``test``: checked writable before any work, and removed when a user
error (``fit``: or a signal) stopped the run before it trained a step (``validate``, ``test``: at any point) and this
run made them.

:func:`check_run_folders_writable` refuses, in one line, a log or checkpoint folder the run could not write (a
read-only or full disk, a special file system such as ``/proc``, a file in the way): that was a traceback from the
logger at set-up, once the data was prepared, or from the first checkpoint save, once training had reached it.

Lightning creates the logger's ``version_N`` folder (TensorBoard's event file, ``config.yaml``, ``hparams.yaml``)
before the checks that need the trainer (data, ``init_from``, the strategy) run. A refused start left that folder
behind, empty of anything a user wants, and the run that follows the fix became ``version_N+1``. Only a folder this
run created, holding only those start-up files, is removed: anything else in it keeps it. A refused resume into an
existing folder loses the start-up files it added there (a new event file, ``config-resume-N.yaml``), nothing else,
also when refused after Lightning restored its loops (at the checkpoint's step).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import Trainer

from epas_lightning.errors import OutputError
from epas_lightning.resume import checkpoint_folder, global_step_of, logger_run_dirs

STARTUP_FILES = ("events.out.tfevents.*", "hparams.yaml", "config.yaml", "config-resume-*.yaml", "metrics.csv")
"""What loggers and the saved config write into a run folder before the first step."""


@dataclass
class RunFolders:
    """The loggers' run folders as they were before ``fit``, ``validate`` or ``test``: which of them, and of their
    parents, already existed, and what those folders held."""

    roots: list[Path]
    before: set[Path]
    missing: list[Path]
    held: set[Path]

    @classmethod
    def before_run(cls, trainer: Trainer) -> RunFolders:
        """Look, without choosing a version (resuming may still set it): each logger's ``save_dir/name``."""
        roots = [Path(logger.root_dir) for logger in trainer.loggers if getattr(logger, "root_dir", None)]
        missing = [p for root in roots for p in (root, *root.parents) if not p.exists()]
        before = {child for root in roots if root.is_dir() for child in root.iterdir()}
        held = {entry for child in before if child.is_dir() and not child.is_symlink() for entry in _entries(child)}
        return cls(roots, before, sorted(set(missing), key=lambda p: len(p.parts), reverse=True), held)

    def remove_unused(self, trainer: Trainer) -> None:
        """When this run trained no step (``validate`` and ``test`` train none): remove the version folders it
        created, if they hold only start-up files, and the start-up files it added to one it resumes into, then the
        parents it created, if empty (call it on the first rank, after a user error)."""
        if trained_a_step(trainer):
            return
        for logger in trainer.loggers:
            folder = _version_folder(logger) if getattr(logger, "root_dir", None) else None
            if folder is None or folder.parent not in self.roots:
                continue
            if folder not in self.before:
                _remove_if_startup_only(folder)
            elif folder.is_dir() and not folder.is_symlink():
                for entry in sorted(set(_entries(folder)) - self.held, key=lambda p: len(p.parts), reverse=True):
                    if _is_startup_file(entry) or (entry.is_dir() and not entry.is_symlink() and _startup_only(entry)):
                        _remove_startup_files(entry)
        for folder in self.missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                continue


def trained_a_step(trainer: Trainer) -> bool:
    """Whether ``trainer``'s ``fit`` took an optimizer step: its step is neither 0 (the loops not restored yet) nor the
    step of the checkpoint it resumes (restored, not trained since; one that does not say counts as trained)."""
    if trainer.global_step == 0:
        return False
    return trainer.ckpt_path is None or trainer.global_step != global_step_of(Path(trainer.ckpt_path))


def _version_folder(logger: object) -> Path:
    """A logger's version folder (``root_dir/version_N``): its ``log_dir``, or above it (a ``sub_dir``)."""
    version = logger.version
    return Path(logger.root_dir) / (version if isinstance(version, str) else f"version_{version}")


CHECKPOINTS = "checkpoints"
"""The checkpoint folder in a version folder (Lightning's default ``dirpath``): no start-up file lies inside it."""


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, and what its folders hold (links not followed), except inside its ``checkpoints``
    folders: a run folder's sharded checkpoints may hold many thousand files, slow to list on a cluster's file
    system at every start."""
    found = []
    for top, dirs, files in os.walk(folder):
        found += [Path(top, name) for name in (*dirs, *files)]
        dirs[:] = [name for name in dirs if name != CHECKPOINTS]
    return found


def _is_startup_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and any(path.match(pattern) for pattern in STARTUP_FILES)


def _startup_only(folder: Path) -> bool:
    """Whether ``folder`` holds start-up files and folders of them only (a logger's ``sub_dir``), or nothing."""
    return all(
        _is_startup_file(e) or (e.is_dir() and not e.is_symlink() and _startup_only(e)) for e in folder.iterdir()
    )


def _remove_startup_files(path: Path) -> None:
    """Remove a start-up file, or a folder that :func:`_startup_only` found to hold only those."""
    if not path.is_dir():
        path.unlink()
        return
    for entry in path.iterdir():
        _remove_startup_files(entry)
    path.rmdir()


def _remove_if_startup_only(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and _startup_only(folder):  # else something else is in it
        _remove_startup_files(folder)


def check_url_file_system(config: Namespace, ckpt: str) -> None:
    """A checkpoint folder given as a URL needs fsspec's file system for it: without its package (``s3fs`` for
    ``s3://``) Lightning's ``ModelCheckpoint`` raised an ``ImportError`` traceback at set-up, once the data was
    prepared."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    given = config.get("checkpoint", {}).get("dirpath") if config.get("checkpoint") else None
    where, url = (f"checkpoint.dirpath {given}", given) if given else (ckpt, ckpt)
    if not given and config.trainer.get("logger") is False:
        root = config.trainer.get("default_root_dir")
        where, url = f"trainer.default_root_dir {root}", root
    try:
        get_filesystem(str(url))
    except ImportError as e:
        raise OutputError(
            f"the checkpoint folder is a URL this machine has no file system for ({e})",
            where,
            "install the package it names, or give a local folder",
        ) from None


def check_run_folders_writable(config: Namespace, fitting: bool) -> None:
    """Before any work: the loggers' folders (``save_dir``/``name``) and, when ``fitting``, the checkpoint folder can be
    made and written, on a disk with space left; else an :class:`OutputError` naming the folder."""
    folders = logger_run_dirs(config)
    if fitting and config.trainer.get("enable_checkpointing") is not False and (ckpt := checkpoint_folder(config)):
        if ":/" in str(ckpt):  # a URL: written through fsspec (AtomicCheckpointIO leaves it to Lightning's)
            check_url_file_system(config, ckpt)
        folders.append(Path(ckpt).expanduser())
    fix = "choose another folder (trainer.logger.init_args.save_dir, checkpoint.dirpath)"
    for folder in (f for f in folders if ":/" not in str(f)):  # a URL (s3://...) is the logger's business
        try:
            existing = next(p for p in (folder, *folder.parents) if p.exists())  # the root always does
        except OSError as e:  # a parent that cannot be searched, a name too long
            raise OutputError(f"{e.strerror or e}", folder, fix) from e
        if not existing.is_dir():
            raise OutputError(f"{existing} is a file, not a folder", folder, fix)
        if link := next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None):
            # exists() is False for a loop and a missing target alike: mkdir failed at the first save, after training
            raise OutputError(f"{link} is a symbolic link to nothing (a loop, or its target is missing)", folder, fix)
        usage = shutil.disk_usage(existing)
        if usage.total == 0:  # /proc, /sys: no storage at all (a full disk has a size)
            raise OutputError(
                f"{existing} cannot be written: a special file system (such as /proc or /sys), not a disk", folder, fix
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"{existing} is not writable (a read-only file system, or permissions)", folder, fix)
        if usage.free == 0:
            raise OutputError("no space left on the device (or quota)", folder, f"free space, or {fix}")
