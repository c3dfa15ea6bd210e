"""Overhead of ``Trainer.fit`` over a bare PyTorch loop training the same model on the same batches.

Three arms train the same model (same seed, so the same initial weights) on the same in-memory batches, served by
the same ``DataLoader``, with the optimizer ``EPASModule`` configures (AdamW over decay / no-decay groups and the
per-step ``WarmupCosineLR``) and the same loss:

- ``bare``: a plain loop: forward, loss, backward, ``optimizer.step``, ``zero_grad(set_to_none=True)``,
  ``scheduler.step``;
- ``lightning``: ``Trainer.fit`` of ``EPASModule``, no logger, progress bar, checkpointing or model summary;
- ``lightning_default``: the same with what a CLI run carries: ``ProgressiveSharing`` (disabled: dense, but its
  hooks and per-step ``sharing/layers`` logging run), a ``CSVLogger`` logging every step, the progress bar and
  ``ModelCheckpoint`` (which saves only after the timed window).

A repetition trains each arm from scratch for ``warmup + steps + 1`` steps; the timed window runs from the start of
step ``warmup`` to the start of step ``warmup + steps`` (``time.perf_counter`` in ``on_train_batch_start`` for
Lightning, at the top of the loop body for the bare loop), so it holds ``steps`` whole loop iterations and excludes
setup, teardown and the final checkpoint. Arms alternate with a rotating order across repetitions; the medians give
``ratio = lightning / bare`` (target <= 1.05) and ``ratio_default = lightning_default / bare``. Both arms' training
losses are compared as a check that they did the same work.

Usage::

    python benchmarks/lightning_overhead.py --model demo --seq-len 256 --batch-size 8 --steps 10 --reps 5
    python benchmarks/lightning_overhead.py --quick      # tiny model, seconds (smoke test)

The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from harness import cpu_ticks, device_name, emit, foreign_load, preset_config, shape_flags, token_batches
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.errors import fit_in_script, run_script
from epas_lightning.loss import train_loss
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.module import EPASModule
from epas_lightning.optim import default_optimizer
from epas_lightning.script_args import ScriptParser, count, whole_number

ARMS = ("bare", "lightning", "lightning_default")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(p, model="demo", seq_len=256, batch_size=8)
    p.add_argument("--steps", type=count, default=10, help="timed steps per repetition")
    p.add_argument("--warmup", type=whole_number(0), default=2, help="untimed steps at the start of every repetition")
    p.add_argument("--reps", type=count, default=5)
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_quick("debug shape, 2 reps of 4 steps", model="debug", seq_len=32, batch_size=2, steps=4, warmup=1, reps=2)
    return p.parse_args(argv)


class StepClock(Callback):
    """Time stamps of every ``on_train_batch_start`` and the training loss of every step."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(outputs["loss"].item())


def window(starts: list[float], warmup: int, steps: int) -> float:
    """Seconds from the start of step ``warmup`` to the start of step ``warmup + steps``."""
    return starts[warmup + steps] - starts[warmup]


def run_bare(config: LlamaConfig, loader, args: argparse.Namespace, total: int) -> tuple[float, list[float]]:  # noqa: ANN001
    torch.manual_seed(args.seed)
    model = Llama(config)
    model.train()
    optimizer = default_optimizer(model)  # EPASModule's default
    scheduler = WarmupCosineLR(optimizer, warmup_steps=min(100, total // 10), max_steps=total)
    starts, losses = [], []
    for step, batch in enumerate(loader):
        if step == total:
            break
        starts.append(time.perf_counter())
        loss = train_loss(model, batch)  # EPASModule.training_step's loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return window(starts, args.warmup, args.steps), losses


def run_lightning(
    config: LlamaConfig,
    loader,  # noqa: ANN001
    args: argparse.Namespace,
    total: int,
    defaults: bool,
    root: str,
) -> tuple[float, list[float]]:
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    kwargs = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    if defaults:
        callbacks += [ProgressiveSharing(target=0.5, enabled=False), ModelCheckpoint(dirpath=root)]
        kwargs = dict(logger=CSVLogger(root), log_every_n_steps=1, enable_progress_bar=True, enable_checkpointing=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        precision="32-true",
        default_root_dir=root,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )
    torch.manual_seed(args.seed)  # EPASModule builds the model in configure_model, inside fit
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with quiet[0], quiet[1], warnings.catch_warnings():  # the progress bar and fit warnings
        warnings.simplefilter("ignore")
        fit_in_script(trainer, EPASModule(config), train_dataloaders=loader)
    return window(clock.starts, args.warmup, args.steps), clock.losses


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    config = preset_config(args.model, args.seq_len)
    total = args.warmup + args.steps + 1
    batches = token_batches(config, args.batch_size, args.seq_len, total, torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    loads: dict[str, list[float | None]] = {a: [] for a in ARMS}
    losses: dict[str, list[float]] = {}
    print(f"Trainer.fit vs a bare loop: {args.model}, {args.batch_size} x {args.seq_len}, {args.steps} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = ARMS[rep % 3 :] + ARMS[: rep % 3]
            for arm in order:
                ticks = cpu_ticks()
                begin = time.perf_counter()
                if arm == "bare":
                    seconds, arm_losses = run_bare(config, loader, args, total)
                else:
                    root = f"{tmp}/{arm}{rep}"
                    seconds, arm_losses = run_lightning(config, loader, args, total, arm == "lightning_default", root)
                times[arm].append(seconds / args.steps)
                loads[arm].append(foreign_load(ticks, cpu_ticks(), time.perf_counter() - begin))
                losses.setdefault(arm, arm_losses)
                print(f"  rep {rep}: {arm:18s} {seconds / args.steps * 1000:9.2f} ms/step", flush=True)
    median = {arm: statistics.median(times[arm]) for arm in ARMS}
    loss_diff = max(abs(a - b) for arm in ARMS[1:] for a, b in zip(losses["bare"], losses[arm], strict=True))
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "precision": "32-true",
        "device_name": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "bare_step_ms": median["bare"] * 1000,
        "lightning_step_ms": median["lightning"] * 1000,
        "lightning_default_step_ms": median["lightning_default"] * 1000,
        "ratio": median["lightning"] / median["bare"],
        "ratio_default": median["lightning_default"] / median["bare"],
        "overhead_ms_per_step": (median["lightning"] - median["bare"]) * 1000,
        "target": "ratio <= 1.05",
        "target_met": median["lightning"] / median["bare"] <= 1.05,
        "loss_max_abs_diff": loss_diff,
        "step_seconds": times,
        "foreign_load": loads,
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    print(
        f"bare {result['bare_step_ms']:.1f} ms/step, Trainer.fit {result['lightning_step_ms']:.1f} "
        f"(ratio {result['ratio']:.3f}), with logger/progress bar/callbacks {result['lightning_default_step_ms']:.1f} "
        f"(ratio {result['ratio_default']:.3f}); max loss difference {loss_diff:.2e}"
    )
    emit(result)
    return result


if __name__ == "__main__":
    run_script(main)
