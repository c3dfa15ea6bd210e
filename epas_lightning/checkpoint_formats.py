"""The forms a trained model's checkpoint comes in, read safely: which form a path is, its weights' names and shapes
with its metadata (of the tensors only the sharing mask is read), and its weights a few at a time.

The forms: a single-file Lightning ``.ckpt``, the folder FSDP2 training writes (one shard per rank, torch distributed
checkpoint), a ``consolidate`` folder (``model.safetensors`` + ``config.json``) and a Hugging Face LLaMA folder.
Nothing is unpickled freely (see :mod:`epas_lightning.safe_load`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from epas_lightning.errors import CheckpointError, ConfigError, listed, os_reason
from epas_lightning.hf.convert import (
    config_from_hf,
    hf_tensors,
    hf_to_ours,
    is_hf_dir,
    located,
    read_hf_config,
    read_hf_weights,
    safetensors_meta,
)
from epas_lightning.model import LlamaConfig
from epas_lightning.provenance import MOVED_KEY, TRAINING_KEY, from_consolidated, from_export_metadata, local_path
from epas_lightning.region import REGION_KEY, TrainedRegion
from epas_lightning.safe_load import (
    DCP_METADATA,
    LIGHTNING_METADATA,
    check_readable,
    is_sharded_checkpoint,
    load_torch_file,
    verify_checkpoint,
)

MODEL_PREFIX = "model."
"""``EPASModule`` keeps the ``Llama`` as ``self.model``."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARING_MASK = "sharing.mask"
"""The one tensor a description reads (with the metadata, it gives the trained region)."""
SHARD_READ_BYTES = 1 << 28
"""Bytes of weights read from a sharded checkpoint at once."""
TOKENIZER_FIELDS = {"path": str, "bos_id": int, "eos_id": int, "sha256": str, "data_dir": str}
"""The fields of the tokenizer record a checkpoint keeps (``fit``'s, ``consolidate``'s), each of its type or null."""
AS_WRITTEN = "pass the checkpoint as fit or consolidate wrote it"


def read_checkpoint(
    path: str | Path, weights: bool = True, flag: str = "--checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``Llama`` state dict (keys without ``model.``) and the Lightning metadata of a checkpoint file or dir.

    A file is mapped into memory (``mmap``): its tensors are read where they are used (an optimizer's state never).
    Without ``weights``, every tensor but the sharing mask is an empty meta tensor of its shape, and a dir's shards
    are not opened but for the mask.
    """
    path = Path(path).expanduser()
    if path.is_file():  # one weights_only load: refusing an unsafe file needs no separate check
        checkpoint = load_torch_file(path, mmap=True, where=f"{flag} {path}", keep=not weights)  # weights: where used
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(
                "not a Lightning checkpoint (no state_dict)", f"{flag} {path}", "pass a checkpoint written by fit"
            )
        state = _strip_prefix(checkpoint.pop("state_dict"))
        return (state if weights else _shapes_only(state)), checkpoint
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from epas_lightning.safe_dcp import SafeFileSystemReader

    path = verify_checkpoint(path, flag)  # exists, and its metadata reads safely
    reader = SafeFileSystemReader(path)
    wanted, mask = "state_dict." + MODEL_PREFIX, "state_dict." + MODEL_PREFIX + SHARING_MASK
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype, device=None if weights or key == mask else "meta")
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(wanted) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"no model weights (no keys starting with {wanted!r})", path / DCP_METADATA, AS_WRITTEN)
    read_shards({key: t for key, t in state.items() if weights or key == mask}, path)
    metadata = load_torch_file(path / LIGHTNING_METADATA) if (path / LIGHTNING_METADATA).is_file() else {}
    return _strip_prefix(state, wanted), metadata


def read_lightning_metadata(path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any] | None:
    """The Lightning metadata of a ``.ckpt`` file or a sharded folder (its loops, callbacks' and data module's states,
    its optimizers' ``param_groups``), without a weight: a file's entries but its ``state_dict``, mapped (its optimizer
    state is not read; a legacy file, which cannot be, is read whole once and kept for the next look, until the
    restore's full load frees it first: :class:`~epas_lightning.safe_load.LegacyReads`); a folder's ``meta.pt``, with
    the settings its shards' metadata names (:func:`sharded_optimizer_states`). ``None`` where it has none (a folder
    without ``meta.pt``, a file that is no dict). What a resumed fit refuses before Lightning loads it is read here."""
    path = Path(path).expanduser()
    if path.is_dir():
        meta = path / LIGHTNING_METADATA
        loaded = load_torch_file(meta, where=f"{flag} {path}") if meta.is_file() else None
        if isinstance(loaded, dict) and (path / DCP_METADATA).is_file():
            loaded.setdefault("optimizer_states", sharded_optimizer_states(path, flag))
    else:
        loaded = load_torch_file(path, mmap=True, where=f"{flag} {path}", keep=True)
    if not isinstance(loaded, dict):
        return None
    loaded.pop("state_dict", None)
    return loaded


def sharded_optimizer_states(path: Path, flag: str = "--ckpt_path") -> list[dict[str, Any]]:
    """The optimizer states of a sharded checkpoint as far as its metadata names them: each optimizer's
    ``param_groups``, a dict of its setting names (``optimizer_0.param_groups.1.betas``) to ``None`` per group (the
    values lie in the shards, unread)."""
    from epas_lightning.safe_dcp import read_dcp_metadata

    metadata = read_dcp_metadata((path / DCP_METADATA).read_bytes(), f"{flag} {path}")
    groups: dict[int, dict[int, dict[str, None]]] = {}
    for key in metadata.state_dict_metadata:
        parts = key.split(".")
        if len(parts) == 4 and parts[0].startswith("optimizer_") and parts[1] == "param_groups":
            optimizer, group = parts[0].removeprefix("optimizer_"), parts[2]
            if optimizer.isdigit() and group.isdigit():
                groups.setdefault(int(optimizer), {}).setdefault(int(group), {})[parts[3]] = None
    return [
        {"param_groups": [found[g] for g in sorted(found)]}
        for found in (groups.get(i, {}) for i in range(max(groups, default=-1) + 1))
    ]


def read_shards(state: dict[str, torch.Tensor], path: Path) -> None:
    """Fill ``state``'s tensors (keyed as the sharded checkpoint ``path`` names them) from its shards, in-process."""
    from epas_lightning.safe_dcp import load_shards

    with warnings.catch_warnings():  # torch warns that it loads in one process even when told to (no_dist)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load_shards(state, path, no_dist=True)


def _shapes_only(state: dict[str, Any]) -> dict[str, Any]:
    """Empty meta tensors of the weights' shapes (nothing is read), the sharing mask as it is."""
    return {
        key: torch.empty(t.shape, dtype=t.dtype, device="meta")
        if isinstance(t, torch.Tensor) and key != SHARING_MASK
        else t
        for key, t in state.items()
    }


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: t for key, t in state.items() if key.startswith(prefix)}


def _read_consolidated(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shapes (as :func:`read_checkpoint` without weights: from the safetensors header, and the mask) and a
    checkpoint-like metadata dict of a ``consolidate`` directory; its errors name the file and ``flag``."""
    where = f"{flag} {path}"
    try:
        record = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        fix = "consolidate again, or copy the model folder again if it is a Hugging Face one"
        raise CheckpointError(f"unreadable {CONFIG_FILE} ({e})", where, fix) from e
    if not isinstance(record, dict) or "model" not in record:
        raise CheckpointError(f"{CONFIG_FILE} was not written by consolidate (no 'model' entry)", where, AS_WRITTEN)
    check_readable(path / WEIGHTS_FILE)
    try:
        with safe_open(path / WEIGHTS_FILE, "pt") as f:  # its header (names, shapes), then the mask
            state = {
                key: f.get_tensor(key) if key == SHARING_MASK else safetensors_meta(f, key)
                for key in f.keys()  # noqa: SIM118 - a safe_open handle is no dict
            }
    except (SafetensorError, OSError) as e:
        raise corrupt_weights(e, where) from e
    tokenizer = checked_tokenizer(record.get("tokenizer"), where, f"its {CONFIG_FILE}'s")
    if tokenizer.get("path"):
        tokenizer["path"] = str(path / Path(tokenizer["path"]).name)
    sharing = record["sharing"] if isinstance(record.get("sharing"), dict) else {}  # else: the region of the mask
    training = from_consolidated(record, path)
    gone = training is not None and training[MOVED_KEY]  # moved or copied: its relative paths lead elsewhere
    metadata = {
        "model_config": record["model"],
        "tokenizer": tokenizer,
        "global_step": record.get("global_step"),
        "data_dir": local_path(tokenizer["data_dir"], path, gone) if tokenizer.get("data_dir") else None,
    }
    if "region" in sharing:
        metadata[REGION_KEY] = sharing["region"]
    if WEIGHTS_REGION_KEY in sharing:  # a copy of a stock export: read by :func:`weights_region`
        metadata[WEIGHTS_REGION_KEY] = sharing[WEIGHTS_REGION_KEY]
    if EXPORTED_KEY in sharing:  # a copy of an export that chose fewer layers: the commands' default
        metadata[HF_SHARED_KEY] = sharing[EXPORTED_KEY]
    if training is not None:
        metadata[TRAINING_KEY] = training
    return state, metadata


def corrupt_weights(error: Exception, where: str) -> CheckpointError:
    """A consolidated folder's unreadable ``model.safetensors`` (``where``: the flag and the folder)."""
    return CheckpointError(f"corrupt or truncated {WEIGHTS_FILE} ({error})", where, "consolidate again")


def _read_hf(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face LLaMA folder as checkpoint-like shapes and metadata: dense, or the trained region an ``export``
    recorded; its ``tokenizer.json`` / ``tokenizer.model`` and BOS/EOS ids when it has them; no data."""
    from epas_lightning.data.tokenizer import tokenizer_in

    hf = read_hf_config(path)
    with located(f"{flag} {path}", path):
        config = config_from_hf(hf)
        state = hf_to_ours(read_hf_weights(path, weights=False), config)
    region = hf_trained_region(hf, config.n_layer, path / CONFIG_FILE)
    state[SHARING_MASK] = torch.tensor([i in region.layers for i in range(config.n_layer)])
    tokenizer = tokenizer_in(path)
    metadata = {
        "model_config": config.to_dict(),
        "tokenizer": {"path": str(tokenizer) if tokenizer else None, **_special_ids(hf)},
        REGION_KEY: region.to_record(),
        HF_SHARED_KEY: hf.get("epas_shared_layers") or [],  # as written: only inspect shows it
    }
    if (training := export_record(path)) is not None:
        metadata[TRAINING_KEY] = training
    if not region.size and (trained := recorded_weights_region(path, config.n_layer)) is not None:
        metadata[WEIGHTS_REGION_KEY] = trained.to_record()
    return _shapes_only(state), metadata


EXPORT_REGION_KEY = "epas_trained_region"
"""The region a stock export's weights trained sharing, in the metadata of its ``model.safetensors`` (JSON, as
:meth:`TrainedRegion.to_record` writes it): a record only, the stock ``config.json`` runs dense."""
WEIGHTS_REGION_KEY = "weights_trained_region"
"""Metadata of a checkpoint read as dense: the region its weights trained, as a stock export recorded it (a consolidated
folder made from one keeps it in its ``config.json``'s ``sharing``)."""
HF_SHARED_KEY = "hf_shared_layers"
"""Metadata of a Hugging Face folder: the layers transformers loads it with sharing (its config's
``epas_shared_layers``, as written; none in a stock LLaMA config); of a consolidated copy of one, its
:data:`EXPORTED_KEY`."""
EXPORTED_KEY = "exported_shared_layers"
"""A consolidated folder's ``sharing`` entry for a copy of an export that chose fewer layers than its trained region
(``export --sharing-layers``): that choice, which the commands run the copy with by default, as they ran the export."""


def hf_trained_region(hf: dict[str, Any], n_layer: int, where: Path) -> TrainedRegion:
    """The trained region an ``export`` recorded in the HF config ``hf`` (dense where none)."""
    record = {"layers": hf.get("epas_trained_region") or [], "order": hf.get("epas_growth_order", "deep_first")}
    try:
        return TrainedRegion.from_record(record, n_layer)
    except ConfigError as e:  # a hand-edited config.json
        raise CheckpointError(
            f"its recorded sharing region is invalid ({e.what.rstrip('.')})", where, AS_WRITTEN
        ) from e


def export_record(path: Path) -> dict[str, Any] | None:
    """The provenance ``export`` wrote into the metadata of ``path``'s ``model.safetensors`` (its header alone is
    read); ``None`` for a folder without one (another tool's, or an older export's)."""
    return from_export_metadata(_weights_metadata(path), path)


def recorded_weights_region(path: Path, n_layer: int) -> TrainedRegion | None:
    """The region the weights of the stock export ``path`` trained sharing, as it recorded it; ``None`` where none is
    recorded (a dense checkpoint's export, another tool's folder) or the record does not read."""
    try:
        record = json.loads((_weights_metadata(path) or {})[EXPORT_REGION_KEY])
    except (KeyError, ValueError):
        return None
    return weights_region(record, n_layer)


def weights_region(record: Any, n_layer: int) -> TrainedRegion | None:
    """The region a dense checkpoint's weights trained sharing, from its ``record`` (a stock export's, as
    :meth:`TrainedRegion.to_record` writes it); ``None`` where there is none or it does not read."""
    try:
        region = TrainedRegion.from_record(record, n_layer)
    except (TypeError, ValueError):  # ConfigError too: no record, a record of another model
        return None
    return region if region.size else None


def _weights_metadata(path: Path) -> dict[str, str] | None:
    """The string metadata of ``path``'s ``model.safetensors`` (its header alone is read); ``None`` without one."""
    try:
        with safe_open(path / WEIGHTS_FILE, "pt") as f:
            return f.metadata()
    except (SafetensorError, OSError):  # sharded or .bin weights; a corrupt file is refused where its weights are read
        return None


def _special_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    """``bos_id`` and ``eos_id`` from an HF config (the first of a list, as Llama 3 lists its end tokens)."""
    ids = {}
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        value = hf.get(theirs)
        value = value[0] if isinstance(value, list) and value else value
        ids[ours] = value if isinstance(value, int) else None
    return ids


def checkpoint_kind(path: Path, flag: str = "--checkpoint") -> str | None:
    """Which form of checkpoint ``path`` would be read as: ``ckpt`` (a file), ``sharded`` (an FSDP2 folder),
    ``consolidated`` or ``hf``; ``None`` for anything else (a run folder, say). Nothing is read but ``config.json``.
    A folder this user may not read is a :class:`CheckpointError`."""
    try:
        return _checkpoint_kind(path)
    except OSError as e:
        raise CheckpointError(
            f"cannot read the folder: {os_reason(e)} ({e.filename})",
            f"{flag} {path}",
            "make it readable for this user",
        ) from e


def _checkpoint_kind(path: Path) -> str | None:
    if path.is_file():
        return "ckpt"
    if path.is_dir() and is_hf_dir(path):
        return "hf"
    if path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "consolidated"
    return "sharded" if is_sharded_checkpoint(path) else None


def read_any(path: Path, flag: str = "--checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shapes (:func:`read_checkpoint` without weights) and metadata of a ``.ckpt`` file, an FSDP2 directory, a
    consolidated or an HF LLaMA directory; of the tensors, only the sharing mask is read."""
    if not path.exists():
        raise CheckpointError("checkpoint does not exist", f"{flag} {path}", "check the path")
    kind = checkpoint_kind(path, flag)
    if kind == "hf":
        return _read_hf(path, flag)
    if kind == "consolidated":
        return _read_consolidated(path, flag)
    if kind == "ckpt":
        check_not_a_part(path, flag)
    if kind is not None:
        state, metadata = read_checkpoint(path, weights=False, flag=flag)
        metadata["tokenizer"] = checked_tokenizer(metadata.get("tokenizer"), f"{flag} {path}")
        return state, metadata
    if (inside := checkpoints_inside(path)) is None:
        check_complete(path, flag)
    raise CheckpointError(
        "not a checkpoint",
        f"{flag} {path}",
        inside
        or "pass a .ckpt file, an FSDP2 checkpoint directory, a consolidated directory or a Hugging Face LLaMA folder",
    )


FOLDER_KINDS = {"sharded": "an FSDP2 checkpoint", "consolidated": "a consolidated", "hf": "a Hugging Face model"}


def check_not_a_part(file: Path, flag: str = "--checkpoint") -> None:
    """Refuse a file of a checkpoint folder (its ``model.safetensors``, ``config.json``, a ``.distcp`` shard) given for
    the folder: it would be read as a training checkpoint, and called corrupt. A ``.ckpt`` file is read wherever it
    lies."""
    if file.suffix != ".ckpt" and (kind := checkpoint_kind(file.parent, flag)) in FOLDER_KINDS:
        raise CheckpointError(
            f"a file of {FOLDER_KINDS[kind]} folder, not a checkpoint itself",
            f"{flag} {file}",
            f"pass the folder: {flag} {file.parent}",
        )


def check_complete(folder: Path, flag: str = "--checkpoint") -> None:
    """Refuse a folder that holds part of a checkpoint (copied without one of its files), saying which is missing, or
    an HF folder's weights beside a ``config.json`` that does not read: it would read as no checkpoint at all."""
    missing = None
    if any(folder.glob("*.distcp")) and not (folder / DCP_METADATA).is_file():
        missing = f"FSDP2 shards without their {DCP_METADATA} (a hidden file, which `cp folder/*` leaves out)"
    elif (folder / WEIGHTS_FILE).is_file() and not (folder / CONFIG_FILE).is_file():
        missing = f"{WEIGHTS_FILE} without the {CONFIG_FILE} beside it"
    if missing is not None:
        raise CheckpointError(f"an incomplete checkpoint: {missing}", f"{flag} {folder}", "copy the whole folder again")
    hf_weights = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors.index.json")
    if (folder / CONFIG_FILE).is_file() and any((folder / name).is_file() for name in hf_weights):
        try:  # an HF folder whose config.json is damaged: no consolidated folder either (no model.safetensors)
            json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"unreadable {CONFIG_FILE} ({e})", f"{flag} {folder}", "copy the model folder again"
            ) from e


def checked_tokenizer(record: Any, where: object, holder: str = "its") -> dict[str, Any]:
    """The tokenizer record of a checkpoint (``{}`` where there is none), refused where it is not as ``fit`` and
    ``consolidate`` write it (a hand-edited ``config.json``): no mapping, or a field of another type. ``holder``
    names what keeps the record in the message (``its config.json's``)."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"{holder} tokenizer record is invalid ({record!r})", where, AS_WRITTEN)
    for key, kind in TOKENIZER_FIELDS.items():
        if not isinstance(record.get(key), kind | None):
            raise CheckpointError(f"{holder} tokenizer record is invalid ({key}: {record[key]!r})", where, AS_WRITTEN)
    return dict(record)


def checkpoints_inside(folder: Path) -> str | None:
    """The fix for fit's run folder or its ``checkpoints/`` folder: the checkpoints it holds, ``last.ckpt`` first; for
    a folder of runs (the logger's ``runs/<name>``, ``runs/``), its newest ``last.ckpt`` and how to list all."""
    found = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("checkpoints/*.ckpt"))
    found.sort(key=lambda ckpt: ckpt.name != "last.ckpt")
    if found:
        return f"pass one of the checkpoints it holds: {listed([str(ckpt) for ckpt in found])}"
    runs = [*folder.glob("version_*/checkpoints/last.ckpt"), *folder.glob("*/version_*/checkpoints/last.ckpt")]
    if not runs:
        return None
    newest = max(runs, key=lambda ckpt: ckpt.stat().st_mtime)
    return (
        f"pass a checkpoint under it, e.g. the newest last.ckpt {newest} "
        f"(`python -m epas_lightning inspect --checkpoint {folder}` lists them all)"
    )


def stored_weights(
    path: Path, shapes: dict[str, torch.Tensor], config: LlamaConfig, flag: str = "--checkpoint"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``Llama`` weights stored at ``path`` (a checkpoint :func:`read_any` read the ``shapes`` of), by our names:
    a ``.ckpt`` mapped into memory (``weights_only``), safetensors one tensor at a time, a sharded folder in batches
    of about :data:`SHARD_READ_BYTES`; a Hugging Face folder's, one file at a time."""
    kind = checkpoint_kind(path, flag)
    if kind == "ckpt":
        loaded = load_torch_file(path, mmap=True, where=f"{flag} {path}")["state_dict"]
        yield from _strip_prefix(loaded).items()
    elif kind == "sharded":
        yield from shard_tensors(path, shapes)
    elif kind == "consolidated":
        try:
            with safe_open(path / WEIGHTS_FILE, "pt") as f:
                yield from ((key, f.get_tensor(key)) for key in f.keys())  # noqa: SIM118 - no dict
        except (SafetensorError, OSError) as e:
            raise corrupt_weights(e, f"{flag} {path}") from e
    else:
        with located(f"{flag} {path}", path):
            yield from hf_tensors(path, config)


def shard_tensors(path: Path, shapes: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of the sharded checkpoint ``path`` (``shapes``: meta tensors by our names), read about
    :data:`SHARD_READ_BYTES` at a time."""
    prefix = "state_dict." + MODEL_PREFIX
    metas = {prefix + key: meta for key, meta in shapes.items() if key != SHARING_MASK}
    yield from ((name[len(prefix) :], t) for name, t in stored_shards(path, metas))


def stored_shards(path: Path, metas: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the sharded checkpoint ``path`` that ``metas`` (meta tensors, keyed as the checkpoint names them)
    describe, read about :data:`SHARD_READ_BYTES` at a time."""
    batches, batch, size = [], {}, 0
    for key, meta in metas.items():
        batch[key], size = meta, size + meta.numel() * meta.element_size()
        if size >= SHARD_READ_BYTES:
            batches.append(batch)
            batch, size = {}, 0
    for group in filter(None, [*batches, batch]):
        read = {key: torch.empty(meta.shape, dtype=meta.dtype) for key, meta in group.items()}
        read_shards(read, path)
        yield from ((key, read.pop(key)) for key in list(read))
