"""An EPAS LLaMA for ``transformers`` (HF remote code written by epas_lightning; imports only torch + transformers).

The parameters and their names are those of ``LlamaForCausalLM`` (with ``epas_attention_bias`` "qkv", a Qwen2's: q, k
and v biases, none on o_proj); only the forward differs. A layer listed in
``config.epas_shared_layers`` runs in sharing mode: in "qk" mode it reuses the post-RoPE query and key of the last
computing layer before it and projects only V (in "kv" mode it reuses that layer's K and V and projects only Q).
V, the output projection, the MLP, norms and residuals always run. ``output_hidden_states`` returns what the stock
model does: the embeddings, then each layer's output, the last one normed; ``output_attentions`` each layer's
attention weights, computed as eager attention does (a sharing layer's in "qk" mode are its source's);
``attention_dropout`` drops them in training, as on the stock model.

Generation works with and without a KV cache, on transformers 4.57 to 5.24: the cache reaches ``forward`` as
``past_key_values`` up to 5.23 and as ``cache`` from 5.24, and the output names it the same way. With the cache every
layer stores the K/V it attends over, so a sharing layer stores a copy of its source's keys (correct, not
memory-saving); the project's own ``generate`` is the place for the smaller cache.

Each decoder layer is called as a module, so hooks on it run (accelerate's ``device_map``, FSDP, a probe); it returns
its hidden states, then its attention weights (or None) and the pair it hands on. ``gradient_checkpointing_enable()``
works as on the stock model: in training transformers recomputes each decoder layer it marks in backward (a sharing
layer from the Q/K or K/V its source handed on), and the cache is turned off.

Notation: B batch, T new tokens, S cached + new tokens, H query heads, H_kv key/value heads, D head dim.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import logging

from .configuration_epas_llama import EpasLlamaConfig

logger = logging.get_logger(__name__)

CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""How this transformers version names the KV cache in model inputs and outputs (``cache`` from 5.24 on)."""
MASK_SIZES_BY_LENGTH = "query_length" in inspect.signature(Cache.get_mask_sizes).parameters
"""Whether a cache's ``get_mask_sizes`` takes the number of new tokens (transformers 5) or their positions (4.57)."""


def _rope_theta(config):
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _inv_freq(config, head_dim, device):
    """fp32 (D / 2,) RoPE frequencies; a scaled RoPE (llama3, linear) as transformers computes it for LLaMA."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, device)[0].float()
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / _rope_theta(config) ** exponent


def _rope_tables(config, head_dim, position_ids):
    """fp32 (cos, sin), each (B, 1, T, D), for ``position_ids`` (B, T): rotate-half layout."""
    inv_freq = _inv_freq(config, head_dim, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D / 2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _key_span(cache, cache_position):
    """(how many keys, the position of the first) attention gets once ``cache`` holds the new tokens at
    ``cache_position``, as the cache tells transformers' own masks (a static cache: all its slots, empty ones too)."""
    if cache is None:
        return cache_position.shape[0], 0
    return cache.get_mask_sizes(cache_position.shape[0] if MASK_SIZES_BY_LENGTH else cache_position, 0)


def _pads_nothing(attention_mask):
    """Whether a 2-D ``attention_mask`` keeps every token, as transformers checks before dropping it for SDPA's plain
    causal (flash) attention; compiled, the mask is kept, its content unknown while tracing."""
    return not torch.compiler.is_compiling() and bool(attention_mask.all())


def _attention_mask(attention_mask, batch, cache_position, keys, first_key):
    """Boolean mask (B, 1, T, S), True where a query at ``cache_position`` may attend to the ``keys`` keys from position
    ``first_key`` on, or None for plain causal attention (no cached keys, nothing padded)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1
    new = cache_position.shape[0]
    if keys == new and first_key == 0 and (attention_mask is None or _pads_nothing(attention_mask)):
        return None
    key_pos = torch.arange(first_key, first_key + keys, device=cache_position.device)
    mask = key_pos[None, :] <= cache_position[:, None]  # (T, S) causal
    if attention_mask is not None:  # as transformers: read from first_key, the slots past its end padding
        keep = F.pad(attention_mask, (0, first_key + keys - attention_mask.shape[-1]))[:, first_key:].bool()
        mask = (mask & keep[:, None, None]) | (key_pos[None, :] == cache_position[:, None])  # a padded row sees itself
    return mask.expand(batch, 1, new, keys)


def _attention_weights(q, k, v, mask, dropout):
    """Attention output (B, H, T, D) and its weights (B, H, T, S), as transformers' eager attention computes them
    (``dropout`` applied to the weights)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:  # plain causal, no cached keys (SDPA's is_causal)
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, dropout, training=dropout > 0)
    return weights @ v, weights


class EpasLlamaDecoderLayer(LlamaDecoderLayer):
    """A ``LlamaDecoderLayer`` (the same parameters) run as EPAS runs it. It is called as a module, so that hooks on it
    run (accelerate's ``device_map``, FSDP, a probe) and transformers' gradient checkpointing recomputes it."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.config, self.layer_idx = config, layer_idx
        if getattr(config, "epas_attention_bias", None) == "qkv":  # a Qwen2: LlamaAttention biased o_proj too
            self.self_attn.o_proj.bias = None

    def forward(self, h, *reuse, cos, sin, mask, kv_cache, cache_kwargs, want_weights):
        """(the output, the attention weights or None, then the pair this layer computed for the sharing layers after
        it: post-RoPE (Q, K) in "qk" mode, (K, V) in "kv" mode; none when it reuses ``reuse``, the pair of the last
        computing layer). Tensors that need gradients come positionally, so that a checkpoint (reentrant or not)
        recomputes the layer from them and passes their gradients back to where they came from. ``cache_kwargs`` say
        where the new tokens go in ``kv_cache`` (4.57's StaticCache reads them; not named ``cache``, which
        transformers' checkpointing drops)."""
        config, (B, T, _) = self.config, h.shape
        n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.hidden_size // n_head

        def heads(x, n):
            return x.view(B, T, n, head_dim).transpose(1, 2)  # (B, n, T, D)

        attn = self.self_attn
        x = self.input_layernorm(h)
        computed = ()
        if not reuse:
            q = _apply_rope(heads(attn.q_proj(x), n_head), cos, sin)  # (B, H, T, D)
            k = _apply_rope(heads(attn.k_proj(x), n_kv_head), cos, sin)  # (B, H_kv, T, D)
            v = heads(attn.v_proj(x), n_kv_head)
            computed = (q, k) if config.epas_sharing_mode == "qk" else (k, v)
        elif config.epas_sharing_mode == "qk":
            q, k = reuse
            v = heads(attn.v_proj(x), n_kv_head)
        else:
            k, v = reuse
            q = _apply_rope(heads(attn.q_proj(x), n_head), cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx, cache_kwargs)  # (B, H_kv, S, D) each
        weights, dropout = None, config.attention_dropout if self.training else 0.0
        if want_weights:
            y, weights = _attention_weights(q, k, v, mask, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, enable_gqa=n_kv_head != n_head
            )
        h = h + attn.o_proj(y.transpose(1, 2).reshape(B, T, n_head * head_dim))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return (h, weights, *computed)


class EpasLlamaModel(LlamaModel):
    config_class = EpasLlamaConfig
    _no_split_modules = ["EpasLlamaDecoderLayer"]

    def __init__(self, config):  # LlamaModel's, with EPAS layers: each layer built and initialised once, as stock
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(EpasLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # unused here; kept for code that reads it
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        layers = self.layers[: self.config.num_hidden_layers]
        grad = self.training and torch.is_grad_enabled()  # no backward, nothing to recompute (as stock)
        recompute = grad and any(layer.gradient_checkpointing for layer in layers)
        if recompute and (use_cache or past_key_values is not None):  # a recomputed layer would write it twice
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        B, T, _ = inputs_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        cache_position = kwargs.get("cache_position")  # given by transformers < 5
        if cache_position is None:
            cache_position = torch.arange(T, device=inputs_embeds.device) + past  # T long: `past` may be a tensor
        if position_ids is None:
            position_ids = cache_position[None].expand(B, T)
        config = self.config
        cos, sin = _rope_tables(config, config.hidden_size // config.num_attention_heads, position_ids)
        mask = _attention_mask(attention_mask, B, cache_position, *_key_span(past_key_values, cache_position))
        shared_layers = set(config.epas_shared_layers)

        h = inputs_embeds
        record = kwargs.get("output_hidden_states")
        hidden = [h] if (config.output_hidden_states if record is None else record) else None
        record = kwargs.get("output_attentions")
        attentions = [] if (config.output_attentions if record is None else record) else None
        reuse, options = (), dict(cos=cos, sin=sin, mask=mask, want_weights=attentions is not None)
        options.update(kv_cache=past_key_values, cache_kwargs={"cache_position": cache_position})
        for i, layer in enumerate(layers):  # transformers' GradientCheckpointingLayer recomputes a checkpointed one
            h, weights, *computed = layer(h, *reuse, **options) if i in shared_layers and reuse else layer(h, **options)
            reuse = tuple(computed) or reuse
            if attentions is not None:
                attentions.append(weights)
            if hidden is not None:
                hidden.append(h)
        h = self.norm(h)
        if hidden is not None:  # as transformers' LlamaModel: the last layer's output is given normed
            hidden[-1] = h
        output = BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=None if attentions is None else tuple(attentions),
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )
        return output.to_tuple() if kwargs.get("return_dict") is False else output  # the causal LM's own is popped


class EpasLlamaForCausalLM(LlamaForCausalLM):
    config_class = EpasLlamaConfig
    _no_split_modules = ["EpasLlamaDecoderLayer"]

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = EpasLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_region(self, n):
        """Run with the first ``n`` layers of the trained region sharing (0 = dense; up to its length)."""
        trained = self.config.epas_trained_region
        if not 0 <= n <= len(trained):
            most = f"{len(trained)} sharing layer{'' if len(trained) == 1 else 's'}"
            raise ValueError(f"The weights were trained with up to {most}, not {n}.")
        self.set_shared_layers(trained[:n])

    def set_shared_layers(self, layers):
        """Run with exactly ``layers`` sharing (e.g. a shorter deepest region for a smaller compute budget)."""
        layers = sorted(int(i) for i in layers)
        bad = [i for i in layers if not 1 <= i < self.config.num_hidden_layers]
        if bad:
            raise ValueError(f"Layers {bad} cannot share: valid are 1..{self.config.num_hidden_layers - 1}.")
        self.config.epas_shared_layers = layers
