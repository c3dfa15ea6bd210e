"""Continual pretraining, small scale: does growing the region progressively beat imposing it statically or post hoc?

The paper's strongest result (TinyLlama, 4B tokens, region grown to 5/22): the EPAS model run with its region keeps
54.47 average accuracy where sharing imposed on a dense model after training gives 44.99. This script reproduces
the *comparison* at CPU scale on real text (the built-in corpus: the Python standard library, vocab 4096):

0. pretrain one dense model (every run below starts from this one checkpoint, via ``model.init_from``);
1. continue it for the same number of steps on the same tokens (same data order, same seeds) in three ways:
   (a) dense, (b) EPAS progressive growth to the target region, (c) the full region imposed from step 0;
2. evaluate held-out loss of every model at every region length 0..target (the deepest N layers share);
   (d) post-hoc sharing is (a) evaluated with N > 0.

Writes ``OUT/results.csv``, ``OUT/results.md``, ``OUT/continual.png`` and the checkpoints under ``OUT/checkpoints``
into the new folder ``OUT`` (an existing one is refused), built under a hidden name beside it and renamed into place
once complete; the last stdout line is a JSON summary.
It runs on a CPU (``--quick``: a much shorter run); benchmarks/RESULTS.md records how long it took there.

    PYTHONPATH=. python experiments/continual.py --output out/continual
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import lightning as L
import torch

from epas_lightning import EPASModule, LlamaConfig, ProgressiveSharing, TokenDataModule, WarmupCosineLR
from epas_lightning.checkpoint import load_model
from epas_lightning.data import heldout_loader
from epas_lightning.errors import ConfigError, OutputError, fit_in_script, run_script
from epas_lightning.evaluation.perplexity import perplexity_of_batches
from epas_lightning.inference import deepest_layers
from epas_lightning.outputs import check_output, output_folder
from epas_lightning.runtime import json_text
from epas_lightning.script_args import ScriptParser, count, positive_number, training_seed

RUNS = {
    "dense": "(a) continue dense",
    "progressive": "(b) continue, EPAS progressive",
    "static": "(c) continue, full region from step 0",
}


OUTPUTS = ("results.csv", "results.md", "continual.png", "checkpoints")
"""What a run writes under ``--output``."""
OUTPUT_KIND = "continual"
"""The kind of output folder this script writes (``epas_lightning.outputs``)."""


def check_out(out: Path) -> None:
    """Refuse, before any training, an ``--output`` that exists: a file, an earlier run's (named as such) or any other
    folder. The outputs are built in a new folder beside it and renamed into place, so nothing is replaced."""
    if out.exists() and not out.is_dir():
        raise OutputError("is a file, not a folder", f"--output {out}", "choose a folder")
    earlier = [name for name in OUTPUTS if (out / name).exists()]
    if earlier:
        raise OutputError(
            f"holds the outputs of an earlier run ({', '.join(earlier)}), which this run would replace",
            f"--output {out}",
            "choose another --output, or move those files away",
        )
    check_output(out, OUTPUT_KIND)


def check_model(args: argparse.Namespace) -> None:
    """Refuse, before any training, a model or region the flags cannot make (the checks name the fit command's keys:
    the pretraining ran first, and its checkpoint then blocked a run again)."""
    try:
        model_config(args)
    except ConfigError as e:
        raise ConfigError(e.what, f"--n-embd {args.n_embd}", "give a multiple of 8: 4 heads of an even width") from None
    try:
        ProgressiveSharing(target=args.target, n_layer=args.n_layer)
    except ConfigError as e:
        fix = f"choose between 1 and --n-layer - 1 = {args.n_layer - 1}" if args.n_layer > 1 else "raise --n-layer"
        fix += " (layer 0 always computes)"
        raise ConfigError(e.what, f"--target {args.target}", fix) from None


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=4,
        intermediate_size=args.n_embd * 3,
        vocab_size=args.vocab_size,
        block_size=args.seq_len,
    )


def sharing_callback(kind: str, args: argparse.Namespace) -> ProgressiveSharing:
    """(a) no region, (b) one layer per stage over the first half of the run, (c) the whole region at step 0."""
    if kind == "dense":
        return ProgressiveSharing(target=args.target, enabled=False)
    if kind == "static":
        return ProgressiveSharing(target=args.target, growth=args.target, interval=1, start_step=0)
    interval = max(1, args.continue_steps // (2 * args.target))
    return ProgressiveSharing(target=args.target, growth=1, interval=interval, start_step=interval)


def train(
    args: argparse.Namespace, steps: int, lr: float, callback: ProgressiveSharing, init_from: Path | None, out: Path
) -> Path:
    """Train with a fixed seed and data order; return the checkpoint file."""
    L.seed_everything(args.seed, verbose=False)
    module = EPASModule(
        model_config(args),
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=max(1, steps // 20)),
        init_from=str(init_from) if init_from is not None else None,
    )
    data = TokenDataModule(seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=args.vocab_size, seed=args.seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[callback],
    )
    fit_in_script(trainer, module, data)
    path = out / "checkpoints" / f"{'pretrained' if init_from is None else callback_name(callback)}.ckpt"
    trainer.save_checkpoint(path)
    return path


def callback_name(callback: ProgressiveSharing) -> str:
    if not callback.enabled:
        return "dense"
    return "static" if callback.growth == len(callback.schedule.target_layers) else "progressive"


def evaluate_all(checkpoint: Path, args: argparse.Namespace) -> list[float]:
    """Held-out loss at region lengths 0..target (forcing regions beyond what the weights trained for)."""
    model = load_model(checkpoint).model
    loader = heldout_loader(None, model.config.block_size, args.eval_batch_size, model.config.vocab_size)
    losses = []
    for n in range(args.target + 1):
        model.set_shared_layers(deepest_layers(args.n_layer, n))
        losses.append(perplexity_of_batches(model, loader, args.eval_batches)["loss"])
    return losses


def plot(table: dict[str, list[float]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = list(range(args.target + 1))
    labels = {**RUNS, "dense": "(a) dense / (d) post-hoc sharing", "pretrained": "start checkpoint"}
    for name, losses in table.items():
        ax.plot(lengths, losses, marker="o", label=labels[name], linestyle="--" if name == "pretrained" else "-")
    ax.set_xlabel(f"sharing region length N (deepest N of {args.n_layer} layers)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Continual pretraining: region imposed how?")
    ax.set_xticks(lengths)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "--out", type=Path, default=Path("out/continual"))
    parser.add_argument("--n-layer", type=count, default=8)
    parser.add_argument("--n-embd", type=count, default=128)
    parser.add_argument("--vocab-size", type=count, default=4096)
    parser.add_argument("--seq-len", type=count, default=128)
    parser.add_argument("--batch-size", type=count, default=8)
    parser.add_argument("--target", type=count, default=3, help="full region (deepest layers)")
    parser.add_argument("--pretrain-steps", type=count, default=500)
    parser.add_argument("--continue-steps", type=count, default=200)
    parser.add_argument("--pretrain-lr", type=positive_number, default=3e-3)
    parser.add_argument("--continue-lr", type=positive_number, default=1e-3)
    parser.add_argument("--eval-batches", type=count, default=20)
    parser.add_argument("--eval-batch-size", type=count, default=8)
    parser.add_argument("--seed", type=training_seed, default=1234)
    parser.add_argument(
        "--threads", type=count, default=1, help="torch threads (1: no oversubscription on shared cores)"
    )
    parser.add_quick("a ~1-minute run (fewer steps)", pretrain_steps=40, continue_steps=12, eval_batches=3)
    args = parser.parse_args()
    check_out(args.output)
    check_model(args)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    with output_folder(args.output, OUTPUT_KIND) as out:  # built beside --output, renamed into place once complete
        t0 = time.perf_counter()
        pretrained = train(args, args.pretrain_steps, args.pretrain_lr, sharing_callback("dense", args), None, out)
        timings = {"pretrain_s": time.perf_counter() - t0}
        checkpoints = {"pretrained": pretrained}
        for kind in RUNS:
            t = time.perf_counter()
            checkpoints[kind] = train(
                args, args.continue_steps, args.continue_lr, sharing_callback(kind, args), pretrained, out
            )
            timings[f"{kind}_s"] = time.perf_counter() - t
        table = {name: evaluate_all(path, args) for name, path in checkpoints.items()}
        timings["total_s"] = time.perf_counter() - t0

        lengths = list(range(args.target + 1))
        with (out / "results.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", *[f"loss_N{n}" for n in lengths]])
            for name, losses in table.items():
                writer.writerow([name, *[f"{x:.4f}" for x in losses]])
        header = "| model | " + " | ".join(f"N={n}" for n in lengths) + " |"
        rows = [header, "|---|" + "---|" * len(lengths)]
        names = {"pretrained": "start checkpoint (no continuation)", **RUNS}
        names["dense"] = "(a) continue dense; N > 0 = (d) post-hoc sharing"
        for name, losses in table.items():
            rows.append(f"| {names[name]} | " + " | ".join(f"{x:.4f}" for x in losses) + " |")
        markdown = "\n".join(rows)
        (out / "results.md").write_text(markdown + "\n")
        plot(table, args, out / "continual.png")

    full = args.target
    summary = {
        "n_layer": args.n_layer,
        "target": full,
        "tokens_per_continuation": args.continue_steps * args.batch_size * args.seq_len,
        "loss_at_full_region": {name: round(table[name][full], 4) for name in table},
        "progressive_minus_posthoc": round(table["progressive"][full] - table["dense"][full], 4),
        "progressive_minus_static": round(table["progressive"][full] - table["static"][full], 4),
        "dense_at_0": round(table["dense"][0], 4),
        "progressive_at_0": round(table["progressive"][0], 4),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    print(markdown)
    print(f"wrote {args.output / 'results.csv'}, {args.output / 'results.md'}, {args.output / 'continual.png'}")
    print(json_text(summary))


if __name__ == "__main__":
    run_script(main)
