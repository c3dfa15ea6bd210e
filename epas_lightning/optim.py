"""The optimizer every run starts from: AdamW with weight decay on matrices only."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

DEFAULT_ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
"""``EPASModule``'s AdamW when no optimizer is configured."""
NOT_SETTINGS = ("params", "lr", "initial_lr")
"""Param-group entries that are not the optimizer's settings: its parameters, and what the LR scheduler sets."""


def param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters in two groups: matrices (linear and embedding weights) with the optimizer's weight decay,
    vectors (norm gains, attention biases) without."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def grouped_parameter_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters in the order of :func:`param_groups`: the order an optimizer built on them
    numbers them in its saved state."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in param_groups(model) for p in group["params"]]


def state_tensors(state: Mapping[Any, Mapping[str, Any]]) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """Each floating-point tensor of an optimizer's per-parameter ``state`` (``exp_avg``, ``exp_avg_sq``; not AdamW's
    step count), as (parameter, key, tensor), the parameter as ``state`` keys it: the tensor itself in an optimizer,
    its number or name in a checkpoint."""
    for parameter, entries in state.items():
        for key, t in entries.items():
            if torch.is_tensor(t) and t.is_floating_point() and t.dim():
                yield parameter, key, t


def state_entry(key: str, parameter: str) -> str:
    """An optimizer-state tensor as a line names it: ``exp_avg_sq of norm.weight``."""
    return f"{key} of {parameter}"


def default_optimizer(model: nn.Module, **overrides) -> torch.optim.AdamW:
    """``AdamW(param_groups(model), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)``, any of them overridden.

    Fused (one kernel for every parameter) when all trainable parameters are on CUDA at construction, the default
    implementation (for-loop / foreach) elsewhere; ``fused=...`` overrides the choice.
    """
    groups = param_groups(model)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, **{**DEFAULT_ADAMW, "fused": fused or None, **overrides})


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The settings of each parameter group (betas, weight decay, eps, ...), as configured."""
    return [{k: v for k, v in group.items() if k not in NOT_SETTINGS} for group in optimizer.param_groups]


def check_same_optimizer(optimizer: torch.optim.Optimizer, saved_groups: list[dict], where: str) -> None:
    """Refuse a checkpoint whose optimizer state (its ``param_groups``, ``saved_groups``) is another optimizer's than
    ``optimizer``: loading it was torch's ``KeyError`` traceback (SGD's state into Adam) or kept the other's settings
    and state beside the configured ones. Settings one side lacks and the other has, both ways, tell (a torch version
    adding a setting only adds one way)."""
    from epas_lightning.errors import CheckpointError  # noqa: PLC0415 - the optimizer helpers stay light

    saved = set().union(*(set(group) for group in saved_groups)) - set(NOT_SETTINGS) if saved_groups else set()
    configured = set(optimizer.defaults) - set(NOT_SETTINGS)
    if saved and saved - configured and configured - saved:
        raise CheckpointError(
            f"the checkpoint's optimizer state is not the configured {type(optimizer).__name__}'s (it has "
            f"{', '.join(sorted(saved - configured))}; lacks {', '.join(sorted(configured - saved))})",
            where,
            "resume with the run's model.optimizer (its run folder keeps config.yaml), or start a new run from its "
            "weights with --model.init_from",
        )


def restore_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> str:
    """Put the configured ``settings`` (:func:`optimizer_settings`) back into the groups of ``optimizer``, where
    loading a checkpoint's optimizer state had put the saved ones; return what changed (``""``: nothing)."""
    changed = {}
    for group, configured in zip(optimizer.param_groups, settings, strict=True):
        for key, value in configured.items():
            if not _same(group.get(key), value):
                changed.setdefault(key, f"{key} {group.get(key)} -> {value}")
            group[key] = value
    return ", ".join(changed[key] for key in sorted(changed))


def _same(a: object, b: object) -> bool:
    """Equal settings; a list equals the tuple of the same items (FSDP2 restores AdamW's betas as one)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
