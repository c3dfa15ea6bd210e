"""Training checkpoints in, models out: ``load_model`` for every consumer, and ``consolidate``.

``load_model`` reads the forms a trained model comes in: a single-file ``.ckpt``, the directory FSDP2 training
writes (one shard per rank, torch distributed checkpoint), and a ``consolidate`` directory (``model.safetensors`` +
``config.json``); and a Hugging Face LLaMA folder, such as the dense model a continual run starts from. It returns the
model with what every consumer needs to know: the trained sharing region in growth order, the tokenizer and the data
the run trained on. Nothing is unpickled freely (see :mod:`epas_lightning.safe_load`).

``python -m epas_lightning consolidate --checkpoint <ckpt> --output <dir>`` turns either training form into the
consolidated one, built beside the target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from epas_lightning.data.tokenizer import (
    RecordedTokenizer,
    TokenizerError,
    file_sha256,
    load_tokenizer,
    resolve_tokenizer_path,
)
from epas_lightning.errors import CheckpointError, ConfigError, os_reason
from epas_lightning.hf.convert import (
    HFCheckpointError,
    config_from_hf,
    hf_named,
    hf_tensors,
    hf_to_ours,
    is_hf_dir,
    located,
    read_hf_config,
    read_hf_weights,
    safetensors_meta,
    saveable,
)
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.outputs import check_output, output_folder
from epas_lightning.provenance import (
    TRAINING_KEY,
    callback_states,
    carried,
    checked,
    from_consolidated,
    from_export_metadata,
    training_record,
)
from epas_lightning.region import REGION_KEY, TrainedRegion
from epas_lightning.runtime import DTYPES, dtype_name, dtype_overflow, emit_json, resolve_device, resolve_dtype
from epas_lightning.safe_load import (
    DCP_METADATA,
    LIGHTNING_METADATA,
    check_readable,
    is_sharded_checkpoint,
    load_torch_file,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from epas_lightning.data.token_data import HeldOut

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
"""``EPASModule`` keeps the ``Llama`` as ``self.model``."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARING_MASK = "sharing.mask"
"""The one tensor a description reads (with the metadata, it gives the trained region)."""
STORED = "stored"
"""The ``dtype`` of :func:`load_model` that keeps the floating-point dtype the checkpoint stores its weights in."""
CHECK_ELEMENTS = 1 << 22
"""Elements checked for NaN and inf at once (:func:`is_finite_tensor`)."""
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
        checkpoint = load_torch_file(path, mmap=True, where=f"{flag} {path}")  # the weights: read where used
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


def _model_config(metadata: dict[str, Any], path: Path, where: object) -> LlamaConfig:
    """The model config the checkpoint at ``path`` records; its errors name ``where`` (the flag that gave ``path``)."""
    if "model_config" not in metadata and path.is_dir() and not (path / LIGHTNING_METADATA).is_file():
        raise CheckpointError(
            f"no {LIGHTNING_METADATA} beside the shards (fit keeps the model config there)",
            where,
            "copy the whole checkpoint folder again, or pass a checkpoint of fit",
        )
    if "model_config" not in metadata:
        raise CheckpointError("no 'model_config': it was not written by EPASModule", where, "pass a checkpoint of fit")
    if not isinstance(recorded := metadata["model_config"], dict):
        raise CheckpointError(f"its model config is invalid (not a mapping: {recorded!r})", where, AS_WRITTEN)
    try:
        return LlamaConfig.from_dict(recorded)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"its model config is invalid ({e})", where, AS_WRITTEN) from e


def recorded_region(metadata: dict[str, Any], shared: list[int], n_layer: int) -> TrainedRegion:
    """The trained region a checkpoint records; for older checkpoints, derived from the mask (and the schedule)."""
    if REGION_KEY in metadata:
        region = TrainedRegion.from_record(metadata[REGION_KEY], n_layer)
        if sorted(region.layers) == sorted(shared):
            return region
    order = None
    for key, state in callback_states(metadata).items():
        if str(key).startswith("ProgressiveSharing") and isinstance(state, dict):
            order = state.get("order", "deep_first")
    return TrainedRegion.from_shared(shared, n_layer, order)


@dataclass
class CheckpointInfo:
    """What a checkpoint records besides its weights, read by :func:`describe_checkpoint` (see :class:`LoadedModel`)."""

    config: LlamaConfig
    region: TrainedRegion
    tokenizer_path: Path | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    global_step: int | None = None
    data_dir: Path | None = None
    gone_tokenizer: Path | None = None
    gone_data: Path | None = None
    changed_tokenizer: Path | None = None
    tokenizer_sha256: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from (:func:`~epas_lightning.provenance.training_record`): step, epoch, tokens, latest
    validation loss, the training checkpoint's name."""
    mixed_data: list[Path] = field(default_factory=list)
    """The data folders of a training checkpoint's run that mixed several (as its data module saved them, in order);
    empty for a run of one. ``data_dir`` is the first: the one whose tokenizer the run recorded."""
    heldout: HeldOut | None = None
    """The held-out data the run validated on (its ``data.val_dir``, or the ``val`` splits of its data folders), as
    recorded, there or not; ``None`` where not recorded (older checkpoints, other tools' folders)."""
    exported_sharing: int | None = None
    """The region length an ``export`` chose for its folder (``--sharing-layers``: its ``epas_shared_layers``, the
    first layers of ``region``), which transformers runs it with; ``None``: no export chose one."""

    @property
    def default_sharing(self) -> int:
        """The region length the commands run without ``--sharing-layers``: the one an export chose, else the whole
        trained region."""
        return self.region.size if self.exported_sharing is None else self.exported_sharing

    def own_heldout(self) -> HeldOut | Path | None:
        """The held-out data the commands read without ``--data``: what the run validated on where recorded, else the
        ``val`` split of ``data_dir``; ``None`` when neither is there (:meth:`no_data` says why)."""
        if self.heldout is None:
            return self.data_dir
        return None if self.gone_data is not None or self.changed_tokenizer is not None else self.heldout

    def no_data(self) -> str:
        """Why :meth:`own_heldout` is ``None``, for the error or note that asks for ``--data``: the run recorded
        none, or what it recorded is gone or was prepared again (named)."""
        if self.changed_tokenizer is not None:
            return (
                "the data the checkpoint trained on was prepared again since (its tokenizer "
                f"{self.changed_tokenizer} changed)"
            )
        if self.gone_data is not None:
            validated = self.heldout is not None and self.gone_data == self.heldout.val_dir
            whose = f"the data the checkpoint {'validated' if validated else 'trained'} on"
            if self.gone_data.exists():  # a file where the folder was: "gone" sent the user looking for a folder
                return f"{whose} ({self.gone_data}) is a file now, not the folder it was"
            return f"{whose} is gone ({self.gone_data})"
        if self.gone_tokenizer is not None:
            return f"the data the checkpoint trained on is gone (its tokenizer {self.gone_tokenizer} no longer exists)"
        return "the checkpoint does not say which data it trained on"

    def mixed_data_note(self, command: str) -> str | None:
        """For a run that mixed several data folders, the line saying whose val split ``command`` reads without
        ``--data`` where the checkpoint does not record what ``fit`` validated on (older ones): the first folder's,
        not the mixture of them that ``fit`` validates on by default."""
        if self.heldout is not None or len(self.mixed_data) < 2 or self.data_dir is None:
            return None
        others = ", ".join(map(str, self.mixed_data[1:]))
        return (
            f"{command}: held-out data is the val split of {self.data_dir}, the first of the {len(self.mixed_data)} "
            f"data folders the run mixed, not their mixture; pass --data for another ({others})"
        )

    def own_data_instead_of(self, data: str | Path | None) -> bool:
        """Whether a ``--data`` of ``data`` names other data than the checkpoint's own, which leaving it unset reads
        (a refusal of ``data`` then says so)."""
        if data is None or self.data_dir is None:
            return False
        return Path(data).expanduser().resolve() != self.data_dir.expanduser().resolve()

    def no_tokenizer(self) -> str:
        """Why ``tokenizer_path`` is ``None``, for the error that asks for one: the run recorded none, or the file it
        recorded is gone (named)."""
        if self.changed_tokenizer is not None:
            return f"the tokenizer file the checkpoint was trained with changed since ({self.changed_tokenizer})"
        if self.gone_tokenizer is not None:
            return f"the tokenizer the checkpoint was trained with is gone ({self.gone_tokenizer})"
        return "the checkpoint does not name a tokenizer"

    @property
    def recorded_tokenizer(self) -> RecordedTokenizer | None:
        """The tokenizer file the checkpoint names, usable or not, with the hash it recorded: what data must hold the
        ids of (:func:`~epas_lightning.data.token_data.check_tokenized_as`)."""
        path = self.tokenizer_path or self.changed_tokenizer or self.gone_tokenizer
        return None if path is None else RecordedTokenizer(path, self.tokenizer_sha256)

    def tokenizer_file(self, override: str | Path | None = None, flag: str = "--tokenizer") -> Path | None:
        """The tokenizer file a command reads: ``override`` (its ``--tokenizer``) or the one the checkpoint recorded;
        ``None`` when neither (:meth:`no_tokenizer` says why).

        A recorded file that changed since the checkpoint trained (its data folder prepared again) is refused: its
        ids are other tokens than the weights learned. An ``override`` that is not the recorded file (by hash) is
        warned about in one line, unless the recorded file is still there and tokenizes the probe texts alike (one
        vocabulary in two formats: a sentencepiece ``tokenizer.model`` and the ``tokenizer.json`` export writes).
        """
        if override is not None:
            path = resolve_tokenizer_path(override)
            other = self.tokenizer_sha256 and file_sha256(path) != self.tokenizer_sha256
            if other and (difference := self._tokenizes_otherwise(path)) is not None:
                log.warning(
                    f"{flag} {override} is not the tokenizer the checkpoint trained with ({difference}): unless it is "
                    "the same vocabulary, the model's tokens read as other text"
                )
            return path
        if self.changed_tokenizer is not None:
            raise TokenizerError(
                "the tokenizer file changed since the checkpoint trained (its data folder prepared again?): the "
                "model's tokens would read as other text",
                self.changed_tokenizer,
                f"restore it, or pass {flag} with the tokenizer the checkpoint trained with",
            )
        return self.tokenizer_path

    def _tokenizes_otherwise(self, path: Path) -> str | None:
        """How the tokenizer file ``path`` differs from the one the checkpoint trained with, in a few words; ``None``
        when they agree on the probe texts, or where the command refuses ``path`` anyway (it does not load, or its
        ids overrun the model's vocabulary: its own error says why)."""
        from epas_lightning.hf.sentencepiece_json import PROBE_TEXTS

        try:
            theirs = load_tokenizer(path, bos_id=self.bos_id, eos_id=self.eos_id)
        except (TokenizerError, OSError):
            return None
        if theirs.vocab_size > self.config.vocab_size:
            return None
        if self.tokenizer_path is None:  # gone or changed: nothing to compare it with
            return "its hash is not the one the checkpoint recorded"
        ours = load_tokenizer(self.tokenizer_path, bos_id=self.bos_id, eos_id=self.eos_id)
        if theirs.vocab_size != ours.vocab_size:
            return f"{theirs.vocab_size} tokens, not {ours.vocab_size} as {self.tokenizer_path}"
        for text in PROBE_TEXTS:
            if theirs.encode(text) != ours.encode(text):
                return f"{text!r} is other tokens than with {self.tokenizer_path}"
        return None


@dataclass(kw_only=True)
class LoadedModel(CheckpointInfo):
    """A trained model with what inference, export and evaluation need to know about it: the model, and what
    :class:`CheckpointInfo` says of its checkpoint.

    Attributes:
        model: The ``Llama`` in eval mode, its trained sharing region switched on (also for an export that chose
            fewer layers: its mask is the region every save of it records; :attr:`default_sharing` is the choice).
        config: Its ``LlamaConfig``.
        region: The trained region in growth order: ``region.first(n)`` is the region of ``n`` sharing layers.
        tokenizer_path: The tokenizer file the run trained with, or ``None`` when the checkpoint did not record it
            (or it no longer exists).
        bos_id, eos_id: Its BOS/EOS ids, when recorded.
        data_dir: The prepared data directory the run trained on, when known (its ``val`` split gives held-out
            tokens where the checkpoint does not record ``heldout``, the data the run validated on).
        global_step: The optimizer step the checkpoint was written at, when known.
        weights_dtype: The dtype the checkpoint stores its weights in (bfloat16 for a ``bf16-true`` run); the model
            itself is loaded in float32, or in the ``dtype`` given to :func:`load_model`.
    """

    model: Llama
    weights_dtype: torch.dtype = torch.float32

    @property
    def max_shared(self) -> int:
        return self.region.size

    @property
    def trained_shared_layers(self) -> list[int]:
        return sorted(self.region.layers)


def _read_consolidated(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shapes (as :func:`read_checkpoint` without weights: from the safetensors header, and the mask) and a
    checkpoint-like metadata dict of a ``consolidate`` directory."""
    try:
        record = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {CONFIG_FILE} ({e})", path / CONFIG_FILE, "consolidate again") from e
    if not isinstance(record, dict) or "model" not in record:
        raise CheckpointError(
            f"{CONFIG_FILE} was not written by consolidate (no 'model' entry)", path / CONFIG_FILE, AS_WRITTEN
        )
    check_readable(path / WEIGHTS_FILE)
    try:
        with safe_open(path / WEIGHTS_FILE, "pt") as f:  # its header (names, shapes), then the mask
            state = {
                key: f.get_tensor(key) if key == SHARING_MASK else safetensors_meta(f, key)
                for key in f.keys()  # noqa: SIM118 - a safe_open handle is no dict
            }
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt or truncated weights ({e})", path / WEIGHTS_FILE, "consolidate again") from e
    tokenizer = checked_tokenizer(record.get("tokenizer"), path / CONFIG_FILE)
    if tokenizer.get("path"):
        tokenizer["path"] = str(path / Path(tokenizer["path"]).name)
    sharing = record["sharing"] if isinstance(record.get("sharing"), dict) else {}  # else: the region of the mask
    metadata = {
        "model_config": record["model"],
        "tokenizer": tokenizer,
        "global_step": record.get("global_step"),
        "data_dir": tokenizer.get("data_dir"),
    }
    if "region" in sharing:
        metadata[REGION_KEY] = sharing["region"]
    if (training := from_consolidated(record)) is not None:
        metadata[TRAINING_KEY] = training
    return state, metadata


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
    return _shapes_only(state), metadata


HF_SHARED_KEY = "hf_shared_layers"
"""Metadata of a Hugging Face folder: the layers transformers loads it with sharing (its config's
``epas_shared_layers``, as written; none in a stock LLaMA config)."""


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
    try:
        with safe_open(path / WEIGHTS_FILE, "pt") as f:
            return from_export_metadata(f.metadata())
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


def _read_any(path: Path, flag: str = "--checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shapes (:func:`read_checkpoint` without weights) and metadata of a ``.ckpt`` file, an FSDP2 directory, a
    consolidated or an HF LLaMA directory; of the tensors, only the sharing mask is read."""
    if not path.exists():
        raise CheckpointError("checkpoint does not exist", f"{flag} {path}", "check the path")
    kind = checkpoint_kind(path, flag)
    if kind == "hf":
        return _read_hf(path, flag)
    if kind == "consolidated":
        return _read_consolidated(path)
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
    """Refuse a folder that holds part of a checkpoint (copied without one of its files), saying which is missing:
    it would read as no checkpoint at all."""
    missing = None
    if any(folder.glob("*.distcp")) and not (folder / DCP_METADATA).is_file():
        missing = f"FSDP2 shards without their {DCP_METADATA} (a hidden file, which `cp folder/*` leaves out)"
    elif (folder / WEIGHTS_FILE).is_file() and not (folder / CONFIG_FILE).is_file():
        missing = f"{WEIGHTS_FILE} without the {CONFIG_FILE} beside it"
    if missing is not None:
        raise CheckpointError(f"an incomplete checkpoint: {missing}", f"{flag} {folder}", "copy the whole folder again")


def checked_tokenizer(record: Any, where: object) -> dict[str, Any]:
    """The tokenizer record of a checkpoint (``{}`` where there is none), refused where it is not as ``fit`` and
    ``consolidate`` write it (a hand-edited ``config.json``): no mapping, or a field of another type."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"its tokenizer record is invalid ({record!r})", where, AS_WRITTEN)
    for key, kind in TOKENIZER_FIELDS.items():
        if not isinstance(record.get(key), kind | None):
            raise CheckpointError(f"its tokenizer record is invalid ({key}: {record[key]!r})", where, AS_WRITTEN)
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


def _fitted_model(
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    where: object,
) -> Llama:
    """The model of ``config`` on ``device``, its floating-point weights in ``dtype`` if given, checked against the
    names and shapes of ``state`` (strictly), with the sharing mask of ``state`` loaded. Its weights are allocated but
    not read (:func:`_load_weights` fills them); on the meta device only the mask is real. The errors name ``where``
    (the flag that gave ``path``)."""
    with torch.device("meta"):
        model = Llama(config)
    if device.type == "meta":
        model.sharing.to_empty(device="cpu")  # the shapes are checked, the mask is read
    else:
        if dtype is not None:
            model.to(dtype)  # still on the meta device (nothing allocated); the sharing mask stays bool
        model.to_empty(device=device)
        model.tie_weights()
    fix = f"{AS_WRITTEN} (weights and config from the same run)"
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch and checkpoint_kind(path) == "hf":
        raise hf_misfit(model.state_dict(), state, where)
    if mismatch:
        raise CheckpointError(f"the weights do not fit the model config it records ({mismatch})", where, fix)
    try:
        model.sharing.load_state_dict({"mask": state[SHARING_MASK]})
    except (RuntimeError, ValueError) as e:  # a corrupt sharing mask
        raise CheckpointError(f"the weights do not fit the model config it records ({e})", where, fix) from e
    return model


@torch.no_grad()
def _load_weights(
    model: Llama, path: Path, shapes: dict[str, torch.Tensor], dtype: torch.dtype | None, flag: str
) -> None:
    """Copy the weights stored at ``path`` into ``model``'s, as few at a time as its format allows (a mapped file, one
    tensor, a batch of shards): the host never holds the checkpoint's state beside the model, nor a wider copy of it.
    Weights past the range of ``dtype`` are refused, all of them named; so is a weight that the ``shapes`` name but
    that was not read (the file changed since), which would be left uninitialised."""
    targets, over, unread = model.state_dict(), [], set(shapes) - {SHARING_MASK}
    for key, t in stored_weights(path, shapes, model.config, flag):
        if key in unread:
            if dtype is not None:
                over += past_range({key: t}, dtype)
            targets[key].copy_(t)
            unread.discard(key)
    if model.config.tie_embeddings and "embed_tokens.weight" not in unread:
        unread.discard("lm_head.weight")  # the same tensor (an HF folder stores it once)
    if over:
        raise dtype_overflow(f"the weights do not fit {dtype_name(dtype)} ({listed(over)})", dtype)
    if unread:
        raise CheckpointError(
            f"weights named in its header were not found ({listed(sorted(unread))})", f"{flag} {path}", "copy it again"
        )


def stored_weights(
    path: Path, shapes: dict[str, torch.Tensor], config: LlamaConfig, flag: str = "--checkpoint"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``Llama`` weights stored at ``path`` (a checkpoint :func:`_read_any` read the ``shapes`` of), by our names:
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
            raise CheckpointError(
                f"corrupt or truncated weights ({e})", path / WEIGHTS_FILE, "consolidate again"
            ) from e
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


def check_finite(state: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse weights holding NaN or inf (meta tensors are not checked): nothing should run, export or train them."""
    refuse_not_finite(not_finite(state), where)


def not_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors of ``state`` holding NaN or inf (meta tensors are not checked)."""
    return [
        key for key, t in state.items() if t.is_floating_point() and t.device.type != "meta" and not is_finite_tensor(t)
    ]


NOT_FINITE_FIX = (
    "use another checkpoint, e.g. an earlier one of the run (fit's divergence guard never writes such weights)"
)


def refuse_not_finite(bad: list[str], where: object) -> None:
    """Refuse the weights named ``bad`` (:func:`not_finite`), if any."""
    if bad:
        raise CheckpointError(f"the weights hold NaN or inf ({listed(bad)})", where, NOT_FINITE_FIX)


def is_finite_tensor(t: torch.Tensor) -> bool:
    """Whether the floating-point tensor ``t`` holds no NaN or inf, checked :data:`CHECK_ELEMENTS` at a time: the
    check's temporaries (``isfinite`` takes the absolute value, then compares) stay small beside a large tensor."""
    chunks = t.reshape(-1).split(CHECK_ELEMENTS)
    return bool(torch.stack([torch.isfinite(chunk).all() for chunk in chunks]).all()) if chunks else True


def past_range(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """The tensors of ``state`` that a cast to ``dtype`` would turn into inf, each with its largest magnitude. Tensors
    of a dtype no wider than ``dtype`` are skipped; the others are reduced once each, without a copy."""
    over = []
    for key, t in state.items():
        if not t.is_floating_point() or t.device.type == "meta" or torch.finfo(t.dtype).max <= torch.finfo(dtype).max:
            continue
        low, high = torch.aminmax(t)
        peak = torch.maximum(-low, high)
        if bool(torch.isinf(peak.to(dtype))):  # the largest magnitude rounds past the range, as the cast would round
            over.append(f"{key} max |value| {float(peak):.3g}")
    return over


def state_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], shown: int = 3, by: str = "the model has"
) -> str:
    """What keeps ``given`` from loading into a model whose state is ``expected`` ("" when it fits): each kind of
    problem with its count and first few names, so that a large model's 300 missing keys stay one readable line.
    ``by`` says whose the expected shapes are."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [
        f"{key} {list(given[key].shape)} where {by} {list(expected[key].shape)}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    kinds = (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
    return "; ".join(f"{kind}: {listed(names, shown)}" for kind, names in kinds if names)


def hf_misfit(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], where: object
) -> HFCheckpointError:
    """The error for an HF folder whose weights (``given``, by our names) are not those of the model its config.json
    describes (``expected``): each tensor named as the folder names it."""
    mismatch = state_mismatch(hf_named(expected), hf_named(given), by="config.json makes")
    return HFCheckpointError(
        f"its config.json and weights disagree ({mismatch})",
        where,
        "make config.json describe the weights beside it (or copy the model folder again: both files from one model)",
    )


def listed(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many there are in all when more."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _info(metadata: dict[str, Any], model: Llama, where: object = None) -> CheckpointInfo:
    from epas_lightning.data.token_data import HeldOut

    config = model.config
    try:
        region = recorded_region(metadata, model.sharing.shared_layers, config.n_layer)
    except ConfigError as e:  # a hand-edited record
        raise CheckpointError(
            f"its recorded sharing region is invalid ({e.what.rstrip('.')})", where, AS_WRITTEN
        ) from e
    tokenizer = metadata.get("tokenizer") or {}
    tokenizer_path = Path(tokenizer["path"]) if tokenizer.get("path") else None
    sha256 = tokenizer.get("sha256")
    gone = tokenizer_path if tokenizer_path is not None and not tokenizer_path.is_file() else None
    changed = None  # the file is there, but not the one the run read (its data folder prepared again)
    if tokenizer_path is not None and gone is None and sha256 and file_sha256(tokenizer_path) != sha256:
        changed = tokenizer_path
    if gone is not None or changed is not None:
        tokenizer_path = None  # its data folder too was prepared again: data_dir is not derived from it
    data_dir = metadata.get("data_dir") or (_data_dir_of(tokenizer_path) if tokenizer_path else None)
    found = data_dir is not None and Path(data_dir).is_dir()
    training = training_record(metadata)
    heldout = HeldOut.from_record(training["heldout"])
    gone_data = Path(data_dir) if data_dir is not None and not found else None
    return CheckpointInfo(
        config=config,
        region=region,
        tokenizer_path=tokenizer_path,
        bos_id=tokenizer.get("bos_id"),
        eos_id=tokenizer.get("eos_id"),
        global_step=training["global_step"],
        data_dir=Path(data_dir) if found else None,
        gone_tokenizer=gone,
        gone_data=gone_data if heldout is None else heldout.missing(),  # a val_dir may do without the data folders
        changed_tokenizer=changed,
        tokenizer_sha256=sha256,
        training=training,
        mixed_data=_mixed_data(metadata),
        heldout=heldout,
        exported_sharing=exported_length(metadata.get(HF_SHARED_KEY), region),
    )


def exported_length(shared: Any, region: TrainedRegion) -> int | None:
    """How many sharing layers an export chose (``shared``: its ``epas_shared_layers``), where they are the first ones
    of its trained ``region``; ``None`` for a folder without them, and for a choice past the region (``--force``) or
    out of its order (hand-edited), which transformers runs as written and our commands only when asked."""
    if not isinstance(shared, list) or not all(type(i) is int for i in shared) or len(shared) > region.size:
        return None
    return len(shared) if sorted(shared) == sorted(region.layers[: len(shared)]) else None


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None, flag: str = "path"
) -> LoadedModel:
    """Load a model from a ``.ckpt`` file, an FSDP2 checkpoint directory, a :func:`consolidate` directory or an HF
    LLaMA folder (dense, or with the region an ``export`` recorded), on ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``: one this machine lacks is a :class:`~epas_lightning.errors.ConfigError`), its floating-point weights in
    ``dtype`` if given (a torch dtype or its name: ``auto``, ``float32``, ``bfloat16``, ``float16``; weights past its
    range are refused; :data:`STORED`: the dtype the checkpoint stores them in), else as stored in the model (fp32).
    The weights are read into the model's as few at a time as the format allows (:func:`stored_weights`).

    Pickles are read only with ``weights_only=True`` or the restricted metadata unpickler; anything that is not a
    checkpoint is a :class:`~epas_lightning.errors.CheckpointError` that says what was expected, at ``flag`` (the
    argument or command-line flag that named ``path``).
    """
    device = resolve_device(device, "device")  # a device this machine lacks: one line, before anything is read
    dtype = _requested_dtype(dtype, device)
    path = checkpoint_path(path, flag)
    shapes, metadata = _read_any(path, flag)  # names, shapes, dtypes and the mask: no weight
    stored = next((t.dtype for t in shapes.values() if t.is_floating_point()), torch.float32)
    dtype = stored if dtype == STORED else dtype
    where = f"{flag} {path}"
    model = _fitted_model(_model_config(metadata, path, where), shapes, path, device, dtype, where)
    _load_weights(model, path, shapes, dtype, flag)
    check_finite(model.state_dict(), where)  # on the device: fast there
    info = _info(metadata, model, where)
    model.trained_region = info.region  # set_region(model, n) counts n in it, as with the region passed
    return LoadedModel(model=model.eval(), weights_dtype=stored, **vars(info))


def _requested_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str | None:
    """:func:`load_model`'s ``dtype``: ``None``, :data:`STORED`, a name as every ``--dtype`` takes it (``auto`` too)
    or a floating-point torch dtype; anything else is a :class:`ConfigError` naming ``dtype`` (``torch.int64`` failed
    in ``Module.to``, ``"auto"`` was refused by a line that offered it)."""
    if dtype is None or dtype == STORED:
        return dtype
    if isinstance(dtype, str):
        return resolve_dtype(dtype, device)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ConfigError(
        f"dtype must be a floating-point torch dtype or its name, got {dtype!r}",
        "dtype",
        f"use auto or one of {', '.join(DTYPES)}",
    )


def checkpoint_path(path: str | Path, flag: str = "--checkpoint") -> Path:
    """``path`` as a ``Path`` (``~`` expanded); a :class:`CheckpointError` at ``flag`` for what is no path (``None``
    was a TypeError from ``pathlib``)."""
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(
            f"a checkpoint path is a str or Path, not a {type(path).__name__}", flag, "pass the checkpoint's path"
        )
    return Path(path).expanduser()


def describe_checkpoint(path: str | Path, flag: str = "--checkpoint") -> CheckpointInfo:
    """What :func:`load_model` would report, without reading the weights: the same safe readers and the same checks
    (every weight's name and shape against the recorded config), but of the tensors only the sharing mask is read.

    A sharded directory's shards are not opened but for the mask's: a missing or short shard file is refused here
    (its size is checked), one corrupt within its length only when the model is loaded.
    """
    return read_description(path, flag)[0]


def read_description(
    path: str | Path, flag: str = "--checkpoint"
) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`describe_checkpoint`, with what it read: the state (empty meta tensors of the weights' shapes and
    dtypes, and the sharing mask) and the checkpoint's metadata (its step, epoch and callbacks' state, where kept)."""
    path = checkpoint_path(path, flag)
    state, metadata = _read_any(path, flag)
    where = f"{flag} {path}"
    model = _fitted_model(_model_config(metadata, path, where), state, path, torch.device("meta"), None, where)
    return _info(metadata, model, where), state, metadata


def recorded_config(path: str | Path, flag: str = "--checkpoint") -> LlamaConfig:
    """The model config a checkpoint records, read without loading its weights (checked to load safely)."""
    path = checkpoint_path(path, flag)
    return _model_config(_read_any(path, flag)[1], path, f"{flag} {path}")


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The ``Llama`` saved by :func:`consolidate`, with its trained sharing region switched on."""
    return load_model(path, device).model


def _mixed_data(metadata: dict[str, Any]) -> list[Path]:
    """The data folders a training checkpoint's run mixed: its data module saves the train streams its position holds
    for (``<folder>/train``, in order). Empty for a run of one folder, or a checkpoint that does not say."""
    for value in metadata.values():
        settings = value.get("position_settings") if isinstance(value, dict) else None
        streams = settings.get("streams") if isinstance(settings, dict) else None
        if isinstance(streams, list) and len(streams) > 1 and all(isinstance(s, str) for s in streams):
            return [Path(stream).parent for stream in streams]
    return []


def _data_dir_of(tokenizer_path: Path) -> str | None:
    """The complete prepared data directory a tokenizer file lives in (``prepare`` writes it there), if any."""
    from epas_lightning.data.layout import missing_entries

    return None if missing_entries(tokenizer_path.parent) else str(tokenizer_path.parent)


def consolidate(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``output/model.safetensors`` and ``output/config.json`` from a training checkpoint; return ``output``.

    The weights keep the dtype the checkpoint stores them in; ``config.json`` records their provenance
    (:mod:`epas_lightning.provenance`). The tokenizer the run trained with (recorded in the
    checkpoint) is copied beside them when it still exists, is the file it trained with (its recorded hash) and
    parses as a tokenizer; only the tokenizer file itself is copied, under its standard name, with the chat template
    and the end tokens found beside it, and its hash is recorded. Otherwise a warning says so, and the recorded hash is
    kept (a ``--tokenizer`` given for the folder is compared with it).
    """
    from epas_lightning.data.tokenizer import copy_tokenizer

    checkpoint = Path(checkpoint).expanduser()
    check_output(output, "consolidated", overwrite, [checkpoint])
    loaded = load_model(checkpoint, dtype=STORED, flag="--checkpoint")  # no wider copy of the weights
    state = loaded.model.state_dict()
    training = carried(loaded.training, checkpoint)
    record: dict[str, Any] = {
        "model": loaded.model.config.to_dict(),
        "sharing": {
            "shared_layers": loaded.trained_shared_layers,
            "mode": loaded.model.config.sharing_mode,
            "region": loaded.region.to_record(),
        },
        "global_step": training.pop("global_step"),
        TRAINING_KEY: training,  # epoch, tokens, val_loss, source
    }
    with output_folder(output, "consolidated", overwrite, inputs=[checkpoint]) as build:
        save_file(saveable(state), build / WEIGHTS_FILE)
        if loaded.tokenizer_path is None:
            log.warning(f"{loaded.no_tokenizer().capitalize()}: consolidated weights and config only")
            if sha256 := loaded.tokenizer_sha256:  # what a --tokenizer given for the folder is compared with
                record["tokenizer"] = {"sha256": sha256, "bos_id": loaded.bos_id, "eos_id": loaded.eos_id}
        else:
            try:
                tokenizer = load_tokenizer(loaded.tokenizer_path, bos_id=loaded.bos_id, eos_id=loaded.eos_id)
            except (TokenizerError, OSError):
                tokenizer = None  # not a tokenizer after all: copy nothing
                log.warning(
                    f"The tokenizer the checkpoint names ({loaded.tokenizer_path}) is not a tokenizer: consolidated "
                    "weights and config only"
                )
            if tokenizer is not None:
                name = copy_tokenizer(tokenizer, build)
                record["tokenizer"] = {
                    "path": name,
                    "bos_id": tokenizer.bos_id,  # the checkpoint's, when it recorded them
                    "eos_id": tokenizer.eos_id,
                    "data_dir": str(loaded.data_dir) if loaded.data_dir else None,
                    "sha256": tokenizer.sha256,  # the copy's: a folder whose tokenizer is replaced is refused too
                }
        (build / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(output).expanduser().absolute()


def consolidated_summary(folder: Path) -> dict[str, Any]:
    """What a consolidated folder holds, for ``--json``: its files, trained region, step, tokenizer file and where the
    weights came from (:mod:`~epas_lightning.provenance`)."""
    record = json.loads((folder / CONFIG_FILE).read_text())
    return {
        "output": str(folder),
        "weights": str(folder / WEIGHTS_FILE),
        "trained_region": record["sharing"]["region"],
        "global_step": record["global_step"],
        "tokenizer": (record.get("tokenizer") or {}).get("path"),
        "training": checked(from_consolidated(record)),  # the folder was just written: it has the record
    }


def consolidate_command(checkpoint: Path, output: Path, overwrite: bool = False, json: bool = False) -> None:
    """Turn a training checkpoint (.ckpt file or FSDP2 folder) into model.safetensors + config.json.

    The folder is built beside the target and renamed into place when complete; it records the model config, the
    trained sharing region in growth order, the tokenizer (copied when it still exists) and where the weights came
    from: the step, epoch, tokens trained and latest validation loss of the training checkpoint, and its name.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        output: The folder to write.
        overwrite: Replace --output if it is a consolidated folder written by this command.
        json: End with one JSON line of what was written.
    """
    out = consolidate(checkpoint, output, overwrite)
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE}")
    emit_json(consolidated_summary(out), json)
