"""Reading checkpoints without running code from them.

A checkpoint is a file a user hands us, possibly from someone else. Pickles are only ever read by a restricted
unpickler: ``torch.load(weights_only=True)`` for ``.ckpt``/``.pt``/``.bin`` files, and :class:`SafeFileSystemReader`
for the metadata of a torch distributed checkpoint (``.metadata``, a plain pickle that ``torch.distributed.checkpoint``
would otherwise load with ``pickle.load``), and :class:`SafeLoadPlanner` for the non-tensor entries inside its shards
(an optimizer's hyperparameters, pickles that it would load with ``weights_only=False``). Weights in safetensors need
no unpickling at all.

:func:`verify_checkpoint` checks a checkpoint this way before Lightning or torch.distributed.checkpoint open it, and
:func:`load_sharded_checkpoint` is the resume path of a sharded (FSDP2) checkpoint directory with the safe reader.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from epas_lightning.errors import CheckpointError

DCP_METADATA = ".metadata"
"""The pickle of a torch distributed checkpoint directory (tensor names, shapes, storage layout)."""
LIGHTNING_METADATA = "meta.pt"
"""What Lightning saves beside the shards: loops, callbacks, hyperparameters (a ``torch.save`` file)."""
SAVE_ID = "epas_save"
"""One random id per sharded save (``FSDP2Strategy``): each rank's shard holds it as the entry
``state_dict.epas_save.<id>.rank<N>`` (so ``.metadata`` names it too), and ``meta.pt`` under this key. Files of
two saves in one folder (same layout and sizes) disagree on it; checkpoints without it load unchecked."""
_DCP_METADATA_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles distributed-checkpoint metadata: its dataclasses, torch dtypes/sizes and paths, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (
            (module, name) in _DCP_METADATA_CLASSES
            or module == "torch.distributed.checkpoint.metadata"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def read_dcp_metadata(data: bytes, where: object) -> Metadata:
    """Distributed-checkpoint metadata from its pickle bytes, through the restricted unpickler."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any failure of an untrusted pickle is the file's fault
        raise CheckpointError(
            f"unsafe or corrupt distributed-checkpoint metadata ({e})", where, "use a checkpoint written by fit"
        ) from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError("not distributed-checkpoint metadata", where, "use a checkpoint written by fit")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by the restricted unpickler (tensors load ``weights_only``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_dcp_metadata(stream.read(), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        if not isinstance(planner, SafeLoadPlanner):  # torch's planner unpickles non-tensor entries freely
            raise TypeError("SafeFileSystemReader reads only with a SafeLoadPlanner")
        return super().read_data(plan, planner)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor entries load with ``weights_only=True`` (``where`` names the checkpoint
    in the error); torch's loads them with ``weights_only=False``."""

    def __init__(self, where: object, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        checked = io.BytesIO()  # only tensors and plain data get through, saved again for torch's own loader
        torch.save(load_torch_file(value, where=self.where), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def load_shards(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` from the directory ``path`` with the safe reader and planner;
    a missing, truncated or unsafe shard is a :class:`CheckpointError`."""
    try:
        dcp_load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(path), **kwargs)
    except (Exception, CheckpointException) as e:  # a missing or truncated shard (CheckpointException is no Exception)
        raise_wrapped_interrupt(e)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        if isinstance(cause, CheckpointError):
            raise cause from e
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"cannot read the shards ({detail})", path, "copy it again") from e


def raise_wrapped_interrupt(error: BaseException) -> None:
    """Raise the Ctrl+C (or ``GracefulStop``'s stop at once) that ``torch.distributed.checkpoint`` caught on a rank
    and wrapped into its ``CheckpointException``: an interrupted load or save, not a bad checkpoint."""
    failures = error.failures.values() if isinstance(error, CheckpointException) else ()
    for cause, _ in failures:
        if isinstance(cause, KeyboardInterrupt):
            raise cause from error


def load_torch_file(
    path: str | Path | IO[bytes], map_location: Any = "cpu", mmap: bool = False, where: object = None
) -> Any:
    """``torch.load`` with ``weights_only=True``; an unsafe, corrupt or truncated file is a :class:`CheckpointError`
    (``where`` names it in the message; default: the path). ``path`` may be an open binary stream (never mapped)."""
    path = path if isinstance(path, io.IOBase) else Path(path)
    try:
        mmap = mmap and isinstance(path, Path) and _is_zip(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if isinstance(path, Path) and not _written_by_torch_save(path):
            raise CheckpointError(
                "not a checkpoint file: torch.save writes a zip archive or a pickle, and this is neither",
                where or path,
                "pass a checkpoint written by fit or consolidate",
            ) from e
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
        raise CheckpointError(
            f"not a readable checkpoint: corrupt or truncated ({type(e).__name__}: {detail})",
            where or path,
            "copy it again, or pass a checkpoint written by fit or consolidate",
        ) from e


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _written_by_torch_save(path: Path) -> bool:
    """A zip archive, or a pickle of protocol 2 or later (its first byte is the PROTO opcode): what torch.save writes
    (a text file, say, is neither)."""
    with path.open("rb") as f:
        return f.read(1) == pickle.PROTO or _is_zip(path)


def is_sharded_checkpoint(path: Path) -> bool:
    """A torch distributed checkpoint directory (what FSDP2 training writes)."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def verify_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> Path:
    """Check that a checkpoint exists and reads safely before anything else opens it; return its path.

    A file must load with ``weights_only=True``; a sharded directory must have metadata the restricted unpickler
    accepts, every shard file that metadata names at its full length, and a ``meta.pt`` that loads with
    ``weights_only=True``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("checkpoint does not exist", f"{flag} {path}", "check the path")
    if path.is_file():
        load_torch_file(path, mmap=True, where=f"{flag} {path}")
        return path
    if (path / "config.json").is_file() and not is_sharded_checkpoint(path):
        raise CheckpointError(
            "a model folder (consolidated or Hugging Face) holds weights only, no training state to resume",
            f"{flag} {path}",
            f"start a new run from its weights with --model.init_from {path}",
        )
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            "not a checkpoint: a directory without distributed-checkpoint metadata",
            f"{flag} {path}",
            "pass a .ckpt file or a checkpoint directory written by fit with FSDP2",
        )
    metadata = read_dcp_metadata((path / DCP_METADATA).read_bytes(), f"{flag} {path}")
    check_shard_files(metadata, path, f"{flag} {path}")
    meta = (
        load_torch_file(path / LIGHTNING_METADATA, where=f"{flag} {path}")
        if (path / LIGHTNING_METADATA).is_file()
        else None
    )
    check_one_save(metadata, meta, path, f"{flag} {path}")
    return path


def check_shard_files(metadata: Metadata, path: Path, where: str) -> None:
    """Every shard file of a sharded checkpoint is in ``path`` and holds all the bytes its metadata places in it
    (checked from file sizes, before any rank starts reading and fails alone with a traceback)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    fix = "copy the whole checkpoint folder again (one .distcp file per rank that saved it)"
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"shard {name} is missing ({len(needed)} shard files expected)", where, fix)
        if shard.stat().st_size < size:
            raise CheckpointError(f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)", where, fix)


def check_one_save(metadata: Metadata, meta: dict[str, Any] | None, path: Path, where: object) -> None:
    """Every shard file and ``meta.pt`` of a sharded checkpoint come from the save its ``.metadata`` records
    (:data:`SAVE_ID`; one read of about a kilobyte per shard file). Without save ids, nothing is checked."""
    prefix = f"state_dict.{SAVE_ID}."
    marks = [(index.fqn, info) for index, info in (metadata.storage_data or {}).items() if index.fqn.startswith(prefix)]
    if not marks:
        return
    save_id = marks[0][0].split(".")[2]  # state_dict.epas_save.<id>.rank<N>
    fix = "copy the folder of one save again, whole (its .metadata, .distcp files and meta.pt belong together)"
    for _, info in sorted(marks, key=lambda mark: str(mark[1].relative_path)):
        with open(path / info.relative_path, "rb") as shard:
            shard.seek(info.offset)
            blob = shard.read(info.length)
        try:
            written = load_torch_file(io.BytesIO(blob))
        except CheckpointError:  # other bytes there: a shard of a save with another layout
            written = None
        if written != save_id:
            raise CheckpointError(
                f"its files come from two saves: {info.relative_path} is not of this .metadata", where, fix
            )
    if meta is not None and meta.get(SAVE_ID) != save_id:
        raise CheckpointError(
            f"its files come from two saves: {LIGHTNING_METADATA} is not of this .metadata", where, fix
        )


def load_sharded_checkpoint(
    path: Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], strict: bool = True
) -> dict[str, Any]:
    """Load a sharded checkpoint directory into ``module`` (and ``optimizers``) on every rank; return the metadata.

    The model and optimizer states go through ``torch.distributed.checkpoint`` with :class:`SafeFileSystemReader`;
    the rest (``meta.pt``) loads with ``weights_only=True``. Optimizer states are returned as Lightning expects them
    (``optimizer_states``), already loaded into the optimizers.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    metadata = SafeFileSystemReader(path).read_metadata()  # refuse unsafe metadata before anything else happens
    meta = load_torch_file(path / LIGHTNING_METADATA) if (path / LIGHTNING_METADATA).is_file() else None
    check_one_save(metadata, meta, path, path)
    module_state = {"state_dict": get_model_state_dict(module)}
    load_shards(module_state, path)
    module.load_state_dict(module_state["state_dict"], strict=strict)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        load_shards(optimizer_state, path)
        set_optimizer_state_dict(
            module, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
        )
    return meta or {}
