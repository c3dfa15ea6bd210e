"""Scale-out of a decoder: activation checkpointing, per-block ``torch.compile`` and FSDP2, in torchtitan's order.

Nothing here knows about EPAS or Lightning. ``parallelize`` needs a model with ``layers`` (an ``nn.ModuleList`` of
decoder blocks); whatever a block receives (e.g. tensors reused across blocks) must be an explicit argument, so that
checkpointing and compile see it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy matching a Trainer ``precision``.

    - ``32-true``: fp32 everywhere;
    - ``bf16-mixed``: fp32 master weights all-gathered in bf16, gradients reduce-scattered in fp32;
    - ``bf16-true``: bf16 weights (the precision plugin converts them), gradients reduce-scattered in fp32.
    """
    if precision == "32-true":
        return MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16-true":
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    raise ValueError(f"FSDP2 supports precision {PRECISIONS}, got {precision!r}.")


def checkpointed_blocks(activation_checkpointing: bool | int, n_blocks: int) -> int:
    """How many blocks (the first ones) an ``activation_checkpointing`` setting checkpoints."""
    if isinstance(activation_checkpointing, bool):
        return n_blocks if activation_checkpointing else 0
    if not isinstance(activation_checkpointing, int) or not 0 <= activation_checkpointing <= n_blocks:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r} must be a bool or in [0, {n_blocks}].")
    return activation_checkpointing


def blocks_to_checkpoint(n_blocks: int, block_bytes: float, kept_bytes: float, budget: float) -> int:
    """The fewest blocks to checkpoint so that activations fit ``budget`` bytes: each block keeps ``block_bytes``
    without checkpointing and ``kept_bytes`` (its inputs) with it; ``n_blocks`` when even that does not fit."""
    for k in range(n_blocks + 1):
        if (n_blocks - k) * block_bytes + k * kept_bytes <= budget:
            return k
    return n_blocks


def parallelize(
    model: nn.Module,
    device_mesh: DeviceMesh | None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    activation_checkpointing: bool | int = False,
    compile: bool | str = False,
) -> nn.Module:
    """Apply, in place and in this order: AC per block -> compile per block -> ``fully_shard`` per block -> root.

    Args:
        model: A decoder with ``model.layers``; may live on the meta device (sharding then allocates nothing).
        device_mesh: A 1-D data-parallel mesh to shard over; ``None`` skips FSDP (single device, DDP).
        mp_policy: FSDP2 mixed precision (see :func:`mixed_precision_policy`); default fp32.
        activation_checkpointing: Recompute blocks' activations in backward instead of keeping them: ``True`` every
            block, an integer k the first k blocks (selective: less recompute where memory allows some blocks to keep
            theirs), ``False`` / 0 none.
        compile: ``torch.compile`` each block (``True``: inductor; a string names the backend).
    """
    n_checkpointed = checkpointed_blocks(activation_checkpointing, len(model.layers))
    for index, block in enumerate(model.layers):
        if index < n_checkpointed:
            block = checkpoint_wrapper(block)  # state-dict keys stay those of the unwrapped block
        if compile:
            block.compile(backend="inductor" if compile is True else compile, fullgraph=True)
        model.layers[index] = block
    if device_mesh is None:
        return model
    mp_policy = mp_policy or MixedPrecisionPolicy()
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # the last block's parameters are needed again right away by backward: keep them gathered
        fully_shard(block, mesh=device_mesh, mp_policy=mp_policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=device_mesh, mp_policy=mp_policy)  # always, even on one rank: it installs mp_policy
    return model
