"""Map HF LLaMA checkpoints to our ``Llama`` and back: configs, parameter names, vocabulary rows, weight files.

A Qwen2 (``model_type: qwen2``, Qwen2 and Qwen2.5) is a LLaMA with biases on q_proj, k_proj and v_proj
(``attention_bias: qkv``) and the same parameter names; a Mistral without a sliding window is a LLaMA.

An HF LLaMA directory holds ``config.json`` and the weights as ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or (legacy) ``pytorch_model.bin`` (loaded with ``weights_only=True``). Parameter
names differ only by the ``model.`` prefix HF puts before the decoder (``lm_head`` has none), and both use the
rotate-half RoPE layout, so no weight is permuted. Nothing here needs ``transformers``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from epas_lightning.errors import CheckpointError, ConfigError
from epas_lightning.model import LlamaConfig
from epas_lightning.model.config import LLAMA3_FIELDS, RopeScaling, check_is_config

HF_PREFIX = "model."
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "epas_llama")
"""``mistral`` is a LLaMA with a sliding window: accepted when it has none (Mistral-7B-v0.3) or one that spans its
whole context, where it masks nothing (:func:`check_no_sliding_window`). ``qwen2`` is a LLaMA with q/k/v biases
whose window is off unless ``use_sliding_window`` (it is in every released base)."""
DEFAULT_SLIDING_WINDOW = 4096
"""The ``sliding_window`` transformers gives a Mistral or Qwen2 whose config.json names none."""
WINDOWED = ("mistral", "qwen2")
"""The model types whose config.json without a ``sliding_window`` gets :data:`DEFAULT_SLIDING_WINDOW` in transformers
(a Qwen2's counts only with ``use_sliding_window: true``)."""
DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32}
"""The ``num_key_value_heads`` transformers gives a Mistral or Qwen2 whose config.json names none (``MistralConfig``'s
and ``Qwen2Config``'s defaults, in 4.x and 5); a LLaMA's, and any one's set to null, is its head count."""
DEFAULT_CONTEXT = {"mistral": 131072, "qwen2": 32768}
"""The ``max_position_embeddings`` transformers gives a Mistral or Qwen2 whose config.json names none (or null); a
LLaMA's is 2048."""
REQUIRED_HF_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
OPTIONAL_SIZE_KEYS = ("head_dim", "num_key_value_heads", "max_position_embeddings")
"""Sizes an HF config may leave out or set to null (a default is taken)."""
VOCAB_KEYS = ("embed_tokens.weight", "lm_head.weight")
"""Our parameters with one row per vocabulary entry (padded to ``padded_vocab_size``)."""
BASE_MODEL_NAMES = ("embed_tokens.", "layers.", "norm.")
"""How the tensors of a base ``LlamaModel`` save (no LM head) begin: they are ours, without the ``model.`` prefix."""
IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)
"""Buffers some old HF checkpoints saved; we recompute them."""
COMPARED_FIELDS = (
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "intermediate_size",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "norm_eps",
    "tie_embeddings",
    "vocab_size",
)
"""Fields where a model config must equal the checkpoint's for the weights to mean the same function (a larger
``vocab_size`` would put zero rows inside the softmax; ``padded_vocab_size`` may add rows outside it)."""


class HFCheckpointError(CheckpointError):
    """An HF checkpoint directory we cannot read or that does not fit the model."""


@contextmanager
def located(where: object, folder: str | Path | None = None) -> Iterator[None]:
    """Name ``where`` in the :class:`HFCheckpointError` raised inside, unless it names a place already other than
    ``folder`` itself: the path ``where`` gives with the flag that named it (``--checkpoint <folder>``)."""
    try:
        yield
    except HFCheckpointError as e:
        if e.where and (folder is None or e.where != str(folder)):
            raise
        raise HFCheckpointError(e.what, where, e.fix) from e


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like an HF model directory (``config.json`` with a ``model_type``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        record = json.loads(config.read_text())
    except ValueError:
        return False
    return isinstance(record, dict) and "model_type" in record


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory as a dict."""
    path = Path(path).expanduser()
    if path.is_file():  # its config.json, say: "does not exist" sent one looking for a typo
        raise HFCheckpointError("a file, not an HF model directory", path, f"give the folder: {path.parent}")
    if not path.is_dir():
        raise HFCheckpointError("HF model directory does not exist", path, "check the path")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(
            "no config.json: not an HF model directory",
            path,
            "give the folder save_pretrained wrote (config.json and weights)",
        )
    try:
        return json.loads(config_file.read_text())
    except ValueError as e:
        raise HFCheckpointError(f"not valid JSON ({e})", config_file, "copy the model folder again") from e


def rope_of(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling of an HF config as transformers 5 reads them: 4.x's ``rope_scaling`` where it is set
    (whatever ``rope_parameters`` says), else ``rope_parameters``; the base is that field's ``rope_theta``, else the
    top-level one. Scalings other than ``llama3`` and ``linear`` are refused."""
    params, scaling = config_object(hf, "rope_parameters"), config_object(hf, "rope_scaling")
    field, source = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    rope_type = source.get("rope_type") or source.get("type") or "default"
    theta = config_number(source.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta")
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise HFCheckpointError(
            f"RoPE scaling {rope_type!r} ({field}) is not supported, only llama3 and linear: the model would compute "
            "other positions than the checkpoint was trained with",
            fix="use a LLaMA checkpoint with the default, llama3 or linear RoPE (LLaMA 2, TinyLlama, LLaMA 3.x, ...)",
        )
    read = {key: source.get(key) for key in (("factor", *LLAMA3_FIELDS) if rope_type == "llama3" else ("factor",))}
    if rope_type == "llama3" and read["original_max_position_embeddings"] is None:  # transformers' default
        read["original_max_position_embeddings"] = context_of(hf)
    try:
        return theta, RopeScaling(rope_type, **read)
    except ConfigError as e:
        raise HFCheckpointError(
            f"{field} {json.dumps(source)}: {e.what}", fix=f"correct {field} in its config.json"
        ) from e


def context_of(hf: dict[str, Any]) -> Any:
    """The context length of an HF config as transformers reads it: its ``max_position_embeddings``, else its
    class's default (:data:`DEFAULT_CONTEXT`)."""
    context = hf.get("max_position_embeddings")
    return DEFAULT_CONTEXT.get(hf.get("model_type"), 2048) if context is None else context


def config_object(hf: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON object at ``key`` of an HF config (``{}`` when it is unset or null)."""
    value = hf.get(key) or {}
    if not isinstance(value, dict):
        raise HFCheckpointError(
            f"its config.json's {key} must be an object {{...}}, got {value!r}",
            fix=f'write {key} as transformers does ("{key}": {{"rope_type": "linear", "factor": 4.0}}) or remove it',
        )
    return value


def config_number(value: Any, key: str) -> float:
    """``value``, an HF config's ``key``, as a float."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(
            f"its config.json's {key} must be a number, got {value!r}",
            fix=f"write {key} in config.json as a JSON number, or remove it for transformers' default",
        ) from e


def config_flag(hf: dict[str, Any], key: str) -> bool:
    """An HF config's boolean ``key`` (false when unset or null); any other value is refused: transformers 5 refuses
    it, 4.x takes ``"false"`` for true."""
    value = hf.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise HFCheckpointError(
        f"its config.json's {key} must be true or false, got {value!r}",
        fix=f'write {key} in config.json as a JSON boolean ("{key}": false, not "false" or 0)',
    )


def check_no_sliding_window(hf: dict[str, Any], length: int | None = None) -> None:
    """Refuse a sliding-window attention that masks positions inside the model's context (or the ``length`` tokens a
    model of it runs at, where longer: a continual run's): our attention sees every earlier position, so the model
    would compute another function than the checkpoint's from that distance on. A Qwen2's ``sliding_window`` counts
    only where it slides over some layer (:func:`qwen2_slides`)."""
    qwen2 = hf.get("model_type") == "qwen2"
    if qwen2 and not qwen2_slides(hf):
        return
    unset = "sliding_window" not in hf  # transformers' Mistral and Qwen2 then slide a 4096-token window
    window = hf.get("sliding_window", DEFAULT_SLIDING_WINDOW if hf.get("model_type") in WINDOWED else None)
    context = context_of(hf)
    runs = context if length is None else length
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in (window, runs))
    if window is not None and not (whole and window >= runs):  # a window that masks nothing of a known length
        default = " (transformers' default: config.json names none)" if unset else ""
        spans = f"its context (max_position_embeddings={context})"
        fix = "use a checkpoint without a sliding window (Mistral-7B-v0.2 and later, every Qwen2/2.5 base)"
        if length is not None:
            spans = f"the {length} tokens model.config runs at (block_size, max_position_embeddings)"
            fix = f"set model.config.block_size (and max_position_embeddings) to at most {window}, or {fix}"
        raise HFCheckpointError(
            f"{'use_sliding_window=true with ' if qwen2 else ''}sliding_window={window!r}{default} does not span "
            f"{spans}: sliding-window attention is not supported, our attention sees every earlier position",
            fix=fix,
        )


def qwen2_slides(hf: dict[str, Any]) -> bool:
    """Whether transformers slides a Qwen2's window over some layer: with ``use_sliding_window``, over those its
    ``layer_types`` names ``sliding_attention``, else over those from ``max_window_layers`` (default 28) on."""
    if not config_flag(hf, "use_sliding_window"):
        return False
    if isinstance(layer_types := hf.get("layer_types"), list):
        return "sliding_attention" in layer_types
    first, n_layer = hf.get("max_window_layers", 28), hf.get("num_hidden_layers")
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in (first, n_layer))
    return not whole or first < n_layer


def attention_bias_of(hf: dict[str, Any]) -> str | None:
    """Our ``attention_bias`` for an HF config: Qwen2's q/k/v biases, HF LLaMA's ``attention_bias`` (all four
    projections), or what one of our ``epas_llama`` exports recorded."""
    model_type = hf.get("model_type")
    if model_type == "qwen2":
        return "qkv"
    if model_type == "epas_llama" and hf.get("epas_attention_bias"):
        return hf["epas_attention_bias"]
    if model_type in ("llama", "epas_llama") and config_flag(hf, "attention_bias"):
        return "qkvo"
    return None


def check_sizes(hf: dict[str, Any]) -> None:
    """The HF config's sizes are positive whole numbers (a hand-edited ``"64"`` or ``64.0`` is named as such, not
    met later as a head_dim mismatch or a division error)."""
    sizes = [*REQUIRED_HF_KEYS, *(key for key in OPTIONAL_SIZE_KEYS if hf.get(key) is not None)]
    for key in sizes:
        value = hf[key]
        whole = hasattr(type(value), "__index__") and not isinstance(value, bool)  # numpy's ints too
        if not whole or value < 1:
            kind = "a positive whole number" if whole else f"a whole number, not {type(value).__name__}"
            raise HFCheckpointError(
                f"its config.json's {key} must be {kind}, got {value!r}",
                fix=f'write {key} in config.json as a JSON whole number ("{key}": 64, not "64" or 64.0)',
            )


def kv_heads_of(hf: dict[str, Any]) -> int:
    """The key/value heads of an HF config as transformers reads them: a Mistral's or Qwen2's left out is its class
    default (:data:`DEFAULT_KV_HEADS`), refused where it cannot divide the heads (the weights cannot fit it)."""
    n_head, model_type = hf["num_attention_heads"], hf.get("model_type")
    if "num_key_value_heads" in hf or model_type not in DEFAULT_KV_HEADS:
        return hf.get("num_key_value_heads") or n_head
    default = DEFAULT_KV_HEADS[model_type]
    if n_head % default:
        raise HFCheckpointError(
            f"its config.json names no num_key_value_heads, which transformers then takes as {default} (a "
            f"{model_type}'s default), and {n_head} attention heads cannot share {default} key/value heads",
            fix="write num_key_value_heads in config.json: the rows of k_proj.weight divided by the head size",
        )
    return default


def config_from_hf(hf: dict[str, Any] | str | Path, **overrides: Any) -> LlamaConfig:
    """Our ``LlamaConfig`` for an HF LLaMA config (a dict or a model directory); ``overrides`` set other fields.

    ``padded_vocab_size`` equals ``vocab_size`` so the logits match HF over the whole vocabulary, and
    ``block_size`` is ``max_position_embeddings`` unless overridden (RoPE is computed for any length).
    """
    if not isinstance(hf, dict):
        hf = read_hf_config(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(
            f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}",
            fix="use a LLaMA-architecture checkpoint (Llama 2 and 3.x, TinyLlama, SmolLM, Mistral-7B-v0.3, Qwen2/2.5, "
            "...)",
        )
    check_no_sliding_window(hf)
    missing = [key for key in REQUIRED_HF_KEYS if key not in hf]
    if missing:
        raise HFCheckpointError(
            f"its config.json lacks {', '.join(missing)}: not a complete LLaMA config",
            fix="copy the model folder again, or give one whose config.json save_pretrained wrote",
        )
    check_sizes(hf)
    if model_type in ("llama", "epas_llama") and config_flag(hf, "mlp_bias"):  # Mistral's and Qwen2's have none
        raise HFCheckpointError(
            "mlp_bias=true is not supported: our MLP has no biases", fix="use a LLaMA checkpoint without MLP biases"
        )
    if quantization := hf.get("quantization_config"):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise HFCheckpointError(
            f"quantized checkpoints (quantization_config: {method}) are not supported: our model runs the weights "
            "as plain tensors",
            fix="use the model's unquantized (bf16/fp16/fp32) release",
        )
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names of one activation
        raise HFCheckpointError(
            f"hidden_act={hf['hidden_act']!r} is not supported: our MLP is SwiGLU (silu)",
            fix="use a LLaMA-architecture checkpoint (hidden_act silu)",
        )
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise HFCheckpointError(
            f"head_dim={head_dim} with {n_head} heads != hidden_size={n_embd}: decoupled head_dim is not supported",
            fix="use a checkpoint whose head_dim is hidden_size / num_attention_heads (or unset)",
        )
    theta, scaling = rope_of(hf)
    fields = dict(
        n_layer=hf["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=kv_heads_of(hf),
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],
        block_size=context_of(hf),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=attention_bias_of(hf),
        norm_eps=config_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=config_flag(hf, "tie_word_embeddings"),
        sharing_mode=hf.get("epas_sharing_mode", "qk"),
    )
    try:
        LlamaConfig(**fields)  # the folder's own mistakes named as its, not as model.config's
    except ConfigError as e:
        raise HFCheckpointError(
            f"its config.json makes no valid model: {e.what}",
            fix="copy the model folder again, or give one whose config.json save_pretrained wrote",
        ) from e
    return LlamaConfig(**{**fields, **overrides})


def check_compatible(
    config: LlamaConfig, hf: dict[str, Any] | str | Path, source: str = "the checkpoint", fix: str | None = None
) -> LlamaConfig:
    """Fail, listing every difference, when ``config`` cannot hold the weights of the HF config ``hf``; return the
    HF model's config (:func:`config_from_hf`). The error's fix is ``fix``, by default the fields to use."""
    hf = hf if isinstance(hf, dict) else read_hf_config(hf)
    theirs = config_from_hf(hf)
    if config.context_length > theirs.block_size:  # a window spanning the folder's context may not span this one's
        check_no_sliding_window(hf, config.context_length)
    diffs = [
        f"{name}: model {getattr(config, name)!r} vs {source} {getattr(theirs, name)!r}"
        for name in COMPARED_FIELDS
        if getattr(config, name) != getattr(theirs, name)
    ]
    if diffs:
        suggestion = {k: theirs.to_dict()[k] for k in COMPARED_FIELDS}
        fix = fix or f"use these model.config fields: {json.dumps(suggestion)}"
        raise HFCheckpointError(f"model.config does not match {source}: " + "; ".join(diffs), fix=fix)
    return theirs


def read_hf_weights(path: str | Path, weights: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single or sharded safetensors, else ``pytorch_model.bin``), on the CPU; without
    ``weights``, empty meta tensors of their shapes (safetensors headers are read, a ``.bin`` loads to meta)."""
    state: dict[str, torch.Tensor] = {}
    for file in hf_weight_files(path):
        if file.suffix == ".safetensors":
            state.update(_safetensors_load(file) if weights else _safetensors_shapes(file))
        else:
            state.update(_torch_load(file) if weights else _torch_shapes(file))
    return state


def hf_weight_files(path: str | Path) -> list[Path]:
    """The weight files of an HF directory that :func:`read_hf_weights` reads: ``model.safetensors``, the shards its
    index lists, else ``pytorch_model.bin`` or the shards of its index."""
    path = Path(path).expanduser()
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (TORCH_FILE, TORCH_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            return _shard_files(path, index)
    raise HFCheckpointError(
        "no weights", path, f"expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX}"
    )


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    from epas_lightning.safe_load import load_torch_file

    return tensor_dict(load_torch_file(file), file)


def _torch_shapes(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``file`` on the meta device: none is read from a zip file (mapped), none held from a legacy
    (non-zip) one, which cannot be mapped."""
    from epas_lightning.safe_load import load_torch_file

    return tensor_dict(load_torch_file(file, map_location="meta", mmap=True), file)


def tensor_dict(loaded: Any, file: Path) -> dict[str, torch.Tensor]:
    """``loaded``, what the ``.bin`` weight file ``file`` holds, where it is a dict of tensors by name."""
    if isinstance(loaded, dict):
        other = next(((k, v) for k, v in loaded.items() if not isinstance(v, torch.Tensor)), None)
        if other is None:
            return loaded
        found = f"{other[0]!r} is a {type(other[1]).__name__}"
    else:
        found = f"it is a {type(loaded).__name__}"
    raise HFCheckpointError(
        f"{file.name} holds no state dict of tensors ({found})",
        file,
        "save the model with save_pretrained (or torch.save(model.state_dict(), ...))",
    )


def _safetensors_shapes(file: Path) -> dict[str, torch.Tensor]:
    from epas_lightning.safe_load import check_readable

    check_readable(file)
    try:
        with safe_open(file, "pt") as f:
            return {key: safetensors_meta(f, key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"corrupt or truncated safetensors ({e})", file, "copy the model folder again") from e


def safetensors_meta(f: Any, key: str) -> torch.Tensor:
    """An empty meta tensor of the shape and dtype of ``key`` in the ``safe_open`` file ``f``; no data is read (the
    dtype is that of an empty slice)."""
    shape = f.get_slice(key).get_shape()
    dtype = f.get_slice(key)[:0].dtype if shape else f.get_tensor(key).dtype
    return torch.empty(shape, dtype=dtype, device="meta")


def _safetensors_load(file: Path) -> dict[str, torch.Tensor]:
    from epas_lightning.safe_load import check_readable

    check_readable(file)
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"corrupt or truncated safetensors ({e})", file, "copy the model folder again") from e


def _shard_files(path: Path, index_name: str) -> list[Path]:
    try:
        weight_map = json.loads((path / index_name).read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise HFCheckpointError(
            f"unreadable shard index ({e})", path / index_name, "copy the model folder again"
        ) from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFCheckpointError(
            "unreadable shard index (no weight_map)", path / index_name, "copy the model folder again"
        )
    names = set(weight_map.values())
    if stray := [name for name in names if not isinstance(name, str) or Path(name).name != name]:
        raise HFCheckpointError(
            f"unreadable shard index ({stray[0]!r} is no file name in the model folder)",
            path / index_name,
            "copy the model folder again",
        )
    shards = [path / name for name in sorted(names)]
    for shard in shards:
        if not shard.is_file():
            raise HFCheckpointError(f"shard listed in {index_name} is missing", shard, "copy the model folder again")
    if index_name == SAFETENSORS_INDEX:
        check_each_tensor_once(shards, weight_map, path / index_name)
    return shards


def check_each_tensor_once(shards: list[Path], weight_map: dict[str, Any], index: Path) -> None:
    """Refuse a tensor stored in two safetensors shards (a stale shard of another download, say): which one a reader
    takes depends on the order it reads them in, and transformers takes the one the index names."""
    from epas_lightning.safe_load import check_readable

    seen: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(check_readable(shard), "pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(
                f"corrupt or truncated safetensors ({e})", shard, "copy the model folder again"
            ) from e
        for key in keys:
            if key in seen:
                raise HFCheckpointError(
                    f"{key} is stored in two shards, {seen[key]} and {shard.name} ({index.name} names "
                    f"{weight_map.get(key)})",
                    index,
                    "copy the model folder again: each tensor in the one shard the index names",
                )
            seen[key] = shard.name


def hf_to_ours(hf_state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our ``Llama`` parameters from an HF state dict (no ``sharing.mask``); vocabulary rows padded with zeros to
    ``padded_vocab_size``. Its errors name no place: callers say where the state came from (:func:`located`)."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in hf_state.items():
        if key.endswith(IGNORED_HF_KEYS):
            continue
        ours = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
        if ours in state:
            raise HFCheckpointError(
                f"the weights hold {ours} twice, with and without the {HF_PREFIX!r} prefix",
                fix="save the model again with save_pretrained",
            )
        if key.startswith(HF_PREFIX) or key == "lm_head.weight" or key.startswith(BASE_MODEL_NAMES):
            state[ours] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise HFCheckpointError(
            f"unexpected tensors in the HF checkpoint: {sorted(unknown)[:8]}",
            fix="use a plain LLaMA-architecture checkpoint (no weights of other modules)",
        )
    if config.tie_embeddings:
        _tie_head(state)
    elif "lm_head.weight" not in state:
        raise HFCheckpointError(
            "the HF checkpoint has no lm_head.weight but tie_word_embeddings is false",
            fix="copy the model folder again",
        )
    for key in VOCAB_KEYS:
        if key in state:
            check_vocab_rows(state[key], config.vocab_size, HF_PREFIX + key if key != "lm_head.weight" else key)
            state[key] = resize_rows(state[key], config.padded_vocab_size)
    if config.tie_embeddings and "embed_tokens.weight" in state:  # else it is missing (the caller says so)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _tie_head(state: dict[str, torch.Tensor]) -> None:
    """Our names of a tied HF state: its ``lm_head.weight`` is the embedding where the embedding is not stored (as
    transformers ties them), else dropped once checked equal to it (:func:`check_tied_head`)."""
    head = state.pop("lm_head.weight", None)
    if head is None:
        return
    if "embed_tokens.weight" not in state:
        state["embed_tokens.weight"] = head
    elif not head.is_meta:
        check_tied_head(head, state["embed_tokens.weight"])


def hf_tensors(path: str | Path, config: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of the HF directory ``path`` (checked by :func:`hf_to_ours` for ``config``) by our names, as
    :func:`hf_to_ours` converts them, read one safetensors tensor (or one ``.bin`` file) at a time; with tied
    embeddings, a stored ``lm_head.weight`` is checked equal to the embedding, or yielded as it where it is stored
    alone."""
    for file in hf_weight_files(path):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt") as f:
                    for key in f.keys():  # noqa: SIM118 - a safe_open handle is no dict
                        yield from _ours(key, f.get_tensor(key), config, path)
            except (SafetensorError, OSError) as e:
                raise HFCheckpointError(
                    f"corrupt or truncated safetensors ({e})", file, "copy the model folder again"
                ) from e
        else:
            from epas_lightning.safe_load import load_torch_file

            for key, tensor in load_torch_file(file, mmap=True).items():  # mapped: read where copied
                yield from _ours(key, tensor, config, path)


def _ours(key: str, tensor: torch.Tensor, config: LlamaConfig, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensor ``key`` of the folder ``path`` by our name, its vocabulary rows padded (nothing for an ignored or
    tied tensor)."""
    if key == "lm_head.weight" and config.tie_embeddings:
        embedding = hf_tensor(path, HF_PREFIX + "embed_tokens.weight")
        embedding = hf_tensor(path, "embed_tokens.weight") if embedding is None else embedding  # a base model's
        if embedding is None:  # the tied matrix stored under the head's name alone
            yield "embed_tokens.weight", resize_rows(tensor, config.padded_vocab_size)
        else:
            check_tied_head(tensor, embedding)
        return
    if key.endswith(IGNORED_HF_KEYS):
        return
    ours = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
    yield ours, resize_rows(tensor, config.padded_vocab_size) if ours in VOCAB_KEYS else tensor


def hf_tensor(path: str | Path, key: str) -> torch.Tensor | None:
    """The tensor ``key`` of the HF directory ``path`` (read from the file that holds it); ``None`` if none does."""
    for file in hf_weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                if key in f.keys():  # noqa: SIM118 - a safe_open handle is no dict
                    return f.get_tensor(key)
        else:
            from epas_lightning.safe_load import load_torch_file

            if key in (state := load_torch_file(file, mmap=True)):
                return state[key]
    return None


def check_tied_head(head: torch.Tensor, embedding: torch.Tensor) -> None:
    """Refuse an ``lm_head.weight`` stored beside the embedding it is tied to with other values: transformers 5 runs
    the head (it ties only equal ones), 4.x the embedding, so the folder means two models."""
    if not torch.equal(head, embedding):
        raise HFCheckpointError(
            "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight: transformers 5 "
            "runs lm_head.weight, transformers 4 the embedding",
            fix='set "tie_word_embeddings": false in config.json to use lm_head.weight (as transformers 5 does)',
        )


def check_vocab_rows(tensor: torch.Tensor, vocab_size: int, name: str) -> None:
    """Refuse an HF vocabulary tensor whose rows are not ``vocab_size`` (transformers refuses to load it): padding or
    cutting it would give tokens zero rows or drop trained ones."""
    if tensor.shape[0] != vocab_size:
        raise HFCheckpointError(
            f"{name} has {tensor.shape[0]} rows but config.json says vocab_size {vocab_size}",
            fix="set vocab_size in config.json to the number of rows the weights have (transformers refuses the "
            "folder as it is)",
        )


def hf_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``, by our names, keyed by the names an HF ``LlamaForCausalLM`` gives its tensors."""
    return {key if key == "lm_head.weight" else HF_PREFIX + key: tensor for key, tensor in state.items()}


def ours_to_hf(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """An HF ``LlamaForCausalLM`` state dict from ours: padded vocabulary rows dropped, no ``lm_head`` when tied."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("sharing."):
            continue
        if key in VOCAB_KEYS:
            tensor = resize_rows(tensor, config.vocab_size)
        if key == "lm_head.weight":
            if config.tie_embeddings:
                continue
            out[key] = tensor
        else:
            out[HF_PREFIX + key] = tensor
    return saveable(out)


def saveable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as safetensors saves it: contiguous tensors of which none shares memory with another (safetensors
    refuses that): a tensor whose storage an earlier one uses (tied embeddings) is copied, no other."""
    seen, out = set(), {}
    for key, tensor in state.items():
        tensor = tensor.contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with exactly ``rows`` rows: extra rows dropped, missing rows zero (never-emitted padding tokens)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def load_hf_state(path: str | Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Read and convert an HF LLaMA directory for a model of ``config`` (checked first, with every difference named)."""
    check_is_config(config, "load_hf_state(config=...)", "build it with epas_lightning.config_from_hf(path)")
    path = Path(path).expanduser()
    check_compatible(config, read_hf_config(path), source=str(path))
    with located(path):
        return hf_to_ours(read_hf_weights(path), config)
