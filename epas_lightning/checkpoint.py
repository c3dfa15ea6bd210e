"""Training checkpoints in, models out: ``load_model`` for every consumer, and what a checkpoint says of its model.

``load_model`` reads the forms a trained model comes in (:mod:`epas_lightning.checkpoint_formats`): a single-file
``.ckpt``, the directory FSDP2 training writes, a ``consolidate`` directory (:mod:`epas_lightning.consolidation`) and a
Hugging Face LLaMA folder, such as the dense model a continual run starts from. It returns the model with what every
consumer needs to know: the trained sharing region in growth order, the tokenizer and the data the run trained on;
``describe_checkpoint`` says the same without reading the weights. Nothing is unpickled freely (see
:mod:`epas_lightning.safe_load`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from epas_lightning.checkpoint_formats import (
    AS_WRITTEN,
    HF_SHARED_KEY,
    SHARING_MASK,
    WEIGHTS_REGION_KEY,
    checkpoint_kind,
    read_any,
    stored_weights,
    weights_region,
)
from epas_lightning.data.tokenizer import (
    RecordedTokenizer,
    TokenizerError,
    load_tokenizer,
    resolve_tokenizer_path,
    tokenizer_sha256,
)
from epas_lightning.errors import CheckpointError, ConfigError, listed
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.provenance import MOVED, MOVED_KEY, TRAINING_KEY, callback_states, training_record
from epas_lightning.region import REGION_KEY, TrainedRegion, unrun_region_text
from epas_lightning.runtime import DTYPES, dtype_name, dtype_overflow, resolve_device, resolve_dtype
from epas_lightning.safe_load import LIGHTNING_METADATA
from epas_lightning.weight_checks import check_finite, hf_misfit, past_range, state_mismatch

if TYPE_CHECKING:
    from epas_lightning.data.token_data import HeldOut

log = logging.getLogger(__name__)

STORED = "stored"
"""The ``dtype`` of :func:`load_model` that keeps the floating-point dtype the checkpoint stores its weights in."""


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
    validation loss, the training checkpoint's absolute path."""
    mixed_data: list[Path] = field(default_factory=list)
    """The data folders of a training checkpoint's run that mixed several (as its data module saved them, in order);
    empty for a run of one. ``data_dir`` is the first: the one whose tokenizer the run recorded."""
    heldout: HeldOut | None = None
    """The held-out data the run validated on (its ``data.val_dir``, or the ``val`` splits of its data folders), as
    recorded, there or not; ``None`` where not recorded (older checkpoints, other tools' folders)."""
    moved: bool = False
    """Whether the folder (an export, a consolidated folder) was moved or copied since it was written: the data
    folders it records relative to itself are not known here (:func:`~epas_lightning.provenance.local_paths`)."""
    exported_sharing: int | None = None
    """The region length an ``export`` chose for its folder (``--sharing-layers``: its ``epas_shared_layers``, the
    first layers of ``region``), which transformers runs it with; ``None``: no export chose one."""

    @property
    def weights_region(self) -> TrainedRegion | None:
        """Of a checkpoint that runs dense, the region its weights trained sharing, as a stock export recorded it (and
        consolidate and export carry it on): a record only, never run (``region.unrun``); ``None`` elsewhere."""
        return self.region.unrun

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
        if self.moved:
            return f"the data it records is not known here ({MOVED})"
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

    def unrun_region_note(self, path: str | Path, command: str) -> str | None:
        """For a stock export, or a copy of one (``path``), the line saying that ``command`` runs it dense and how to
        run the region its weights trained (:func:`~epas_lightning.region.unrun_region_text`); ``None`` elsewhere."""
        if self.weights_region is None:
            return None
        stock = checkpoint_kind(Path(path)) == "hf"
        return f"{command}: the region is {unrun_region_text(self.weights_region, stock)}"

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
            other = self.tokenizer_sha256 and tokenizer_sha256(path) != self.tokenizer_sha256
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
    if tokenizer_path is not None and gone is None and sha256 and tokenizer_sha256(tokenizer_path) != sha256:
        changed = tokenizer_path
    if gone is not None or changed is not None:
        tokenizer_path = None  # its data folder too was prepared again: data_dir is not derived from it
    data_dir = metadata.get("data_dir") or (_data_dir_of(tokenizer_path) if tokenizer_path else None)
    found = data_dir is not None and Path(data_dir).is_dir()
    training = training_record(metadata)
    heldout = HeldOut.from_record(training["heldout"])
    gone_data = Path(data_dir) if data_dir is not None and not found else None
    unrun = None if region.size else weights_region(metadata.get(WEIGHTS_REGION_KEY), config.n_layer)
    return CheckpointInfo(
        config=config,
        region=replace(region, unrun=unrun),  # --sharing-layers on a stock export: refused, or forced, counted in it
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
        moved=isinstance(kept := metadata.get(TRAINING_KEY), dict) and kept.get(MOVED_KEY) is True,
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
    """Load a model from a ``.ckpt`` file, an FSDP2 checkpoint directory, a ``consolidate`` directory or an HF
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
    shapes, metadata = read_any(path, flag)  # names, shapes, dtypes and the mask: no weight
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
    state, metadata = read_any(path, flag)
    where = f"{flag} {path}"
    model = _fitted_model(_model_config(metadata, path, where), state, path, torch.device("meta"), None, where)
    return _info(metadata, model, where), state, metadata


def recorded_config(path: str | Path, flag: str = "--checkpoint") -> LlamaConfig:
    """The model config a checkpoint records, read without loading its weights (checked to load safely)."""
    path = checkpoint_path(path, flag)
    return _model_config(read_any(path, flag)[1], path, f"{flag} {path}")


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The ``Llama`` saved by ``consolidate``, with its trained sharing region switched on."""
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
