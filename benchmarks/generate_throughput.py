"""Generation throughput of one model at 0%, 25% and 50% sharing ("many-in-one"), in one process.

What it measures: KV-cache generation (``epas_lightning.inference.generate``) of ``--new-tokens`` tokens after a
random ``--prompt-len``-token prompt, greedy, no early stop, for every (batch size, sharing fraction) setting on the
SAME randomly initialised model (the weights do not change the work done). Settings alternate within each repetition
(forward order, then reversed) so drift hits all of them; one untimed warm-up per setting. Reported per setting: the
median decode tokens/s (new tokens after the first, per second of decode), prefill tokens/s and KV-cache bytes.

``gain_F = decode tokens/s at sharing F / decode tokens/s dense - 1``. The paper (V100, HF-style eager decoding, 125M):
gain_25 = +0.227, gain_50 = +0.292. Target: ``gain_50 >= 0.29`` (stretch 0.35) at every batch size.

Sharing layers decode with attention-probability reuse (``--no-attention-reuse`` recomputes Q K^T per layer instead,
``--compare-reuse`` times both).

Usage::

    python benchmarks/generate_throughput.py --model llama-125m

A table goes to stdout; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import alternate, device_name, emit, preset_config, resolve_device

from epas_lightning.errors import ConfigError, run_script
from epas_lightning.inference import generate, set_region
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.runtime import size_text
from epas_lightning.script_args import ScriptParser, count, fraction

TARGET = 0.29
STRETCH = 0.35


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-125m", help="LlamaConfig preset name")
    p.add_argument("--batch-sizes", type=count, nargs="+", default=[1, 8])
    p.add_argument(
        "--sharing",
        type=fraction,
        nargs="+",
        default=[0.0, 0.25, 0.5],
        help="fractions of layers sharing (dense is always measured)",
    )
    p.add_argument("--prompt-len", type=count, default=128)
    p.add_argument("--new-tokens", type=count, default=128)
    p.add_argument("--reps", type=count, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--no-attention-reuse", action="store_true", help="sharing layers recompute softmax(Q K^T)")
    p.add_argument("--compare-reuse", action="store_true", help="time sharing with and without attention reuse")
    p.add_argument(
        "--cuda-graph", choices=("auto", "on", "off"), default="auto", help="replay decode steps (auto: on CUDA)"
    )
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.new_tokens < 2:  # the first new token comes from the prefill: decode tokens/s needs a second one
        raise ConfigError("decoding needs at least 2 new tokens", f"--new-tokens {args.new_tokens}", "pass 2 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    graphs = {"auto": device.type == "cuda", "on": True, "off": False}[args.cuda_graph]
    if graphs and device.type != "cuda":
        raise ConfigError(
            "CUDA graphs need a CUDA device", f"--cuda-graph on --device {args.device}", "use --cuda-graph off"
        )
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)
    config = preset_config(args.model, args.prompt_len + args.new_tokens)
    model = Llama(config).to(device=device, dtype=dtype).eval()
    L = config.n_layer
    settings = [("dense", 0, False)]  # (label, n_shared, attention_reuse); dense is the baseline of every gain
    for share in args.sharing:
        n = min(round(share * L), L - 1)
        if n == 0:
            continue
        if args.compare_reuse:
            settings += [(f"{share:g}", n, True), (f"{share:g}/recompute", n, False)]
        else:
            settings.append((f"{share:g}", n, not args.no_attention_reuse))
    generator = torch.Generator().manual_seed(args.seed)
    results: dict = {}
    for B in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (B, args.prompt_len), generator=generator).tolist()

        def run(n_shared: int, reuse: bool, prompts: list = prompts):
            set_region(model, n_shared)
            model.attention_reuse = reuse
            return generate(model, prompts, args.new_tokens, cuda_graph=graphs)

        for _, n, reuse in settings:
            run(n, reuse)  # warm-up
        decode: dict[str, list[float]] = {label: [] for label, _, _ in settings}
        prefill: dict[str, list[float]] = {label: [] for label, _, _ in settings}
        cache: dict[str, int] = {}
        by_label = {label: (n, reuse) for label, n, reuse in settings}
        for rep, label in alternate(list(by_label), args.reps):
            n, reuse = by_label[label]
            r = run(n, reuse)
            decode[label].append(r.decode_tokens_per_s)
            prefill[label].append(r.prefill_tokens_per_s)
            cache[label] = r.cache_bytes
            print(f"  batch {B} rep {rep} {label:>14}: decode {r.decode_tokens_per_s:9.1f} tok/s", flush=True)
        med = {label: statistics.median(v) for label, v in decode.items()}
        results[B] = {
            label: {
                "n_shared": n,
                "attention_reuse": reuse,
                "decode_tokens_per_s": med[label],
                "prefill_tokens_per_s": statistics.median(prefill[label]),
                "kv_cache_bytes": cache[label],
                "gain": med[label] / med["dense"] - 1.0,
                "decode_rep_tokens_per_s": decode[label],
            }
            for label, n, reuse in settings
        }
    summary = summarize(args, config, device, dtype_name, results)
    print_table(summary)
    emit(summary)
    return summary


def summarize(args, config: LlamaConfig, device: torch.device, dtype: str, results: dict) -> dict:
    def gain(B: int, share: float) -> float | None:
        row = results[B].get(f"{share:g}")
        return None if row is None else row["gain"]

    first = args.batch_sizes[0]
    gains_50 = [g for B in args.batch_sizes if (g := gain(B, 0.5)) is not None]
    return {
        "model": args.model,
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype,
        "cuda_graph": args.cuda_graph,
        "n_layer": config.n_layer,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "gain_25": gain(first, 0.25),
        "gain_50": gain(first, 0.5),
        "gain_25_by_batch": {B: gain(B, 0.25) for B in args.batch_sizes},
        "gain_50_by_batch": {B: gain(B, 0.5) for B in args.batch_sizes},
        "target": TARGET,
        "target_met": bool(gains_50) and min(gains_50) >= TARGET,
        "stretch_met": bool(gains_50) and min(gains_50) >= STRETCH,
        "results": results,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def print_table(s: dict) -> None:
    print()
    print(f"{s['model']} on {s['device_name']} ({s['dtype']}), prompt {s['prompt_len']}, {s['new_tokens']} new tokens")
    head = f"{'batch':>5} {'setting':>16} {'shared':>6} {'decode tok/s':>13} {'gain':>8}"
    print(f"{head} {'prefill tok/s':>14} {'KV cache':>10}")
    for B, rows in s["results"].items():
        for label, r in rows.items():
            print(
                f"{B:>5} {label:>16} {r['n_shared']:>6} {r['decode_tokens_per_s']:>13.1f} {r['gain']:>+8.3f} "
                f"{r['prefill_tokens_per_s']:>14.1f} {size_text(r['kv_cache_bytes']):>10}"
            )
    print(f"gain_50 >= {s['target']} at every batch size: {s['target_met']} (stretch {STRETCH}: {s['stretch_met']})")


if __name__ == "__main__":
    run_script(main)
