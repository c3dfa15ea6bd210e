"""Initial weights of a ``fit`` from a pretrained model (``model.init_from``): an HF LLaMA directory or our checkpoint.

Continual pretraining starts here: the weights are copied into the freshly built (possibly FSDP2-sharded) model
before training, after meta-device materialisation, and never over a resumed checkpoint (a resume wins).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from epas_lightning.errors import CheckpointError, ConfigError, listed
from epas_lightning.hf.convert import (
    COMPARED_FIELDS,
    HFCheckpointError,
    check_compatible,
    config_from_hf,
    hf_to_ours,
    is_hf_dir,
    located,
    read_hf_config,
    read_hf_weights,
)
from epas_lightning.launch import launched_node_rank
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.config import PRESETS, REUSED


def leave_unset(config: LlamaConfig, python: bool = False) -> str:
    """What to do when ``model.config`` (from ``python``: the arguments of :func:`source_config`) sets a field otherwise
    than the ``init_from`` model (:func:`filled_from`)."""
    if python:
        preset = f" (drop name={config.name!r}: its preset sets them)" if config.name else ""
        return f"leave those arguments of source_config unset{preset}: it takes them from the model at path"
    preset = f" (drop model.config.name {config.name}: its preset sets them)" if config.name else ""
    return f"leave those model.config fields unset{preset}: a fit from init_from takes them from the init_from model"


OURS_ONLY = ("padded_vocab_size", "sharing_mode")
"""The fields our checkpoints must match too (HF folders do not record them)."""
NOT_LOADED = ("sharing.mask",)
"""State the initial weights do not set: the sharing region belongs to the new run's schedule."""
INIT_READ_BYTES = 1 << 28
"""Bytes of weights (in the model's dtype) read and handed to the model at once: a batch ends with the tensor that
reaches it."""
LONGEST_TAKEN_BLOCK_SIZE = 8192
"""The longest ``block_size`` a run takes from its source model when it sets none: a source trained or extended to a
longer context (Llama 3.x's 131072 tokens) is not meant to be trained at that length."""


def source_config(path: str | Path, **fields: Any) -> LlamaConfig:
    """The config of a model trained from the model at ``path`` (``init_from``: an HF LLaMA directory or one of our
    checkpoints): the ``fields`` given, each checked to match the source (as :class:`~epas_lightning.EPASModule`
    checks them), every architecture field not given the source's (:func:`filled_from`), and the source's context
    length when it is longer than ``block_size`` and ``max_position_embeddings`` is not given.

    ``EPASModule(source_config("/models/Llama-3.2-1B", block_size=2048), init_from="/models/Llama-3.2-1B")``
    continues Llama-3.2-1B at 2048 tokens a sequence.
    """
    return config_from_source(path, fields, python=True)


def config_from_source(path: str | Path, fields: dict[str, Any], python: bool = False) -> LlamaConfig:
    """:func:`source_config`, a mismatch worded for ``model.config`` (the ``fit`` command) or, from ``python``, for
    its arguments."""
    path = _existing(path)
    source = read_source_config(path)
    config = keeping_source_context(filled_from(source, fields, ours=not is_hf_dir(path)), source)
    check_init_source(path, config, python)
    return config


def filled_from(source: LlamaConfig, fields: dict[str, Any], ours: bool = False) -> LlamaConfig:
    """A config of ``fields`` (``None`` counts as unset; a preset ``name`` sets its fields) whose architecture fields
    left unset (``COMPARED_FIELDS``, and for one of ``ours`` checkpoints :data:`OURS_ONLY`) are those of
    ``source``; an unset ``block_size`` is the source's (an HF model's ``max_position_embeddings``, the length one of
    our checkpoints trained at), unless that is longer than :data:`LONGEST_TAKEN_BLOCK_SIZE`."""
    given = {key: value for key, value in fields.items() if value is not None}
    given = {**PRESETS.get(given.get("name"), {}), **given}  # an unknown name: LlamaConfig says so
    taken = (*COMPARED_FIELDS, *OURS_ONLY) if ours else COMPARED_FIELDS
    taken = {key: getattr(source, key) for key in taken if key not in given}
    if "block_size" not in given:
        if source.block_size > LONGEST_TAKEN_BLOCK_SIZE:
            raise ConfigError(
                f"block_size is unset and the init_from model's context is {source.block_size} tokens, longer than "
                f"{LONGEST_TAKEN_BLOCK_SIZE} (the longest taken from it)",
                "model.config.block_size",
                "set the training sequence length, e.g. 2048 or 4096 (the model keeps its context for inference)",
            )
        taken["block_size"] = source.block_size
    return LlamaConfig(**taken, **given)


def read_source_config(path: Path) -> LlamaConfig:
    """The config of the model at ``path``: an HF LLaMA directory, or the one our checkpoint records."""
    if is_hf_dir(path):
        with located(f"model.init_from {path}"):
            return config_from_hf(path)
    from epas_lightning.checkpoint import recorded_config

    return recorded_config(path, "model.init_from")


def check_init_source(path: str | Path, config: LlamaConfig, python: bool = False) -> LlamaConfig:
    """Fail before any work when ``path`` is missing or holds weights of another shape than ``config`` (the advice
    worded by :func:`leave_unset`); return the config of the model at ``path``."""
    path = _existing(path)
    fix = leave_unset(config, python)
    if is_hf_dir(path):
        with located(f"model.init_from {path}"):
            return check_compatible(config, read_hf_config(path), f"init_from {path}", fix)
    theirs = read_source_config(path)
    check_same_architecture(config, theirs, f"model.init_from {path}", fix)
    return theirs


def keeping_source_context(config: LlamaConfig, source: LlamaConfig) -> LlamaConfig:
    """``config`` with the context length of the ``init_from`` model ``source`` when that is longer and ``config``
    sets none: a continual run at a shorter ``block_size`` keeps (and exports) the positions the model had."""
    if config.max_position_embeddings is not None or source.context_length <= config.block_size:
        return config
    return replace(config, max_position_embeddings=source.context_length)


def resumed_instead(ckpt_path: str | Path) -> str:
    """What ``fit`` says when a resumed checkpoint wins over ``init_from``."""
    return f"init_from: not applied, the weights resume from {ckpt_path}"


def _existing(path: str | Path) -> Path:
    """``path``, or a :class:`CheckpointError`. Every rank reads the source's config (and tokenizer) as it parses its
    command line, before the ranks connect: rank 0 alone reads the weights. So a node other than rank 0's that lacks
    the path (a node-local disk) says so."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    if node := launched_node_rank():
        raise CheckpointError(
            f"does not exist on node {node}, which reads its config and tokenizer as rank 0's node does (rank 0 "
            "alone reads the weights)",
            f"model.init_from {path}",
            "put it on a filesystem every node mounts at the same path, or copy it to each node",
        )
    raise CheckpointError(
        "does not exist",
        f"model.init_from {path}",
        "give a local HF LLaMA directory (config.json + safetensors) or an EPAS checkpoint (.ckpt, FSDP2 "
        "checkpoint dir or consolidated dir)",
    )


def check_same_architecture(
    config: LlamaConfig,
    theirs: LlamaConfig,
    where: str,
    fix: str = "set those model.config fields to the checkpoint's values",
) -> None:
    """Fail, naming every differing field, unless ``theirs`` (one of our checkpoints) holds the same function."""
    diffs = [
        f"{name}: model {getattr(config, name)!r} vs checkpoint {getattr(theirs, name)!r}"
        for name in (*COMPARED_FIELDS, *OURS_ONLY)
        if getattr(config, name) != getattr(theirs, name)
    ]
    if diffs:
        raise HFCheckpointError("model.config does not match the checkpoint: " + "; ".join(diffs), where, fix)


def read_init_state(path: str | Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``Llama`` parameters stored at ``path``, converted and checked for ``config``, all at once
    (``fit`` streams them instead: :func:`load_initial_weights`)."""
    path = _existing(path)
    return {key: t for batch in init_batches(path, config, source_shapes(path, config)) for key, t in batch.items()}


def source_shapes(path: Path, config: LlamaConfig, stage: str | None = "fit") -> dict[str, torch.Tensor]:
    """Empty meta tensors of the weights stored at ``path`` by our names (no :data:`NOT_LOADED`), after every check
    that needs no weight read: the source's own consistency and its architecture against ``config``. Warns when the
    source trained sharing (:func:`_say_it_starts_dense`; ``stage``: the Lightning command that reads it, ``None``:
    checks only, warning nothing)."""
    from epas_lightning.checkpoint import read_description  # .ckpt, FSDP2 or consolidated dir
    from epas_lightning.checkpoint_formats import hf_trained_region, recorded_weights_region

    if is_hf_dir(path):
        where = f"model.init_from {path}"
        with located(where, path):  # config.json may have changed since check_init_source: worded as it words it
            hf = read_hf_config(path)
            check_compatible(config, hf, f"init_from {path}", leave_unset(config))
            shapes = hf_to_ours(read_hf_weights(path, weights=False), config)  # vocabulary rows, unknown tensors
        region = hf_trained_region(hf, config.n_layer, where)  # export's record, perhaps hand-edited
        unrun = None if region.size else recorded_weights_region(path, config.n_layer)  # a stock export's record
        mode = hf.get("epas_sharing_mode") or "qk"
        if stage is not None:
            _say_it_starts_dense(path, list((unrun or region).layers), stage, unrun is not None, mode)
        return shapes
    info, state, _ = read_description(path, flag="model.init_from")
    check_same_architecture(config, info.config, f"model.init_from {path}", leave_unset(config))
    unrun = info.weights_region  # a copy of a stock export: the region its weights trained, as recorded
    mode = info.config.sharing_mode
    if stage is not None:
        _say_it_starts_dense(path, list((unrun or info.region).layers), stage, unrun is not None, mode)
    return {key: t for key, t in state.items() if key not in NOT_LOADED}


def init_batches(
    path: Path,
    config: LlamaConfig,
    shapes: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    limit: int = INIT_READ_BYTES,
) -> Iterator[dict[str, torch.Tensor]]:
    """The weights stored at ``path`` (``shapes``: :func:`source_shapes`) in batches of about ``limit`` bytes, read a
    tensor (or a shard batch) at a time, each tensor in ``dtype`` if given (else as stored) and each batch checked
    for NaN and inf. With tied embeddings, ``lm_head.weight`` is the embedding's tensor. A weight the ``shapes`` name
    but the read did not give (the files changed since) is refused before the last batch."""
    from epas_lightning.checkpoint_formats import stored_weights
    from epas_lightning.weight_checks import not_finite, refuse_not_finite

    where = f"model.init_from {path}"
    unread, batch, bad, size = set(shapes), {}, [], 0
    for key, t in stored_weights(path, shapes, config, "model.init_from"):
        if key not in unread:
            continue  # the sharing mask; a tied LM head given with the embedding
        bad += not_finite({key: t})  # before the cast, which could round a large value to inf
        t = t if dtype is None else t.to(dtype)
        tied = config.tie_embeddings and key == "embed_tokens.weight"
        for name in (key, "lm_head.weight") if tied else (key,):
            batch[name] = t
            unread.discard(name)
        size += t.numel() * t.element_size()
        if size >= limit:
            refuse_not_finite(bad, where)
            yield batch
            batch, size = {}, 0
    refuse_not_finite(bad, where)
    if unread:
        raise CheckpointError(
            f"weights named in its header were not found ({listed(sorted(unread))})", where, "copy it again"
        )
    if batch:
        yield batch


def _say_it_starts_dense(
    path: Path, trained_shared_layers: list[int], stage: str = "fit", record_only: bool = False, mode: str = "qk"
) -> None:
    """Warn that the layers the source trained sharing compute again in this run (an export records them too; a stock
    export, or a copy of one, only as a record, ``record_only``: it runs dense itself): ``fit``'s schedule decides the
    region from there, and ``validate``/``test``/``predict`` run the weights as ``fit`` starts from them (the baseline
    of a continual run), not the trained region; on rank 0 only (which alone reads the source in a distributed run).
    ``mode``: the source's sharing mode (what its sharing layers took from their source)."""
    if not trained_shared_layers or rank_zero_only.rank != 0:
        return
    own = REUSED.get(mode, REUSED["qk"])  # a hand-edited config.json's mode is refused where it is read
    trained = f"model.init_from {path} trained layers {trained_shared_layers} sharing; "
    origin = "the training checkpoint its weights came from" if record_only else None  # the folder runs dense
    if stage == "predict":
        runs = f"ckpt_path= (or epas_lightning.load_model({str(path)!r}))"
        runs = runs if origin is None else f"{origin}, as ckpt_path=,"
        said = (
            f"predict runs it with every layer computing its own {own}, as a fit from it starts: {runs} runs its "
            "trained region"
        )
    elif stage in ("validate", "test"):
        scores = f"evaluate --checkpoint {path}" if origin is None else f"evaluate --checkpoint of {origin}"
        said = (
            f"{stage} scores it with every layer computing its own {own}, as a fit from it starts (val/loss; "
            f"sharing.val_sharing_layers adds regions of sharing.target): {scores} scores its trained region"
        )
    else:
        said = (
            f"this run starts every layer computing its own {own} (their {own.lower()} weights are the ones left from "
            "before they shared) and its sharing schedule decides the region"
        )
    warnings.warn(trained + said, stacklevel=3)


@torch.no_grad()
def load_initial_weights(model: nn.Module, path: str | Path, stage: str = "fit") -> None:
    """Copy the weights at ``path`` into ``model`` (plain, DDP's or FSDP2-sharded: each rank keeps its shard), about
    :data:`INIT_READ_BYTES` at a time in the model's dtype, never the whole state nor a wider copy of it.

    In a distributed run rank 0 alone reads and checks the source, holding one batch beside its shard, and broadcasts
    each batch to the others; before each it tells them whether one follows or what stopped its read, which every rank
    then raises alike (the same exception, the same one-line message) instead of waiting in a collective.
    ``stage``: the Lightning command that starts from them (``validate`` scores them)."""
    if not _distributed():
        for batch in _checked_batches(model, path, stage):
            set_model_state_dict(model, batch, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    if dist.get_rank() != 0:
        while (news := _from_rank_zero()) == _A_BATCH:
            set_model_state_dict(model, {}, options=options)
        if isinstance(news, BaseException):
            raise news
        return
    batches = _checked_batches(model, path, stage)
    while True:
        try:
            batch = next(batches, None)
        except Exception as error:
            sent = _from_rank_zero(_sendable(error))
            if sent is error:
                raise
            raise sent from error
        if _from_rank_zero(_DONE if batch is None else _A_BATCH) == _DONE:
            return
        set_model_state_dict(model, batch, options=options)


_A_BATCH, _DONE = "a batch follows", "done"
"""What rank 0 tells the other ranks before each batch of :func:`load_initial_weights` (else: the error it met)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_rank_zero(news: object = None) -> object:
    """``news`` as rank 0 gives it, on every rank (a collective)."""
    box = [news]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sendable(error: Exception) -> Exception:
    """``error`` if it survives pickling whole (our errors do: what, where, fix), else a ``RuntimeError`` saying it, so
    every rank raises one with the same message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:  # one pickle cannot rebuild: its message travels instead
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def _checked_batches(model: nn.Module, path: str | Path, stage: str = "fit") -> Iterator[dict[str, torch.Tensor]]:
    """The batches of :func:`init_batches` for ``model``, after checking that the source at ``path`` fits it; every
    check runs in the first ``next``."""
    path = _existing(path)
    shapes = source_shapes(path, model.config, stage)
    check_fits(model, shapes, path)
    dtype = next(model.parameters()).dtype
    yield from init_batches(path, model.config, shapes, dtype, INIT_READ_BYTES)


def check_fits(model: nn.Module, shapes: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse the weights at ``path`` (``shapes``: :func:`source_shapes`) unless their names and shapes are those of
    ``model``'s state (but :data:`NOT_LOADED`)."""
    from epas_lightning.checkpoint_formats import AS_WRITTEN
    from epas_lightning.weight_checks import hf_misfit, state_mismatch

    expected = {k: v for k, v in model.state_dict().items() if k not in NOT_LOADED}
    mismatch = state_mismatch(expected, shapes)
    if mismatch and is_hf_dir(path):  # its config.json is model.config's (checked): the folder disagrees with itself
        raise hf_misfit(expected, shapes, f"model.init_from {path}")
    if mismatch:
        raise HFCheckpointError(
            f"the weights do not fit the model ({mismatch})",
            f"model.init_from {path}",
            f"{AS_WRITTEN} (weights and config from the same run)",
        )


def check_init_weights(path: str | Path, config: LlamaConfig, attention_reuse: bool = False) -> None:
    """Fail before any work (data preparation included) when the weights at ``path`` do not fit the model ``config``
    builds: every check of :func:`load_initial_weights` that reads no tensor data (files, safetensors headers, a
    torch checkpoint mapped), against the model built on the meta device. Their values are read (and checked) when
    the run starts from them. On rank 0's node only, as rank 0 alone reads the weights."""
    if launched_node_rank():
        return
    path = _existing(path)
    with torch.device("meta"):
        model = Llama(config, attention_reuse=attention_reuse)
    check_fits(model, source_shapes(path, config, stage=None), path)
