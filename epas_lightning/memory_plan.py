"""Memory-aware activation checkpointing: how many decoder blocks must recompute so that a micro-batch fits the GPU.

An estimate, not a measurement: per block and token, the tensors a bf16-mixed compute block keeps for backward
(``ACTIVATION_BYTES_PER_TOKEN`` x n_embd, rounded up from the saved-tensor count in ``benchmarks/RESULTS.md``), the
training state of the local parameter shard (fp32 weight, gradient and AdamW's two moments), and a safety margin.
"""

from __future__ import annotations

import torch
from torch import nn

from epas_lightning.flops import matmul_params
from epas_lightning.model.config import LlamaConfig
from epas_lightning.parallel import blocks_to_checkpoint

ACTIVATION_BYTES_PER_TOKEN = 64
"""Bytes per token and unit of n_embd that one block keeps for backward without checkpointing (bf16-mixed)."""
CHECKPOINTED_BYTES_PER_TOKEN = 12
"""The same with the block checkpointed: its fp32 input, plus the Q/K it may hand to sharing layers (bf16)."""
STATE_BYTES_PER_PARAM = 16
"""fp32 weight + fp32 gradient + AdamW's exp_avg and exp_avg_sq."""
USABLE_FRACTION = 0.8
"""Of the free device memory: the rest is left to the allocator's fragmentation, the LM-head chunks and workspaces."""


def plan_checkpointing(config: LlamaConfig, tokens: int, free_bytes: int, shards: int = 1) -> int:
    """The number of blocks to checkpoint (the first ones) for micro-batches of ``tokens`` tokens on a device with
    ``free_bytes`` free, the parameters sharded ``shards`` ways: 0 where every block's activations fit."""
    state = STATE_BYTES_PER_PARAM * n_params(config) / shards
    budget = USABLE_FRACTION * free_bytes - state
    block = tokens * ACTIVATION_BYTES_PER_TOKEN * config.n_embd
    kept = tokens * CHECKPOINTED_BYTES_PER_TOKEN * config.n_embd
    return blocks_to_checkpoint(config.n_layer, block, kept, budget)


def n_params(config: LlamaConfig) -> int:
    """Every parameter: the matmul weights, the embedding unless tied to the head, the norm gains, the attention
    biases."""
    embedding = 0 if config.tie_embeddings else config.padded_vocab_size * config.n_embd
    kv_dim = config.n_kv_head * config.head_dim
    widths = {"q_proj": config.n_embd, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": config.n_embd}
    biases = config.n_layer * sum(widths[name] for name in config.biased_projections)
    return matmul_params(config) + embedding + (2 * config.n_layer + 1) * config.n_embd + biases


def on_device_bytes(model: nn.Module, device: torch.device) -> int:
    """The bytes of ``model``'s parameters already on ``device``: free memory read after they were allocated lacks
    them, and :func:`plan_checkpointing` counts their weights in the training state (none for a meta-device model)."""
    return sum(p.nbytes for p in model.parameters() if p.device == device)
