"""Initial weights of a ``fit`` from a pretrained model (``model.init_from``): an HF LLaMA directory or our checkpoint.

Continual pretraining starts here: the weights are copied into the freshly built (possibly FSDP2-sharded) model
before training, after meta-device materialisation, and never over a resumed checkpoint (a resume wins).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from epas_lightning.errors import CheckpointError
from epas_lightning.hf.convert import (
    COMPARED_FIELDS,
    HFCheckpointError,
    check_compatible,
    is_hf_dir,
    load_hf_state,
    located,
    read_hf_config,
)
from epas_lightning.model import LlamaConfig

NOT_LOADED = ("sharing.mask",)
"""State the initial weights do not set: the sharing region belongs to the new run's schedule."""


def check_init_source(path: str | Path, config: LlamaConfig) -> LlamaConfig:
    """Fail before any work when ``path`` is missing or holds weights of another shape than ``config``; return the
    config of the model at ``path``."""
    path = _existing(path)
    if is_hf_dir(path):
        with located(f"model.init_from {path}"):
            return check_compatible(config, read_hf_config(path), source=f"init_from {path}")
    from epas_lightning.checkpoint import recorded_config

    theirs = recorded_config(path, "model.init_from")
    check_same_architecture(config, theirs, f"model.init_from {path}")
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
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            "does not exist",
            f"model.init_from {path}",
            "give a local HF LLaMA directory (config.json + safetensors) or an EPAS checkpoint (.ckpt, FSDP2 "
            "checkpoint dir or consolidated dir)",
        )
    return path


def check_same_architecture(
    config: LlamaConfig,
    theirs: LlamaConfig,
    where: str,
    fix: str = "set those model.config fields to the checkpoint's values",
) -> None:
    """Fail, naming every differing field, unless ``theirs`` (one of our checkpoints) holds the same function."""
    diffs = [
        f"{name}: model {getattr(config, name)!r} vs checkpoint {getattr(theirs, name)!r}"
        for name in (*COMPARED_FIELDS, "padded_vocab_size", "sharing_mode")
        if getattr(config, name) != getattr(theirs, name)
    ]
    if diffs:
        raise HFCheckpointError("model.config does not match the checkpoint: " + "; ".join(diffs), where, fix)


def read_init_state(path: str | Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``Llama`` parameters stored at ``path``, converted and checked for ``config``."""
    path = _existing(path)  # the loaders below check safety and architecture as they read
    from epas_lightning.checkpoint import check_finite, load_model  # our own .ckpt / FSDP2 dir / consolidated dir

    if is_hf_dir(path):
        state = load_hf_state(path, config)
        check_finite(state, f"model.init_from {path}")
        _say_it_starts_dense(path, sorted(int(i) for i in read_hf_config(path).get("epas_trained_region") or ()))
        return state

    loaded = load_model(path)
    check_same_architecture(config, loaded.model.config, f"model.init_from {path}")
    _say_it_starts_dense(path, loaded.trained_shared_layers)
    return {k: v for k, v in loaded.model.state_dict().items() if k not in NOT_LOADED}


def _say_it_starts_dense(path: Path, trained_shared_layers: list[int]) -> None:
    """Warn that the layers the source trained sharing compute again in this run (an export records them too); on
    rank 0 only, as every rank of a distributed run reads the weights."""
    if trained_shared_layers and rank_zero_only.rank == 0:
        warnings.warn(
            f"model.init_from {path} trained layers {trained_shared_layers} sharing; this run starts every "
            "layer computing its own Q/K (their q/k weights are the ones left from before they shared) and its sharing "
            "schedule decides the region",
            stacklevel=3,
        )


@torch.no_grad()
def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights at ``path`` into ``model`` (plain or FSDP2-sharded: each rank keeps its shard)."""
    from epas_lightning.checkpoint import state_mismatch

    state = read_init_state(path, model.config)
    mismatch = state_mismatch({k: v for k, v in model.state_dict().items() if k not in NOT_LOADED}, state)
    if mismatch:
        raise HFCheckpointError(f"the weights do not fit the model ({mismatch})", f"model.init_from {path}")
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
