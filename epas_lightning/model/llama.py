"""The LLaMA decoder with EPAS sharing. Parameter names follow HF ``modeling_llama`` (a checkpoint maps by key)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from epas_lightning.model.attention import Attention, Shared
from epas_lightning.model.config import LlamaConfig
from epas_lightning.model.layers import MLP, RMSNorm
from epas_lightning.model.rope import RotaryEmbedding
from epas_lightning.model.sharing import SharingState


def _normal_(weight: torch.Tensor, std: float) -> None:
    """Fill ``weight`` from N(0, std). A sharded (DTensor) weight receives the shard of a full draw made on rank 0,
    so the model is the same for any number of ranks (a local draw per shard would repeat values across ranks)."""
    if isinstance(weight, DTensor):
        full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.to_local().device)
        nn.init.normal_(full, std=std)
        weight.copy_(distribute_tensor(full, weight.device_mesh, weight.placements))
    else:
        nn.init.normal_(weight, std=std)


class DecoderLayer(nn.Module):
    """RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU MLP -> residual."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config.n_embd, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], reuse: Shared | None = None
    ) -> tuple[torch.Tensor, Shared]:
        h, shared = self.self_attn(self.input_layernorm(x), rope, reuse)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, shared


class Llama(nn.Module):
    """Decoder-only LLaMA. ``sharing`` says which layers reuse the Q/K (or K/V) of the last compute layer."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.sharing = SharingState(config.n_layer)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and reset every buffer); the one place init is defined.

        | tensor                                            | init                          |
        |---------------------------------------------------|-------------------------------|
        | embed_tokens, lm_head, q/k/v_proj, gate/up_proj   | N(0, init_std)                |
        | o_proj, down_proj (write into the residual)       | N(0, init_std / sqrt(2 L))    |
        | RMSNorm weights                                   | 1                             |
        | sharing mask                                      | all layers compute            |

        Runs in ``__init__`` and again after meta-device materialisation (see ``EPASModule.on_fit_start``).
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        _normal_(self.embed_tokens.weight, std)
        if not self.config.tie_embeddings:
            _normal_(self.lm_head.weight, std)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _normal_(linear.weight, std)
            for linear in (attn.o_proj, mlp.down_proj):
                _normal_(linear.weight, residual_std)
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()
        self.sharing.reset_parameters()

    def set_shared_layers(self, layers: Iterable[int]) -> None:
        """Switch exactly ``layers`` to sharing mode (all others compute); cheap, no module is rebuilt."""
        self.sharing.set_shared_layers(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for token ids (B, T)."""
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"Sequence length {T} exceeds block_size={self.config.block_size}.")
        rope = self.rotary_emb(T, input_ids.device)  # fp32 (cos, sin), each (T, D)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        shared: Shared | None = None
        for layer, shares in zip(self.layers, self.sharing.flags, strict=True):
            x, shared = layer(x, rope, shared if shares else None)
        return self.lm_head(self.norm(x))
