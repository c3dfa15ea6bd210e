"""Reading torch distributed (FSDP2) checkpoints without running code from them.

Their metadata (``.metadata``, a plain pickle that ``torch.distributed.checkpoint`` would load with ``pickle.load``)
is read by :class:`SafeFileSystemReader` through a restricted unpickler, and the non-tensor entries inside the shards
(an optimizer's hyperparameters, pickles that it would load with ``weights_only=False``) by :class:`SafeLoadPlanner`
with ``weights_only=True``. :func:`load_sharded_checkpoint` is the resume path of a sharded checkpoint directory;
:func:`load_full_optimizer_states` that of the optimizer states of a single-file one.
A module of its own because ``torch.distributed.checkpoint`` is slow to import: only sharded checkpoints need it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from epas_lightning.errors import CheckpointError
from epas_lightning.safe_load import LIGHTNING_METADATA, SAVE_ID, load_torch_file

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
    """Unpickles distributed-checkpoint metadata: its dataclasses, torch dtypes/sizes and paths, nothing else.

    Names are looked up one level deep only: pickle follows a dotted name attribute by attribute (``os.system`` of
    the metadata module, which imports ``os``)."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (
            (module, name) in _DCP_METADATA_CLASSES
            or _metadata_class(module, name)
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _metadata_class(module: str, name: str) -> bool:
    """Whether ``module.name`` is a class that torch's checkpoint metadata module defines (not one it imports)."""
    import torch.distributed.checkpoint.metadata as metadata

    found = getattr(metadata, name, None) if module == metadata.__name__ else None
    return isinstance(found, type) and found.__module__ == module


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
    for info in (metadata.storage_data or {}).values():  # torch joins the folder and the name: an absolute one wins
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"its metadata places shard file {name!r} outside its folder", where, "use a checkpoint written by fit"
            )
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
        if isinstance(cause, pickle.UnpicklingError):  # not torch's text: it advises weights_only=False
            detail = "corrupt, or holding objects other than tensors and plain data, which we never unpickle"
        raise CheckpointError(f"cannot read the shards ({detail})", path, "copy it again") from e


def raise_wrapped_interrupt(error: BaseException) -> None:
    """Raise the Ctrl+C (or ``GracefulStop``'s stop at once) that ``torch.distributed.checkpoint`` caught on a rank
    and wrapped into its ``CheckpointException``: an interrupted load or save, not a bad checkpoint."""
    failures = error.failures.values() if isinstance(error, CheckpointException) else ()
    for cause, _ in failures:
        if isinstance(cause, KeyboardInterrupt):
            raise cause from error


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
    (:data:`~epas_lightning.safe_load.SAVE_ID`; one read of about a kilobyte per shard file). Without save ids,
    nothing is checked."""
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
        except CheckpointError:  # other bytes there: a shard of a save with another layout, or damaged bytes
            raise CheckpointError(
                f"{info.relative_path} is corrupt or of another save: it holds no save record where this .metadata "
                "places it",
                where,
                fix,
            ) from None
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
        wanted = get_optimizer_state_dict(module, optimizer)
        stored = {f"{key}.state.{name}.": name for name in wanted["state"]}
        saved = {stored[prefix] for prefix in stored if any(k.startswith(prefix) for k in metadata.state_dict_metadata)}
        wanted["state"] = {name: value for name, value in wanted["state"].items() if name in saved}
        optimizer_state = {key: wanted}
        load_shards(optimizer_state, path)
        options = StateDictOptions(cpu_offload=True, strict=False)  # the parameters without a saved state: below
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key], options=options)
        _forget_unsaved_states(optimizer, _param_names(wanted), saved)
    return meta or {}


def load_full_optimizer_states(
    module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], states: list[dict[str, Any]]
) -> None:
    """Load the optimizer states of a single-file checkpoint into the optimizers of the sharded ``module``.

    A one-device or DDP optimizer numbers its parameters in the optimizer's own order (``param_groups``: matrices, then
    norm gains), which Lightning took for the module's order: FSDP2's resume failed on the first size mismatch. The
    numbers are replaced here by the names of the parameters at those places (FSDP2's own single files name them).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)  # see below
    for optimizer, state in zip(optimizers, states, strict=False):  # fewer states: Lightning says it holds none
        names = _param_names(get_optimizer_state_dict(module, optimizer))
        state = _keyed_by_name(state, names)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)
        _forget_unsaved_states(optimizer, names, set(state["state"]))


def _param_names(state: dict[str, Any]) -> list[str]:
    """The parameter names of a ``get_optimizer_state_dict``, in the order of the optimizer's ``param_groups``."""
    return [name for group in state["param_groups"] for name in group["params"]]


def _forget_unsaved_states(optimizer: torch.optim.Optimizer, names: list[str], saved: set[str]) -> None:
    """Leave no state to the parameters of ``optimizer`` (named ``names``, in order) whose state the checkpoint lacks.

    They had none when it was saved: they never had a gradient, like the q/k of layers sharing from the first step.
    torch's loader gives every parameter a zero state at step 1 first (and refuses, unless not strict, a checkpoint
    without one), which would shrink their first update should they compute again.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params, strict=True):
        if name not in saved:
            optimizer.state.pop(param, None)


def _keyed_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``state`` with the parameter numbers of its ``param_groups`` (in order) replaced by ``names``."""
    numbers = [i for group in state["param_groups"] for i in group["params"]]
    if all(isinstance(i, str) for i in numbers):
        return state
    name_of = dict(zip(numbers, names, strict=True))
    return {
        **state,
        "state": {name_of[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]} for group in state["param_groups"]],
    }
