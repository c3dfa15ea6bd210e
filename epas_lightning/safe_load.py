"""Reading checkpoints without running code from them.

A checkpoint is a file a user hands us, possibly from someone else. Pickles are only ever read by a restricted
unpickler: ``torch.load(weights_only=True)`` for ``.ckpt``/``.pt``/``.bin`` files here, and for a torch distributed
checkpoint the readers of :mod:`epas_lightning.safe_dcp` (imported only for one: ``torch.distributed.checkpoint`` is
slow to import). Weights in safetensors need no unpickling at all.

:func:`verify_checkpoint` checks a checkpoint this way before Lightning or torch.distributed.checkpoint open it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from epas_lightning.errors import CheckpointError

DCP_METADATA = ".metadata"
"""The pickle of a torch distributed checkpoint directory (tensor names, shapes, storage layout)."""
LIGHTNING_METADATA = "meta.pt"
"""What Lightning saves beside the shards: loops, callbacks, hyperparameters (a ``torch.save`` file)."""
SAVE_ID = "epas_save"
"""One random id per sharded save (``FSDP2Strategy``): each rank's shard holds it as the entry
``state_dict.epas_save.<id>.rank<N>`` (so ``.metadata`` names it too), and ``meta.pt`` under this key. Files of
two saves in one folder (same layout and sizes) disagree on it; checkpoints without it load unchecked."""


def check_readable(file: Path, where: object = None) -> Path:
    """``file``, refused in one line where this user may not read it: safetensors (a Rust library) reports such a file
    as missing, and a corrupt one would be suspected."""
    try:
        file.open("rb").close()
    except PermissionError as e:
        raise CheckpointError(
            "cannot open the file: permission denied", where or file, "make it readable for this user"
        ) from e
    return file


def load_torch_file(
    path: str | Path | IO[bytes],
    map_location: Any = "cpu",
    mmap: bool = False,
    where: object = None,
    keep: bool = False,
) -> Any:
    """``torch.load`` with ``weights_only=True``; an unsafe, corrupt or truncated file is a :class:`CheckpointError`
    (``where`` names it in the message; default: the path). ``path`` may be an open binary stream (never mapped).

    A legacy file (not a zip) cannot be mapped: one read to map (``mmap``, on the CPU) is read whole; ``keep`` keeps it
    for the next such read of the unchanged file, which takes it without ``keep`` (:class:`LegacyReads`)."""
    path = path if isinstance(path, io.IOBase) else Path(path)
    try:
        if not isinstance(path, Path):
            return torch.load(path, map_location=map_location, weights_only=True)
        if mmap and _is_zip(path):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        if mmap and map_location == "cpu":  # a legacy file cannot be mapped: read whole, once while kept
            return _LEGACY_READS.read(path, keep)
        _LEGACY_READS.forget()  # a full load (a restore, say): what is kept, of any file, is freed first
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        _refuse_other_files(path, where, e)
        raise CheckpointError(
            "cannot read this file safely (it holds objects other than tensors and plain data, which we never "
            "unpickle)",
            where or path,
            "pass a checkpoint written by fit or consolidate",
        ) from e
    except MemoryError:
        raise
    except PermissionError as e:
        raise CheckpointError(
            "cannot open the file: permission denied", where or path, "make it readable for this user"
        ) from e
    except Exception as e:  # garbage fails the unpickler in many ways (KeyError, IndexError, ...): the file is bad
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(path, Path) and path.is_file() and path.stat().st_size == 0:
            detail = "the file is empty"
        else:  # a text file, say, fails the legacy loader with a KeyError
            _refuse_other_files(path, where, e)
        raise CheckpointError(
            f"not a readable checkpoint: corrupt or truncated ({type(e).__name__}{': ' if detail else ''}{detail})",
            where or path,
            "copy it again, or pass a checkpoint written by fit or consolidate",
        ) from e


class LegacyReads:
    """The last legacy file (not a zip: ``torch.save(..., _use_new_zipfile_serialization=False)``, an older version's
    ``.ckpt``) that a read of its metadata asked to keep. Such a file cannot be mapped, so each look at its metadata
    (the checks of a command, Lightning's look for hyperparameters) read it whole again. A read to keep reuses it; one
    that does not (its weights, read once) takes it and frees it; a full load of any file frees it first (a restore:
    the kept read may be of a file never read again, a resumed fit's ``init_from``). A file changed since (its size,
    modification or change time, device or inode: one written over in place with its modification time kept, too)
    is read again. Each read gets its own top-level dict (callers pop ``state_dict``)."""

    def __init__(self) -> None:
        self._kept: tuple[tuple[Path, int, int, int, int, int], Any] | None = None

    def read(self, path: Path, keep: bool) -> Any:
        stat = path.stat()
        key = (path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_dev, stat.st_ino)
        kept = self._kept
        if kept is not None and kept[0] == key:
            loaded = kept[1]
        else:
            self._kept = kept = None  # freed before the next file is read
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        self._kept = (key, loaded) if keep else None
        return dict(loaded) if isinstance(loaded, dict) else loaded

    def forget(self, path: Path | None = None) -> None:
        """Free what is kept of ``path`` (of any file: ``None``): it is read in full, or by a reader of its own."""
        if self._kept is not None and (path is None or self._kept[0][0] == path.resolve()):
            self._kept = None


_LEGACY_READS = LegacyReads()


def release_kept_read(path: Path) -> None:
    """Free the kept read of the legacy file ``path`` (:class:`LegacyReads`), before a reader of its own (Lightning's
    ``load_from_checkpoint``) loads it again."""
    _LEGACY_READS.forget(path)


def plain_numbers(tree: Any) -> Any:
    """``tree`` with every numpy scalar or array in its dicts, lists and tuples replaced by the Python number(s) it
    holds (dicts and lists in place): ``torch.load(weights_only=True)`` refuses numpy objects, so a checkpoint
    written with a sweep's ``np.float64`` learning rate or sharing target could neither resume nor load."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            tree[key] = plain_numbers(value)
    elif isinstance(tree, list):
        tree[:] = [plain_numbers(value) for value in tree]
    elif type(tree) is tuple:
        return tuple(plain_numbers(value) for value in tree)
    elif isinstance(tree, (np.generic, np.ndarray)):
        return tree.tolist()
    return tree


def _refuse_other_files(path: Path | IO[bytes], where: object, error: Exception) -> None:
    """A file that torch.save did not write is refused as not a checkpoint, not as a corrupt one."""
    if isinstance(path, Path) and path.is_file() and not _written_by_torch_save(path):
        raise CheckpointError(
            "not a checkpoint file: torch.save writes a zip archive or a pickle, and this is neither",
            where or path,
            "pass a checkpoint written by fit or consolidate",
        ) from error


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _written_by_torch_save(path: Path) -> bool:
    """A zip archive (whole, or the start of one: a truncated copy), or a pickle of protocol 2 or later (its first
    byte is the PROTO opcode): what torch.save writes (a text file, say, is neither)."""
    with path.open("rb") as f:
        head = f.read(4)
    return head[:1] == pickle.PROTO or head == b"PK\x03\x04" or _is_zip(path)


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    """Whether a Lightning checkpoint (loaded, or its metadata) is a weights-only save (``save_weights_only``):
    Lightning writes no callback states into one, nor calls any callback's ``on_save_checkpoint`` or
    ``on_load_checkpoint``."""
    return "callbacks" not in checkpoint


def is_sharded_checkpoint(path: Path) -> bool:
    """A torch distributed checkpoint directory (what FSDP2 training writes)."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def verify_checkpoint(path: str | Path, flag: str = "--ckpt_path", scoring: bool = False) -> Path:
    """Check that a checkpoint exists and reads safely before anything else opens it; return its path.

    A file must load with ``weights_only=True``; a sharded directory must have metadata the restricted unpickler
    accepts, every shard file that metadata names at its full length, and a ``meta.pt`` that loads with
    ``weights_only=True``. ``scoring``: for ``validate``/``test``, whose answer to a model folder is ``evaluate``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("checkpoint does not exist", f"{flag} {path}", "check the path")
    if path.is_file():
        load_torch_file(path, mmap=True, where=f"{flag} {path}", keep=True)  # its metadata is read next
        return path
    if (path / "config.json").is_file() and not is_sharded_checkpoint(path):
        if scoring:
            raise CheckpointError(
                "a model folder (consolidated or Hugging Face) is no Lightning checkpoint",
                f"{flag} {path}",
                f"score it with python -m epas_lightning evaluate --checkpoint {path} (the held-out loss of "
                "validate, at any trained region: --sharing-layers all)",
            )
        raise CheckpointError(
            "a model folder (consolidated or Hugging Face) holds weights only, no training state to resume",
            f"{flag} {path}",
            f"start a new run from its weights with --model.init_from {path}",
        )
    if not is_sharded_checkpoint(path):
        from epas_lightning.checkpoint_formats import checkpoints_inside  # a run folder: name the checkpoints in it

        raise CheckpointError(
            "not a checkpoint: a directory without distributed-checkpoint metadata",
            f"{flag} {path}",
            checkpoints_inside(path) or "pass a .ckpt file or a checkpoint directory written by fit with FSDP2",
        )
    from epas_lightning.safe_dcp import check_one_save, check_shard_files, read_dcp_metadata

    metadata = read_dcp_metadata((path / DCP_METADATA).read_bytes(), f"{flag} {path}")
    check_shard_files(metadata, path, f"{flag} {path}")
    meta = (
        load_torch_file(path / LIGHTNING_METADATA, where=f"{flag} {path}")
        if (path / LIGHTNING_METADATA).is_file()
        else None
    )
    check_one_save(metadata, meta, path, f"{flag} {path}")
    return path
