"""``RunCheckpoint``: the run's ``ModelCheckpoint``, whose ``last.ckpt`` holds the step training ended at.

Lightning writes ``last.ckpt`` only beside a scheduled save (every ``every_n_train_steps``, after a validation, at an
epoch end), so a run whose length is not a multiple of the interval ended with ``last.ckpt`` some steps behind: the
steps after the last scheduled save were lost, and ``--ckpt_path last`` trained them again.

``trainer.fit(..., ckpt_path="last")`` from a script looked only in the new version folder a fresh ``Trainer`` logs
into, found nothing and trained from step 0 with a warning; with ``RunCheckpoint`` it means what ``--ckpt_path last``
means (:mod:`epas_lightning.resume`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from epas_lightning.checkpoint_io import remove_unfinished_saves
from epas_lightning.checkpoint_space import check_folder_shared_by_nodes, warn_if_disk_too_small
from epas_lightning.plateau_metrics import (
    PLATEAU_METRICS_KEY,
    hold_plateau_steps,
    release_plateau_steps,
    restore_plateau_metrics,
    save_plateau_metrics,
)
from epas_lightning.resume import (
    last_checkpoint_of_run,
    same_folder,
    version_folder,
    version_of,
    version_to_continue,
)
from epas_lightning.run_summary import max_time_ran_out, say
from epas_lightning.safe_load import verify_checkpoint


def save_last_now(trainer: Trainer, checkpoint: ModelCheckpoint, weights_only: bool = False) -> Path | None:
    """Write the current state (weights, optimizer, loops; the weights alone with ``weights_only``) to ``last.ckpt``
    in ``checkpoint``'s folder; every rank takes part. ``checkpoint`` then counts this step as saved, so no scheduled
    save writes the same step again. Returns the path, or ``None`` when ``checkpoint`` has no folder."""
    if checkpoint.dirpath is None:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    checkpoint.last_model_path = str(path)  # part of the state written below
    trainer.save_checkpoint(path, weights_only=weights_only)  # a link here is replaced, never written through
    checkpoint._last_global_step_saved = trainer.global_step  # Lightning's own "this step is saved" record
    checkpoint._last_checkpoint_saved = str(path)
    return path


def keep_epoch_unfinished(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """In ``checkpoint``'s loop state, undo the end of an epoch that the fit loop reached before its last batch (as
    ``max_steps`` ends it), so that a resume continues that epoch where the data stopped."""
    fit_loop = trainer.fit_loop
    epoch = fit_loop.epoch_progress.current
    saved = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if saved is None or epoch.processed < epoch.ready or fit_loop.epoch_loop._num_ready_batches_reached():
        return
    for counts in (saved["total"], saved["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
    checkpoint["epoch"] = saved["current"]["completed"]


def keep_epoch_finished(checkpoint: dict[str, Any]) -> None:
    """In the loop state of a ``checkpoint`` saved at an epoch's end (``on_train_epoch_end``: ``every_n_epochs``, or a
    run without validation), count that epoch as done, and the next one as not begun: Lightning had it processed but
    not completed, so a resume under ``max_steps`` went on in it for one more batch (the next epoch's first) and then
    began the next epoch past the rest of its batches. The checkpoint is marked (:data:`EPOCH_ENDED_KEY`) for the
    resume to take the epoch's plateau steps (:func:`finish_resumed_epoch`). One saved after a stop's save at that
    step (:data:`VALIDATION_SKIPPED_KEY`, :data:`PLATEAU_STEPS_HELD_KEY`) is read as that save instead
    (:func:`keep_step_unfinished`)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if epochs is None or batches is None or not batches.get("is_last_batch"):
        return
    epoch = epochs["current"]
    if not epoch["ready"] == epoch["started"] == epoch["processed"] == epoch["completed"] + 1:
        return  # saved inside the epoch, or after it was counted done
    step = checkpoint.get("global_step")
    if step in (checkpoint.get(VALIDATION_SKIPPED_KEY, -1), checkpoint.get(PLATEAU_STEPS_HELD_KEY, -1)):
        keep_step_unfinished(fit_loop)
        return
    for counts in (epochs["total"], epochs["current"]):
        counts["completed"] = counts["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    checkpoint[EPOCH_ENDED_KEY] = step


def keep_step_unfinished(fit_loop: dict[str, Any]) -> None:
    """Turn the loop state ``fit_loop`` of a save at an epoch's end into the state of a save between steps after its
    last batch (``on_train_batch_end``): the epoch not yet processed, the batch not yet completed, the step not yet
    counted for logging, as Lightning counts them there. A resume then finishes that step as a stop's
    (:func:`finish_resumed_step`): the stop skipped its validation and held its plateau steps, and Lightning counted
    the step's end, and so those, as done."""
    for counts in (fit_loop["epoch_progress"]["total"], fit_loop["epoch_progress"]["current"]):
        counts["processed"] -= 1
    batches = fit_loop["epoch_loop.batch_progress"]
    for counts in (batches["total"], batches["current"]):
        counts["completed"] -= 1
    if "_batches_that_stepped" in (state := fit_loop.get("epoch_loop.state_dict", {})):
        state["_batches_that_stepped"] -= 1


VALIDATION_SKIPPED_KEY = "validation_skipped_at_step"
"""The step of a checkpoint saved before a validation due at that step, which its run then skipped (a stop by
``GracefulStop``): a resume runs it (:func:`finish_resumed_step`)."""

PLATEAU_STEPS_HELD_KEY = "plateau_steps_held_at_step"
"""The step of a checkpoint saved in the step a stop by ``GracefulStop`` ended, after its save, whose
``ReduceLROnPlateau`` steps (of the step; of the epoch, where it ended one) its run held for the resume to take, a
validation due there or not: one saved at the epoch's end is resumed as the stop's own save
(:func:`keep_epoch_finished`)."""

STEP_ENDED_KEY = "step_ended_at_step"
"""The step of a checkpoint with the loop state of a save between steps, written after the step's end (its validation,
its ``ReduceLROnPlateau`` steps; its epoch's end where the step ended the epoch): the rewritten ``last.ckpt`` of
:class:`RunCheckpoint`. A resume of it replays none of them."""


EPOCH_ENDED_KEY = "epoch_ended_at_step"
"""The step of a checkpoint saved at its epoch's end (``on_train_epoch_end``), set as it loads
(:func:`keep_epoch_finished`): its run stepped the ``ReduceLROnPlateau`` schedulers of interval "epoch" after the
save, which a resume takes (:func:`finish_resumed_epoch`)."""


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), saving only between optimizer steps: a checkpoint holds no
    accumulated gradients, so one saved inside a step under gradient accumulation resumed with the step's earlier
    micro-batches lost.

    A save due inside a step (``train_time_interval`` elapsed) waits for its end. A validation inside a step
    (``val_check_interval`` counts micro-batches: one that ``accumulate_grad_batches`` does not divide) saves once the
    step is done, with the validation's metrics. A stop asked for inside a step (by ``EarlyStopping`` at such a
    validation, by ``max_time``) also waits for its end, so that ``last.ckpt`` holds whole steps. Where ``max_time``
    ends the run, it validates only where one is due (not as Lightning does when a fit stops early), as the run with a
    larger ``max_time`` does, so that a resume goes on as that run. A resumed run saves
    nothing before its first optimizer step: Lightning's saved the resumed step again after one micro-batch. It first
    runs the rest of the resumed step, which the checkpoint's run did after the save (:func:`finish_resumed_step`), and
    a ``ReduceLROnPlateau`` stepped per epoch steps at the end of the epoch the run resumed in. The metrics the plateau
    schedulers monitor are saved in its checkpoints, and put back at the resume (:mod:`epas_lightning.plateau_metrics`).
    """

    _save_after_step = False  # a validation inside an optimizer step asked for a save
    _resume: tuple | None = None  # what the resume finishes: resume_record of the checkpoint
    _stop_after_step = False  # a stop was asked for inside an optimizer step
    _stop_validated = False  # ... by a validation, which has run

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and trainer.fit_loop.epoch_loop._should_accumulate():
            self._save_after_step = True
            self._hold_stop(trainer, validated=True)
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            self._hold_stop(trainer, validated=False)  # max_time's Timer
            return  # inside the step: Lightning's time trigger (train_time_interval) saved there; it waits for the end
        if self._save_after_step:
            self._save_after_step = False
            super().on_validation_end(trainer, pl_module)  # with the validation's metrics, at the step just done
        if self._stop_after_step:
            trainer.should_stop = True
            if self._stop_validated:  # Lightning validates when fit stops early: not again after the one that asked
                trainer.fit_loop.epoch_loop._skip_next_val = True
            self._stop_after_step = self._stop_validated = False
        if trainer.should_stop and max_time_ran_out(trainer) and not validation_due_but_for_stop(trainer):
            # Lightning validates when fit stops early: where max_time ends it, a validation that neither the run
            # with a larger max_time nor its resume runs there (a val/loss point, a plateau step of its own)
            trainer.fit_loop.epoch_loop._skip_next_val = True
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _hold_stop(self, trainer: Trainer, validated: bool) -> None:
        """Keep a stop asked for inside an optimizer step until the step is done: the run ended there, and Lightning
        validated again at every micro-batch left in the step (its validation when a fit stops early)."""
        if trainer.should_stop:
            trainer.should_stop, self._stop_after_step = False, True
            self._stop_validated = self._stop_validated or validated

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run's step is saved already (in the checkpoint it resumed): under gradient accumulation Lightning
        saved it again after the next step's first micro-batch, over that checkpoint's name, half a window on."""
        super().on_train_start(trainer, pl_module)
        self._save_after_step = self._stop_after_step = self._stop_validated = False  # from a fit ended by an error
        if trainer.ckpt_path is not None:
            self._last_global_step_saved = trainer.global_step
            if self is step_checkpoints(trainer)[0]:
                finish_resume(trainer, *(self._resume or (None, None, None)))
        self._resume = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        save_plateau_metrics(trainer, checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resume = resume_record(checkpoint)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        end_restart(trainer)


def step_checkpoints(trainer: Trainer) -> list[StepCheckpoint]:
    """The trainer's :class:`StepCheckpoint` callbacks: the first finishes a resume (none with checkpointing off:
    ``EPASModule`` does)."""
    return [c for c in trainer.callbacks if isinstance(c, StepCheckpoint)]


def resume_record(checkpoint: dict[str, Any]) -> tuple[tuple[int, bool] | None, int | None, Any]:
    """What a resume of ``checkpoint`` finishes (:func:`finish_resume`): the end of its step yet to run (its epoch,
    whether its validation was skipped; ``None`` where the checkpoint holds it), the epoch whose end it was saved at
    (``None`` where it was not), and the plateau metrics it saved."""
    step = checkpoint.get("global_step")
    skipped = checkpoint.get(VALIDATION_SKIPPED_KEY, -1) == step
    epoch = checkpoint.get("epoch", 0)
    if checkpoint.get(EPOCH_ENDED_KEY, -1) == step:
        return None, epoch, checkpoint.get(PLATEAU_METRICS_KEY)
    resumed = None if checkpoint.get(STEP_ENDED_KEY) == step else (epoch, skipped)
    return resumed, None, checkpoint.get(PLATEAU_METRICS_KEY)


def finish_resume(
    trainer: Trainer, resumed: tuple[int, bool] | None, epoch_ended: int | None, plateau_metrics: Any
) -> None:
    """At the start of a resumed run's training, what Lightning's resume skips (the arguments: :func:`resume_record`):
    the saved plateau metrics put back (reset since the checkpoint loaded), the end of the resumed step
    (:func:`finish_resumed_step`) or epoch (:func:`finish_resumed_epoch`), the next epoch begun as new
    (:func:`begin_next_epoch_as_new`). The first :class:`StepCheckpoint` calls it, else (checkpointing off)
    ``EPASModule``. A checkpoint without plateau metrics (an older version's, or one of a run without a
    :class:`StepCheckpoint`) takes no plateau step that finds none (as Lightning's resume took none; a strict
    scheduler raised), said once."""
    restore_plateau_metrics(trainer, plateau_metrics)
    skipped: set[str] | None = set() if plateau_metrics is None else None
    if resumed is not None:
        finish_resumed_step(trainer, *resumed, skipped=skipped)
    if epoch_ended is not None:
        finish_resumed_epoch(trainer, epoch_ended, skipped=skipped)
    begin_next_epoch_as_new(trainer)
    if skipped:
        rank_zero_warn(
            f"ckpt_path {trainer.ckpt_path} was saved without the value of {', '.join(sorted(skipped))} (by an older "
            "epas_lightning, or by a run without its RunCheckpoint or StepCheckpoint, such as one with Lightning's "
            f"ModelCheckpoint alone), which a ReduceLROnPlateau steps on at step {trainer.global_step}: that step is "
            "skipped, as Lightning's resume does; checkpoints saved from now on hold it, nothing to do"
        )


def step_plateau_schedulers(trainer: Trainer, interval: str, skipped: set[str] | None = None) -> None:
    """Step the ``ReduceLROnPlateau`` schedulers of ``interval`` ("step", "epoch") due now, as Lightning does at a
    step's or an epoch's end. With ``skipped`` (the resumed checkpoint saved no plateau metrics), one due whose metric
    is not logged takes no step, and its metric is added to ``skipped``."""
    epoch_loop, unsaved = trainer.fit_loop.epoch_loop, []
    if skipped is not None:
        index = epoch_loop.batch_idx if interval == "step" else trainer.current_epoch  # Lightning's count, 0-based
        configs = [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == interval]
        unsaved = [c for c in configs if (index + 1) % c.frequency == 0 and c.monitor not in trainer.callback_metrics]
        skipped.update(config.monitor for config in unsaved)
    held = hold_plateau_steps(unsaved)
    try:
        epoch_loop.update_lr_schedulers(interval, update_plateau_schedulers=True)
    finally:
        release_plateau_steps(held)


def end_restart(trainer: Trainer) -> None:
    """At an epoch's end: Lightning steps no ``ReduceLROnPlateau`` of interval "epoch" at the end of the epoch a run
    resumed in (its metric was not saved), where the uninterrupted run did. The fit loop counts as restarting no more
    from here."""
    trainer.fit_loop._restarting = False  # its setter keeps it True under max_steps


def validation_due_but_for_stop(trainer: Trainer) -> bool:
    """Whether the run validates after the optimizer step just done by its schedule (``val_check_interval``, an
    epoch's end), leaving aside the validation Lightning runs when ``trainer.should_stop`` ends fit early."""
    stop, trainer.should_stop = trainer.should_stop, False
    try:
        return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    finally:
        trainer.should_stop = stop


def begin_next_epoch_as_new(trainer: Trainer) -> None:
    """Resumed from a save between steps after an epoch's last batch, Lightning counts that epoch done but keeps its
    'restarted mid-epoch' stage for the next one, which then began uncounted (no ``on_train_epoch_start``): a checkpoint
    of this session inside that epoch recorded it as not begun, and its resume trained that epoch again (other
    batches, another epoch count). The next epoch now begins as in an uninterrupted run."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    closed = epoch_loop.restarted_on_train_batch_end and epoch_loop.batch_progress.is_last_batch
    if closed and fit_loop.restarted_mid_epoch:
        fit_loop.reset_restart_stage()


def finish_resumed_step(
    trainer: Trainer, epoch: int, validation_skipped: bool, skipped: set[str] | None = None
) -> None:
    """Run the end of the resumed step that the checkpoint's run did after its save between steps, in the checkpoint's
    ``epoch`` (after an epoch's last batch Lightning resumes in the next). Lightning skips it all.

    The validation due at that step where that run skipped it (:data:`VALIDATION_SKIPPED_KEY`): Lightning counted it
    as run, so no session scored that step (its ``val/loss`` point was missing), where the uninterrupted run had; it
    logs at that step, in that epoch (where it logged the next epoch's number, or was not due at all), and no checkpoint
    saves the resumed step again. Then a ``ReduceLROnPlateau`` stepped per step takes the step it took there (the
    stop's session took it after its save; with or without a validation), and where the step ended its epoch, one
    stepped per epoch takes the epoch's step. None of this where a validation due at the step was not skipped: the
    checkpoint's run went on to it after the save (``every_n_train_steps`` at a validation's step); Lightning counts it
    as run, and the steps on its metric would take the value before it (a strict scheduler: none yet, an error)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not epoch_loop.restarted_on_train_batch_end:
        return  # saved elsewhere than between steps
    with counted_as_epoch(trainer, epoch):
        due = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        if due and not validation_skipped:  # that run went on to it: Lightning counts it, and what follows, as done
            return
        if due:
            for checkpoint in trainer.checkpoint_callbacks:  # the resumed step is saved already
                checkpoint._last_global_step_saved = trainer.global_step
            val_loop, first_loop_iter = epoch_loop.val_loop, trainer._logger_connector._first_loop_iter
            val_loop.restarting = False  # a new validation, not the rest of the last one
            trainer.validating = True
            val_loop.run()
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter
        step_plateau_schedulers(trainer, "step", skipped)  # as Lightning at the step's end
        if epoch_loop._num_ready_batches_reached():  # as Lightning at the end of an epoch
            step_plateau_schedulers(trainer, "epoch", skipped)


def finish_resumed_epoch(trainer: Trainer, epoch: int, skipped: set[str] | None = None) -> None:
    """Run the end of the resumed ``epoch`` that the checkpoint's run did after its save there (``on_train_epoch_end``):
    a ``ReduceLROnPlateau`` stepped per epoch takes the epoch's step, which Lightning skipped (the learning rate then
    followed the uninterrupted run's one epoch late). Lightning instead ended the epoch's last step again, as if saved
    at its validation: a second plateau step of interval "step" and one more logging step; the loop restarts no more.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop.restarted_on_last:  # the step was ended before the save: a new epoch begins
        epoch_loop.restarting = False
    with counted_as_epoch(trainer, epoch):
        step_plateau_schedulers(trainer, "epoch", skipped)  # as Lightning after the epoch's end


@contextmanager
def counted_as_epoch(trainer: Trainer, epoch: int) -> Iterator[None]:
    """``trainer.current_epoch`` reads ``epoch`` inside (Lightning's count of the epochs completed)."""
    progress = trainer.fit_loop.epoch_progress.current
    ahead = progress.completed - epoch
    progress.completed -= ahead
    try:
        yield
    finally:
        progress.completed += ahead


class ListedCheckpoint(StepCheckpoint):
    """A ``ModelCheckpoint`` of ``trainer.callbacks`` once :func:`save_between_steps` made it a
    :class:`StepCheckpoint`; its state in checkpoints keeps ``ModelCheckpoint``'s key, so resumes find it both ways."""

    @property
    def state_key(self) -> str:
        return ModelCheckpoint.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)


def save_between_steps(callbacks: list[Any]) -> None:
    """Make each plain ``ModelCheckpoint`` of ``callbacks`` a :class:`ListedCheckpoint` (the same object, every
    setting kept), which saves only between optimizer steps as the run's own checkpoint does."""
    for callback in callbacks:
        if type(callback) is ModelCheckpoint:
            callback.__class__ = ListedCheckpoint


class RunCheckpoint(StepCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose ``last.ckpt`` (with ``save_last``) holds the step training ended at.

    It is the ``checkpoint`` section of ``fit``, with ``ModelCheckpoint``'s arguments; when training ends at a step
    that no checkpoint holds yet, it writes ``last.ckpt`` then. Before training, it refuses a folder the nodes of a
    multi-node run do not share, removes the staging files of saves killed midway there, and warns when its folder's
    disk looks too small for the checkpoints it keeps at once (see :mod:`epas_lightning.checkpoint_space`).

    ``ckpt_path="last"`` is the newest ``last.ckpt`` of the run (``dirpath``, or every ``version_*/checkpoints``
    folder of the first logger's ``save_dir``/``name``), checked to read without running code; none is an error. A
    ``fit`` resuming it logs and checkpoints into its version folder where the loggers have not fixed their version
    yet (one given ``version=`` keeps it), and none is a ``CSVLogger``, which would delete that folder's
    ``metrics.csv``.

    Like every :class:`StepCheckpoint`, it saves only between optimizer steps. Where training ends with a validation
    at a step saved before it (``every_n_train_steps`` a multiple of ``val_check_interval``; a stop in the run's last
    step), ``last.ckpt`` is written again with that validation and the loop state of the step's save, from which a
    resume goes on as from that save.
    """

    _between_steps: tuple[int, dict[str, Any], int] | None = None
    """This fit's latest save between optimizer steps: its step, loop state and epoch."""
    _validated_after_save: int | None = None  # the step of a validation that ran after this callback saved that step
    _rewriting = False  # last.ckpt is written again after the validation at its step

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """Lightning's lookup for ``ckpt_path="last"``, which searched only the version folder of this new run."""
        loggers = trainer.loggers
        run_dir = Path(loggers[0].save_dir or trainer.default_root_dir) / str(loggers[0].name) if loggers else None
        version = getattr(loggers[0], "_version", None) if loggers else None  # given to the logger, or not chosen yet
        if self.dirpath is not None or not loggers:
            dirpath, run_dirs = self.dirpath or Path(trainer.default_root_dir) / "checkpoints", []
        elif version is not None:  # that version's own checkpoints, as the CLI's `last` with a version
            dirpath, run_dirs = version_folder(run_dir, version) / "checkpoints", []
        else:
            dirpath, run_dirs = None, [run_dir]
        fix = "train first, or pass the checkpoint's path as ckpt_path (None starts from scratch)"
        newest = verify_checkpoint(last_checkpoint_of_run(dirpath, run_dirs, fix), 'ckpt_path="last"')
        if trainer.state.fn == TrainerFn.FITTING:
            say(f"Resuming from {newest}")
            csv = any(isinstance(logger, CSVLogger) for logger in loggers)
            version_dir = version_to_continue(newest, run_dirs, csv_logger=csv)
            for logger in loggers if version_dir else []:
                if getattr(logger, "_version", "") is None:  # not chosen yet: nothing was written under it
                    logger._version = version_of(version_dir)
        return {str(newest)}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._between_steps = self._validated_after_save = None
        if self.dirpath is not None:
            check_folder_shared_by_nodes(trainer, Path(self.dirpath))
            if trainer.is_global_zero and Path(self.dirpath).is_dir():  # before the space they hold is counted free
                remove_unfinished_saves(Path(self.dirpath))
        warn_if_disk_too_small(trainer, pl_module, self)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved after ``max_steps`` ended an epoch midway (``last.ckpt`` at the end of training, a save at
        the epoch's end) records that epoch as unfinished: Lightning counted it as done, so the resumed run went on in
        the next epoch (a run with ``max_epochs: 1`` trained nothing more). The loop state of a save between steps is
        kept for writing ``last.ckpt`` again after the step's validation, as the step's save holds it."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._rewriting and self._between_steps is not None and "loops" in checkpoint:
            _, loops, epoch = self._between_steps  # what a resume of the step's own save goes on from
            checkpoint["loops"], checkpoint["epoch"] = copy.deepcopy(loops), epoch
            checkpoint[STEP_ENDED_KEY] = trainer.global_step
            return
        keep_epoch_unfinished(trainer, checkpoint)
        batches = trainer.fit_loop.epoch_loop.batch_progress.current
        if "loops" in checkpoint and batches.processed == batches.completed + 1:  # on_train_batch_end: between steps
            self._between_steps = (trainer.global_step, copy.deepcopy(checkpoint["loops"]), checkpoint["epoch"])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        between_steps = not trainer.fit_loop.epoch_loop._should_accumulate()
        if fitting and between_steps and self._last_global_step_saved == trainer.global_step:  # saved before it ran
            self._validated_after_save = trainer.global_step
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fast_dev_run`` saves nothing: Lightning's own end-of-training save wrote ``last.ckpt`` (into
        ``checkpoints/`` of the working folder, a new ``last-vN.ckpt`` each run) although it says it suppresses
        checkpointing."""
        if trainer.fast_dev_run:
            return
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            save_last_now(trainer, self, weights_only=self.save_weights_only)  # as every save of the run
        elif self.save_last and self._validated_since_saved(trainer):
            self._rewriting = True
            try:
                save_last_now(trainer, self, weights_only=self.save_weights_only)
            finally:
                self._rewriting = False
        super().on_train_end(trainer, pl_module)

    def _validated_since_saved(self, trainer: Trainer) -> bool:
        """Whether the step training ended at was saved before a validation that then ran there: ``last.ckpt`` lacks
        it (the run's final ``val/loss``, a ``ReduceLROnPlateau`` step on it), which inspect, export and a run extended
        from it read."""
        step = trainer.global_step
        if self._validated_after_save != step or self._last_global_step_saved != step:
            return False
        return self.save_weights_only or (self._between_steps is not None and self._between_steps[0] == step)


def adopt_model_checkpoint_states(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Checkpoints written before the run's checkpoint was a ``RunCheckpoint`` keep its state under Lightning's
    ``ModelCheckpoint{...}`` key: moved to the key of the run's ``RunCheckpoint`` of the same arguments, so that a
    resume restores it (the best checkpoints kept so far, the last one) and Lightning does not ask for a callback the
    run has. A plain ``ModelCheckpoint`` of the run's own keeps its state. A ``RunCheckpoint`` none of whose states
    the checkpoint holds keeps writing the run's last checkpoint (:func:`keep_last_of_resumed_run`)."""
    states = checkpoint.get("callbacks") or {}
    own = {callback.state_key for callback in trainer.callbacks}
    kind = f"{RunCheckpoint.__qualname__}{{"
    kind = kind if any(key.startswith(kind) for key in states) else "ModelCheckpoint{"  # the run's checkpoint states
    for callback in trainer.callbacks:
        older = "ModelCheckpoint" + callback.state_key.removeprefix(type(callback).__qualname__)
        if isinstance(callback, RunCheckpoint) and callback.state_key not in states and older in states.keys() - own:
            states[callback.state_key] = states.pop(older)
    unclaimed = {key: state for key, state in states.items() if key.startswith(kind) and key not in own}
    unrestored = [c for c in trainer.callbacks if isinstance(c, RunCheckpoint) and c.state_key not in states]
    for callback in unrestored:
        if (taken := keep_last_of_resumed_run(callback, unclaimed)) is not None:
            del states[taken]  # else Lightning asks to add a callback of the earlier settings back
            say(
                f"{callback.last_model_path} goes on as the run's last checkpoint: the checkpoint section's settings "
                "are not those it was saved with; the step checkpoints they kept stay"
            )


def keep_last_of_resumed_run(callback: RunCheckpoint, unclaimed: dict[str, Any]) -> str | None:
    """A resume whose ``checkpoint`` section differs from the checkpoint's (another ``every_n_train_steps``,
    ``train_time_interval``, ``save_top_k``, ``monitor``) gets none of its state: its ``last.ckpt`` stays the run's own,
    to be written again, rather than Lightning's ``last-v1.ckpt`` beside a stale ``last.ckpt`` that ``--ckpt_path
    last`` would resume. The step checkpoints it kept are not taken on: they stay.

    ``unclaimed`` are the run's checkpoint states (``ModelCheckpoint``'s in a checkpoint older than ``RunCheckpoint``)
    that no callback of this run restores: not a user's own checkpoint callback's, whose last checkpoint it would write
    too (or in its stead). The state taken is removed from them, so that two callbacks do not take one name; its key
    is returned (``None`` where none is in the callback's folder)."""
    for key in list(unclaimed):
        state = unclaimed[key]
        last = state.get("last_model_path") if isinstance(state, dict) else None
        if last and isinstance(state.get("dirpath"), str) and same_folder(callback.dirpath, Path(state["dirpath"])):
            callback.last_model_path = os.path.join(callback.dirpath, Path(last).name)  # as Lightning names its saves
            del unclaimed[key]
            return key
    return None
