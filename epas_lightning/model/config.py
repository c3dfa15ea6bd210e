"""Model configuration: one dataclass plus a handful of named presets."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from epas_lightning.errors import ConfigError, DataError

SharingMode = Literal["qk", "kv"]
RopeType = Literal["llama3", "linear"]
AttentionBias = Literal["qkv", "qkvo"]
ATTENTION_BIASES: dict[str | None, tuple[str, ...]] = {
    None: (),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
"""The attention projections that carry a bias, per ``LlamaConfig.attention_bias``."""
LLAMA3_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The fields of :class:`RopeScaling` that only ``llama3`` takes (and needs)."""

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: tiny enough to build, run and differentiate in milliseconds.
    "debug": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512, block_size=64),
    # The CPU demo (configs/demo.yaml): about 8.5M parameters.
    "demo": dict(n_layer=8, n_embd=256, n_head=4, intermediate_size=704, vocab_size=4096, block_size=256),
    # The paper's shapes (Table 1 and the throughput table).
    "llama-125m": dict(n_layer=12, n_embd=768, n_head=12, intermediate_size=2048, vocab_size=32000, block_size=2048),
    "tinyllama-1.1b": dict(
        n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, intermediate_size=5632, vocab_size=32000, block_size=2048
    ),
    "llama-3b": dict(n_layer=26, n_embd=3072, n_head=24, intermediate_size=8192, vocab_size=32000, block_size=2048),
    "llama-7b": dict(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008, vocab_size=32000, block_size=2048),
}
OTHER_NAMES = {
    "n_query_groups": "n_kv_head",  # LitGPT's
    "rope_base": "rope_theta",
    "num_hidden_layers": "n_layer",  # transformers' config.json
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
"""LitGPT's and transformers' names of :class:`LlamaConfig` fields, for the line that refuses one."""
REUSED = {"qk": "Q/K", "kv": "K/V"}
"""What a sharing layer takes from its source, by sharing mode (its own weights for them stop training)."""
FIELD_DEFAULTS: dict[str, Any] = dict(rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, sharing_mode="qk")
"""The values of these :class:`LlamaConfig` fields when neither the user nor a preset sets them: their dataclass default
is ``None``, so that a field left unset can be told from one set to this value (``init_from`` fills unset ones)."""


@dataclass(repr=False)
class RopeScaling:
    """RoPE frequency rescaling, as transformers' ``rope_parameters`` (4.x: ``rope_scaling``) spells it.

    ``linear`` divides every frequency by ``factor``. ``llama3`` (Llama 3.1 and later) divides only the low frequencies
    (wavelengths above ``original_max_position_embeddings / low_freq_factor``) by ``factor``, keeps the high ones
    (wavelengths below ``original_max_position_embeddings / high_freq_factor``) and blends the ones between.
    In YAML: ``rope_scaling: {rope_type: llama3, factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0,
    original_max_position_embeddings: 8192}`` (Llama 3.2).

    Attributes:
        rope_type: 'llama3' or 'linear'.
        factor: How much slower the scaled frequencies turn.
        low_freq_factor: llama3 only: ``original_max_position_embeddings / low_freq_factor`` is the longest unblended
            wavelength.
        high_freq_factor: llama3 only: ``original_max_position_embeddings / high_freq_factor`` is the shortest
            blended wavelength.
        original_max_position_embeddings: llama3 only: the context length the model pretrained at before scaling.
    """

    rope_type: RopeType
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        where = "model.config.rope_scaling"
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"rope_type must be 'llama3' or 'linear', got {self.rope_type!r}",
                where,
                "set rope_type: llama3 or linear",
            )
        llama3 = self.rope_type == "llama3"
        needed = ("factor", *LLAMA3_FIELDS) if llama3 else ("factor",)
        for name in needed:  # numpy numbers as the Python numbers they hold: checkpoints keep plain types
            if _is_number(value := getattr(self, name)) and hasattr(value, "item"):
                setattr(self, name, value.item())
        if missing := [name for name in needed if getattr(self, name) is None]:
            raise ConfigError(f"{self.rope_type} RoPE scaling needs {', '.join(missing)}", where, "set them too")
        if extra := [name for name in LLAMA3_FIELDS if name not in needed and getattr(self, name) is not None]:
            raise ConfigError(
                f"linear RoPE scaling takes only factor, got {', '.join(extra)}",
                where,
                "remove them, or set rope_type: llama3",
            )
        if wrong := [f"{name} {getattr(self, name)!r}" for name in needed if not _is_number(getattr(self, name))]:
            raise ConfigError(f"RoPE scaling takes numbers, got {', '.join(wrong)}", where, "give numbers")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ConfigError(
                f"original_max_position_embeddings must be >= 1, got {self.to_dict()}",
                where,
                "set it to the context length the model was pretrained at",
            )
        infinite = not all(_is_finite(getattr(self, name)) for name in needed)  # inf: positions without rotation
        if infinite or not self.factor > 0 or (llama3 and not 0 < self.low_freq_factor < self.high_freq_factor):
            raise ConfigError(
                "RoPE scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, all finite, got "
                f"{self.to_dict()}",
                where,
                "change the values that break it",
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields this ``rope_type`` uses (transformers' ``rope_scaling`` keys)."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    def __repr__(self) -> str:
        return repr(self.to_dict())


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA decoder.

    Fields left as ``None`` are taken from the preset named by ``name`` and, failing that, derived
    (``n_kv_head = n_head``, ``intermediate_size`` from the SwiGLU 8/3 rule, ``padded_vocab_size``) or set to their
    default. In YAML, ``config: {name: llama-125m, vocab_size: 8192}`` takes a preset and overrides one field. A fit
    from ``init_from`` takes every architecture field left unset from that model instead
    (:func:`epas_lightning.init_from.source_config`).

    Attributes:
        name: Preset to start from: debug, demo, llama-125m, tinyllama-1.1b, llama-3b, llama-7b.
        n_layer: Number of decoder layers.
        n_embd: Model width d (hidden size).
        n_head: Number of query heads.
        n_kv_head: Number of key/value heads (GQA); defaults to n_head (plain multi-head attention).
        intermediate_size: SwiGLU hidden size; defaults to 8/3 * n_embd rounded up to a multiple of 256.
        vocab_size: Tokenizer vocabulary size.
        padding_multiple: The embedding table is padded to a multiple of this (faster matmuls).
        padded_vocab_size: Rows of the embedding / LM head; defaults to vocab_size rounded up to padding_multiple.
        block_size: Training sequence length (linked to data.seq_len).
        max_position_embeddings: The longest sequence the model runs at inference (prompt plus new tokens), written to
            an export's config.json; default block_size. A fit from init_from keeps the source model's, when longer than
            block_size.
        rope_theta: RoPE base frequency; 10000.0 when unset.
        rope_scaling: RoPE frequency rescaling (``llama3`` for Llama 3.1 and later, or ``linear``); none by default.
        attention_bias: Which attention projections have a bias: 'qkv' (Qwen2: q_proj, k_proj, v_proj), 'qkvo' (HF
            LLaMA's ``attention_bias: true``: all four); none by default.
        norm_eps: RMSNorm epsilon; 1e-5 when unset.
        tie_embeddings: Share the token embedding matrix with the LM head; false when unset.
        init_std: Standard deviation of the normal init of linear and embedding weights.
        sharing_mode: What a sharing layer reuses from the last compute layer: 'qk' (the paper; when unset) or 'kv'
            (CLA-style).
    """

    name: str | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    padding_multiple: int = 64
    padded_vocab_size: int | None = None
    block_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    attention_bias: AttentionBias | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float = 0.02
    sharing_mode: SharingMode | None = None

    def __post_init__(self) -> None:
        for field in fields(self):  # numpy (or 0-d tensor) numbers, e.g. from a sweep: the Python numbers they hold
            value = getattr(self, field.name)
            if hasattr(value, "item") and type(value) not in (bool, int, float, str):
                setattr(self, field.name, value.item())
        if isinstance(self.rope_scaling, dict):  # from a checkpoint's to_dict() or a parsed YAML mapping
            self.rope_scaling = _rope_scaling(self.rope_scaling)
        if self.name is not None:
            if self.name not in PRESETS:
                raise ConfigError(
                    f"unknown model preset {self.name!r}",
                    "model.config.name",
                    f"choose one of {', '.join(sorted(PRESETS))}, or give the shape's fields without a name",
                )
            for key, value in PRESETS[self.name].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        missing = [k for k in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size") if getattr(self, k) is None]
        if missing:
            raise ConfigError(
                f"LlamaConfig needs {missing}",
                "model.config",
                f"set them, pick a preset with model.config.name ({', '.join(sorted(PRESETS))}), or start from a "
                "shipped config: --config demo",
            )
        for key, value in FIELD_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(int(8 * self.n_embd / 3), 256)
        if not _is_count(self.padding_multiple):  # it divides below (0 was a ZeroDivisionError)
            raise ConfigError(
                f"padding_multiple must be a positive integer, got {self.padding_multiple!r}",
                "model.config",
                "set it to 1 or more (64 when unset)",
            )
        if self.padded_vocab_size is None:
            self.padded_vocab_size = _round_up(self.vocab_size, self.padding_multiple)
        self._validate()

    def _validate(self) -> None:
        sizes = ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "block_size", "intermediate_size")
        sizes += ("padded_vocab_size",) + (() if self.max_position_embeddings is None else ("max_position_embeddings",))
        bad = {k: getattr(self, k) for k in sizes if not _is_count(getattr(self, k))}  # "600" failed comparing str, int
        if bad:
            raise ConfigError(
                f"model sizes must be positive integers, got {bad}", "model.config", "set each to 1 or more"
            )
        numbers = {"rope_theta": self.rope_theta, "norm_eps": self.norm_eps, "init_std": self.init_std}
        if bad := {k: v for k, v in numbers.items() if _out_of_range(k, v)}:
            raise ConfigError(
                f"rope_theta must be a positive number, norm_eps and init_std non-negative ones (finite), got {bad}",
                "model.config",
                "set numbers in those ranges, or leave rope_theta and norm_eps unset (10000.0 and 1e-5)",
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(
                f"tie_embeddings must be true or false, got {self.tie_embeddings!r}",
                "model.config",
                "set true or false",
            )
        if not isinstance(self.rope_scaling, RopeScaling | None):  # a string (a rope_type) failed in the first forward
            raise ConfigError(
                f"rope_scaling must be a mapping like {{rope_type: linear, factor: 2.0}} or null, got "
                f"{self.rope_scaling!r}",
                "model.config.rope_scaling",
                "give rope_type and factor under it, or null for none",
            )
        if self.n_embd % self.n_head:
            what = f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            raise ConfigError(what, "model.config", _head_count_fix(self.n_embd, self.n_head))
        if self.n_head % self.n_kv_head:
            divisors = ", ".join(str(n) for n in range(1, self.n_head + 1) if self.n_head % n == 0)
            raise ConfigError(
                f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}",
                "model.config",
                f"set n_kv_head to one of {divisors}",
            )
        if self.head_dim % 2:
            what = f"head_dim={self.head_dim} (n_embd / n_head) must be even for RoPE"
            raise ConfigError(what, "model.config", _head_count_fix(self.n_embd, self.n_head))
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}",
                "model.config",
                "leave it unset (vocab_size rounded up to padding_multiple) or raise it",
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.block_size:
            raise ConfigError(
                f"max_position_embeddings={self.max_position_embeddings} < block_size={self.block_size}",
                "model.config",
                "leave it unset (it defaults to block_size) or raise it",
            )
        if self.sharing_mode not in ("qk", "kv"):
            raise ConfigError(
                f"sharing_mode must be 'qk' or 'kv', got {self.sharing_mode!r}", "model.config", "set qk or kv"
            )
        if self.attention_bias not in tuple(ATTENTION_BIASES):  # (a list from YAML is not hashable)
            raise ConfigError(
                f"attention_bias must be 'qkv' (Qwen2), 'qkvo' (all four projections) or null, got "
                f"{self.attention_bias!r}",
                "model.config",
                "set qkv, qkvo or null",
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def biased_projections(self) -> tuple[str, ...]:
        """The attention projections with a bias (``attention_bias``): names of ``Attention``'s linears."""
        return ATTENTION_BIASES[self.attention_bias]

    @property
    def context_length(self) -> int:
        """The longest sequence the model runs at inference: ``max_position_embeddings``, else ``block_size``."""
        return self.max_position_embeddings or self.block_size

    def check_token_ids(self, lowest: int, highest: int, where: object) -> None:
        """A :class:`DataError` unless token ids ``lowest..highest`` lie in the model's vocabulary."""
        check_token_ids(lowest, highest, self.vocab_size, where)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """Build a preset, optionally overriding fields: ``LlamaConfig.from_name("debug", n_layer=4)``."""
        return cls(name=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (what a checkpoint records)."""
        return {**asdict(self), "rope_scaling": self.rope_scaling and self.rope_scaling.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"Unknown LlamaConfig fields: {sorted(unknown)}",
                "model.config",
                f"remove them (its fields: {', '.join(f.name for f in fields(cls))})",
            )
        return cls(**data)


def check_is_config(
    config: object,
    where: str,
    fix: str = "build it with LlamaConfig.from_name('debug', ...) or LlamaConfig(**fields)",
) -> None:
    """A :class:`LlamaConfig`, or one line saying how to make one (a dict or a preset name failed later with an
    ``AttributeError`` on ``n_layer``)."""
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"config must be a LlamaConfig, not a {type(config).__name__}", where, fix)


def _is_count(value: Any) -> bool:
    """A positive int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _out_of_range(name: str, value: Any) -> bool:
    """Whether ``value`` is no finite number in the range of ``name``: ``rope_theta`` above 0, ``norm_eps`` and
    ``init_std`` 0 or more (NaN compares as neither and made every output NaN; inf weights, or no rotation)."""
    if not _is_number(value) or not _is_finite(value):
        return True
    return value <= 0 if name == "rope_theta" else value < 0


def _is_finite(value: numbers.Real) -> bool:
    """Whether the number ``value`` is finite as a float (an integer too large for one is not: it overflowed)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_number(value: Any) -> bool:
    """A real number (numpy's too), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _rope_scaling(data: dict[str, Any]) -> RopeScaling:
    """A :class:`RopeScaling` from its ``to_dict()``, every key checked."""
    known = {f.name for f in fields(RopeScaling)}
    unknown, missing = sorted(set(data) - known), [key for key in ("rope_type", "factor") if key not in data]
    if unknown or missing:
        raise ConfigError(
            f"rope_scaling needs rope_type and factor and knows only {sorted(known)}, got {sorted(data)}",
            "model.config.rope_scaling",
            "give rope_type and factor, and for llama3 " + ", ".join(LLAMA3_FIELDS),
        )
    return RopeScaling(**data)


def _head_count_fix(n_embd: int, n_head: int) -> str:
    """What to set when ``n_head`` does not split ``n_embd`` into heads of an even size: the nearest head counts that
    do, or a width that does."""
    counts = [n for n in range(1, n_embd + 1) if n_embd % n == 0 and (n_embd // n) % 2 == 0]
    near = [max((n for n in counts if n < n_head), default=None), min((n for n in counts if n > n_head), default=None)]
    options = " or ".join(str(n) for n in near if n is not None)
    width = f"n_embd to a multiple of {2 * n_head}"
    return f"set n_head to {options}, or {width}" if options else f"set {width}"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_token_ids(
    lowest: int,
    highest: int,
    vocab_size: int,
    where: object,
    fix: str = "tokenize with the tokenizer the model trained with",
) -> None:
    """A :class:`DataError` unless token ids ``lowest..highest`` lie in a vocabulary of ``vocab_size`` ids."""
    if lowest < 0 or highest >= vocab_size:
        raise DataError(
            f"token ids must lie in 0..{vocab_size - 1} (the model's vocab_size), got {lowest}..{highest}", where, fix
        )
