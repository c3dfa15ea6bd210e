"""Small-scale pretraining comparison: dense vs EPAS progressive vs static sharing vs shallow-first growth.

Sized for a CPU (fp32, one torch thread; benchmarks/RESULTS.md records how long it took there): the ``demo``
shape (8 layers, d 256, 4 heads, vocab 4096, 8.5M parameters) at sequence length 128, batch 8, 200 optimizer steps
per variant (205k training tokens each), AdamW lr 2e-3 with 20 warm-up steps and a cosine to 10%, gradient clipping
at 1.0, validation every 10 steps on the same 8 held-out batches (8k tokens). One thread by default: on a shared
2-core machine a two-thread step stalls whenever another process holds a core. Data: the built-in corpus (the Python
standard library tokenized with a 4096-token BPE, built once into the cache) through ``TokenDataModule``, or
``--data-dir``.

The four variants, all from the same initial weights (same seed), trained on the same batches in the same order:

- ``dense``: every layer computes its Q/K (``ProgressiveSharing(enabled=False)``);
- ``epas``: the paper's schedule: the region grows deep -> shallow to 50% of the layers (7, then 6-7, ... 4-7), one
  layer every ``--interval`` steps from ``--start-step`` (default: 20% of the run, full at 50% of the run);
- ``static``: the same 50% region (layers 4-7) shares from step 0;
- ``shallow``: the same schedule, shallow-first: layers 1, then 1-2, ... 1-4 (they reuse layer 0's Q/K).

The sharing mask of every step comes from ``ProgressiveSharing.shared_layers_at(step)`` (our ``SharingSchedule``) and is
applied with ``Llama.set_shared_layers``, as the callback does inside ``Trainer.fit``. The loss, the parameter groups
(weight decay on matrices only), the optimizer and the LR schedule are those ``EPASModule`` configures.

Fair timing on a shared machine: all four models live in ONE process and train round-robin, ``--chunk`` steps
(default 1) of one variant, then ``--chunk`` of the next (the order rotates every round). Each variant's "own" wall
clock is the sum of ``time.perf_counter`` around its own training steps only (validation excluded), so load from
other processes lands on all variants alike instead of on whichever ran while the machine was busy. Equal-wall-clock
comparisons read every variant's validation curve at the same own time (the shortest run's total), interpolated
linearly.

Outputs in the new folder ``--output`` (default ``out/pretrain_compare/``, gitignored; an existing one is refused),
built under a hidden name beside it and renamed into place once complete: TensorBoard runs side by side in
``tb/<variant>/`` (scalars ``val/loss``, ``train/loss``, ``perf/tokens_per_s``, ``sharing/layers``,
``time/own_seconds`` by step; each event's wall time is the run's start plus the variant's own training time, so
TensorBoard's "Relative" axis is own time; ``val/loss_by_own_ms`` has own milliseconds as its step), ``loss.png``
(validation loss vs step and vs own time), ``results.md`` (the table) and ``results.json``.
The last stdout line is the same JSON.

Usage::

    python experiments/pretrain_compare.py                    # the documented budget
    python experiments/pretrain_compare.py --quick            # seconds: a tiny model on random tokens (smoke test)
    tensorboard --logdir out/pretrain_compare/tb
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.errors import ConfigError, DataError, OutputError, UserError, run_script
from epas_lightning.flops import flop_cut
from epas_lightning.loss import token_losses, train_loss
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.config import PRESETS
from epas_lightning.optim import default_optimizer
from epas_lightning.outputs import check_output, output_folder
from epas_lightning.runtime import json_text
from epas_lightning.script_args import ScriptParser, count, fraction, positive_number, training_seed, whole_number

VARIANTS = ("dense", "epas", "static", "shallow")
PAPER_LOSS_GAP = (0.03, 0.05)
"""The paper: EPAS final validation loss is 0.03-0.05 above dense at equal tokens."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="LlamaConfig preset")
    p.add_argument("--n-layer", type=count, default=None, help="override the preset's number of layers")
    p.add_argument("--seq-len", type=count, default=128)
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--steps", type=count, default=200, help="optimizer steps per variant")
    p.add_argument("--sharing", type=fraction, default=0.5, help="fraction of the layers in the full region")
    p.add_argument(
        "--start-step", type=whole_number(0), default=None, help="first growth step (default: 20%% of --steps)"
    )
    p.add_argument("--interval", type=count, default=None, help="steps between growth stages (default: full at 50%%)")
    p.add_argument("--lr", type=positive_number, default=2e-3)
    p.add_argument("--warmup", type=whole_number(0), default=20)
    p.add_argument("--eval-every", type=count, default=10)
    p.add_argument("--val-batches", type=count, default=8)
    p.add_argument("--chunk", type=count, default=1, help="steps of one variant before the next one runs")
    p.add_argument("--seed", type=training_seed, default=1234)
    p.add_argument("--threads", type=whole_number(0), default=1, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--data-dir", default=None, help="prepared data dir (default: the built-in corpus)")
    p.add_argument("--output", "--out", default="out/pretrain_compare")
    quick = {"model": "debug", "n_layer": 4, "seq_len": 32, "batch_size": 2, "steps": 12}
    quick |= {"warmup": 2, "eval_every": 4, "val_batches": 2, "chunk": 2}
    p.add_quick("tiny model on random tokens, a few steps", **quick)
    args = p.parse_args(argv)
    if args.start_step is None:
        args.start_step = max(args.steps // 5, 1)
    return args


def build_config(args: argparse.Namespace) -> LlamaConfig:
    overrides = {} if args.n_layer is None else {"n_layer": args.n_layer}
    try:
        config = LlamaConfig.from_name(args.model, **overrides)
    except ConfigError as e:  # it names the fit command's model.config.name
        raise ConfigError(e.what, f"--model {args.model}", f"choose one of {', '.join(sorted(PRESETS))}") from None
    return LlamaConfig.from_name(args.model, block_size=max(config.block_size, args.seq_len), **overrides)


def schedules(args: argparse.Namespace, n_layer: int) -> dict[str, ProgressiveSharing]:
    """One ``ProgressiveSharing`` per variant; ``shared_layers_at(step)`` gives the mask of every step."""
    try:
        ProgressiveSharing(target=args.sharing, n_layer=n_layer)
    except ConfigError as e:  # it names the fit command's sharing.target
        fix = f"give a fraction of the {n_layer} layers that holds one layer or more, below all of them"
        raise ConfigError(e.what, f"--sharing {args.sharing}", fix) from None
    n_target = int(args.sharing * n_layer)
    interval = args.interval
    if interval is None:  # the region is full at half the run
        interval = max((args.steps // 2 - args.start_step) // max(n_target - 1, 1), 1)
    grow = dict(target=args.sharing, growth=1, interval=interval, start_step=args.start_step, n_layer=n_layer)
    return {
        "dense": ProgressiveSharing(target=args.sharing, n_layer=n_layer, enabled=False),
        "epas": ProgressiveSharing(**grow),
        "static": ProgressiveSharing(target=args.sharing, growth=n_target, interval=1, start_step=0, n_layer=n_layer),
        "shallow": ProgressiveSharing(**grow, order="shallow_first"),
    }


def load_batches(args: argparse.Namespace, vocab_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """``steps`` training batches and ``val_batches`` held-out batches of shape (B, T + 1), kept in memory."""
    if args.quick:
        g = torch.Generator().manual_seed(args.seed)

        def draw(n: int) -> list[torch.Tensor]:
            return [torch.randint(0, vocab_size, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(n)]

        return draw(args.steps), draw(args.val_batches), "random tokens"
    from epas_lightning.data import TokenDataModule

    data = TokenDataModule(
        data_dir=args.data_dir, seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=vocab_size, seed=args.seed
    )
    try:
        data.prepare_data()
        data.setup("fit")
    except UserError as e:  # the data module names the fit command's key; this script's flag is --data-dir
        where, fix = (None if x is None else x.replace("data.data_dir", "--data-dir") for x in (e.where, e.fix))
        raise type(e)(e.what, where, fix) from None
    train = take(data.train_dataloader(), args.steps)
    val = take(data.val_dataloader(), args.val_batches)
    if len(train) < args.steps or len(val) < args.val_batches:
        have = f"{len(train)} training / {len(val)} validation batches of {args.batch_size} x {args.seq_len + 1} tokens"
        raise DataError(f"the data holds {have}", data.data_dir, "lower --steps, --val-batches or --batch-size")
    name = "built-in corpus" if args.data_dir is None else args.data_dir
    return train, val, f"{name} ({data.data_dir})"


def take(loader, n: int) -> list[torch.Tensor]:  # noqa: ANN001
    out = []
    for batch in loader:
        out.append(batch.long().clone())
        if len(out) == n:
            break
    return out


@dataclass
class Run:
    """One variant: its model, optimizer, schedule and the curves it produced."""

    name: str
    model: Llama
    optimizer: torch.optim.Optimizer
    lr_schedule: WarmupCosineLR
    sharing: ProgressiveSharing
    step: int = 0
    own_seconds: float = 0.0
    train_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    n_shared: list[int] = field(default_factory=list)
    val: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, own seconds, validation loss)."""


def build_run(name: str, config: LlamaConfig, sharing: ProgressiveSharing, args: argparse.Namespace) -> Run:
    torch.manual_seed(args.seed)  # identical initial weights in every variant
    model = Llama(config)
    model.train()
    optimizer = default_optimizer(model, lr=args.lr)  # as EPASModule: weight decay on matrices only
    lr_schedule = WarmupCosineLR(optimizer, warmup_steps=args.warmup, max_steps=args.steps)
    return Run(name, model, optimizer, lr_schedule, sharing)


def train_step(run: Run, batch: torch.Tensor) -> None:
    """One optimizer step under the mask the schedule gives for this step; times itself."""
    start = time.perf_counter()
    layers = run.sharing.shared_layers_at(run.step)
    if layers != run.model.sharing.shared_layers:
        run.model.set_shared_layers(layers)
    loss = train_loss(run.model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_schedule.step()
    seconds = time.perf_counter() - start
    run.own_seconds += seconds
    run.step_seconds.append(seconds)
    run.train_loss.append(loss.item())
    run.n_shared.append(len(layers))
    run.step += 1


@torch.no_grad()
def validate(run: Run, val: list[torch.Tensor]) -> float:
    """Mean loss over the held-out batches' real tokens (pad rows left out), with the mask the model trains with at
    this step."""
    run.model.eval()
    scored = [token_losses(run.model, b) for b in val]
    run.model.train()
    loss = sum(losses.sum().item() for losses, _ in scored) / sum(int(real.sum()) for _, real in scored)
    run.val.append((run.step, run.own_seconds, loss))
    return loss


def paired_speedup(dense: Run, run: Run, steps) -> float | None:  # noqa: ANN001
    """Median over ``steps`` of dense's time for step i over ``run``'s, minus 1.

    Step i of every variant runs in the same round, moments apart, so each pair saw about the same machine load; a
    median of whole-run rates would mix phases of different load (the region grows late in the run).
    """
    ratios = [dense.step_seconds[i] / run.step_seconds[i] for i in steps]
    return statistics.median(ratios) - 1.0 if ratios else None


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of (x, y) points (sorted by x) at ``x``; clamps outside the range."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def train_all(runs: dict[str, Run], train: list[torch.Tensor], val: list[torch.Tensor], args, writers) -> None:  # noqa: ANN001
    """Round-robin: ``chunk`` steps per variant in turn (rotating the order), validating every ``eval_every`` steps."""
    names = list(runs)
    for run in runs.values():
        log_val(run, validate(run, val), writers, args)
    for round_idx, first in enumerate(range(0, args.steps, args.chunk)):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            for _ in range(min(args.chunk, args.steps - first)):
                train_step(run, train[run.step])
                log_step(run, writers, args)
                if run.step % args.eval_every == 0 or run.step == args.steps:
                    log_val(run, validate(run, val), writers, args)
        done = min(first + args.chunk, args.steps)
        if done % args.eval_every == 0 or done == args.steps:
            print(
                f"step {done:4d}  "
                + "  ".join(f"{n} {runs[n].val[-1][2]:.3f} ({runs[n].own_seconds:.0f}s)" for n in names),
                flush=True,
            )


def log_step(run: Run, writers, args) -> None:  # noqa: ANN001
    writer = writers.get(run.name)
    if writer is None:
        return
    wall = writers["t0"] + run.own_seconds
    tokens_per_s = args.batch_size * args.seq_len / run.step_seconds[-1]
    writer.add_scalar("train/loss", run.train_loss[-1], run.step, walltime=wall)
    writer.add_scalar("perf/tokens_per_s", tokens_per_s, run.step, walltime=wall)
    writer.add_scalar("sharing/layers", run.n_shared[-1], run.step, walltime=wall)
    writer.add_scalar("time/own_seconds", run.own_seconds, run.step, walltime=wall)


def log_val(run: Run, loss: float, writers, args) -> None:  # noqa: ANN001
    writer = writers.get(run.name)
    if writer is not None:
        writer.add_scalar("val/loss", loss, run.step, walltime=writers["t0"] + run.own_seconds)
        writer.add_scalar("val/loss_by_own_ms", loss, round(run.own_seconds * 1000), walltime=writers["t0"])


def summarize(runs: dict[str, Run], args: argparse.Namespace, config: LlamaConfig, data: str) -> dict:
    equal_time = min(run.own_seconds for run in runs.values())
    tokens_per_step = args.batch_size * args.seq_len
    dense = runs["dense"]
    rows = {}
    for name, run in runs.items():
        curve = [(s, loss) for _, s, loss in run.val]
        full = [i for i, n in enumerate(run.n_shared) if n == max(run.n_shared)]
        rows[name] = {
            "final_val_loss": run.val[-1][2],
            "val_loss_at_equal_time": interpolate(curve, equal_time),
            "own_seconds": run.own_seconds,
            "tokens_per_s": args.steps * tokens_per_step / run.own_seconds,
            "median_step_tokens_per_s": tokens_per_step / statistics.median(run.step_seconds),
            "paired_speedup_vs_dense": paired_speedup(dense, run, range(args.steps)),
            "full_region_paired_speedup_vs_dense": paired_speedup(dense, run, full),
            "full_region_steps": len(full),
            "final_shared_layers": run.sharing.shared_layers_at(args.steps - 1),  # the last step's (0-based)
            "mean_shared_layers": sum(run.n_shared) / len(run.n_shared),
            "flop_cut_full_region": flop_cut(config, max(run.n_shared), args.seq_len),
            "val_curve": run.val,
        }
    for row in rows.values():
        row["delta_final_vs_dense"] = row["final_val_loss"] - rows["dense"]["final_val_loss"]
        row["delta_equal_time_vs_dense"] = row["val_loss_at_equal_time"] - rows["dense"]["val_loss_at_equal_time"]
    epas = rows["epas"]
    return {
        "model": args.model,
        "n_layer": config.n_layer,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "tokens_per_variant": args.steps * tokens_per_step,
        "data": data,
        "threads": torch.get_num_threads(),
        "chunk": args.chunk,
        "start_step": args.start_step,
        "interval": runs["epas"].sharing.interval,
        "equal_time_seconds": equal_time,
        "dense_own_seconds": dense.own_seconds,
        "epas_delta_final": epas["delta_final_vs_dense"],
        "epas_delta_equal_time": epas["delta_equal_time_vs_dense"],
        "paper_delta_final": list(PAPER_LOSS_GAP),
        "variants": rows,
    }


def markdown(result: dict) -> str:
    r = result
    lines = [
        f"{r['model']} ({r['n_layer']} layers), seq {r['seq_len']}, batch {r['batch_size']}, {r['steps']} steps "
        f"({r['tokens_per_variant']:,} tokens per variant), {r['threads']} threads, data: {r['data']}. "
        f"Round-robin in chunks of {r['chunk']} steps; EPAS/shallow grow one layer every {r['interval']} steps "
        f"from step {r['start_step']}. Equal time = {r['equal_time_seconds']:.1f} s of own training time.",
        "",
        "| variant | final layers | val loss @ step "
        f"{r['steps']} | Δ vs dense | val loss @ {r['equal_time_seconds']:.1f} s | Δ vs dense | own s | tokens/s "
        "(run) | step speedup vs dense | same, full-region steps | full-region FLOP cut |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        layers = v["final_shared_layers"]
        region = "none" if not layers else str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        lines.append(
            f"| {name} | {region} | {v['final_val_loss']:.4f} | {v['delta_final_vs_dense']:+.4f} | "
            f"{v['val_loss_at_equal_time']:.4f} | {v['delta_equal_time_vs_dense']:+.4f} | {v['own_seconds']:.1f} | "
            f"{v['tokens_per_s']:.0f} | "
            f"{v['paired_speedup_vs_dense']:+.1%} | {v['full_region_paired_speedup_vs_dense']:+.1%} | "
            f"{v['flop_cut_full_region']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, run in runs.items():
        steps, seconds, losses = zip(*run.val, strict=True)
        by_step.plot(steps, losses, marker=".", label=name)
        by_time.plot(seconds, losses, marker=".", label=name)
    by_step.set(xlabel="optimizer step (= tokens)", ylabel="validation loss", title="loss vs step")
    by_time.set(xlabel="own training seconds (interleaved, same machine)", title="loss vs wall-clock")
    later = [loss for run in runs.values() for *_, loss in run.val[1:]]  # the step-0 loss (ln V) would squash the rest
    if later:
        by_step.set_ylim(min(later) - 0.05, max(later) + 0.05)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def open_writers(out: Path, names: tuple[str, ...]) -> dict:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: no TensorBoard runs written.")
        return {"t0": time.time()}
    writers = {name: SummaryWriter(log_dir=str(out / "tb" / name)) for name in names}
    writers["t0"] = time.time()
    return writers


OUTPUTS = ("results.md", "results.json", "loss.png")
"""What a run writes under ``--output`` beside its TensorBoard runs."""
OUTPUT_KIND = "pretrain_compare"
"""The kind of output folder this script writes (``epas_lightning.outputs``)."""


def check_out(out: Path) -> None:
    """Refuse, before any work, an ``--output`` that exists: a file, an earlier comparison's (named as such) or any
    other folder. The outputs are built in a new folder beside it and renamed into place, so nothing is replaced."""
    if out.exists() and not out.is_dir():
        raise OutputError("is a file, not a folder", f"--output {out}", "choose a folder")
    if any((out / "tb").glob("*/events.out.tfevents.*")):  # TensorBoard would merge both runs into one curve each
        what = "holds the TensorBoard runs of an earlier comparison, which this run's would mix with"
        raise OutputError(what, out / "tb", "choose another --output, or delete that folder")
    if earlier := [name for name in OUTPUTS if (out / name).exists()]:
        raise OutputError(
            f"holds {', '.join(earlier)}, which this run would replace",
            f"--output {out}",
            "choose another --output, or move those files away",
        )
    check_output(out, OUTPUT_KIND)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output)
    check_out(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    sharing = schedules(args, config.n_layer)
    train, val, data = load_batches(args, config.vocab_size)
    runs = {name: build_run(name, config, sharing[name], args) for name in VARIANTS}
    with output_folder(out, OUTPUT_KIND) as build:  # built beside --output, renamed into place once complete
        writers = open_writers(build, VARIANTS)
        try:
            for name in VARIANTS:
                target = list(sharing[name].schedule.target_layers) if sharing[name].enabled else []
                print(f"{name:8s} region (growth order) {target}")
            start = time.perf_counter()
            train_all(runs, train, val, args, writers)
        finally:
            for name in VARIANTS:
                if name in writers:
                    writers[name].close()
        result = summarize(runs, args, config, data)
        result["total_seconds"] = time.perf_counter() - start
        table = markdown(result)
        (build / "results.md").write_text(table)
        (build / "results.json").write_text(json_text(result, indent=1))
        plot(runs, build / "loss.png")
    print()
    print(table)
    print(f"outputs: {out}/ (tb/, loss.png, results.md, results.json)")
    print(json_text({k: v for k, v in result.items() if k != "variants"} | {"variants": strip_curves(result)}))
    return result


def strip_curves(result: dict) -> dict:
    return {n: {k: v for k, v in row.items() if k != "val_curve"} for n, row in result["variants"].items()}


if __name__ == "__main__":
    run_script(main)
