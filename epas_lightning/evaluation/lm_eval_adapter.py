"""The lm-eval-harness model ``epas``: a checkpoint of ours at any sharing region, scored as lm-eval's ``hf`` model
scores its export.

Needs the ``eval`` extra (``pip install 'epas_lightning[eval]'``). lm-eval 0.4.13 finds no models outside its own
package, so importing this module is what registers ``epas``::

    import lm_eval
    import epas_lightning.evaluation.lm_eval_adapter  # registers the model "epas"

    lm_eval.simple_evaluate(model="epas", model_args={"checkpoint": "last.ckpt", "sharing_layers": 2}, tasks=[...])

From the shell, ``python -m epas_lightning lm-eval`` runs lm-eval's evaluator with it (one region or all of them).

Why the numbers equal ``hf`` on ``export``'s folder: :class:`EPASLM` *is* lm-eval's ``HFLM``, handed the tokenizer
that the export ships (BOS added as the model trained with it), so tokenization, the context/continuation split,
batching, truncation, rolling windows and the bookkeeping of generation are lm-eval's own code. Two methods change:
``_model_call`` runs our ``Llama`` and returns logits over the real vocabulary (``config.vocab_size``, the rows the
export keeps), and ``_model_generate`` decodes with our KV-cache ``generate`` over that whole vocabulary (ids the
tokenizer lacks too, as ``hf`` decodes the export; ``generate``, ``chat`` and ``serve`` cut it at the tokenizer's
``vocab_size``), sampling (a task with ``do_sample``) as transformers' ``generate`` samples the export: the 50 most
likely tokens where the task sets no ``top_k`` (transformers' default; the export's ``generation_config.json`` sets
none), every token for ``top_k`` 0 or null. A task that samples at temperature 0 (or sets none) is an error, as
transformers raises for it: not greedy decoding as vLLM would, since ``hf`` has no numbers for it to equal and
greedy text would be scored as samples (:func:`check_sampling_temperature`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from epas_lightning.errors import ConfigError, UserError
from epas_lightning.inference.generate import generate, set_region
from epas_lightning.model import Llama
from epas_lightning.runtime import activations_overflow, dtype_name, is_real_number, is_whole_number


class CausalLM(nn.Module):
    """Our ``Llama`` where ``HFLM`` expects a ``transformers`` model: logits over the real vocabulary only. Logits that
    come out NaN or inf (activations past the range of the model's dtype) are a one-line error, not NaN scores."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.llama = model
        self.config = SimpleNamespace(model_type="epas_llama", max_position_embeddings=model.config.context_length)

    @property
    def device(self) -> torch.device:
        return self.llama.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """``HFLM`` calls it; our tied embeddings are tied already."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.llama(input_ids)[..., : self.llama.config.vocab_size]
        if not bool(torch.isfinite(logits).all()):  # HFLM waits for them anyway (log_softmax, then the CPU)
            raise activations_overflow("the logits", logits.dtype)
        return logits


HF_TOP_K = 50
"""transformers' ``top_k`` for sampling where neither the call nor the model's ``generation_config.json`` sets one."""


DECODING_SETTINGS = {"do_sample", "temperature", "top_k", "top_p", "attention_mask", "use_cache"}
"""The generation kwargs our decoding reads (:func:`sampling_settings`; ``attention_mask``: ``HFLM``'s padding), or
takes at any value (``use_cache``: the same tokens either way)."""
NO_OP_SETTINGS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "min_p": None,
}
"""transformers' ``generate`` settings at values that change nothing (its defaults)."""


def check_decoding_settings(kwargs: dict[str, Any], where: str = "the task's generation_kwargs") -> None:
    """A :class:`ConfigError` for a generation kwarg that transformers' ``generate`` would honour on the export and our
    decoding does not (beam search: ``num_beams: 10``, a repetition penalty, ...); it was ignored without a word.
    ``where``: who asked (the task, or the command's ``--gen-kwargs``)."""
    asker = "the task" if where == "the task's generation_kwargs" else where
    for key, value in kwargs.items():
        if key in DECODING_SETTINGS or (key in NO_OP_SETTINGS and value == NO_OP_SETTINGS[key]):
            continue
        raise ConfigError(
            f"{asker} asks for {key}: {value!r}, which this model's decoding does not do (it decodes greedily, or "
            "samples with temperature, top_k and top_p, as transformers' generate does for the export)",
            where,
            f"remove {key} from them, or score the export with lm-eval's hf model",
        )


def check_sampling_temperature(temperature: object) -> None:
    """A task that samples (``do_sample: true``) at temperature 0, or with none (``HFLM`` passes 0 then), is a
    :class:`ConfigError`, as transformers' ``generate`` refuses it for the export (a ``ValueError`` there).

    Not greedy decoding instead, as vLLM decodes at temperature 0: this model's numbers are ``hf``'s on the export,
    and ``hf`` has none for such a task; greedy output would be scored as samples (the repeats of a self-consistency
    or pass@k task all alike) without a word. vLLM is no common ground either: it has no ``do_sample``, and samples at
    temperature 1 where the task sets none. The task's author chooses: a temperature above 0, or ``do_sample: false``.
    """
    if temperature == 0:
        raise ConfigError(
            "a task samples (do_sample: true) at temperature 0, which transformers' generate refuses for the export "
            "(lm-eval passes 0 where neither the task nor --gen-kwargs sets a temperature)",
            "--gen-kwargs, or the task's generation_kwargs",
            "give a temperature above 0 (1 samples from the model's distribution), or do_sample: false for greedy "
            "decoding",
        )


def sampling_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s ``temperature``, ``top_k`` and ``top_p`` for a task's generation kwargs, as transformers'
    ``generate`` reads them for the export (whose ``generation_config.json`` sets none): greedy unless ``do_sample``;
    sampling keeps the :data:`HF_TOP_K` most likely tokens unless the task sets ``top_k`` (``0`` or null: no cut;
    transformers fills in its defaults before the call's own values, so a ``None`` passed to ``generate`` stays).
    ``top_p`` as transformers' nucleus cut: 1 or more, or none, cuts nothing; 0 keeps only the most likely token,
    which is greedy decoding. Sampling at temperature 0 is refused (:func:`check_sampling_temperature`)."""
    if not kwargs.get("do_sample"):
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    check_sampling_temperature(kwargs.get("temperature", 0.0))
    if kwargs.get("top_p") == 0:
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    top_k = kwargs.get("top_k", HF_TOP_K)
    temperature, top_p = kwargs["temperature"], kwargs.get("top_p")
    return {
        "temperature": 1.0 if temperature is None else temperature,  # transformers: None tempers nothing
        "top_k": None if top_k in (0, None) else top_k,
        "top_p": None if is_real_number(top_p) and top_p >= 1 else top_p,
    }


@contextlib.contextmanager
def _quiet(name: str = "lm_eval.models.huggingface") -> Iterator[None]:
    """Hide ``HFLM``'s warnings about being handed a model object (that is how this class works)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


COMMAND_FLAG = re.compile(r"--(checkpoint|tokenizer|device|dtype)\b( (?=\S)(?!with ))?")
"""The ``lm-eval`` command's flags that name a model argument, and whether a value follows (``--checkpoint PATH``;
not in ``pass --tokenizer with the tokenizer ...``)."""


def as_model_arguments(error: UserError) -> UserError:
    """``error`` naming the model arguments a Python caller gave (``checkpoint=PATH``, ``device=cpu``) where the
    loading code names the command's flags (``--checkpoint PATH``, ``--device cpu``)."""

    def named(text: str | None) -> str | None:
        return None if text is None else COMMAND_FLAG.sub(lambda m: m[1] + ("=" if m[2] else ""), text)

    return type(error)(named(error.what), named(error.where), named(error.fix))


@contextlib.contextmanager
def _named_as(command_flags: bool) -> Iterator[None]:
    """Errors as the caller gave the values: the command's flags, else the model arguments
    (:func:`as_model_arguments`)."""
    try:
        yield
    except UserError as e:
        if command_flags:
            raise
        raise as_model_arguments(e) from e


def model_max_length(max_length: object, context_length: int) -> int:
    """``HFLM``'s ``max_length`` (the tokens a request keeps, cut from the left): the model's context length, or a
    shorter one the caller gives (as ``hf`` takes it); a longer one is a :class:`ConfigError`, as our model has no
    positions past its context length."""
    if max_length is None:
        return context_length
    if not is_whole_number(max_length) or not 1 <= max_length <= context_length:
        raise ConfigError(
            f"max_length must be a whole number from 1 to the model's context length ({context_length}), got "
            f"{max_length!r}",
            "max_length",
            f"give {context_length} or less, or leave it unset",
        )
    return int(max_length)


TOKENIZER_FIX = "pass --tokenizer PATH (the tokenizer.json or tokenizer.model the model was trained with)"
MODEL_ARGS = ("sharing_layers", "force=True")
"""How lm-eval's ``--model_args`` and Python name the region length and the override, in :class:`EPASLM`'s errors."""


@register_model("epas")
class EPASLM(HFLM):
    """A checkpoint of ours as an lm-eval model, with the first ``sharing_layers`` layers of its trained region sharing.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        sharing_layers: Region length N (the first N layers of the trained region); default: the trained region (an
            export's folder: the N it was exported with).
        tokenizer: Tokenizer file (default: the one the checkpoint records).
        batch_size: Sequences per forward pass.
        max_batch_size: Upper bound for lm-eval's ``batch_size=auto``.
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        force: Allow a region longer than the trained one.
        command_flags: Errors name the ``lm-eval`` command's flags (``--checkpoint PATH``) rather than these
            arguments (``checkpoint=PATH``), as the command passes them.
        **kwargs: Further ``HFLM`` options that apply to a model object (``max_length`` up to the model's context
            length, ``add_bos_token``, ``prefix_token_id``,
            ``logits_cache``, ``softmax_dtype``, ...).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        sharing_layers: int | None = None,
        tokenizer: str | Path | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | None = 64,
        device: str | None = "auto",
        dtype: str | None = "auto",
        force: bool = False,
        command_flags: bool = False,
        **kwargs: Any,
    ) -> None:
        with _named_as(command_flags):
            hf_tokenizer = self._load(checkpoint, sharing_layers, tokenizer, device, dtype, force)
        with _quiet():
            super().__init__(
                pretrained=CausalLM(self.loaded.model),
                tokenizer=hf_tokenizer,
                backend="causal",
                batch_size=batch_size,
                max_batch_size=max_batch_size,
                max_length=model_max_length(kwargs.pop("max_length", None), self.loaded.model.config.context_length),
                **kwargs,
            )
        self.set_sharing_layers(self.loaded.default_sharing if sharing_layers is None else sharing_layers)

    def _load(self, checkpoint: str | Path, sharing_layers: int | None, tokenizer: str | Path | None,
              device: str | None, dtype: str | None, force: bool) -> Any:  # fmt: skip
        """Load the model (``self.loaded``) and its tokenizer; return the tokenizer the export ships. The region
        length, the tokenizer and the device are checked against the checkpoint's description first."""
        from epas_lightning.checkpoint import describe_checkpoint
        from epas_lightning.data.tokenizer import load_tokenizer
        from epas_lightning.hf.export import exported_tokenizer
        from epas_lightning.inference.generate_cli import check_device, load_for_inference

        check_device(device or "auto", dtype or "auto")
        recorded = describe_checkpoint(checkpoint)  # the region and the tokenizer checked before the weights load
        n = recorded.default_sharing if sharing_layers is None else sharing_layers
        recorded.region.first(n, bool(force), MODEL_ARGS)
        path = recorded.tokenizer_file(tokenizer)
        if path is None:
            raise ConfigError(recorded.no_tokenizer(), f"--checkpoint {checkpoint}", TOKENIZER_FIX)
        text_tokenizer = load_tokenizer(Path(path), bos_id=recorded.bos_id, eos_id=recorded.eos_id)
        text_tokenizer.check_fits(recorded.config.vocab_size)
        hf_tokenizer = exported_tokenizer(
            Path(path), recorded.config.context_length, recorded.bos_id, recorded.eos_id, recorded.config.vocab_size
        )
        # attention recomputed in every layer, as the export's modeling code does
        self.loaded = load_for_inference(checkpoint, device or "auto", dtype or "auto", attention_reuse=False)
        self.checkpoint, self.force = str(checkpoint), bool(force)
        self.stop_ids = text_tokenizer.stop_ids  # what the export's generation_config.json stops at
        return hf_tokenizer

    def set_sharing_layers(self, n: int) -> list[int]:
        """Run with the first ``n`` layers of the trained region sharing; return those layers."""
        self.sharing_layers = n
        self.shared_layers = set_region(self.loaded.model, n, self.loaded.region, self.force, MODEL_ARGS)
        return self.shared_layers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """``HFLM``'s, with its logits cache off. The cache scores requests whose tokens are the same once as the
        longest of them; lm-eval 0.4.13 then reads a shorter continuation's log-probabilities at the first positions
        instead of the last, so a document's windows that repeat (a text of a repeating pattern) changed its number
        with the batch size, for ``hf`` alike. Off, every window is scored by its own forward: ``hf``'s number at batch
        size 1, at any batch size. (The windows of one document rarely share tokens: the cache saves little here.)"""
        cache, self.logits_cache = self.logits_cache, False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.logits_cache = cache

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """``HFLM``'s, once every request's tokens to generate are known to leave room for a prompt: ``HFLM`` asserted
        it (an ``AssertionError`` traceback), for a task that sets no ``max_gen_toks`` too (lm-eval's default, 256,
        past a context length of 256 or less)."""
        from lm_eval.models.utils import normalize_gen_kwargs

        for settings in {repr(request.args[1]): request.args[1] for request in requests}.values():
            tokens = normalize_gen_kwargs(settings, self.max_gen_toks)["max_gen_toks"]
            if tokens >= self.max_length:
                raise ConfigError(
                    f"a task generates up to {tokens} tokens (max_gen_toks; {self.max_gen_toks} where the task sets "
                    f"none), which leaves no room for a prompt in the model's context length of {self.max_length}",
                    "the task's generation_kwargs",
                    f"give --gen-kwargs max_gen_toks=N, N below {self.max_length}",
                )
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _batch_scheduler(self, pos: int, n_reordered_requests: Any) -> int:
        """``HFLM``'s search schedule for ``batch_size="auto:N"``, with N at most the number of requests: lm-eval
        0.4.13 split them into ``len // N`` each, zero below N requests (a small task, a small ``limit``), and divided
        by it (a ``ZeroDivisionError``, for ``hf`` alike). There the search runs once per request."""
        schedule, self.batch_schedule = self.batch_schedule, min(self.batch_schedule, len(n_reordered_requests))
        try:
            return super()._batch_scheduler(pos, n_reordered_requests)
        finally:
            self.batch_schedule = schedule

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """Left-padded ``context`` (B, T) followed by the new tokens, padded after EOS: what ``model.generate`` gives.

        Greedy unless the task asks for ``do_sample`` (then ``temperature``, ``top_k``, ``top_p`` with transformers'
        defaults: :func:`sampling_settings`); ``HFLM`` cuts the decoded text at the stop strings. A setting our decoding
        does not honour (beam search, a repetition penalty) is refused: :func:`check_decoding_settings`.
        """
        context_length = self.loaded.model.config.context_length
        if max_length > context_length:  # a task's max_length: --gen-kwargs' is checked before the weights load
            raise ConfigError(
                f"max_length {max_length} is past the model's context length of {context_length} (the prompt and the "
                "generated tokens together)",
                "--gen-kwargs, or the task's generation_kwargs",
                f"give max_length {context_length} or less, or max_gen_toks for the tokens to generate",
            )
        if max_length <= context.shape[1]:  # transformers' generate raises for it on the export
            raise ConfigError(
                f"max_length {max_length} leaves no token to generate after a prompt of {context.shape[1]} tokens (the "
                "prompt and the generated tokens together)",
                "--gen-kwargs, or the task's generation_kwargs",
                "give a larger max_length, or max_gen_toks for the tokens to generate",
            )
        mask = kwargs.get("attention_mask")
        rows = context.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(context, mask, strict=True)]
        check_decoding_settings(kwargs)
        settings = sampling_settings(kwargs)
        result = generate(self.loaded.model, rows, max_length - context.shape[1], eos_id=self.stop_ids, **settings)
        pad = self.tokenizer.pad_token_id
        width = max(len(tokens) for tokens in result.tokens)
        new = [tokens + [pad] * (width - len(tokens)) for tokens in result.tokens]
        return torch.cat([context, torch.tensor(new, dtype=context.dtype, device=context.device)], dim=1)

    def get_model_info(self) -> dict:
        """What ``simple_evaluate`` records as the model: the checkpoint and the region it ran with."""
        model = self.loaded.model
        return {
            "checkpoint": self.checkpoint,
            "sharing_layers": self.sharing_layers,
            "shared_layers": self.shared_layers,
            "trained_region": self.loaded.region.to_record(),
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": dtype_name(model.embed_tokens.weight.dtype),
        }
