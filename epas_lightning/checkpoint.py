"""Consolidate a training checkpoint into ``model.safetensors`` + ``config.json``, and load the result.

``python -m epas_lightning consolidate <checkpoint> --output <dir>`` accepts the directory that FSDP2 writes (one
shard per rank, torch distributed checkpoint) or a single-file ``.ckpt``. ``config.json`` records the model config
(``LlamaConfig.to_dict()``) and the sharing state, so :func:`load_consolidated` rebuilds the trained model.

Nothing is unpickled freely: ``meta.pt`` / ``.ckpt`` files load with ``weights_only=True``, and the distributed
checkpoint's metadata (a pickle by design) is read by an unpickler that only admits the classes it consists of.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from epas_lightning.model import Llama, LlamaConfig

MODEL_PREFIX = "model."
"""``EPASModule`` keeps the ``Llama`` as ``self.model``."""
_DCP_METADATA_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
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
        raise pickle.UnpicklingError(f"Refusing to load {module}.{name} from checkpoint metadata.")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :class:`_MetadataUnpickler` (tensors load ``weights_only``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold distributed-checkpoint metadata.")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``Llama`` state dict (keys without ``model.``) and the Lightning metadata of a checkpoint file or dir."""
    path = Path(path)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.pop("state_dict")
        return _strip_prefix(state), checkpoint
    reader = SafeFileSystemReader(path)
    wanted = "state_dict." + MODEL_PREFIX
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(wanted) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path} holds no model weights (expected keys starting with {wanted!r}).")
    dcp_load(state, storage_reader=reader, no_dist=True)
    metadata = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    return _strip_prefix(state, wanted), metadata


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: t for key, t in state.items() if key.startswith(prefix)}


def consolidate(checkpoint: str | Path, output: str | Path) -> Path:
    """Write ``output/model.safetensors`` and ``output/config.json`` from a training checkpoint; return ``output``.

    The tokenizer the run trained with (recorded in the checkpoint) is copied beside them when it still exists.
    """
    state, metadata = read_checkpoint(checkpoint)
    if "model_config" not in metadata:
        raise ValueError(f"{checkpoint} has no 'model_config': it was not written by EPASModule.")
    config = LlamaConfig.from_dict(metadata["model_config"])
    mask = state.get("sharing.mask")
    shared_layers = [i for i, shares in enumerate(mask.tolist()) if shares] if mask is not None else []
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # clones: safetensors refuses tensors that share memory (tied embeddings)
    save_file({key: t.contiguous().clone() for key, t in state.items()}, output / "model.safetensors")
    record: dict[str, Any] = {
        "model": config.to_dict(),
        "sharing": {"shared_layers": shared_layers, "mode": config.sharing_mode},
        "global_step": metadata.get("global_step"),
    }
    tokenizer = metadata.get("tokenizer")
    if tokenizer and Path(tokenizer["path"]).is_file():
        source = Path(tokenizer["path"])
        shutil.copyfile(source, output / source.name)
        record["tokenizer"] = {**tokenizer, "path": source.name, "data_dir": _data_dir_of(source)}
    (output / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    return output


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The ``Llama`` saved by :func:`consolidate`, with its trained sharing region switched on."""
    return load_model(path, device).model


def _data_dir_of(tokenizer_path: Path) -> str | None:
    """The complete prepared data directory a tokenizer file lives in (``prepare`` writes it there), if any."""
    from epas_lightning.data.datamodule import missing_entries

    return None if missing_entries(tokenizer_path.parent) else str(tokenizer_path.parent)


@dataclass
class LoadedModel:
    """A trained model with what inference, export and evaluation need to know about it.

    Attributes:
        model: The ``Llama`` in eval mode, its trained sharing region switched on.
        trained_shared_layers: The layers that shared when the checkpoint was written: the largest region the
            weights were trained for. Any region of the deepest ``0..len(trained_shared_layers)`` layers is valid.
        tokenizer_path: The tokenizer file the run trained with, or ``None`` when the checkpoint did not record it
            (or it no longer exists).
        bos_id, eos_id: Its BOS/EOS ids, when recorded.
        data_dir: The prepared data directory the run trained on, when known (its ``val`` split gives held-out
            tokens).
        global_step: The optimizer step the checkpoint was written at, when known.
    """

    model: Llama
    trained_shared_layers: list[int] = field(default_factory=list)
    tokenizer_path: Path | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    global_step: int | None = None
    data_dir: Path | None = None

    @property
    def max_shared(self) -> int:
        return len(self.trained_shared_layers)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model from a ``.ckpt`` file, an FSDP2 checkpoint directory or a :func:`consolidate` directory.

    Tensors load with ``weights_only=True`` (or from safetensors); a file that is not a checkpoint of ours gets an
    error that says what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        record = json.loads((path / "config.json").read_text())
        if "model" not in record:
            raise ValueError(f"{path / 'config.json'} was not written by `consolidate` (no 'model' entry).")
        config = LlamaConfig.from_dict(record["model"])
        state = load_file(path / "model.safetensors", device="cpu")
        tokenizer = record.get("tokenizer") or {}
        data_dir = tokenizer.get("data_dir")
        if tokenizer.get("path"):
            tokenizer = {**tokenizer, "path": str(path / tokenizer["path"])}
        global_step = record.get("global_step")
    else:
        try:
            state, metadata = read_checkpoint(path)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
            raise ValueError(f"{path} is not a readable EPAS checkpoint (a .ckpt file or checkpoint dir): {e}") from e
        if "model_config" not in metadata:
            raise ValueError(f"{path} has no 'model_config': it was not written by EPASModule.")
        config = LlamaConfig.from_dict(metadata["model_config"])
        tokenizer = metadata.get("tokenizer") or {}
        global_step = metadata.get("global_step")
        data_dir = _data_dir_of(Path(tokenizer["path"])) if tokenizer.get("path") else None
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    state = {key: t.to(device) for key, t in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"The weights in {path} do not fit the model config it records: {e}") from e
    trained = model.sharing.shared_layers
    tokenizer_path = Path(tokenizer["path"]) if tokenizer.get("path") else None
    if tokenizer_path is not None and not tokenizer_path.is_file():
        tokenizer_path = None
    return LoadedModel(
        model=model.eval(),
        trained_shared_layers=trained,
        tokenizer_path=tokenizer_path,
        bos_id=tokenizer.get("bos_id"),
        eos_id=tokenizer.get("eos_id"),
        global_step=global_step,
        data_dir=Path(data_dir) if data_dir and Path(data_dir).is_dir() else None,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epas_lightning consolidate",
        description="Turn a (sharded) training checkpoint into model.safetensors + config.json.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (FSDP2) or .ckpt file")
    parser.add_argument("--output", "-o", type=Path, required=True, help="directory to write")
    args = parser.parse_args(argv)
    output = consolidate(args.checkpoint, args.output)
    print(f"wrote {output / 'model.safetensors'} and {output / 'config.json'}")
    return 0
