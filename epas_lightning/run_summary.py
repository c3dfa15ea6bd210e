"""What a run reports about itself: the model summary with its real FLOPs, a progress bar that does not count to
epoch -2, and ``RunSummary`` at the end of ``fit``.

``RunSummary`` says where the checkpoints and logs are, the final validation loss and perplexity, the median training
throughput, the sharing region reached and when, the wall time, an EarlyStopping that ended it, and the next commands
with the run's real paths.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    EarlyStopping,
    ModelSummary,
    ProgressBar,
    RichModelSummary,
    RichProgressBar,
    Timer,
)
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from epas_lightning.callbacks import ProgressiveSharing, batch_tokens, host_scalar, optimizer_steps
from epas_lightning.divergence import last_checkpoint
from epas_lightning.flops import estimate_flops, flop_cut
from epas_lightning.loss_scaling import loss_scaler
from epas_lightning.progress import LINE_EVERY_S
from epas_lightning.provenance import checked

if TYPE_CHECKING:
    from epas_lightning.model import LlamaConfig

SESSIONS_TOGETHER = "(the training time of all sessions together)"
"""What ``max_time`` counts: Lightning's ``Timer`` resumes the training time a checkpoint holds."""

WARMUP_STEPS = 2
"""Optimizer steps left out of the throughput median (allocator warm-up, compilation)."""


@rank_zero_only
def say(line: str) -> None:
    """A line on stderr from the first process only (every rank runs the same command line and callbacks)."""
    print(line, file=sys.stderr, flush=True)


class RunSummary(Callback):
    """Prints a summary of the run when ``fit`` ends (rank zero only).

    Args:
        command_line: The run is ``python -m epas_lightning fit``: resuming is the same command with ``--ckpt_path
            last``. Otherwise (a script of your own) it is ``trainer.fit`` with the checkpoint's path.
    """

    def __init__(self, command_line: bool = False) -> None:
        self.command_line = command_line
        self._fit_start = 0.0
        self._step_start: float | None = None  # when the step being trained began (the previous one ended)
        self._step_of_window = 0
        self._step_tokens = 0
        self._step_trained: float | None = None  # a step a validation interrupted: its training seconds before it
        self._rates: list[float] = []
        self._start_step: int | None = 0
        self._loss_scale: float | None = None
        self._skipped = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._rates, self._step_trained = [], None
        self._start_step = None  # until training starts (it does not where the resumed step is past max_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed checkpoint's step (restored after on_fit_start)
        scaler = loss_scaler(trainer)
        self._loss_scale, self._skipped = (scaler.get_scale() if scaler else None), 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._step_start is None:  # the session's first step, or the first batch after a validation
            now = time.perf_counter()
            if self._step_trained is not None:  # the step the validation interrupted goes on
                self._step_start, self._step_trained = now - self._step_trained, None
            else:
                self._step_start, self._step_of_window, self._step_tokens = now, trainer.global_step, 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation time is not training time; a step it interrupts (some of its micro-batches trained) keeps them
        and their time."""
        if self._step_start is not None and self._step_tokens:
            self._step_trained = time.perf_counter() - self._step_start
        self._step_start = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Time whole optimizer steps, end to end: every micro-batch of the step, the data loading between them, the
        gradient synchronisation and the update (a step after a validation starts at its first micro-batch)."""
        self._step_tokens += batch_tokens(batch) * trainer.world_size
        if self._step_start is not None and trainer.global_step != self._step_of_window:  # the step is done
            now = time.perf_counter()
            if now > self._step_start:
                self._rates.append(self._step_tokens / (now - self._step_start))
            self._step_start, self._step_of_window, self._step_tokens = now, trainer.global_step, 0
        scaler = loss_scaler(trainer)
        # fp16: the scaler halves its scale when it skips. Read at the micro-batch that stepped (the scale changes only
        # there): reading it is a device sync, which at every micro-batch left the GPU idle between them
        if scaler is not None and self._loss_scale is not None and not trainer.fit_loop._should_accumulate():
            scale = scaler.get_scale()
            self._skipped += scale < self._loss_scale
            self._loss_scale = scale
            pl_module.log("train/loss_scale", host_scalar(scale))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank asks: Lightning broadcasts it from rank zero
        if trainer.is_global_zero:
            print(self.summary(trainer, pl_module, log_dir), file=sys.stdout, flush=True)

    def summary(self, trainer: Trainer, pl_module: LightningModule, log_dir: str | None) -> str:
        steps = optimizer_steps(trainer.global_step)
        if self._start_step is None and trainer.global_step:
            limit = _limit_reached(trainer) or "max_steps"
            steps += (
                f" (none in this session: resumed at step {trainer.global_step}, where {limit} "
                f"{_limit_value(trainer, limit)} had been reached; raise it to train further)"
            )
        elif self._start_step:
            steps += f" ({trainer.global_step - self._start_step} in this session, resumed at step {self._start_step})"
        lines = [f"Run finished: {steps} in {_duration(self._fit_start)}."]
        stopper = _early_stop(trainer)
        if stopper is not None:  # nothing else says why the run ended before its limit
            reason = (stopper.stopping_reason_message or "").removesuffix(" Signaling Trainer to stop.")
            lines.append(f"  stopped      by EarlyStopping: {reason or stopper.stopping_reason.value}")
        if (signalled := _signal_stop(trainer)) is not None:  # Ctrl+C, a scheduler's SIGTERM or requeue signal
            lines.append(signalled)
        elif self._start_step is not None and max_time_timer(trainer) and _limit_reached(trainer) == "max_time":
            value = _limit_value(trainer, "max_time")
            lines.append(f"  stopped      by max_time {value} {SESSIONS_TOGETHER}{_after_step(trainer)}")
        checkpoint = last_checkpoint(trainer)
        if checkpoint:
            lines.append(f"  checkpoints  {Path(checkpoint).parent}  (last: {Path(checkpoint).name})")
        if log_dir and trainer.loggers:  # without a logger Lightning's log_dir is the working directory: no logs
            tensorboard = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            hint = f"  (tensorboard --logdir {tensorboard})" if tensorboard else ""
            lines.append(f"  logs         {log_dir}{hint}")
        if (validation := _val_loss_line(trainer, pl_module)) is not None:
            lines.append(validation)
        rates = self._rates[WARMUP_STEPS:] or self._rates
        if rates:
            lines.append(f"  throughput   {_throughput(statistics.median(rates), len(rates), trainer.world_size)}")
        lines.append(f"  sharing      {_region_line(trainer, pl_module)}")
        if self._skipped:
            lines.append(
                f"  fp16         the loss scaler skipped {self._skipped} step{'' if self._skipped == 1 else 's'} "
                "(overflowing gradients, no update); "
                "they still counted for the learning rate and the sharing schedule"
            )
        if checkpoint:
            lines += [
                "next:",
                f"  python -m epas_lightning generate --checkpoint {checkpoint} --prompt 'def main('",
                f"  python -m epas_lightning bench --checkpoint {checkpoint}",
                f"  python -m epas_lightning evaluate --checkpoint {checkpoint} --sharing-layers all",
                f"  python -m epas_lightning export --checkpoint {checkpoint} --output hf-export",
                f"  resume: {self._resume_advice(trainer, checkpoint, stopper)}",
            ]
        return "\n".join(lines)

    def _resume_advice(self, trainer: Trainer, checkpoint: str, stopper: EarlyStopping | None) -> str:
        """How to go on from ``checkpoint``; ``stopper`` is the ``EarlyStopping`` that ended the run, if one did."""
        from epas_lightning.interrupt import GracefulStop  # it prints with say(): imported here, not at the top

        if any(isinstance(c, GracefulStop) and c.requeued for c in trainer.callbacks):
            return "the requeued job resumes from it when its command has --ckpt_path auto"
        limit, resume = _limit_reached(trainer), _ckpt_path_flag(checkpoint)
        if limit is not None:  # resuming as it is would train nothing
            return raise_limit_advice(limit, checkpoint, self.command_line)
        if stopper is not None and self.command_line:  # its state resumes too: patience spent, the best score kept
            return f"EarlyStopping ended it; {resume} trains on until {stopper.monitor} stops improving again"
        if self.command_line:
            return f"the same command with {resume}"
        return f"trainer.fit(..., ckpt_path={checkpoint!r})"


def raise_limit_advice(limit: str, checkpoint: str, command_line: bool) -> str:
    """How to train on from ``checkpoint`` of a run that ``limit`` (``"max_steps"``, ``"max_epochs"``, ``"max_time"``)
    ended: a resume under the same limit trains nothing."""
    if command_line:
        counts = f" {SESSIONS_TOGETHER}" if limit == "max_time" else ""
        return f"to train further, raise --trainer.{limit}{counts} and resume with {_ckpt_path_flag(checkpoint)}"
    return f"to train further, raise the Trainer's {limit} and call trainer.fit(..., ckpt_path={checkpoint!r})"


def _val_loss_line(trainer: Trainer, pl_module: LightningModule) -> str | None:
    """The held-out loss of the session's last validation; where it ran none (a resume that stopped before the next
    one), the loss the resumed checkpoint holds, at its step, unless the resume changed the held-out data (the module
    then drops it: another data's loss)."""
    loss = trainer.callback_metrics.get("val/loss")
    restored = checked({"val_loss": getattr(pl_module, "last_validation", None)})["val_loss"]
    if loss is not None:  # a run may end steps after it: say which
        step = f" (step {restored['step']})" if restored is not None and restored["step"] is not None else ""
        return f"  val loss     {_with_perplexity(float(loss))} at the last validation{step}"
    if restored is None:
        return None
    at = "the last validation" if restored["step"] is None else f"the validation of step {restored['step']}"
    return f"  val loss     {_with_perplexity(restored['loss'])} at {at}, before this session (which ran none)"


def _ckpt_path_flag(checkpoint: str) -> str:
    """How the command line resumes ``checkpoint``: ``--ckpt_path last`` finds a ``last.ckpt`` only (a run with
    ``checkpoint.save_last: false`` writes none, and ``last`` then resumed another run's or failed), so another
    checkpoint is named."""
    return "--ckpt_path last" if Path(checkpoint).name == "last.ckpt" else f"--ckpt_path {checkpoint}"


def _limit_reached(trainer: Trainer) -> str | None:
    """The trainer's limit the run ended at, ``"max_steps"``, ``"max_epochs"`` or ``"max_time"`` (Lightning's ``Timer``
    counts the training time of every session: a resumed run goes on from the checkpoint's); ``None`` when it stopped
    before."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs"
    timer = max_time_timer(trainer)
    if timer is not None and timer.time_remaining() <= 0:
        return "max_time"
    return None


def _early_stop(trainer: Trainer) -> EarlyStopping | None:
    """The ``EarlyStopping`` that ended the run before its limit, if one did (not a signal, not a limit)."""
    from epas_lightning.interrupt import GracefulStop  # it prints with say(): imported here, not at the top

    stopped = EarlyStoppingReason.NOT_STOPPED
    stopper = next(
        (c for c in trainer.callbacks if isinstance(c, EarlyStopping) and c.stopping_reason != stopped), None
    )
    if stopper is None or _limit_reached(trainer) is not None:
        return None
    signalled = any(isinstance(c, GracefulStop) and c.stopped_by is not None for c in trainer.callbacks)
    return None if signalled else stopper


def _signal_stop(trainer: Trainer) -> str | None:
    """The summary's line for a run a signal stopped (``GracefulStop``), before its limit."""
    from epas_lightning.interrupt import GracefulStop  # it prints with say(): imported here, not at the top

    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop) and c.stopped_by is not None), None)
    if stop is None:
        return None
    line = f"  stopped      by {stop.stopped_by.name}{' (Ctrl+C)' if stop.stopped_by == signal.SIGINT else ''}"
    return line + _after_step(trainer) + (" (the job is requeued)" if stop.requeued else "")


def _after_step(trainer: Trainer) -> str:
    """Where a run stopped short: `` after step N of max_steps M``."""
    of = f" of max_steps {trainer.max_steps}" if trainer.max_steps is not None and trainer.max_steps > 0 else ""
    return f" after step {trainer.global_step}{of}"


def max_time_timer(trainer: Trainer) -> Timer | None:
    """The ``Timer`` that ``trainer.max_time`` (or a ``Timer`` of one's own) stops the run with, if any."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer) and c._duration is not None), None)


def max_time_ran_out(trainer: Trainer) -> bool:
    """Whether ``max_time``'s ``Timer`` has run out; every rank calls it, and the first rank's verdict holds, as the
    ``Timer``'s own does (one broadcast)."""
    timer = max_time_timer(trainer)
    return timer is not None and trainer.strategy.broadcast(timer.time_remaining() <= 0)


def _limit_value(trainer: Trainer, limit: str) -> str:
    """The value of ``limit`` as the flag takes it: ``max_time`` as ``DD:HH:MM:SS``."""
    if limit != "max_time":
        return str(getattr(trainer, limit))
    minutes, seconds = divmod(int(max_time_timer(trainer)._duration), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{seconds:02d}"


def _throughput(tokens_per_second: float, steps: int, world_size: int) -> str:
    """The summary's throughput: the median tokens/s of the optimizer steps, of all processes together."""
    over = f"median over {optimizer_steps(steps)}"
    if world_size > 1:
        over = f"{world_size} processes, {tokens_per_second / world_size:,.0f} per device; {over}"
    return f"{tokens_per_second:,.0f} tokens/s ({over})"


def _with_perplexity(loss: float) -> str:
    """A validation loss as the summary and the log lines print it: ``5.8578 (perplexity 350.0)``."""
    return f"{loss:.4f} (perplexity {math.exp(min(loss, 700)):.1f})"  # exp overflows a float past 709


def _duration(start: float) -> str:
    return _seconds(time.perf_counter() - start)


def _seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _region_line(trainer: Trainer, pl_module: LightningModule) -> str:
    shared = pl_module.model.sharing.shared_layers
    n_layer = pl_module.config.n_layer
    sharing = next((c for c in trainer.callbacks if isinstance(c, ProgressiveSharing)), None)
    if sharing is not None:  # listed as "N sharing layers" counts them
        shared = sharing.in_growth_order(shared)
    if not shared:
        return f"dense: no layer shares (0/{n_layer})"
    line = f"{len(shared)}/{n_layer} layers share {shared}"
    if sharing is not None and sharing.schedule is not None:
        full = len(sharing.schedule.target_layers)
        if len(shared) == full:
            when = f"step {sharing.reached_at}" if sharing.reached_at is not None else "before this run resumed"
            line += f"; full region since {when}"
        else:
            line += f"; {full - len(shared)} more would join by step {sharing.schedule.final_step}"
    return line


class FlopsModelSummary(ModelSummary):
    """Lightning's model summary, with the analytic training FLOPs of the model in place of the measured forward FLOPs
    (Lightning measures them only with an ``example_input_array``, and prints 0 without one)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._max_depth:
            return
        summary = self._summary(trainer, pl_module)
        config = pl_module.config
        dense = estimate_flops(config, 0, config.block_size)
        data = [
            (name, [get_human_readable_count(int(dense)) if row == "model" else "-" for row in summary.layer_names])
            if name == "FLOPs"
            else (name, values)
            for name, values in summary._get_summary_data()
        ]
        if not trainer.is_global_zero:
            return
        summarize = RichModelSummary.summarize if _RICH_AVAILABLE else ModelSummary.summarize
        args = (summary.total_parameters, summary.trainable_parameters, summary.model_size)
        summarize(data, *args, summary.total_training_modes, total_flops=int(dense), **self._summarize_kwargs)
        sharing = next((c for c in trainer.callbacks if isinstance(c, ProgressiveSharing)), None)
        reuse = bool(getattr(pl_module, "attention_reuse", False))
        if sharing is not None and sharing.enabled and sharing.schedule is not None:
            rank_zero_info(flops_line(config, len(sharing.schedule.target_layers), reuse))
        else:
            rank_zero_info(flops_line(config, 0))


def flops_line(config: LlamaConfig, target_layers: int, attention_reuse: bool = False) -> str:
    """What the summary's FLOPs column counts, with its figure, and what the full region cuts from it (with
    ``attention_reuse``, the sharing layers' QK^T too)."""
    dense = get_human_readable_count(int(estimate_flops(config, 0, config.block_size)))
    line = f"FLOPs: {dense} training FLOPs per sequence of {config.block_size} tokens, dense"
    if target_layers:
        cut = flop_cut(config, target_layers, config.block_size, attention_reuse)
        line += f"; {cut:.1%} fewer once {target_layers} layer(s) share"
    return line + "."


class StepRunProgressBar(RichProgressBar):
    """Lightning's rich progress bar, minus the epoch total that a run bounded by ``max_steps`` does not have
    (Lightning then sets ``max_epochs=-1``, and its bar reads "Epoch 0/-2"), with the batches of a step-bounded run
    counted right under gradient accumulation, and with the run's version number shown as the integer it is
    ("v_num: 3", not "v_num: 3.000").

    Where its output is not a terminal (a SLURM log, ``nohup``, a pipe) the bar is drawn only when an epoch ends,
    which may be the end of the run: there it also prints a line on stderr at most every ``line_every_s`` seconds,
    when an optimizer step ends (steps done, that step's train loss: rank zero's, over all ranks at the steps the
    loggers write; tokens/s since the last line, time left), and one after each validation (its loss).

    Args:
        line_every_s: Without a terminal, the shortest time between two step lines.
    """

    reads_train_loss = True
    """``train/loss`` is left out of Lightning's progress-bar metrics with this bar (Lightning reads those back to the
    host after every batch, a device sync per step on CUDA): the bar reads ``callback_metrics`` where it shows it."""

    def __init__(self, line_every_s: float = LINE_EVERY_S) -> None:
        super().__init__()
        self.line_every_s = line_every_s
        self._lines = False
        self._last_line = self._start = self._validation_start = self._metrics_read = 0.0
        self._tokens = 0
        self._start_step = 0
        self._metrics_due = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._lines = trainer.is_global_zero and not sys.stdout.isatty()
        self._last_line = self._start = time.perf_counter()
        self._tokens, self._start_step = 0, trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The metrics are read (a device sync each) where they are shown: without a terminal where a line prints (the
        bar is drawn when the epoch ends, with them read again), in one as often as the bar redraws (``refresh_rate``
        times a second), not at every batch."""
        now = time.perf_counter()
        line_due = self._lines and self._line_due(trainer, now)
        self._metrics_due = line_due or (not self._lines and self._redraw_due(now))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._metrics_due = True
        if self._lines:
            self._tokens += batch_tokens(batch) * trainer.world_size
        if line_due:
            self._print_line(trainer, now)

    def _line_due(self, trainer: Trainer, now: float) -> bool:
        """Whether a step line prints after this batch: a step ends, ``line_every_s`` after the last line or at the last
        step (mid-step, a line would count part of a step beside the loss of the last)."""
        if trainer.fit_loop._should_accumulate():
            return False
        return now - self._last_line >= self.line_every_s or trainer.global_step == trainer.max_steps

    def _redraw_due(self, now: float) -> bool:
        """Whether the bar in a terminal redraws with new metrics by now: ``refresh_rate`` times a second."""
        return self.refresh_rate > 0 and now - self._metrics_read >= 1 / self.refresh_rate

    def _print_line(self, trainer: Trainer, now: float) -> None:
        """The step line: steps done, the train loss, tokens/s since the last line, time left."""
        step, last = trainer.global_step, trainer.max_steps
        parts = [f"{step}/{last} steps" if last and last > 0 else f"{step} steps"]  # counts: no index to misread
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        parts.append(f"{self._tokens / (now - self._last_line):,.0f} tokens/s")
        if last and last > step > self._start_step:
            parts.append(f"{_seconds((now - self._start) / (step - self._start_step) * (last - step))} left")
        print(" · ".join(parts), file=sys.stderr, flush=True)
        self._last_line, self._tokens = now, 0

    def _update_metrics(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._metrics_due:
            super()._update_metrics(trainer, pl_module)
            self._metrics_read = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._last_line += time.perf_counter() - self._validation_start  # tokens/s counts training time only
        loss = trainer.callback_metrics.get("val/loss")
        if self._lines and not trainer.sanity_checking and loss is not None:
            steps = f"{trainer.global_step} step{'' if trainer.global_step == 1 else 's'}"
            print(f"val/loss {_with_perplexity(float(loss))} after {steps}", file=sys.stderr)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")  # not Lightning's progress-bar metric: reads_train_loss
        if loss is not None and "train/loss" not in items:  # first of the logged ones, where Lightning showed it
            items = {**get_standard_metrics(trainer), "train/loss": float(loss), **items}
        if isinstance(items.get("v_num"), int):
            items["v_num"] = str(items["v_num"])
        return items

    @property
    def total_train_batches(self) -> int | float:
        """The batch of the epoch the run ends at: Lightning caps the epoch at the optimizer steps left, which under
        gradient accumulation are fewer than the batches ("20/10" for 10 steps of 2 batches), and which a resumed run
        counts from the batch it resumed at while its bar counts on from there ("10/4" for steps 6 to 10)."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            accumulate = trainer.accumulate_grad_batches
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # a resumed run's batches behind it
            if done >= trainer.num_training_batches:  # the last epoch's count, before the loop resets it
                done = 0
            remaining = (trainer.max_steps - trainer.global_step) * accumulate
            return min(trainer.num_training_batches, done - done % accumulate + remaining)
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


def progress_bar_for(trainer_config: dict[str, Any]) -> list[Callback]:
    """The progress bar to add to a trainer built from ``trainer_config``: none where the user switched the bar off
    or chose their own, or where ``rich`` is missing (Lightning's plain bar has no epoch total to get wrong)."""
    callbacks = trainer_config.get("callbacks") or []
    if trainer_config.get("enable_progress_bar") is False or not _RICH_AVAILABLE:
        return []
    if any(isinstance(c, ProgressBar) for c in (callbacks if isinstance(callbacks, list) else [callbacks])):
        return []
    return [StepRunProgressBar()]
