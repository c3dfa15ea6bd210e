"""``python -m epas_lightning bench --checkpoint ...``: the many-in-one table of one trained model.

For every sharing region the checkpoint supports (the deepest 0, 1, ..., N layers), it measures generation
tokens/s (prefill and decode, median of ``--reps`` alternating runs), the KV-cache size, the FLOPs relative to dense
(``estimate_flops``) and the validation loss on held-out tokens. The table is printed and written as CSV and PNG.

``--budget F`` picks the shortest region whose FLOPs are at most ``F`` x dense: the most accurate setting that fits.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from itertools import islice
from pathlib import Path

import torch

from epas_lightning.evaluation.perplexity import perplexity_of_batches
from epas_lightning.flops import estimate_flops
from epas_lightning.inference.generate import generate, set_region
from epas_lightning.inference.generate_cli import MIB, add_model_arguments, cuda_graph_choice, load_for_inference
from epas_lightning.model import LlamaConfig

COLUMNS = (
    "n_shared",
    "flops_ratio",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "kv_cache_bytes",
    "kv_cache_saving",
    "val_loss",
    "val_ppl",
)


def flops_ratio(config: LlamaConfig, n_shared: int, seq_len: int) -> float:
    """FLOPs per token with ``n_shared`` sharing layers relative to dense (forward and training alike)."""
    return estimate_flops(config, n_shared, seq_len) / estimate_flops(config, 0, seq_len)


def region_for_budget(config: LlamaConfig, budget: float, max_shared: int, seq_len: int) -> int:
    """The fewest sharing layers (most accurate model) whose FLOPs are ``<= budget`` x dense."""
    for n in range(max_shared + 1):
        if flops_ratio(config, n, seq_len) <= budget + 1e-12:
            return n
    floor = flops_ratio(config, max_shared, seq_len)
    raise ValueError(
        f"No region fits a budget of {budget:g} x dense: the largest trained region ({max_shared} layers) needs "
        f"{floor:.4f} x dense. Raise --budget to at least {math.ceil(floor * 1e4) / 1e4:g}."
    )


def heldout_batches(data_dir: Path, config: LlamaConfig, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """Up to ``n_batches`` validation batches (B, block_size + 1), kept in memory to score every region alike."""
    from epas_lightning.data import heldout_loader

    loader = heldout_loader(data_dir, config.block_size, batch_size, config.vocab_size)
    batches = [batch.long() for batch in islice(loader, n_batches)]
    if not batches:
        raise ValueError(f"{data_dir} has no validation batch of {batch_size} x {config.block_size + 1} tokens.")
    return batches


def measure(args: argparse.Namespace) -> dict:
    loaded = load_for_inference(args)
    model, config = loaded.model, loaded.model.config
    max_shared = loaded.max_shared if args.max_shared is None else args.max_shared
    set_region(model, max_shared, loaded.max_shared, args.force)  # validates before any timing
    pick = None
    if args.budget is not None:
        pick = region_for_budget(config, args.budget, max_shared, config.block_size)
    if args.prompt_len + args.new_tokens > config.block_size:
        raise ValueError(
            f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds block_size={config.block_size}."
        )
    data_dir = args.data or loaded.data_dir
    batches = heldout_batches(data_dir, config, args.val_batch_size, args.val_batches) if data_dir else []
    if batches:
        prompts = [row[: args.prompt_len].tolist() for row in batches[0][: args.batch_size]]
        prompts += [prompts[0]] * (args.batch_size - len(prompts))
    else:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len), generator=gen).tolist()
    regions = list(range(max_shared + 1))
    graphs = cuda_graph_choice(args)

    def run(n: int):
        set_region(model, n, loaded.max_shared, args.force)
        return generate(model, prompts, args.new_tokens, cuda_graph=graphs)

    for n in regions:
        run(n)  # warm-up
    decode: dict[int, list[float]] = {n: [] for n in regions}
    prefill: dict[int, list[float]] = {n: [] for n in regions}
    cache: dict[int, tuple[int, int]] = {}
    for rep in range(args.reps):
        for n in regions if rep % 2 == 0 else regions[::-1]:
            result = run(n)
            decode[n].append(result.decode_tokens_per_s)
            prefill[n].append(result.prefill_tokens_per_s)
            cache[n] = (result.cache_bytes, result.dense_cache_bytes)
    rows = []
    for n in regions:
        set_region(model, n, loaded.max_shared, args.force)
        loss = perplexity_of_batches(model, batches)["loss"] if batches else float("nan")
        rows.append(
            {
                "n_shared": n,
                "flops_ratio": flops_ratio(config, n, config.block_size),
                "prefill_tokens_per_s": statistics.median(prefill[n]),
                "decode_tokens_per_s": statistics.median(decode[n]),
                "kv_cache_bytes": cache[n][0],
                "kv_cache_saving": 1 - cache[n][0] / cache[n][1],
                "val_loss": loss,
                "val_ppl": math.exp(loss) if loss == loss else float("nan"),
            }
        )
    return {
        "checkpoint": str(args.checkpoint),
        "device": str(model.embed_tokens.weight.device),
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "n_layer": config.n_layer,
        "trained_max_shared": loaded.max_shared,
        "attention_reuse": model.attention_reuse,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "data": str(data_dir) if data_dir else None,
        "val_tokens": sum(b[:, 1:].numel() for b in batches),
        "budget": args.budget,
        "budget_pick": pick,
        "rows": rows,
    }


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    n = [r["n_shared"] for r in rows]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4))
    speed.plot(n, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode tok/s")
    speed.set_xlabel("sharing layers (deepest N)")
    speed.set_ylabel("decode tokens/s")
    kv = speed.twinx()
    kv.plot(n, [r["kv_cache_bytes"] / MIB for r in rows], "s--", color="tab:gray", label="KV cache MiB")
    kv.set_ylabel("KV cache (MiB)")
    speed.set_title(f"batch {summary['batch_size']}, {summary['new_tokens']} new tokens")
    quality.plot(n, [r["val_loss"] for r in rows], "o-", color="tab:red")
    quality.set_xlabel("sharing layers (deepest N)")
    quality.set_ylabel("validation loss")
    quality.set_title("quality at each region")
    for ax in (speed, quality):
        ax.set_xticks(n)
    if summary["budget_pick"] is not None:
        for ax in (speed, quality):
            ax.axvline(summary["budget_pick"], color="tab:green", linestyle=":", label=f"budget {summary['budget']}")
    fig.suptitle(f"many-in-one: {Path(summary['checkpoint']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(summary: dict) -> None:
    print(
        f"{summary['checkpoint']}: {summary['n_layer']} layers, trained with up to {summary['trained_max_shared']} "
        f"sharing; {summary['device']} {summary['dtype']}, batch {summary['batch_size']}, prompt "
        f"{summary['prompt_len']}, {summary['new_tokens']} new tokens, median of {summary['reps']}"
    )
    head = f"{'shared':>6} {'FLOPs':>6} {'prefill tok/s':>14} {'decode tok/s':>13}"
    print(f"{head} {'KV MiB':>8} {'KV saved':>9} {'val loss':>9}")
    for r in summary["rows"]:
        print(
            f"{r['n_shared']:>6} {r['flops_ratio']:>6.3f} {r['prefill_tokens_per_s']:>14.1f} "
            f"{r['decode_tokens_per_s']:>13.1f} {r['kv_cache_bytes'] / MIB:>8.2f} {r['kv_cache_saving']:>9.1%} "
            f"{r['val_loss']:>9.4f}"
        )
    if summary["budget_pick"] is not None:
        n = summary["budget_pick"]
        print(f"budget {summary['budget']:g} x dense FLOPs -> share the deepest {n} layers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epas_lightning bench", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--data", type=Path, default=None, help="prepared data dir for validation loss (default: the run's)")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--val-batch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1, help="generation batch size")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-shared", type=int, default=None, help="largest region to measure (default: as trained)")
    p.add_argument("--budget", type=float, default=None, help="pick the region with FLOPs <= F x dense")
    p.add_argument("--output", type=Path, default=Path("out/bench"), help="directory for many_in_one.csv/.png/.json")
    args = p.parse_args(argv)
    try:
        summary = measure(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    write_csv(summary["rows"], args.output / "many_in_one.csv")
    write_plot(summary, args.output / "many_in_one.png")
    (args.output / "many_in_one.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    print(f"wrote {args.output / 'many_in_one.csv'} and {args.output / 'many_in_one.png'}")
    print(json.dumps(summary))
    return 0
