"""The optimizer every run starts from: AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
"""``EPASModule``'s AdamW when no optimizer is configured."""


def param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters in two groups: matrices (linear and embedding weights) with the optimizer's weight decay,
    vectors (norm gains) without."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def default_optimizer(model: nn.Module, **overrides) -> torch.optim.AdamW:
    """``AdamW(param_groups(model), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)``, any of them overridden.

    Fused (one kernel for every parameter) when all trainable parameters are on CUDA at construction, the default
    implementation (for-loop / foreach) elsewhere; ``fused=...`` overrides the choice.
    """
    groups = param_groups(model)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, **{**DEFAULT_ADAMW, "fused": fused or None, **overrides})
