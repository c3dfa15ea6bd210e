"""``python -m epas_lightning generate --checkpoint ... --prompt ... [--sharing-layers N]``.

Loads a checkpoint (``.ckpt``, an FSDP2 checkpoint directory or a ``consolidate`` directory), switches the deepest
``N`` layers to sharing (default: the region the checkpoint was trained with), and continues each prompt with the
KV cache. Prints the completions, then tokens/s of prefill and decode and the KV-cache size against a dense model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from epas_lightning.checkpoint import LoadedModel, load_model
from epas_lightning.data.tokenizer import TextTokenizer, load_tokenizer
from epas_lightning.inference.generate import GenerationResult, generate, set_region

MIB = 2**20


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``bench``: where the model comes from and how it runs."""
    p.add_argument(
        "--checkpoint", required=True, type=Path, help=".ckpt file, FSDP2 checkpoint dir or consolidated dir"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="auto: bf16 on CUDA"
    )
    p.add_argument("--force", action="store_true", help="allow more sharing layers than the checkpoint trained with")
    p.add_argument(
        "--no-attention-reuse",
        action="store_true",
        help="sharing layers recompute softmax(Q K^T) instead of reusing the source layer's probabilities",
    )
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")


def load_for_inference(args: argparse.Namespace) -> LoadedModel:
    """The checkpoint's model on the requested device and dtype, with attention reuse set as asked."""
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    loaded = load_model(args.checkpoint, device)
    loaded.model.to(getattr(torch, dtype))
    loaded.model.attention_reuse = loaded.model.config.sharing_mode == "qk" and not args.no_attention_reuse
    return loaded


def cuda_graph_choice(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.cuda_graph]


def resolve_tokenizer(loaded: LoadedModel, path: Path | None) -> TextTokenizer:
    """``--tokenizer`` if given, else the one the checkpoint recorded; a clear error if neither exists."""
    path = path or loaded.tokenizer_path
    if path is None:
        raise SystemExit(
            "error: the checkpoint does not name an existing tokenizer; pass --tokenizer PATH (the tokenizer.json or "
            "tokenizer.model of the data the model was trained on)."
        )
    return load_tokenizer(path)


def describe_region(loaded: LoadedModel, layers: list[int]) -> str:
    L = loaded.model.config.n_layer
    where = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
    reuse = ", attention reuse" if loaded.model.attention_reuse and layers else ""
    return f"{where} share ({len(layers)}/{L}; trained with up to {loaded.max_shared}{reuse})"


def report(result: GenerationResult, loaded: LoadedModel, n_shared: int) -> dict:
    config = loaded.model.config
    analytic = n_shared / (2 * config.n_layer) if config.sharing_mode == "qk" else n_shared / config.n_layer
    return {
        "prompt_tokens": result.prompt_tokens,
        "prefill_seconds": result.prefill_seconds,
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "decode_steps": result.decode_steps,
        "decode_seconds": result.decode_seconds,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "kv_cache_bytes": result.cache_bytes,
        "dense_kv_cache_bytes": result.dense_cache_bytes,
        "kv_cache_saving": result.cache_saving,
        "kv_cache_saving_analytic": analytic,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epas_lightning generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", type=Path, help="a file with one prompt per line (added to --prompt)")
    p.add_argument("--sharing-layers", type=int, default=None, help="deepest N layers share (default: as trained)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer file (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the numbers")
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    if not prompts:
        p.error("give at least one --prompt (or --prompt-file)")
    try:
        loaded = load_for_inference(args)
        tokenizer = resolve_tokenizer(loaded, args.tokenizer)
        n_shared = loaded.max_shared if args.sharing_layers is None else args.sharing_layers
        layers = set_region(loaded.model, n_shared, loaded.max_shared, args.force)
        ids = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in prompts]
        result = generate(
            loaded.model,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=None if args.ignore_eos else tokenizer.eos_id,
            seed=args.seed,
            cuda_graph=cuda_graph_choice(args),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, new in zip(prompts, result.tokens, strict=True):
        completion = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        print(f"{text}{completion}\n")
    numbers = report(result, loaded, n_shared)
    print(f"region: {describe_region(loaded, layers)}", file=sys.stderr)
    print(
        f"prefill: {result.prompt_tokens} tokens, {numbers['prefill_tokens_per_s']:.1f} tok/s | decode: "
        f"{result.decode_steps * result.batch_size} tokens, {numbers['decode_tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
    )
    print(
        f"KV cache: {result.cache_bytes / MIB:.2f} MiB (dense {result.dense_cache_bytes / MIB:.2f} MiB, saving "
        f"{result.cache_saving:.1%}; analytic {numbers['kv_cache_saving_analytic']:.1%})",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({"n_shared": n_shared, "shared_layers": layers, **numbers}))
    return 0
