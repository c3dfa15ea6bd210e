"""Causal self-attention with switchable cross-layer activation sharing.

Notation: B batch, T sequence length, C = n_embd, H = n_head, H_kv = n_kv_head, D = head_dim.

A layer runs in one of two modes, chosen per call by its caller (no module is rebuilt to switch):
- compute: projects its own Q, K, V (RoPE on Q and K) and returns the pair that a later layer may reuse;
- sharing: takes that pair from the last compute layer and skips the projections it replaces.
  In ``qk`` mode (the paper) it reuses post-RoPE (Q, K) and projects only V;
  in ``kv`` mode (CLA-style) it reuses (K, V) and projects only Q.
Skipped projections are simply not called, so their weights get no gradient (``grad is None``) while the layer
shares, and gradients of the sharing layers flow back into the source layer through the reused tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epas_lightning.model.config import LlamaConfig
from epas_lightning.model.rope import apply_rope

Shared = tuple[torch.Tensor, torch.Tensor]
"""The pair a sharing layer reuses: post-RoPE (q, k) in ``qk`` mode, (k, v) in ``kv`` mode."""


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.mode = config.sharing_mode
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], reuse: Shared | None = None
    ) -> tuple[torch.Tensor, Shared]:
        """Attend over ``x`` (B, T, C); with ``reuse`` given, run in sharing mode.

        Returns the output (B, T, C) and the pair a following sharing layer should reuse.
        """
        B, T, _ = x.shape
        cos, sin = rope
        if reuse is None:
            q = apply_rope(self._heads(self.q_proj(x), self.n_head), cos, sin)  # (B, H, T, D)
            k = apply_rope(self._heads(self.k_proj(x), self.n_kv_head), cos, sin)  # (B, H_kv, T, D)
            v = self._heads(self.v_proj(x), self.n_kv_head)  # (B, H_kv, T, D)
            shared = (q, k) if self.mode == "qk" else (k, v)
        elif self.mode == "qk":
            q, k = reuse
            v = self._heads(self.v_proj(x), self.n_kv_head)
            shared = reuse
        else:
            k, v = reuse
            q = apply_rope(self._heads(self.q_proj(x), self.n_head), cos, sin)
            shared = reuse
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H * D)
        return self.o_proj(y), shared

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, D)
