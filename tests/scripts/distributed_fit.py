"""A few training steps of a tiny EPAS model on synthetic tokens under FSDP2 or DDP, recording what tests compare.

Run as a script (Lightning re-launches ``sys.argv`` for every extra process, and ``torchrun`` starts it per node);
one-process runs may call ``main(argv)`` inside the test process instead. Every rank writes ``<out>/rank<R>.json``:
per optimizer step the loss on this rank, the sharing layers, and the layers whose ``q_proj``/``k_proj`` (biases
included) got no gradient; plus the shapes of its local parameter shards, whether the LM head is tied, and the keys
of each batch of ``init_from`` weights it loaded, and with ``--val-dir`` the ``val/loss`` and ``val/tokens`` a
``validate`` after fit logs there (with ``--throughput`` and a logger, rank 0 also the last value of each
``validate/...`` its ``TokenThroughputMonitor`` wrote, over ``--throughput-window`` batches); with ``--reload``, the
keys of its batches too, and rank 0 writes the weights each loads after fit to ``<out>/reload<i>.st``. With
``--read-fails-on-rank R`` that rank's reader of checkpoint weights raises a ``CheckpointError`` after
``--read-fails-after`` tensors. With ``--val-samples N``, fit also
validates (its sanity validation, and every 2 steps) a plain map-style loader of N synthetic sequences, to which
Lightning gives a ``DistributedSampler``, as to a user's own loader (the training loader's sampler is wrapped in one
too). With ``--sigterm-in-step N`` rank
``--sigterm-rank`` sends itself SIGTERM during step N (``GracefulStop`` then stops every rank after it). With
``--log-every N`` a logger records what Lightning writes every N steps (``logged_train_loss``: step to value; with
``--logger-on-rank-zero`` on rank 0 alone), and each step records its micro-batches' losses (``micro``) and the
``torch.distributed.all_reduce`` calls made inside the module's ``training_step`` and ``on_train_batch_end``
(``loss_reduces``: ``train/loss``'s). With ``--ckpt-filename`` each rank records its ``ModelCheckpoint``'s
``best_model_path``. A user error ends each process with one line on stderr and status 2; rank 0 then writes the exit
statuses of the ranks it started to ``<out>/child_exits.json``.

Arguments split by ``--then`` are runs one after the other in the same processes (and process group), e.g. a resume
of the first run's checkpoint without starting two more interpreters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Sampler

from epas_lightning import EPASModule, LlamaConfig, ProgressiveSharing, TokenDataModule, checkpoint_formats, init_from
from epas_lightning.callbacks import TokenThroughputMonitor
from epas_lightning.child_ranks import EndChildRanksOnError
from epas_lightning.errors import CheckpointError, run_script
from epas_lightning.interrupt import GracefulStop
from epas_lightning.strategy import FSDP2Strategy

SEQ_LEN = 32
N_SAMPLES = 256


class EveryWthSample(Sampler):
    """Rank r of W takes samples r, r + W, ... in order, so a global batch is the same for any W (no shuffling)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._rank_world()[1]


class SeededInit(EPASModule):
    """Seeds right before the model is built, so every strategy starts from the same weights; counts the all_reduce
    calls of each optimizer step's ``training_step`` and ``on_train_batch_end`` (``loss_reduces``)."""

    loss_reduces: dict[int, int]
    _counted_step = 0

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(7)
        super().configure_model()

    def training_step(self, batch, batch_idx):
        self._counted_step = self.trainer.global_step  # the step this micro-batch belongs to
        with counting_all_reduces(self.loss_reduces, self._counted_step):
            return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with counting_all_reduces(self.loss_reduces, self._counted_step):
            super().on_train_batch_end(outputs, batch, batch_idx)


@contextmanager
def counting_all_reduces(counts: dict[int, int], step: int) -> Iterator[None]:
    """Count the ``torch.distributed.all_reduce`` calls made inside (Lightning's sync of a logged value makes one) in
    ``counts[step]``."""
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        counts[step] = counts.get(step, 0) + 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = all_reduce


def save_full_weights(module: EPASModule, path: Path, rank: int) -> None:
    """Rank 0 writes the whole model's weights to ``path``; every rank must call it (it all-gathers)."""
    full = {
        k: (t.full_tensor() if isinstance(t, DTensor) else t).clone()  # a tied head: its own copy
        for k, t in module.model.state_dict().items()
    }
    if rank == 0:
        save_file(full, path)


class Recorder(Callback):
    def __init__(self, save_start: Path | None = None) -> None:
        self.steps: dict[int, dict] = {}
        self.save_start = save_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.save_start and trainer.global_step == batch_idx == 0:
            save_full_weights(pl_module, self.save_start, trainer.global_rank)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        no_grad = [
            i
            for i, layer in enumerate(pl_module.model.layers)
            if all(p.grad is None for m in (layer.self_attn.q_proj, layer.self_attn.k_proj) for p in m.parameters())
        ]
        step = self.steps.setdefault(trainer.global_step, {})
        step.update(shared=pl_module.model.sharing.shared_layers, qk_no_grad=no_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = not trainer.fit_loop._should_accumulate()  # the step's last micro-batch: global_step counts it
        step = self.steps.setdefault(trainer.global_step - stepped, {})
        step["loss"] = outputs["loss"].item()
        step.setdefault("micro", []).append(outputs["loss"].item() * trainer.accumulate_grad_batches)  # unscaled
        logged = trainer.callback_metrics
        step["logged"] = {k: logged[k].item() for k in ("train/loss", "train/grad_norm") if k in logged}


class SigtermInStep(Callback):
    """Rank ``rank`` sends itself SIGTERM during optimizer step ``step`` (counted from 1), before the optimizer runs."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class StopAfterStep(Callback):
    """Every rank sets ``trainer.should_stop`` after optimizer step ``step`` (counted from 1), as ``max_time``'s
    ``Timer`` does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.fit_loop._should_accumulate():
            trainer.should_stop = True


class RecordChildExits(EndChildRanksOnError):
    """After an error, rank 0 waits for the ranks it started (killing them after 30 s) and records their statuses."""

    def __init__(self, out: Path) -> None:
        super().__init__(grace_seconds=30)
        self.out = out

    def on_exception(self, trainer, pl_module, exception) -> None:
        procs = list(getattr(trainer.strategy.launcher, "procs", None) or ())
        super().on_exception(trainer, pl_module, exception)
        if procs:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "child_exits.json").write_text(json.dumps([proc.returncode for proc in procs]))


def recording_logger():  # noqa: ANN201
    """A logger remembering the steps and values of what Lightning writes (``helpers.Steps``)."""
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, where helpers.py is
    from helpers import Steps

    return Steps()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", choices=("fsdp2", "ddp", "single"), default="fsdp2")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--data-dir", help="a prepared corpus (resumable litdata streams) instead of synthetic tokens")
    p.add_argument("--val-dir", help="with --data-dir: after fit, validate on this held-out stream (data.val_dir)")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--samples", type=int, default=N_SAMPLES, help="synthetic training sequences")
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--log-every", type=int, help="log_every_n_steps, with a logger recording what is written")
    p.add_argument("--logger-on-rank-zero", action="store_true", help="with --log-every: no logger on the other ranks")
    p.add_argument("--stop-after-step", type=int, help="every rank sets should_stop after this step (from 1)")
    p.add_argument("--monitor-train-loss", action="store_true", help="EarlyStopping on train/loss (never stops)")
    p.add_argument("--throughput", action="store_true", help="with a TokenThroughputMonitor")
    p.add_argument("--throughput-window", type=int, default=5, help="... of this window_size")
    p.add_argument("--clip", type=float, help="gradient_clip_val (by norm)")
    p.add_argument("--val-samples", type=int, help="fit validates a map-style loader of this many sequences")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", default=False, help="torch.compile backend for every block")
    p.add_argument("--save-final", type=Path, help="rank 0 writes the trained weights here (safetensors)")
    p.add_argument("--save-start", type=Path, help="rank 0 writes the weights the first step starts from here")
    p.add_argument("--ckpt-dir", type=Path, help="save a checkpoint every --ckpt-every steps (0: validation) here")
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--val-every", type=int, help="validate on 8 of the training sequences every N training batches")
    p.add_argument("--ckpt-filename", help="the ModelCheckpoint's filename (its best_model_path is recorded)")
    p.add_argument("--resume", type=Path, help="checkpoint to resume from")
    p.add_argument("--init-from", help="model.init_from (HF folder or our checkpoint): the model takes its config")
    p.add_argument("--reload", type=Path, action="append", default=[], help="after fit, init_from this too")
    p.add_argument("--init-read-bytes", type=int, help="init_from.INIT_READ_BYTES: 1 hands the weights over one by one")
    p.add_argument("--read-fails-on-rank", type=int, help="this rank's reader of checkpoint weights raises")
    p.add_argument("--read-fails-after", type=int, default=0, help="... after giving this many tensors")
    p.add_argument("--sigterm-in-step", type=int, help="stop with GracefulStop: SIGTERM to one rank in this step")
    p.add_argument("--sigterm-rank", type=int, default=0, help="... to this rank")
    return p.parse_args(argv)


@contextmanager
def recording_init_batches(read_bytes: int | None) -> Iterator[list[list[str]]]:
    """The keys of each dict ``init_from`` hands to ``set_model_state_dict``, at most ``read_bytes`` at a time if
    given; both restored after (one-process runs share the test's process)."""
    batches, load, limit = [], init_from.set_model_state_dict, init_from.INIT_READ_BYTES

    def record(model, state, **kwargs):
        batches.append(sorted(state))
        return load(model, state, **kwargs)

    init_from.set_model_state_dict, init_from.INIT_READ_BYTES = record, read_bytes or limit
    try:
        yield batches
    finally:
        init_from.set_model_state_dict, init_from.INIT_READ_BYTES = load, limit


@contextmanager
def reads_failing(rank: int | None, after: int) -> Iterator[None]:
    """On ``rank`` (if given), reading checkpoint weights raises a ``CheckpointError`` after ``after`` tensors."""
    read = checkpoint_formats.stored_weights

    def failing(*args, **kwargs):
        for i, item in enumerate(read(*args, **kwargs)):
            if i == after and dist.get_rank() == rank:
                raise CheckpointError("cannot be read (a test's failing reader)", f"rank {rank}", "nothing: a test")
            yield item

    checkpoint_formats.stored_weights = read if rank is None else failing
    try:
        yield
    finally:
        checkpoint_formats.stored_weights = read


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = args.devices * args.num_nodes
    tokens = torch.randint(0, 512, (args.samples, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    if args.data_dir:
        data = TokenDataModule(
            args.data_dir,
            seq_len=SEQ_LEN,
            batch_size=args.global_batch // world_size,
            vocab_size=512,
            val_dir=args.val_dir,
        )
    else:
        data = DataLoader(tokens, batch_size=args.global_batch // world_size, sampler=EveryWthSample(args.samples))
    L.seed_everything(7)
    if args.init_from:
        config = init_from.source_config(args.init_from, block_size=SEQ_LEN)
    else:
        config = LlamaConfig.from_name("debug", n_layer=args.n_layer, block_size=SEQ_LEN)
    module = SeededInit(
        config, activation_checkpointing=args.activation_checkpointing, compile=args.compile, init_from=args.init_from
    )
    strategy = {
        "fsdp2": FSDP2Strategy,
        "ddp": lambda: DDPStrategy(find_unused_parameters=True),
        "single": lambda: "auto",  # one process, no sharding: the reference
    }[args.strategy]()
    module.loss_reduces = {}
    recorder = Recorder(args.save_start)
    callbacks = [ProgressiveSharing(target=2, interval=2), recorder, RecordChildExits(args.out)]
    if args.ckpt_dir:
        every, name = args.ckpt_every, args.ckpt_filename
        callbacks.append(ModelCheckpoint(args.ckpt_dir, name, every_n_train_steps=every or None, save_top_k=-1))
    if args.sigterm_in_step:
        callbacks += [GracefulStop(), SigtermInStep(args.sigterm_in_step, args.sigterm_rank)]
    if args.stop_after_step:
        callbacks.append(StopAfterStep(args.stop_after_step))
    if args.monitor_train_loss:
        callbacks.append(EarlyStopping("train/loss", patience=1000, check_on_train_epoch_end=True))
    if args.throughput:
        callbacks.append(TokenThroughputMonitor(window_size=args.throughput_window))
    logged_here = args.log_every and (rank_zero_only.rank == 0 or not args.logger_on_rank_zero)  # rank: from the env
    logger = recording_logger() if logged_here else False
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        gradient_clip_val=args.clip,
        accumulate_grad_batches=args.accumulate,
        logger=logger,
        log_every_n_steps=args.log_every or 50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.ckpt_dir),
        use_distributed_sampler=bool(
            args.val_samples
        ),  # as a user's Trainer, where one validates a loader of one's own
        val_check_interval=2 if args.val_samples else args.val_every,
        check_val_every_n_epoch=None if args.val_samples else 1,
        default_root_dir=args.out,
        callbacks=callbacks,
    )
    val = (
        DataLoader(tokens[: args.val_samples], batch_size=args.global_batch // world_size) if args.val_samples else None
    )
    failing = reads_failing(args.read_fails_on_rank, args.read_fails_after)
    with failing, recording_init_batches(args.init_read_bytes) as init_batches:
        if val is None and args.val_every:
            val = DataLoader(tokens[:8], batch_size=2)
        trainer.fit(module, data, val, ckpt_path=args.resume)
    shards = {
        name: list((p.to_local() if isinstance(p, DTensor) else p).shape) for name, p in module.named_parameters()
    }
    result = {
        "world_size": trainer.world_size,
        "steps": recorder.steps,
        "local_shapes": shards,
        "param_dtype": str(next(module.parameters()).dtype),
        "tied": module.model.lm_head.weight is module.model.embed_tokens.weight,
        "init_batches": init_batches,
        "loss_reduces": module.loss_reduces,
    }
    if args.ckpt_filename:
        result["best_model_path"] = trainer.checkpoint_callback.best_model_path
    if logger:
        written = zip(logger.steps.get("train/loss", []), logger.values.get("train/loss", []), strict=True)
        result["logged_train_loss"] = dict(written)
    if args.val_dir:  # every rank logs the loss over all the held-out sequences, and the tokens they hold
        (validated,) = trainer.validate(module, data, verbose=False)
        result["validated"] = {key: validated[key] for key in ("val/loss", "val/tokens")}
        if logger and args.throughput and trainer.is_global_zero:  # the monitor logs on rank zero
            written = {key: values[-1] for key, values in logger.values.items() if key.startswith("validate/")}
            result["validated"] |= written
    if args.save_final:
        save_full_weights(module, args.save_final, trainer.global_rank)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(args.reload):  # into the trained shards: every weight but the sharing mask replaced
        failing = reads_failing(args.read_fails_on_rank, args.read_fails_after)
        with failing, recording_init_batches(args.init_read_bytes) as batches:
            init_from.load_initial_weights(module.model, path)
        result[f"reload{i}_batches"] = batches
        save_full_weights(module, args.out / f"reload{i}.st", trainer.global_rank)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main_runs(argv: list[str]) -> None:
    """``main`` for each run in ``argv``, the runs split by ``--then``."""
    from script_runs import split_runs  # beside this script, on sys.path when it runs as one (tests load main alone)

    for run in split_runs(argv):
        main(run)


if __name__ == "__main__":
    run_script(lambda: main_runs(sys.argv[1:]))
