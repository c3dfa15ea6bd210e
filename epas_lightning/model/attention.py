"""Causal self-attention with switchable cross-layer activation sharing.

Notation: B batch, T query length, S key length (T, or the cached length when decoding), C = n_embd,
H = n_head, H_kv = n_kv_head, G = H / H_kv (query heads per KV head), D = head_dim.

A layer runs in one of two modes, chosen per call by its caller (no module is rebuilt to switch):
- compute: projects its own Q, K, V (RoPE on Q and K) and returns what a later layer may reuse;
- sharing: takes that from the last compute layer and skips the projections it replaces.
  In ``qk`` mode (the paper) it reuses post-RoPE (Q, K) and projects only V;
  in ``kv`` mode (CLA-style) it reuses (K, V) and projects only Q.
Skipped projections are simply not called, so their weights get no gradient (``grad is None``) while the layer
shares, and gradients of the sharing layers flow back into the source layer through the reused tensors.

Attention-probability reuse (``qk`` mode): every sharing layer attends with the source's Q and K, so
softmax(Q_src K_src^T / sqrt(D)) is the same matrix in all of them. With reuse on, the source materialises those
probabilities once and each sharing layer computes only P @ V_i; autograd sums the sharing layers' dP into the
source's single softmax backward. It is the same model as recomputing attention per layer (see the tests).

``sdpa_order``: the fused SDPA kernels to try first, in order (``None``: torch's own order); it changes which kernel
computes attention, not what is computed. ``Llama.sdpa_order`` sets it on every layer; a compiled block sees a
constant.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from epas_lightning.model.config import LlamaConfig
from epas_lightning.model.rope import apply_rope

if TYPE_CHECKING:
    from epas_lightning.model.kv_cache import KVCache


class Shared(NamedTuple):
    """What a source layer hands to the sharing layers after it.

    ``pair`` is post-RoPE (q, k) in ``qk`` mode and (k, v) in ``kv`` mode; with a KV cache, k and v span every cached
    position. ``probs`` holds the source's attention probabilities, laid out (B, H_kv, G * T, S), when attention
    reuse is on (``qk`` mode only), else ``None``.
    """

    pair: tuple[torch.Tensor, torch.Tensor]
    probs: torch.Tensor | None = None


class AttentionContext(NamedTuple):
    """What every layer of one forward needs besides its input: positions and the mask.

    ``cos``/``sin`` are fp32 RoPE tables, (T, D) or per row (B, 1, T, D). ``mask`` is ``None`` or a bool (B | 1, 1,
    T, S) tensor, ``True`` where a query may attend to a key; with ``mask=None``, ``is_causal`` says whether the
    usual T == S causal mask applies (training, a first prefill) or none does (one decode token sees all keys).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    is_causal: bool = True


class Attention(nn.Module):
    sdpa_order: tuple[SDPBackend, ...] | None = None

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.mode = config.sharing_mode
        kv_dim, biased = config.n_kv_head * config.head_dim, config.biased_projections
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias="q_proj" in biased)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias="k_proj" in biased)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias="v_proj" in biased)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias="o_proj" in biased)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        reuse: Shared | None = None,
        cache: KVCache | None = None,
        want_probs: bool = False,
    ) -> tuple[torch.Tensor, Shared | None]:
        """Attend over ``x`` (B, T, C); with ``reuse`` given, run in sharing mode.

        ``cache`` stores this layer's new keys/values (only those it projects) and supplies the earlier ones.
        ``want_probs`` (a compute layer followed by sharing layers, attention reuse on) makes the layer materialise
        its attention probabilities and hand them on. Returns the output (B, T, C) and, from a compute layer, what
        sharing layers reuse (``None`` from a sharing layer: it hands nothing new on, and passing its input through
        would return a view of it, which FSDP2 warns about).
        """
        B, T, _ = x.shape
        probs = None
        if reuse is None:
            q, k, v = self._project_qkv(x)
            q = apply_rope(q, ctx.cos, ctx.sin)  # (B, H, T, D)
            k = apply_rope(k, ctx.cos, ctx.sin)  # (B, H_kv, T, D)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D) each
            shared = Shared((q, k) if self.mode == "qk" else (k, v))
        elif self.mode == "qk":
            q, k = reuse.pair
            v = self._heads(self.v_proj(x), self.n_kv_head)
            if cache is not None:
                _, v = cache.update(self.layer_idx, None, v)
            probs, shared = reuse.probs, None
        else:
            k, v = reuse.pair
            q = apply_rope(self._heads(self.q_proj(x), self.n_head), ctx.cos, ctx.sin)
            shared = None
        if probs is None and want_probs and shared is not None:
            probs = attention_probs(q, k, ctx)
            shared = Shared(shared.pair, probs)
        if probs is not None:
            y = apply_probs(probs, v, self.n_head, causal=ctx.is_causal and ctx.mask is None)
        else:
            y = self._sdpa(q, k, v, ctx)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H * D)
        return self.o_proj(y), shared

    @property
    def _gqa(self) -> bool:
        return self.n_kv_head != self.n_head

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        order = nullcontext() if self.sdpa_order is None else sdpa_kernel(list(self.sdpa_order), set_priority=True)
        with order:
            causal = ctx.is_causal and ctx.mask is None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=causal, enable_gqa=self._gqa)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A compute layer's q (B, H, T, D), k and v (B, H_kv, T, D), before RoPE.

        Under ``torch.compile``, one matmul of the stacked q/k/v weights (as LitGPT's ``qkv``; the parameters stay
        HF's three): the concatenation fuses into the weight cast autocast makes anyway, and backward runs one
        input-gradient matmul instead of three whose results are summed. Eager keeps the three projections (their
        forward hooks run; on a CPU the weight copy costs more than it saves, benchmarks/RESULTS.md).
        """
        if not torch.compiler.is_compiling():
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            return self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projections])
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = F.linear(x, weight, bias).split((self.n_head * self.head_dim, kv_dim, kv_dim), dim=-1)
        # v goes to attention as it is, and attention keeps it for backward: a view would keep the whole q/k/v output
        # alive until then, so v gets its own (small) copy; q and k become new tensors in RoPE
        return self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v.contiguous(), self.n_kv_head)

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, D)


def attention_probs(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) under the context's mask, (B, H_kv, G * T, S), softmax in fp32.

    The G query heads that read one KV head are stacked along the query axis, so one batched matmul serves GQA
    without repeating K: the layout ``apply_probs`` expects. Long causal sequences (training) compute only the
    blocks on and below the diagonal.
    """
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    q = q * (1.0 / math.sqrt(D))
    if ctx.mask is None and ctx.is_causal and T == S and T >= 2 * CAUSAL_BLOCK:
        scores = CausalScores.apply(q.reshape(B, H_kv, G, T, D), k.unsqueeze(2))  # (B, H_kv, G, T, T)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(B, H_kv, G * T, S)
    scores = q.reshape(B, H_kv, G * T, D) @ k.transpose(-2, -1)  # (B, H_kv, G * T, S)
    allowed = ctx.mask
    if allowed is None and ctx.is_causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if allowed is not None:
        allowed = allowed.repeat(*([1] * (allowed.dim() - 2)), G, 1)  # (..., G * T, S): row g * T + t
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, n_head: int, causal: bool = False) -> torch.Tensor:
    """P @ V for probabilities from :func:`attention_probs`: (B, H, T, D).

    ``causal`` (training: T == S, no cache) skips the all-zero blocks above the diagonal in forward and backward.
    """
    B, H_kv, GT, S = probs.shape
    T, D = GT * H_kv // n_head, v.shape[-1]
    if causal and T == S and T >= 2 * CAUSAL_BLOCK:
        probs5 = probs.view(B, H_kv, GT // T, T, S)  # (B, H_kv, G, T, S)
        y = CausalProbsMatmul.apply(probs5, v.unsqueeze(2).to(probs.dtype))  # (B, H_kv, G, T, D)
    else:
        y = probs.to(v.dtype) @ v  # (B, H_kv, G * T, D)
    return y.reshape(B, n_head, T, D)


CAUSAL_BLOCK = 128
"""Query rows per block of the causal P @ V: blocks above the diagonal are zero and skipped."""


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(start, min(start + CAUSAL_BLOCK, T)) for start in range(0, T, CAUSAL_BLOCK)]


class CausalProbsMatmul(torch.autograd.Function):
    """P @ V for a causal (lower-triangular) P, block by block: about (n + 1) / 2n of the dense matmul's work for n
    blocks, forward and backward. P is (B, H_kv, G, T, T) and V is (B, H_kv, 1, T, D) (one V per KV head)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = probs.new_empty(*probs.shape[:-1], v.shape[-1])
        for start, end in _blocks(probs.shape[-1]):
            out[..., start:end, :] = probs[..., start:end, :end] @ v[..., :end, :]
        ctx.save_for_backward(probs, v)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        probs, v = ctx.saved_tensors
        grad_probs = grad_v = None
        if ctx.needs_input_grad[0]:  # above the diagonal P is 0, so its gradient there never matters
            grad_probs = torch.zeros_like(probs)
            for start, end in _blocks(probs.shape[-1]):
                grad_probs[..., start:end, :end] = grad[..., start:end, :] @ v[..., :end, :].transpose(-2, -1)
        if ctx.needs_input_grad[1]:  # keys start:end are read by queries start: onwards; sum over the G heads
            grad_v = torch.empty_like(v)
            for start, end in _blocks(probs.shape[-1]):
                part = probs[..., start:, start:end].transpose(-2, -1) @ grad[..., start:, :]  # (B, H_kv, G, b, D)
                grad_v[..., start:end, :] = part.sum(dim=2, keepdim=True)
        return grad_probs, grad_v


class CausalScores(torch.autograd.Function):
    """Causal q k^T, block by block: the blocks above the diagonal are never computed (they are -inf).

    q is (B, H_kv, G, T, D) (already scaled) and k is (B, H_kv, 1, T, D); returns (B, H_kv, G, T, T).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        T = q.shape[-2]
        scores = q.new_full((*q.shape[:-1], T), float("-inf"))
        for start, end in _blocks(T):
            block = q[..., start:end, :] @ k[..., :end, :].transpose(-2, -1)  # (B, H_kv, G, b, end)
            diagonal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            block[..., start:end].masked_fill_(diagonal, float("-inf"))
            scores[..., start:end, :end] = block
        ctx.save_for_backward(q, k)
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        # Where the scores are -inf the softmax gradient is exactly 0, so the skipped blocks contribute nothing.
        q, k = ctx.saved_tensors
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.empty_like(q)
            for start, end in _blocks(q.shape[-2]):
                grad_q[..., start:end, :] = grad[..., start:end, :end] @ k[..., :end, :]
        if ctx.needs_input_grad[1]:
            grad_k = torch.empty_like(k)
            for start, end in _blocks(q.shape[-2]):
                part = grad[..., start:, start:end].transpose(-2, -1) @ q[..., start:, :]  # (B, H_kv, G, b, D)
                grad_k[..., start:end, :] = part.sum(dim=2, keepdim=True)
        return grad_q, grad_k
