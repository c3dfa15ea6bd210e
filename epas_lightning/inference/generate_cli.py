"""``python -m epas_lightning generate --checkpoint ... --prompt ... [--sharing-layers N]``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from epas_lightning.checkpoint import CheckpointInfo, LoadedModel, describe_checkpoint, load_model
from epas_lightning.data.tokenizer import TextTokenizer, check_tokenizer_flag, decode_continuation, load_tokenizer
from epas_lightning.errors import ConfigError, read_text_file, text_lines
from epas_lightning.inference.generate import GenerationResult, fit_new_tokens, generate, per_second, set_region
from epas_lightning.inference.sampling import SamplingError, check_sampling
from epas_lightning.region import SHARING_FLAGS
from epas_lightning.runtime import DType, check_counts, emit_json, resolve_device, resolve_dtype, size_text
from epas_lightning.seeds import SAMPLING_SEEDS, SEED_FIX, seed_out_of_range

CudaGraph = Literal["auto", "on", "off"]


def load_for_inference(
    checkpoint: Path, device: str = "auto", dtype: DType = "auto", attention_reuse: bool = True
) -> LoadedModel:
    """The checkpoint's model on the requested device and dtype, attention reuse on where it is the same model."""
    where = resolve_device(device)
    # straight into the dtype on the device
    loaded = load_model(checkpoint, where, resolve_dtype(dtype, where), "--checkpoint")
    loaded.model.attention_reuse = attention_reuse and loaded.model.config.sharing_mode == "qk"
    return loaded


def check_device(device: str = "auto", dtype: DType = "auto") -> None:
    """``--device`` and ``--dtype`` as :func:`load_for_inference` reads them: a device this machine lacks is said
    first, before the checkpoint's description, its notes or the data are read."""
    resolve_dtype(dtype, resolve_device(device))


def cuda_graph_choice(cuda_graph: CudaGraph, device: str = "auto") -> bool | None:
    """``--cuda-graph`` for ``generate``'s ``cuda_graph`` (``None``: on for CUDA); ``on`` needs a CUDA ``--device``."""
    if cuda_graph == "on" and resolve_device(device).type != "cuda":
        raise ConfigError(
            "CUDA graphs need a CUDA device", f"--cuda-graph on --device {device}", "use --cuda-graph auto or off"
        )
    return {"auto": None, "on": True, "off": False}[cuda_graph]


def check_sampling_flags(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """``--temperature``, ``--top-k`` and ``--top-p``: a :class:`ConfigError` naming the first flag out of range."""
    try:
        check_sampling(temperature, top_k, top_p)
    except SamplingError as e:
        raise ConfigError(e.what, "--" + e.setting.replace("_", "-"), e.fix) from None


def check_seed(seed: int) -> None:
    """``--seed``: a :class:`ConfigError` unless it lies in :data:`~epas_lightning.seeds.SAMPLING_SEEDS` (serve's
    ``seed`` field is checked alike)."""
    if problem := seed_out_of_range(seed, SAMPLING_SEEDS):
        raise ConfigError(problem, "--seed", SEED_FIX)


def resolve_tokenizer(loaded: CheckpointInfo, path: Path | None) -> TextTokenizer:
    """``--tokenizer`` if given, else the one the checkpoint recorded (:meth:`CheckpointInfo.tokenizer_file`); a
    clear error if neither exists, or if its ids can overrun the model's vocabulary (another model's tokenizer)."""
    path = loaded.tokenizer_file(path)
    if path is None:
        raise ConfigError(
            loaded.no_tokenizer(),
            "--tokenizer",
            "pass --tokenizer PATH (the tokenizer.json or tokenizer.model the model was trained with)",
        )
    tokenizer = load_tokenizer(path, bos_id=loaded.bos_id, eos_id=loaded.eos_id)  # the ids its documents began with
    tokenizer.check_fits(loaded.config.vocab_size)
    return tokenizer


def describe_region(loaded: LoadedModel, layers: list[int]) -> str:
    L = loaded.model.config.n_layer
    where = f"layers {layers}" if layers else "no layers"
    reuse = ", attention reuse" if loaded.model.attention_reuse and layers else ""
    return f"{where} share ({len(layers)}/{L}; {loaded.region.summary()}{reuse})"


def in_batches(prompts: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """The prompts in order, in consecutive batches of at most ``batch_size``."""
    return [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the ``index``-th batch: ``seed`` for the first, the next ones along (wrapped within 64
    bits), so that a prompt repeated across batches (several samples of one prompt) is sampled anew in each."""
    return (seed + index + 2**63) % 2**64 - 2**63


def rate_text(tokens_per_s: float | None) -> str:
    """A rate as the commands print it: ``n/a`` where none was measured (no decode step), not ``0.0``."""
    return "n/a tok/s" if tokens_per_s is None else f"{tokens_per_s:.1f} tok/s"


def report(results: list[GenerationResult], loaded: LoadedModel, n_shared: int) -> dict:
    """The numbers of batches decoded one after another: token counts and times summed, the KV cache of the batch
    that held the most (one batch's cache lives at a time); no decode rate (``None``) without decode steps."""
    config = loaded.model.config
    analytic = n_shared / (2 * config.n_layer) if config.sharing_mode == "qk" else n_shared / config.n_layer
    peak = max(results, key=lambda result: result.cache_bytes)
    prompt_tokens = sum(result.prompt_tokens for result in results)
    prefill_seconds = sum(result.prefill_seconds for result in results)
    decode_tokens = sum(result.decode_steps * result.batch_size for result in results)
    decode_seconds = sum(result.decode_seconds for result in results)
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_seconds": prefill_seconds,
        "prefill_tokens_per_s": per_second(prompt_tokens, prefill_seconds),
        "decode_steps": sum(result.decode_steps for result in results),
        "decode_tokens": decode_tokens,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_s": per_second(decode_tokens, decode_seconds),
        "kv_cache_bytes": peak.cache_bytes,
        "dense_kv_cache_bytes": peak.dense_cache_bytes,
        "kv_cache_saving": peak.cache_saving,
        "kv_cache_saving_analytic": analytic,
    }


def generate_command(
    checkpoint: Path,
    prompt: list[str] | None = None,
    prompt_file: Path | None = None,
    sharing_layers: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 1234,
    ignore_eos: bool = False,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    attention_reuse: bool = True,
    cuda_graph: CudaGraph = "auto",
    force: bool = False,
    batch_size: int = 16,
    json: bool = False,
) -> None:
    """Continue prompts with a trained checkpoint, at any sharing region it trained.

    Prints each completion, then (on stderr) the region, prefill and decode tokens/s, and the KV-cache size against a
    dense model (in qk mode a sharing layer caches only V).

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        prompt: A prompt, as typed; repeat the flag for a batch. '[a, b]' is one prompt too (a YAML list of prompts
            goes in a --config file); one that starts with "-" is written --prompt=-x.
        prompt_file: A file with one prompt per line, blank lines skipped (added to --prompt); - reads them
            from standard input.
        sharing_layers: The first N layers of the trained region (in its growth order) share; default: all of it (an
            export's folder: the N it was exported with).
        max_new_tokens: Tokens to generate per prompt (default: 100, or what the model's context length leaves after
            the longest prompt).
        temperature: 0 is greedy decoding.
        top_k: Sample among the k most likely tokens.
        top_p: Sample among the most likely tokens whose probability reaches p; 0 keeps the most likely alone
            (greedy decoding, as serve's top_p 0).
        seed: Seed of the sampling: the same completions again for the same seed and --batch-size on the same device
            and dtype (CPU and CUDA draw from different generators, as in torch).
        ignore_eos: Always generate --max-new-tokens tokens: end tokens the model emits are kept and counted (their
            text is empty: special tokens are skipped when decoding, as vLLM's ``ignore_eos`` shows them).
        tokenizer: Tokenizer file or folder (default: the one the checkpoint records).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        attention_reuse: Sharing layers reuse the source layer's attention probabilities (the same model, less work).
        cuda_graph: Replay decode steps from a CUDA graph (auto: on for CUDA).
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
        batch_size: Prompts decoded at once; more are decoded batch after batch, in order (greedy completions are
            the same at any batch size; sampled ones are reproducible for the same --seed and --batch-size).
        json: End with one JSON line of the numbers and each prompt's completion (``completions``: ``prompt``,
            ``completion`` as printed after it, ``new_tokens`` without the end token it stopped at; with --ignore-eos,
            every token generated).
    """
    check_sampling_flags(temperature, top_k, top_p)  # before the model loads
    check_seed(seed)
    check_counts({"--max-new-tokens": max_new_tokens, "--batch-size": batch_size})
    graphed = cuda_graph_choice(cuda_graph, device)
    check_device(device, dtype)
    check_tokenizer_flag(tokenizer)
    prompts = list(prompt or [])
    if prompt_file is not None:
        text = read_text_file(prompt_file, "prompt file", f"--prompt-file {prompt_file}")
        prompts += [line for line in text_lines(text) if line.strip()]
    if not prompts:
        raise ConfigError("nothing to continue", "--prompt", "give at least one --prompt (or --prompt-file)")
    recorded = describe_checkpoint(checkpoint)  # the tokenizer, region and prompts checked before the weights load
    text_tokenizer = resolve_tokenizer(recorded, tokenizer)
    n_shared = recorded.default_sharing if sharing_layers is None else sharing_layers
    recorded.region.first(n_shared, force, SHARING_FLAGS)
    ids = [[text_tokenizer.bos_id, *text_tokenizer.encode(text)] for text in prompts]
    max_new_tokens = fit_new_tokens(max(map(len, ids)), max_new_tokens, recorded.config.context_length)
    loaded = load_for_inference(checkpoint, device, dtype, attention_reuse)
    layers = set_region(loaded.model, n_shared, loaded.region, force, SHARING_FLAGS)
    if note := loaded.unrun_region_note(checkpoint, "generate"):
        print(note, file=sys.stderr)
    results = [
        generate(
            loaded.model,
            batch,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=None if ignore_eos else text_tokenizer.stop_ids,
            seed=batch_seed(seed, index),
            cuda_graph=graphed,
            vocab_size=text_tokenizer.vocab_size,  # every id it emits decodes
        )
        for index, batch in enumerate(in_batches(ids, batch_size))
    ]
    completions = []
    new_tokens = [row for result in results for row in result.tokens]
    for text, prompt_ids, new in zip(prompts, ids, new_tokens, strict=True):
        if not ignore_eos:  # the end token it stopped at; with --ignore-eos every token generated counts
            new = [t for t in new if t not in text_tokenizer.stop_ids]
        completion = decode_continuation(text_tokenizer.decode, prompt_ids, new)  # its first word's space kept
        completions.append({"prompt": text, "completion": completion, "new_tokens": len(new)})
        print(f"{text}{completion}\n")
    numbers = report(results, loaded, n_shared)
    print(f"region: {describe_region(loaded, layers)}", file=sys.stderr)
    print(
        f"prefill: {numbers['prompt_tokens']} tokens, {rate_text(numbers['prefill_tokens_per_s'])} | decode: "
        f"{numbers['decode_tokens']} tokens, {rate_text(numbers['decode_tokens_per_s'])}",
        file=sys.stderr,
    )
    print(
        f"KV cache: {size_text(numbers['kv_cache_bytes'])} (dense {size_text(numbers['dense_kv_cache_bytes'])}, "
        f"saving {numbers['kv_cache_saving']:.1%}; analytic {numbers['kv_cache_saving_analytic']:.1%})",
        file=sys.stderr,
    )
    emit_json({"sharing_layers": n_shared, "shared_layers": layers, **numbers, "completions": completions}, json)
