"""The LLaMA decoder with EPAS sharing. Parameter names follow HF ``modeling_llama`` (a checkpoint maps by key)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend

from epas_lightning.errors import ConfigError
from epas_lightning.model.attention import Attention, AttentionContext, Shared
from epas_lightning.model.config import LlamaConfig, check_is_config
from epas_lightning.model.kv_cache import KVCache, StaticKVCache
from epas_lightning.model.layers import MLP, RMSNorm
from epas_lightning.model.rope import RotaryEmbedding
from epas_lightning.model.sharing import SharingState

if TYPE_CHECKING:
    from epas_lightning.region import TrainedRegion


def _normal_(weight: torch.Tensor, std: float) -> None:
    """Fill ``weight`` from N(0, std). A sharded (DTensor) weight receives the shard of a full draw made on rank 0,
    so the model is the same for any number of ranks (a local draw per shard would repeat values across ranks)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # slow to import; loaded wherever a DTensor exists
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.to_local().device)
        nn.init.normal_(full, std=std)
        weight.copy_(dtensor.distribute_tensor(full, weight.device_mesh, weight.placements))
    else:
        nn.init.normal_(weight, std=std)


class DecoderLayer(nn.Module):
    """RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU MLP -> residual."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config.n_embd, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        reuse: Shared | None = None,
        cache: KVCache | None = None,
        want_probs: bool = False,
    ) -> tuple[torch.Tensor, Shared | None]:
        h, shared = self.self_attn(self.input_layernorm(x), ctx, reuse, cache, want_probs)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, shared


class Llama(nn.Module):
    """Decoder-only LLaMA. ``sharing`` says which layers reuse the Q/K (or K/V) of the last compute layer.

    ``attention_reuse`` (``qk`` mode): sharing layers reuse the source layer's attention probabilities instead of
    recomputing softmax(Q K^T) from the same Q and K; the same model, less work (see ``attention.py``).
    ``sdpa_order``: the SDPA kernels every layer tries first (``None``: torch's order); same model, another kernel.
    """

    def __init__(self, config: LlamaConfig, attention_reuse: bool = False) -> None:
        super().__init__()
        check_is_config(config, "Llama(config=...)")
        self.config = config
        with _default_init_discarded():  # the weights are init_weights' draws alone, as on the meta device (FSDP2)
            self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.n_embd)
            self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layer))
            self.norm = RMSNorm(config.n_embd, config.norm_eps)
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.rotary_emb = RotaryEmbedding.of(config)
        self.sharing = SharingState(config.n_layer)
        self.trained_region: TrainedRegion | None = None
        """The region the checkpoint it was loaded from trained (``load_model`` records it): what ``set_region``
        counts its layers in; ``None`` for a model built here (``set_region`` then takes the deepest layers)."""
        self.attention_reuse = attention_reuse
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and reset every buffer); the one place init is defined.

        | tensor                                            | init                          |
        |---------------------------------------------------|-------------------------------|
        | embed_tokens, lm_head, q/k/v_proj, gate/up_proj   | N(0, init_std)                |
        | o_proj, down_proj (write into the residual)       | N(0, init_std / sqrt(2 L))    |
        | attention biases (``attention_bias``)             | 0                             |
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
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if linear.bias is not None:
                    linear.bias.zero_()
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()
        self.sharing.reset_parameters()

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the LM head use the embedding matrix itself; again after ``to_empty``, which
        gives each module a tensor of its own."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_shared_layers(self, layers: Iterable[int]) -> None:
        """Switch exactly ``layers`` to sharing mode (all others compute); cheap, no module is rebuilt."""
        self.sharing.set_shared_layers(layers)

    @property
    def attention_reuse(self) -> bool:
        return self._attention_reuse

    @attention_reuse.setter
    def attention_reuse(self, value: bool) -> None:
        check_attention_reuse(self.config, value)
        self._attention_reuse = bool(value)

    @property
    def sdpa_order(self) -> tuple[SDPBackend, ...] | None:
        return next(m.sdpa_order for m in self.modules() if isinstance(m, Attention))

    @sdpa_order.setter
    def sdpa_order(self, order: Iterable[SDPBackend] | None) -> None:
        for module in self.modules():  # (through activation-checkpointing wrappers)
            if isinstance(module, Attention):
                module.sdpa_order = None if order is None else tuple(order)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        static: bool = False,
    ) -> KVCache:
        """An empty KV cache for the current sharing region (dtype/device default to the weights'); ``static``: one
        whose decode steps a CUDA graph can capture (:class:`StaticKVCache`)."""
        weight = self.embed_tokens.weight
        kind = StaticKVCache if static else KVCache
        return kind(
            self.config, self.sharing.flags, batch_size, max_len, device or weight.device, dtype or weight.dtype
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for token ids (B, T).

        With ``cache``, the tokens continue the cached sequences (and are appended to them); ``attention_mask``
        (B, T), 0 at left padding, lets rows of different lengths share a batch. ``head(hidden, lm_head_weight)``,
        given the final normed hidden states (B, T, C) and the head's (padded_vocab_size, C) weight, replaces the LM
        head and its result is returned: a loss that never materialises the logits (``epas_lightning.loss``). It runs
        inside ``forward``, so FSDP has the head's weight gathered.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"input_ids must be a (batch, seq_len) tensor of token ids, not a {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len) token ids, got shape {tuple(input_ids.shape)}")
        if not holds_token_ids(input_ids):
            raise ValueError(f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}")
        T = input_ids.shape[1]
        flags = self.sharing.flags
        if cache is None:
            if T > self.config.context_length:
                raise ValueError(f"Sequence length {T} exceeds the context length {self.config.context_length}.")
            if attention_mask is not None:
                raise ValueError("attention_mask is only supported with a KV cache (left-padded generation).")
            cos, sin = self.rotary_emb(T, input_ids.device)  # fp32, each (T, D)
            ctx = AttentionContext(cos, sin)
        else:
            if input_ids.shape[0] != cache.batch_size:  # failed in a reshape: "shape '[1, 3, 64]' is invalid"
                raise ValueError(
                    f"The KV cache holds {cache.batch_size} rows, but input_ids has {input_ids.shape[0]}: build the "
                    "cache with model.new_cache(batch_size, max_len) for this batch."
                )
            if cache.shared_flags != flags:
                raise ValueError(
                    f"The KV cache was built for sharing layers {_layers(cache.shared_flags)}, but the model now "
                    f"shares {_layers(flags)}: build a new cache after changing the region."
                )
            ctx = cache.context(T, attention_mask)
        reuse_probs = self._attention_reuse
        x = self.embed_tokens(input_ids)  # (B, T, C)
        shared: Shared | None = None
        n = len(flags)
        for i, (layer, shares) in enumerate(zip(self.layers, flags, strict=True)):
            want_probs = reuse_probs and not shares and i + 1 < n and flags[i + 1]
            x, produced = layer(x, ctx, shared if shares else None, cache, want_probs)
            if produced is not None:  # a compute layer: the later sharing layers reuse what it produced
                shared = produced
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if head is not None:
            return head(x, self.lm_head.weight)
        return self.lm_head(x)


def _default_init_discarded() -> AbstractContextManager[None]:
    """Undo the random draws of torch's default init of the layers built inside (``nn.Linear``'s kaiming, the
    embedding's normal) on the default device's generator: :meth:`Llama.init_weights` then draws from the seed as it
    does after a meta-device build, so one seed gives one model on one device, under DDP, and under FSDP2 (whose
    layers are built on the meta device, drawing nothing)."""
    device = torch.get_default_device()
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def check_is_llama(model: object, argument: str = "model") -> None:
    """``model`` is a :class:`Llama` (or a wrapper that forwards its attributes, as ``torch.compile``'s does); a
    ``LoadedModel`` or an ``EPASModule`` failed deep inside with an AttributeError (``embed_tokens``)."""
    if isinstance(model, nn.Module) and hasattr(model, "sharing") and hasattr(model, "embed_tokens"):
        return
    if isinstance(getattr(model, "model", None), Llama):  # load_model's LoadedModel, a trained EPASModule
        fix = f"pass its .model{' (and its .region to set_region)' if hasattr(model, 'region') else ''}"
    else:
        fix = "load one with epas_lightning.load_model(path).model"
    raise ConfigError(f"{argument} must be a Llama, not a {type(model).__name__}", argument, fix)


def holds_token_ids(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s dtype holds token ids: an integer dtype (float, complex and bool ones do not)."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def check_has_weights(model: Llama, argument: str = "model") -> None:
    """``model``'s weights hold values: one built under ``torch.device("meta")`` (FSDP's deferred init) failed deep
    inside with "Tensor.item() cannot be called on meta tensors"."""
    if model.embed_tokens.weight.is_meta:
        raise ConfigError(
            f"{argument} is on the meta device: its weights hold no values",
            argument,
            "load a trained one with epas_lightning.load_model(path).model, or build it off the meta device",
        )


def check_attention_reuse(config: LlamaConfig, enabled: bool) -> None:
    """Attention-probability reuse is only the same model in ``qk`` mode; refuse it otherwise."""
    if enabled and config.sharing_mode != "qk":
        raise ValueError(
            "attention_reuse needs sharing_mode='qk': in 'kv' mode each sharing layer has its own queries, so "
            "its attention probabilities differ from the source's."
        )


def _layers(flags: tuple[bool, ...]) -> list[int]:
    return [i for i, shares in enumerate(flags) if shares]
