"""Record every layer's post-RoPE Q and K, its V, and its attention probabilities, without touching the model's code.

Forward hooks on each layer's ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` see the projections (B, T, H*D); we
split heads and apply the model's own RoPE (``rotary_emb`` + ``apply_rope``) to Q and K, which is exactly what a
compute-mode layer does (V takes no RoPE).
Attention probabilities are then softmax(Q K^T / sqrt(D)) under the causal mask, with K heads repeated for GQA.
Every layer runs in compute mode while capturing (the model's sharing mask is restored afterwards), so each layer
shows what it would compute on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from epas_lightning.model import Llama
from epas_lightning.model.rope import apply_rope


@dataclass
class Activations:
    """Per-layer tensors on the CPU (float32), batches concatenated.

    Attributes:
        q: One (B, H, T, D) post-RoPE query tensor per layer.
        k: One (B, H_kv, T, D) post-RoPE key tensor per layer.
        v: One (B, H_kv, T, D) value tensor per layer.
        attn: One (B, H, T, T) attention-probability tensor per layer (rows sum to 1, zero above the diagonal).
    """

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    attn: list[torch.Tensor]

    @property
    def n_layer(self) -> int:
        return len(self.q)

    @property
    def n_tokens(self) -> int:
        B, _, T, _ = self.q[0].shape
        return B * T


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax(Q K^T / sqrt(D)) in float32 for q (B, H, T, D) and k (B, H_kv, T, D) -> (B, H, T, T)."""
    n_head, n_kv_head, T = q.shape[1], k.shape[1], q.shape[2]
    if n_head % n_kv_head:
        raise ValueError(f"{n_head} query heads cannot be grouped over {n_kv_head} key heads.")
    k = k.repeat_interleave(n_head // n_kv_head, dim=1)  # (B, H, T, D): GQA group g serves heads g*r .. g*r+r-1
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@contextmanager
def _all_layers_computing(model: Llama) -> Iterator[None]:
    shared = model.sharing.shared_layers
    model.set_shared_layers([])
    try:
        yield
    finally:
        model.set_shared_layers(shared)


@torch.no_grad()
def capture_activations(model: Llama, batches: Iterable[torch.Tensor]) -> Activations:
    """Run ``model`` with every layer computing over token batches (B, T) and collect Q, K, V and attention maps."""
    config = model.config
    per_layer: list[dict[str, list[torch.Tensor]]] = [{"q": [], "k": [], "v": []} for _ in model.layers]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer: int, name: str, n_heads: int):  # noqa: ANN202
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            B, T, _ = output.shape
            heads = output.view(B, T, n_heads, config.head_dim).transpose(1, 2)  # (B, heads, T, D)
            if name != "v":
                heads = apply_rope(heads, *rope["cos_sin"])
            per_layer[layer][name].append(heads.float().cpu())

        return record

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(i, "q", config.n_head)))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k", config.n_kv_head)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(i, "v", config.n_kv_head)))
    n_batches = 0
    try:
        with _all_layers_computing(model):
            for batch in batches:
                input_ids = batch.to(next(model.parameters()).device).long()
                rope["cos_sin"] = model.rotary_emb(input_ids.shape[1], input_ids.device)  # fp32 (T, D) each
                model(input_ids)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if n_batches == 0:
        raise ValueError("No batches to analyse: the data stream was empty.")
    if any(len(recorded) != n_batches for layer in per_layer for recorded in layer.values()):
        raise RuntimeError("Some layer did not project its own Q, K and V during capture (is it in compute mode?).")
    q, k, v = ([torch.cat(layer[name]) for layer in per_layer] for name in ("q", "k", "v"))
    attn = [attention_probs(qi, ki) for qi, ki in zip(q, k, strict=True)]
    return Activations(q=q, k=k, v=v, attn=attn)
