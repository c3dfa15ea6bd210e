"""``python -m epas_lightning bench --checkpoint ...``: the many-in-one table of one trained model.

For every sharing region the checkpoint supports (the first 0, 1, ..., N layers of its trained region), it measures
generation tokens/s (prefill and decode, median of ``--reps`` alternating runs), the KV-cache size, the FLOPs relative
to dense (``estimate_flops``) and the loss on held-out tokens. The table is printed and written as CSV, PNG and JSON.

``--budget F`` picks the shortest region whose FLOPs are at most ``F`` x dense: the least sharing that fits.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epas_lightning.checkpoint import CheckpointInfo, LoadedModel, describe_checkpoint
from epas_lightning.data.tokenizer import RecordedTokenizer
from epas_lightning.errors import ConfigError
from epas_lightning.evaluation.perplexity import perplexity, perplexity_of_batches
from epas_lightning.flops import estimate_flops
from epas_lightning.inference.generate import generate, set_region
from epas_lightning.inference.generate_cli import CudaGraph, check_device, cuda_graph_choice, load_for_inference
from epas_lightning.model import LlamaConfig
from epas_lightning.outputs import check_output, output_folder, writing_into
from epas_lightning.progress import progress
from epas_lightning.region import SHARING_FLAGS, sharing_layers_text
from epas_lightning.runtime import DType, check_counts, dtype_name, emit_json, json_text, size_text

if TYPE_CHECKING:
    from epas_lightning.data.token_data import HeldOut

MIB = 2**20
"""The plot's KV-cache unit."""
DEFAULT_TOKENS = 64
"""Default --prompt-len and --max-new-tokens, each cut to what the model's context length leaves."""

COLUMNS = (
    "sharing_layers",
    "shared_layers",
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


def budget_to_fit(ratio: float) -> float:
    """``ratio`` rounded up to 4 decimals: the table shows it and ``--budget`` of that picks its row (never below)."""
    return math.ceil((ratio - 1e-12) * 1e4) / 1e4


def region_for_budget(config: LlamaConfig, budget: float, max_shared: int, seq_len: int) -> int:
    """The fewest sharing layers whose FLOPs are ``<= budget`` x dense."""
    for n in range(max_shared + 1):
        if flops_ratio(config, n, seq_len) <= budget + 1e-12:
            return n
    floor = flops_ratio(config, max_shared, seq_len)
    raise ConfigError(
        f"no region fits a budget of {budget:g} x dense: the largest region ({sharing_layers_text(max_shared)}) needs "
        f"{budget_to_fit(floor):.4f} x dense",
        "--budget",
        f"raise --budget to at least {budget_to_fit(floor):g}",
    )


def bench_budget_pick(recorded: CheckpointInfo, budget: float, max_shared: int, seq_len: int) -> int:
    """:func:`region_for_budget` over the regions measured; where none fits but a longer one the weights trained
    does (``--sharing-layers`` below the trained region, or a stock export's record), the error names that one."""
    config = recorded.config
    trained = (recorded.weights_region or recorded.region).size
    if max_shared < trained:
        try:
            n = region_for_budget(config, budget, trained, seq_len)
        except ConfigError:
            n = 0  # not even the whole trained region fits: region_for_budget's error below says so
        if n > max_shared:
            force = "" if recorded.region.size else " --force (the region its weights trained)"
            raise ConfigError(
                f"no region of 0..{max_shared} sharing layers fits a budget of {budget:g} x dense; the first {n} of "
                f"the {trained} trained do ({flops_ratio(config, n, seq_len):.4f} x dense)",
                "--sharing-layers",
                f"pass --sharing-layers {n}{force}",
            )
    return region_for_budget(config, budget, max_shared, seq_len)


def heldout_batches(
    data_dir: Path | HeldOut,
    config: LlamaConfig,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    tokenizer: Path | RecordedTokenizer | None = None,
    own_data: bool = False,
) -> list[torch.Tensor]:
    """Up to ``n_batches`` validation batches (B, seq_len + 1), kept in memory to score every region alike; the
    data must hold the ids of ``tokenizer`` (the model's, when known; ``own_data``: see ``heldout_loader``)."""
    from epas_lightning.data import heldout_loader

    loader = heldout_loader(data_dir, seq_len, batch_size, config.vocab_size, tokenizer, own_data)
    return [batch.long() for batch in islice(loader, n_batches)]


def bench_prompts(batches: list[torch.Tensor], prompts: int, prompt_len: int, vocab_size: int) -> list[list[int]]:
    """``prompts`` prompts of ``prompt_len`` tokens: consecutive pieces of the held-out tokens (which may be longer
    than one held-out sequence; the first piece is repeated when they run out), or random ids without held-out data."""
    if not batches:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (prompts, prompt_len), generator=gen).tolist()
    tokens = torch.cat([batch.flatten() for batch in batches])
    pieces = tokens[: len(tokens) // prompt_len * prompt_len].view(-1, prompt_len)[:prompts].tolist()
    if not pieces:
        raise ConfigError(
            f"the {len(tokens)} held-out tokens read are fewer than one prompt of {prompt_len}",
            "--prompt-len",
            "raise --batches or --batch-size, or lower --prompt-len",
        )
    return pieces + [pieces[0]] * (prompts - len(pieces))


def median_rate(rates: list[float | None]) -> float | None:
    """The median of the runs' tokens/s; ``None`` (null in JSON, ``-`` in the table) where none was measured: one new
    token has no decode step."""
    return None if None in rates else statistics.median(rates)


def measure(
    loaded: LoadedModel,
    max_shared: int,
    force: bool,
    seq_len: int,
    batches: list[torch.Tensor],
    prompts: int,
    prompt_len: int,
    max_new_tokens: int,
    reps: int,
    cuda_graph: bool | None,
) -> list[dict]:
    """One row per region 0..``max_shared``: FLOPs ratio (at ``seq_len`` tokens a sequence), generation tokens/s
    (median of ``reps`` alternating runs), KV-cache bytes and held-out loss."""
    model, config = loaded.model, loaded.model.config
    rows = bench_prompts(batches, prompts, prompt_len, config.vocab_size)
    regions = list(range(max_shared + 1))

    def run(n: int):
        set_region(model, n, loaded.region, force)
        return generate(model, rows, max_new_tokens, cuda_graph=cuda_graph)

    for n in progress(regions, "bench: warm-up", unit="region"):
        run(n)
    decode: dict[int, list[float | None]] = {n: [] for n in regions}
    prefill: dict[int, list[float | None]] = {n: [] for n in regions}
    cache: dict[int, tuple[int, int]] = {}
    for rep in progress(range(reps), "bench: timing every region", unit="rep"):
        for n in regions if rep % 2 == 0 else regions[::-1]:
            result = run(n)
            decode[n].append(result.decode_tokens_per_s)
            prefill[n].append(result.prefill_tokens_per_s)
            cache[n] = (result.cache_bytes, result.dense_cache_bytes)
    table = []
    for n in progress(regions, "bench: held-out loss", unit="region") if batches else regions:  # none: nothing to say
        set_region(model, n, loaded.region, force)
        loss = perplexity_of_batches(model, batches)["loss"] if batches else None  # null in JSON: not measured
        table.append(
            {
                "sharing_layers": n,
                "shared_layers": loaded.region.first(n, force),
                "flops_ratio": flops_ratio(config, n, seq_len),
                "prefill_tokens_per_s": median_rate(prefill[n]),
                "decode_tokens_per_s": median_rate(decode[n]),
                "kv_cache_bytes": cache[n][0],
                "kv_cache_saving": 1 - cache[n][0] / cache[n][1],
                "val_loss": loss,
                "val_ppl": None if loss is None else perplexity(loss),
            }
        )
    return table


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
    n = [r["sharing_layers"] for r in rows]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4))
    speed.plot(n, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode tok/s")
    speed.set_xlabel("sharing layers (first N of the trained region)")
    speed.set_ylabel("decode tokens/s")
    kv = speed.twinx()
    kv.plot(n, [r["kv_cache_bytes"] / MIB for r in rows], "s--", color="tab:gray", label="KV cache MiB")
    kv.set_ylabel("KV cache (MiB)")
    speed.set_title(f"{summary['prompts']} prompt(s), {summary['max_new_tokens']} new tokens")
    quality.plot(n, [r["val_loss"] for r in rows], "o-", color="tab:red")  # None: no held-out data, no line
    quality.set_xlabel("sharing layers (first N of the trained region)")
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


def shown(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted, ``-`` where it was not measured."""
    return "-" if value is None else format(value, spec)


def print_table(summary: dict) -> None:
    print(
        f"{summary['checkpoint']}: {summary['n_layer']} layers, trained with up to {summary['trained_max_shared']} "
        f"sharing; {summary['device']} {summary['dtype']}, {summary['prompts']} prompt(s) of "
        f"{summary['prompt_len']} tokens, {summary['max_new_tokens']} new tokens, median of {summary['reps']}; "
        f"val loss on {summary['val_tokens']} held-out tokens, sequences of {summary['seq_len']}"
    )
    head = f"{'shared':>6} {'FLOPs':>6} {'prefill tok/s':>14} {'decode tok/s':>13}"
    print(f"{head} {'KV cache':>10} {'KV saved':>9} {'val loss':>9}")
    for r in summary["rows"]:
        loss = shown(r["val_loss"], ".4f")
        prefill, decode = (shown(r[key], ".1f") for key in ("prefill_tokens_per_s", "decode_tokens_per_s"))
        print(
            f"{r['sharing_layers']:>6} {budget_to_fit(r['flops_ratio']):>6.4f} {prefill:>14} {decode:>13} "
            f"{size_text(r['kv_cache_bytes']):>10} {r['kv_cache_saving']:>9.1%} {loss:>9}"
        )
    if summary["budget_pick"] is not None:
        n = summary["budget_pick"]
        layers = summary["rows"][n]["shared_layers"]
        print(f"budget {summary['budget']:g} x dense FLOPs -> {sharing_layers_text(n)} {layers}")


def bench_command(
    checkpoint: Path,
    sharing_layers: int | None = None,
    budget: float | None = None,
    data: Path | None = None,
    batches: int = 8,
    batch_size: int = 4,
    prompts: int = 1,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
    reps: int = 3,
    seq_len: int | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    attention_reuse: bool = True,
    cuda_graph: CudaGraph = "auto",
    force: bool = False,
    output: Path = Path("runs/bench"),
    overwrite: bool = False,
    json: bool = False,
) -> None:
    """Measure one trained model at every sharing region: FLOPs, tokens/s, KV cache and held-out loss.

    For each region of 0..N layers (the first N of the trained region's growth order) it measures generation
    tokens/s (prefill and decode, median of --reps alternating runs), the KV-cache size, the FLOPs relative to dense
    and the held-out loss, prints the table and writes many_in_one.{csv,png,json} into --output. --budget F picks the
    region with the fewest sharing layers whose FLOPs are at most F x dense.

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        sharing_layers: Measure the regions of 0..N layers, each the first layers of the trained region (in its
            growth order); default: N is the trained region's size.
        budget: Pick the region with the fewest sharing layers whose FLOPs are at most this fraction of dense.
        data: Prepared data folder whose val split gives the held-out loss (default: the held-out data fit validated
            the run on: its data.val_dir, or the val splits of its data folders, mixed as fit mixes them).
        batches: Held-out batches of --seq-len tokens to score.
        batch_size: Sequences per held-out batch.
        prompts: Prompts decoded together (the generation batch).
        prompt_len: Tokens per prompt (default: 64, at most half the model's context length).
        max_new_tokens: Tokens generated per prompt (default: 64, at most what the context leaves after the prompt).
        reps: Timed runs per region (alternating order; the median is reported).
        seq_len: Tokens per held-out sequence, and the sequence length the FLOPs are counted at, up to the model's
            context length (default: the block_size it trained at; a Hugging Face folder's is its whole context: give
            the block_size of the run it is compared with).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        attention_reuse: Sharing layers reuse the source layer's attention probabilities (the same model, less work).
        cuda_graph: Replay decode steps from a CUDA graph (auto: on for CUDA).
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
        output: Folder for many_in_one.csv, .png and .json.
        overwrite: Replace --output if it is a bench folder written by this command.
        json: End with one JSON line of the summary.
    """
    from epas_lightning.data.token_data import check_data_flag, check_seq_len, data_record

    counts = {"--batches": batches, "--batch-size": batch_size, "--prompts": prompts, "--reps": reps}
    check_counts({**counts, "--prompt-len": prompt_len, "--max-new-tokens": max_new_tokens, "--seq-len": seq_len})
    check_data_flag(data)
    graphed = cuda_graph_choice(cuda_graph, device)
    check_device(device, dtype)
    read = [path for path in (checkpoint, data) if path is not None]  # no output inside what it reads
    check_output(output, "bench", overwrite, read)
    recorded = describe_checkpoint(checkpoint)  # everything checked before the weights load
    config = recorded.config
    seq_len = config.block_size if seq_len is None else seq_len
    check_seq_len(seq_len, config, where="--seq-len")
    max_shared = recorded.region.size if sharing_layers is None else sharing_layers
    recorded.region.first(max_shared, force, SHARING_FLAGS)
    pick = bench_budget_pick(recorded, budget, max_shared, seq_len) if budget is not None else None
    if note := recorded.unrun_region_note(checkpoint, "bench"):
        print(note, file=sys.stderr)
    if prompt_len is None:
        prompt_len = min(DEFAULT_TOKENS, config.context_length // 2)
    if prompt_len >= config.context_length:
        raise ConfigError(
            f"a prompt of {prompt_len} tokens leaves no room for new ones in the model's context length "
            f"{config.context_length}",
            "--prompt-len",
            f"use at most {config.context_length - 1}",
        )
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_TOKENS, config.context_length - prompt_len)
    if prompt_len + max_new_tokens > config.context_length:
        raise ConfigError(
            f"--prompt-len + --max-new-tokens = {prompt_len + max_new_tokens} exceeds the model's context length "
            f"{config.context_length}",
            "--prompt-len / --max-new-tokens",
            f"ask for at most {config.context_length} tokens in all",
        )
    data_dir = data or recorded.own_heldout()
    if data_dir is None:
        print(f"bench: no held-out loss: {recorded.no_data()} (pass --data for one)", file=sys.stderr)
    elif data is None and (note := recorded.mixed_data_note("bench")):
        print(note, file=sys.stderr)
    own_data = recorded.own_data_instead_of(data)
    held_out = (
        heldout_batches(data_dir, config, seq_len, batch_size, batches, recorded.recorded_tokenizer, own_data)
        if data_dir
        else []
    )
    loaded = load_for_inference(checkpoint, device, dtype, attention_reuse)
    with output_folder(output, "bench", overwrite, inputs=read) as build:
        rows = measure(loaded, max_shared, force, seq_len, held_out, prompts, prompt_len, max_new_tokens, reps,
                       graphed)  # fmt: skip
        summary = {
            "checkpoint": str(checkpoint),
            "device": str(loaded.model.embed_tokens.weight.device),
            "dtype": dtype_name(loaded.model.embed_tokens.weight.dtype),
            "n_layer": config.n_layer,
            "trained_region": loaded.region.to_record(),
            "weights_trained_region": loaded.region.unrun_record(),
            "trained_max_shared": loaded.max_shared,
            "attention_reuse": loaded.model.attention_reuse,
            "prompts": prompts,
            "prompt_len": prompt_len,
            "max_new_tokens": max_new_tokens,
            "reps": reps,
            "seq_len": seq_len,
            "data": data_record(data_dir),
            "val_tokens": sum(b[:, 1:].numel() for b in held_out),
            "budget": budget,
            "budget_pick": pick,
            "rows": rows,
        }
        with writing_into(build):
            write_csv(rows, build / "many_in_one.csv")
            write_plot(summary, build / "many_in_one.png")
            (build / "many_in_one.json").write_text(json_text(summary, indent=2) + "\n")
    print_table(summary)
    print(f"wrote {Path(output) / 'many_in_one.csv'}, .png and .json")
    emit_json(summary, json)
