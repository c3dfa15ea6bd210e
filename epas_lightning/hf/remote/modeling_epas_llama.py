"""An EPAS LLaMA for ``transformers`` (HF remote code written by epas_lightning; imports only torch + transformers).

The parameters and their names are those of ``LlamaForCausalLM`` (with ``epas_attention_bias`` "qkv", a Qwen2's: q, k
and v biases, none on o_proj); only the forward differs. A layer listed in
``config.epas_shared_layers`` runs in sharing mode: in "qk" mode it reuses the post-RoPE query and key of the last
computing layer before it and projects only V (in "kv" mode it reuses that layer's K and V and projects only Q).
V, the output projection, the MLP, norms and residuals always run. ``output_hidden_states`` returns what the stock
model does: the embeddings, then each layer's output, the last one normed (only those it names, from transformers
5.24, where it may be indices); ``output_attentions`` each layer's attention weights under eager attention (a sharing
layer's in "qk" mode are its source's), under SDPA none, as the stock model of the installed transformers gives them;
``attention_dropout`` drops them in training, as on the stock model. Eager and SDPA attention run; other
implementations (flash, flex) are refused, at load with transformers' error.

Generation works with and without a KV cache, on transformers 4.57 to 5.24: the cache reaches ``forward`` as
``past_key_values`` up to 5.23 and as ``cache`` from 5.24, and the output names it the same way. With the cache every
layer stores the K/V it attends over, so a sharing layer stores a copy of its source's keys (correct, not
memory-saving); the project's own ``generate`` is the place for the smaller cache.

Each decoder layer and its attention are called as modules, as the stock layer calls them, so hooks on them run
(accelerate's ``device_map``, FSDP, a probe) and see what they see on the stock model: a layer returns its hidden
states, an attention gets ``hidden_states`` by name and returns ``(attn_output, attn_weights)``. The Q/K (or K/V) pair
a computing layer hands to the sharing layers after it travels in a relay passed as the keyword ``epas_relay``.
``gradient_checkpointing_enable()`` works as on the stock model: in training transformers recomputes each decoder layer
it marks in backward (a sharing layer from the pair its source handed on, which the checkpoint takes as an input and a
computing layer's checkpoint gives as an output), and the cache is turned off.

Layer-wise tools (GPTQ-style calibration) catch layer 0's inputs and keyword arguments, then call each layer alone over
every sample. Given those arguments (the relay among them), a sharing layer takes the pair computed with exactly the
hidden states it is given (the pair of its own sample, and of the layer before as last run over that input); a sharing
layer given no pair (no relay, other hidden states), or its attention called alone (AWQ's scale search), raises,
saying what to do, never runs otherwise.

Notation: B batch, T new tokens, S cached + new tokens, H query heads, H_kv key/value heads, D head dim.
"""

import inspect
import numbers
import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import logging

try:  # transformers 5.24 on: output_hidden_states may name the hidden states to keep
    from transformers.utils.output_capturing import selected_hidden_states
except ImportError:  # before: any true value asks for all

    def selected_hidden_states(output_hidden_states):
        return None


from .configuration_epas_llama import EpasLlamaConfig

logger = logging.get_logger(__name__)

CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""How this transformers version names the KV cache in model inputs and outputs (``cache`` from 5.24 on)."""
MASK_SIZES_BY_LENGTH = "query_length" in inspect.signature(Cache.get_mask_sizes).parameters
"""Whether a cache's ``get_mask_sizes`` takes the number of new tokens (transformers 5) or their positions (4.57)."""
NO_WEIGHTS = () if MASK_SIZES_BY_LENGTH else None
"""The stock model's ``attentions`` when asked for with none computed (SDPA): empty in transformers 5, None in 4.57."""
ATTENTIONS = ("eager", "sdpa")


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
    """fp32 (cos, sin), each (B, T, D) as the stock model's ``position_embeddings``, for ``position_ids`` (B, T):
    rotate-half layout."""
    inv_freq = _inv_freq(config, head_dim, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
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


def _selected(hidden, indices):
    """``hidden`` with those not at ``indices`` (negative ones from the end) None, as the stock model selects them;
    all of them where ``indices`` is None."""
    if indices is None:
        return hidden
    n = len(hidden)
    keep = {i % n for i in indices if -n <= i < n}
    return [x if i in keep else None for i, x in enumerate(hidden)]


FINGERPRINT_WORDS = 1 << 22
"""How many 16-bit words (bytes for a 1-byte dtype) of hidden states ``_fingerprint`` reads at a time: its extra memory
(16 bytes a word, 64 MiB: the words and their places in int32, and the int64 copy of either that torch's integer sum
makes; 2 bytes a word more for a piece copied from non-contiguous hidden states) does not grow with the hidden states
(a layer-wise tool may give a layer a whole calibration batch at once)."""


def _pieces(x, most):
    """The elements of ``x`` in order (its flattened order), as contiguous 1-D tensors of at most ``most`` elements
    each: views of a contiguous ``x``, else copies of one part of it at a time."""
    if x.numel() == 0:
        return
    if x.is_contiguous():
        flat = x.view(-1)
        for start in range(0, flat.numel(), most):
            yield flat[start : start + most]
    elif x.dim() > 1 and x[0].numel() > most:  # one row (along dim 0) is too many: each row in pieces
        for row in x.unbind(0):
            yield from _pieces(row, most)
    else:  # as many whole rows as fit
        rows = max(1, most // x[0].numel())
        for start in range(0, x.shape[0], rows):
            yield x[start : start + rows].contiguous().view(-1)


def _word_sums(piece, word, done):
    """(the sum of the words of ``piece``, 1-D, read as ``word``, and their sum each weighted by its place), int64
    tensors, its first word the one after the ``done`` read before it; the buffers freed on return."""
    if piece.stride(0) != 1:  # one element: contiguous at any stride, which a view as a smaller ``word`` needs to be 1
        piece = piece.clone(memory_format=torch.contiguous_format)
    bits = piece.view(word).int()  # (n,): int32, so a word times its place (< 2**15 * 65521) cannot overflow
    places = torch.arange(bits.numel(), dtype=torch.int32, device=bits.device)
    places.add_(done % 65521).remainder_(65521).add_(1)  # (n,) the places of words done..done + n - 1: 1..65521
    return bits.sum(), places.mul_(bits).sum()  # int32 sums add up in int64 (each in an int64 copy, freed)


def _fingerprint(x):
    """(shape, dtype, two checksums of the bits of ``x``): the same for the same values on any device (a layer's output
    copied into a calibration tool's buffer, moved off the accelerator and back), others for other samples' values.
    The checksums are the sum of its 16-bit words (bytes for a 1-byte dtype) and their sum each weighted by its place
    (order counts), read ``FINGERPRINT_WORDS`` at a time and added up on ``x``'s device (one sync)."""
    x = x.detach()
    word = torch.int16 if x.element_size() > 1 else torch.int8
    most = max(1, FINGERPRINT_WORDS * word.itemsize // x.element_size())  # elements per piece
    total = weighted = torch.zeros((), dtype=torch.int64, device=x.device)
    done = 0  # words read so far
    for piece in _pieces(x, most):
        sums = _word_sums(piece, word, done)
        total, weighted = total + sums[0], weighted + sums[1]
        done += piece.numel() * x.element_size() // word.itemsize
    return tuple(x.shape), x.dtype, *torch.stack((total, weighted)).tolist()


def _region_error(config, layers):
    """The error for ``layers`` of ``config.epas_shared_layers`` that cannot share (the region set past the config's
    checks: a ``from_pretrained`` keyword, the loaded config changed)."""
    which = f"Layer {layers[0]!r}" if len(layers) == 1 else f"Layers {layers}"
    return ValueError(
        f"{which} cannot share: epas_shared_layers may list layers 1..{config.num_hidden_layers - 1} (layer 0 computes "
        "the first pair); give a region within them, or call model.set_region(n) for the first n of the trained one."
    )


def _is_index(i):
    """Whether ``i`` is a layer's index: an integer (numpy's too), not a bool (a mask's True equals layer 1)."""
    return isinstance(i, numbers.Integral) and not isinstance(i, bool)


INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_index_tensor(i):
    """Whether ``i`` is a 0-d integer tensor (an item of ``torch.tensor([2, 3])``), not a bool one."""
    return isinstance(i, torch.Tensor) and i.dim() == 0 and i.dtype in INDEX_DTYPES


def _listed(region):
    """The items of ``region``, or None where it is no collection: not iterable (an int, a 0-d array), or an iterator
    (a generator), which a check would read to its end, leaving the layers none."""
    if isinstance(region, Iterator):
        return None
    try:
        return list(region)
    except TypeError:
        return None


def _check_region(config):
    """Raise, naming them, where ``config.epas_shared_layers`` lists layers that cannot share (0, past the last, not a
    layer's index) or is no list: set on the loaded config past its checks, they would run computing, silently."""
    region, may = config.epas_shared_layers, range(1, config.num_hidden_layers)
    items = _listed(region)
    if items is None:
        raise ValueError(
            f"epas_shared_layers must list layers 1..{may.stop - 1}, not {region!r}: give a list, "
            "or call model.set_region(n) for the first n of the trained region."
        )
    bad = [i for i in items if not _is_index(i) or i not in may]
    if bad:
        raise _region_error(config, bad)


def _cannot_share(config, layer_idx):
    """The error for sharing layer ``layer_idx`` called without the pair of its source (or with no layer before it to
    compute one)."""
    sources = [i for i in range(layer_idx) if i not in config.epas_shared_layers]
    if not sources:
        return _region_error(config, [layer_idx])
    source = max(sources)
    pair = "Q/K" if config.epas_sharing_mode == "qk" else "K/V"
    return RuntimeError(
        f"Layer {layer_idx} reuses layer {source}'s {pair}, which it was not handed: it gets them in the model's "
        f"forward, or called alone as a whole layer (layer by layer, as GPTQ calibration runs it; never its attention "
        f"alone, as AWQ's scale search does) with the keyword arguments a "
        f"forward passed (epas_relay) and exactly the hidden states layer {layer_idx - 1} returned there. Run the "
        "whole model, or load it with epas_shared_layers=[] (export with --sharing-layers 0) for a tool that cannot."
    )


class _Relay:
    """What the layers of one forward hand on: the pair of the last computing layer (post-RoPE (Q, K) in "qk" mode,
    (K, V) in "kv" mode) and, when recording, each layer's attention weights as its attention returned them.

    Once the forward is over (``live`` False) a layer-wise tool may call the layers alone with the keyword arguments
    it caught, this relay among them, over many samples: then a pair is handed on keyed to the hidden states it goes
    with, so a sharing layer takes the pair of its own sample."""

    def __init__(self, record_weights):
        self.pair, self.weights, self.live = (), [] if record_weights else None, True
        self.taken_by = None  # called alone: the layer whose call took the pair
        self.kept, self.sources = {}, {}  # (layer, its input's fingerprint) -> pair; (layer, fingerprint) -> whence
        self.spent = set()  # the keys in ``kept`` of the pairs a sharing layer took

    def pair_for(self, layer_idx):
        """The pair layer ``layer_idx`` may read: in the forward the last one handed on; called alone the one its own
        layer's call took (not what another call, its attention's alone say, left here)."""
        return self.pair if self.live or self.taken_by == layer_idx else ()

    def enter(self, layer_idx, hidden_states, shares, hands_on):
        """Called alone: take the pair handed to layer ``layer_idx`` (if it ``shares``) with exactly ``hidden_states``,
        none if none was; the fingerprint of ``hidden_states`` where the layer ``hands_on`` its pair, else None."""
        self.pair, self.taken_by = (), layer_idx
        given = _fingerprint(hidden_states) if shares or hands_on else None
        if shares:
            self.pair = self.kept.get((layer_idx, given), ())
            if self.pair:
                self.spent.add((layer_idx, given))
        return given if hands_on else None

    def leave(self, layer_idx, given, output):
        """Called alone: hand the pair on (detached: a layer alone takes it as data) to layer ``layer_idx + 1`` given
        exactly ``output``, where ``given`` (the fingerprint of this call's input) is not None. What this layer handed
        on from that input before is dropped (a layer trained alone, epoch after epoch), what went to layers before it
        (kept for it: a tool may run a layer twice over its inputs, GPTQ's second pass over the quantized one) and what
        layers after it took (spent: this layer running again starts their next sweep, as a loop sample by sample
        through all the layers does), so a layer-by-layer loop keeps one pass's pairs and a sample-by-sample one a
        sample's."""
        if given is not None:
            kept = {key for key in self.kept if key[0] >= layer_idx and not (key[0] > layer_idx and key in self.spent)}
            self.kept = {key: self.kept[key] for key in kept}
            self.sources = {key: whence for key, whence in self.sources.items() if (key[0], whence) in kept}
            self.kept.pop((layer_idx + 1, self.sources.pop((layer_idx + 1, given), None)), None)
            handed = _fingerprint(output)
            self.kept[layer_idx + 1, handed] = tuple(x.detach() for x in self.pair)
            self.sources[layer_idx + 1, given] = handed
            self.spent = {key for key in self.spent if key in self.kept and key != (layer_idx + 1, handed)}

    def end(self):
        """Called alone, the layer's call over, or cut short (a hook's early stop): no pair left for another call."""
        self.pair, self.taken_by = (), None


class EpasLlamaAttention(LlamaAttention):
    """``LlamaAttention`` (the same parameters and call) run as EPAS runs it: a layer listed in
    ``config.epas_shared_layers`` takes the pair in ``epas_relay`` and projects only what it lacks; a computing one
    leaves its pair there."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if getattr(config, "epas_attention_bias", None) == "qkv":  # a Qwen2: LlamaAttention biased o_proj too
            self.o_proj.bias = None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, epas_relay=None, **kwargs):
        """(attention output (B, T, C) after ``o_proj``, the weights (B, H, T, S) under eager attention, else None).
        ``attention_mask`` is boolean (B, 1, T, S), True where attended, or None for plain causal attention; the cache
        comes as ``cache`` (transformers 5.24 on) or ``past_key_values``, told ``cache_position`` (4.57's StaticCache
        reads it)."""
        config, (B, T, _) = self.config, hidden_states.shape
        implementation = config._attn_implementation or "sdpa"
        if implementation not in ATTENTIONS:
            raise ValueError(f"The EPAS LLaMA runs eager or sdpa attention, not {implementation!r}: load it with one.")
        cos, sin = (table[:, None] for table in position_embeddings)  # (B, 1, T, D)

        def heads(x):
            return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n, T, D)

        if epas_relay is None or not epas_relay.live:  # called alone: the model's forward did not check the region
            _check_region(config)
        shared = self.layer_idx in config.epas_shared_layers
        if shared and not (epas_relay is not None and epas_relay.pair_for(self.layer_idx)):
            raise _cannot_share(config, self.layer_idx)
        if not shared:
            q = _apply_rope(heads(self.q_proj(hidden_states)), cos, sin)  # (B, H, T, D)
            k = _apply_rope(heads(self.k_proj(hidden_states)), cos, sin)  # (B, H_kv, T, D)
            v = heads(self.v_proj(hidden_states))
            if epas_relay is not None:
                epas_relay.pair = (q, k) if config.epas_sharing_mode == "qk" else (k, v)
        elif config.epas_sharing_mode == "qk":  # the pair on this layer's device (a device_map may split the layers)
            q, k = (x.to(hidden_states.device) for x in epas_relay.pair)
            v = heads(self.v_proj(hidden_states))
        else:
            k, v = (x.to(hidden_states.device) for x in epas_relay.pair)
            q = _apply_rope(heads(self.q_proj(hidden_states)), cos, sin)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            where = {"cache_position": kwargs.get("cache_position")}
            k, v = cache.update(k, v, self.layer_idx, where)  # (B, H_kv, S, D) each
        weights, dropout = None, self.attention_dropout if self.training else 0.0
        if implementation == "eager":
            y, weights = _attention_weights(q, k, v, attention_mask, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=attention_mask is None, enable_gqa=True
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), weights


class EpasLlamaDecoderLayer(LlamaDecoderLayer):
    """A ``LlamaDecoderLayer`` (the same parameters, call and output) whose attention runs as EPAS runs it."""

    def __init__(self, config, layer_idx):  # LlamaDecoderLayer's, with the EPAS attention: built once, in stock's order
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = EpasLlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        """The layer's output (B, T, C); ``kwargs`` (the cache, ``epas_relay``) go on to the attention as stock's do."""
        relay, index = kwargs.get("epas_relay"), self.self_attn.layer_idx
        shared = self.self_attn.config.epas_shared_layers
        alone = relay is not None and not relay.live  # a layer-wise tool's call, with a finished forward's arguments
        if alone:
            _check_region(self.self_attn.config)  # changed on the config since the forward that made the relay
            given = relay.enter(index, hidden_states, shares=index in shared, hands_on=index + 1 in shared)
        try:
            attended, weights = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if relay is not None and relay.weights is not None:
                relay.weights.append(weights)
            hidden_states = hidden_states + attended
            output = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            if alone:
                relay.leave(index, given, output)
        finally:
            if alone:
                relay.end()
        return output

    @property
    def _gradient_checkpointing_func(self):
        """The checkpoint transformers' ``GradientCheckpointingLayer`` runs this layer in, the relay's pair made one of
        its inputs in a sharing layer and one of its outputs in a computing one: a reentrant checkpoint passes gradients
        only through those."""
        return self._checkpoint_with_relay

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, checkpoint):  # set by transformers' gradient_checkpointing_enable
        self._checkpoint = checkpoint

    def _checkpoint_with_relay(self, function, *args):
        relay = getattr(function, "keywords", {}).get("epas_relay")  # the partial transformers checkpoints
        if relay is None or not relay.live:  # no pair to pass, or a layer-wise tool's call: the layer keys its own
            return self._checkpoint(function, *args)
        attention = self.self_attn  # only a sharing layer reads the pair: another's checkpoint would keep it idle
        received = relay.pair if attention.layer_idx in attention.config.epas_shared_layers else ()

        def run(*inputs):
            handed = relay.pair = inputs[len(args) :]  # in a recompute, the checkpoint's copies
            live, relay.live = relay.live, True  # a recompute in backward runs as in the forward
            try:
                output = function(*inputs[: len(args)])
            finally:
                relay.live = live
            return (output,) if relay.pair is handed else (output, *relay.pair)

        outputs = self._checkpoint(run, *args, *received)
        relay.pair = tuple(outputs[1:]) or received
        return outputs[0]


class EpasLlamaModel(LlamaModel):
    config_class = EpasLlamaConfig
    _no_split_modules = ["EpasLlamaDecoderLayer"]
    _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = False  # eager and SDPA only

    def __init__(self, config):  # LlamaModel's, with EPAS layers: each layer built and initialised once, as stock
        LlamaPreTrainedModel.__init__(self, config)
        _check_region(config)  # set past the config's checks: refused before anything is built or a weight loaded
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
        _check_region(self.config)  # changed on the config since load: refused, not run without the layers it names
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
        position_embeddings = _rope_tables(config, config.hidden_size // config.num_attention_heads, position_ids)
        mask = _attention_mask(attention_mask, B, cache_position, *_key_span(past_key_values, cache_position))
        keep = kwargs.get("output_hidden_states")
        keep = config.output_hidden_states if keep is None else keep
        hidden = [inputs_embeds] if keep else None
        record = kwargs.get("output_attentions")
        relay = _Relay(record_weights=config.output_attentions if record is None else record)
        if relay.weights is not None and config._attn_implementation != "eager":
            logger.warning_once(
                f"`{config._attn_implementation}` attention does not support `output_attentions=True`. Please set "
                "your attention to `eager` if you want any of these features."
            )
        options = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        options.update(use_cache=use_cache, cache_position=cache_position, epas_relay=relay)
        options[CACHE_FIELD] = past_key_values
        h, recorded = inputs_embeds, relay.weights
        try:
            for layer in layers:  # transformers' GradientCheckpointingLayer recomputes a checkpointed one
                h = layer(h, **options)  # the hidden states positionally: a reentrant checkpoint passes gradients so
                if hidden is not None:
                    hidden.append(h)
        finally:  # a checkpoint holds the relay: what it holds of this forward's graph would keep the graph alive
            relay.pair, relay.weights, relay.live = (), None, False
        h = self.norm(h)
        if hidden is not None:  # as transformers' LlamaModel: the last layer's output is given normed
            hidden[-1] = h
            hidden = _selected(hidden, selected_hidden_states(keep))
        weights = None if recorded is None else tuple(w for w in recorded if w is not None) or NO_WEIGHTS
        output = BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=weights,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )
        return output.to_tuple() if kwargs.get("return_dict") is False else output  # the causal LM's own is popped


class EpasLlamaForCausalLM(LlamaForCausalLM):
    config_class = EpasLlamaConfig
    _no_split_modules = ["EpasLlamaDecoderLayer"]
    _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = False  # eager and SDPA only

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
        items = _listed(layers)
        indices = [operator.index(i) for i in items if _is_index(i) or _is_index_tensor(i)] if items is not None else []
        if items is None or len(indices) != len(items):
            raise TypeError(f"The sharing layers must be integer layer indices, like [2, 3], not {layers!r}.")
        bad = sorted(i for i in indices if not 1 <= i < self.config.num_hidden_layers)
        if bad:
            raise ValueError(f"Layers {bad} cannot share: valid are 1..{self.config.num_hidden_layers - 1}.")
        self.config.epas_shared_layers = sorted(set(indices))
