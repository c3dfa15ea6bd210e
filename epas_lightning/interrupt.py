"""``GracefulStop``: SIGTERM or Ctrl+C ends ``fit`` after the current optimizer step, with a ``last.ckpt`` to resume.

Without it, Lightning ends a run on SIGTERM (a scheduler's preemption, ``timeout``, ``kill``) with exit status 0 and
nothing saved, and on Ctrl+C wherever the interrupt lands, also without a checkpoint. Its SIGTERM handler also
broadcasts from inside the signal handler, which can break a collective in flight (seen with gloo).

Here a signal only sets a flag. After every optimizer step the ranks agree (one boolean all-reduce: a signal to any
rank is enough), and if any was signalled every rank writes ``last.ckpt`` into the run's checkpoint folder together,
``fit`` stops (without the validation Lightning runs when a fit stops early), and the CLI exits with 128 + the signal:
130 after Ctrl+C, 143 after SIGTERM (a signal in the run's last step saves the same way, but training is complete:
nothing to resume, no job to requeue, exit status 0; so in the step where ``max_time`` runs out, which ends the run
there: to train on, raise it; before ``min_steps`` or ``min_epochs`` are met, it saves and waits for them, the run
training as without it). A second signal stops at once, without a checkpoint, as does
Ctrl+C before training starts, and SIGTERM from when Lightning registers its handler (once the data, the model and a
resumed checkpoint are set up: the sanity validation and the training loader's set-up, where a SIGTERM to any rank
sets a flag the ranks agree on as training starts: all stop before the first step): the CLI then prints one line and
exits with the same status (Lightning would exit 1 after Ctrl+C, and 0 after SIGTERM). A SIGTERM before that (the
config, the built-in corpus's first preparation, the data checks, the model build, ``init_from``'s read, the resume)
stops the CLI at once too, with one line saying nothing was trained (:mod:`epas_lightning.sigterm_in_setup`; one
during the imports, once the config is read); its default action ended the process with status 143 and nothing said.
From a script of one's own it keeps its default action.

In ``validate`` and ``test`` (nothing to save) SIGTERM or Ctrl+C to any rank stops every rank within
:data:`AGREE_EVERY_N_BATCHES` held-out batches: from Lightning's registration its handlers only set the flag, and the
ranks agree on it after the first batch and every that many after (one boolean all-reduce), up to the last batch every
rank has (their counts are compared once as the evaluation starts: a loader of the user's may give the ranks unequal
counts, or none known; one process has them all), and once more as the evaluation ends; the command says
"interrupted: validate stopped (SIGTERM)" once and exits 143 (130 after Ctrl+C), the run folder it created removed.
Lightning's SIGTERM handler, which broadcasts from rank 0 inside the handler, hung there on a SIGTERM to another rank
alone. A second signal stops at once.

Under SLURM with Lightning's ``auto_requeue`` (its default), the requeue signal (``SIGUSR1``, sent before the time
limit with ``#SBATCH --signal=USR1@<seconds>``) stops the same way, and then the first rank requeues the job
(``scontrol requeue``); the requeued job resumes that ``last.ckpt`` with ``--ckpt_path auto``. With checkpointing
off the job is not requeued: it would start over. Lightning's own handler,
which saved ``hpc_ckpt_N.ckpt`` mid-step into the working directory, is off (:mod:`epas_lightning.slurm`). The requeue
signal that comes before the first step (from the start of ``python -m epas_lightning fit``: imports, model build,
data checks, resuming, the sanity validation) is remembered: the ranks agree on it when ``fit`` starts and again just
before the first step, and ``fit`` stops there without a checkpoint (nothing was trained since the job started: the
checkpoint it resumed, if any, is still the newest), the job is requeued, and the exit status is 138. Unless the job
was requeued before (``SLURM_RESTART_COUNT``): then it made no progress since, and would start, stop and requeue
until someone cancels it, so it is not requeued; the CLI says so in one line and exits with 2.
"""

from __future__ import annotations

import signal
import threading
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from epas_lightning.errors import ConfigError
from epas_lightning.interrupted import Interrupted
from epas_lightning.plateau_metrics import hold_plateau_steps, release_plateau_steps
from epas_lightning.rank_agreement import ranks_agree
from epas_lightning.run_checkpoint import (
    PLATEAU_STEPS_HELD_KEY,
    VALIDATION_SKIPPED_KEY,
    RunCheckpoint,
    save_last_now,
)
from epas_lightning.run_summary import max_time_ran_out, raise_limit_advice, say
from epas_lightning.signal_registration import after_signal_registration, forget_signal_registration
from epas_lightning.sigterm_in_setup import STOPPED_IN_SETUP, training_started
from epas_lightning.slurm import (
    give_back_requeue,
    remembered,
    requeue_job,
    restart_count,
    signal_timing,
    slurm_job_id,
    step_aside,
    take_requeue_signal,
)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
AGREE_EVERY_N_BATCHES = 8
"""In ``validate`` and ``test``: the ranks agree whether one was signalled after the first held-out batch and every
this many after, while every rank has that many batches (each agreement a boolean all-reduce and a wait for the
device), and as the evaluation ends."""
EVALUATING = (TrainerFn.VALIDATING, TrainerFn.TESTING)


class GracefulStop(Callback):
    """Stop ``fit`` after the optimizer step during which SIGTERM or Ctrl+C came, and save ``last.ckpt`` first.

    Args:
        enabled: ``False`` leaves Lightning's behaviour (SIGTERM and Ctrl+C stop without a checkpoint).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: signal.Signals | None = None
        """The first signal this process received during ``fit``."""
        self.stopped_by: signal.Signals | None = None
        """Set when ``fit`` stopped for a signal (on any rank): ``exit_status`` is then 128 + it."""
        self.interrupted_by: signal.Signals | None = None
        """Set when a signal ended ``fit`` at once (a second one, or one before training), without a checkpoint."""
        self.interrupted_reason: str | None = None
        """What the command line says of that signal instead of its name (SIGTERM during setup)."""
        self.interrupted_announce = True
        """Whether this process says so (a stop every rank agreed on: the first rank)."""
        self.requeue_signal: signal.Signals | None = None
        """The signal SLURM requeues this job with, when this fit answers it (a SLURM job with ``auto_requeue``)."""
        self.command_line = False
        """Set by ``python -m epas_lightning fit``: the stop says to resume with the same command and ``--ckpt_path
        last``; otherwise (a script of your own) with ``trainer.fit``."""
        self._previous: dict[signal.Signals, Any] = {}
        self._step = -1
        self._validation_skipped_at: int | None = None  # the stop's step, whose validation it skips (a resume runs it)
        self._log_every_n_steps: int | None = None  # the trainer's, while the stop's step logs nothing
        self._held_plateaus: list[tuple[Any, int]] = []  # the plateau schedulers' configs and frequencies, held
        self._trainer: Trainer | None = None  # while the handlers are this callback's
        self._unannounced = False  # the signal came during a validation whose EarlyStopping may end the run
        self._kept_going = False  # a stop waits for min_steps or min_epochs, saved at its signal's step
        self._evaluated: int | None = None  # the held-out batches of the validate or test under way, where it answers
        self._every_rank_has = 0.0  # the held-out batches that every rank of that evaluation is known to have

    @property
    def requeued(self) -> bool:
        """Whether ``fit`` stopped for SLURM's requeue signal, after which the job was requeued."""
        return self.stopped_by is not None and self.stopped_by == self.requeue_signal

    @property
    def exit_status(self) -> int | None:
        return None if self.stopped_by is None else 128 + int(self.stopped_by)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in EVALUATING or not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        # a fit's stop before it (stopped_by, requeue_signal: its exit_status, requeued) stays for a script to read
        self.received = self.interrupted_by = self.interrupted_reason = None
        self.interrupted_announce, self._evaluated = True, 0
        after_signal_registration(trainer, self._answer_signals_in_evaluation)  # before it, their default actions

    def _answer_signals_in_evaluation(self) -> None:
        self._previous = {sig: signal.signal(sig, self._on_signal_in_evaluation) for sig in SIGNALS}
        training_started()  # the command's handler from its start steps aside

    def _on_signal_in_evaluation(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second one: at once
            self._restore()
            raise Interrupted(signum)
        self.received = signal.Signals(signum)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._count_batches_of_every_rank(trainer, trainer.num_test_batches)

    def _count_batches_of_every_rank(self, trainer: Trainer, batches: list[int | float]) -> None:
        """The held-out batches every rank of this ``validate`` or ``test`` has: the fewest of any rank (one all-reduce;
        ``limit_*_batches`` applied; none where a rank's count is not known), so that no agreement waits for a rank
        that has ended its batches (a loader of the user's may give them unequal counts; a length-less one, any). In
        one process no rank can be missing: every batch boundary is open, a length-less loader's too."""
        if self._evaluated is None or trainer.state.fn not in EVALUATING:
            return
        if trainer.world_size == 1:
            self._every_rank_has = float("inf")
            return
        mine = sum(batches)
        mine = torch.tensor(-1.0 if mine == float("inf") else float(mine), device=trainer.strategy.root_device)
        self._every_rank_has = max(0.0, float(trainer.strategy.reduce(mine, reduce_op="min")))

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_evaluation_if_signalled(trainer)

    def on_test_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_evaluation_if_signalled(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_evaluation_if_signalled(trainer, ended=True)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_evaluation_if_signalled(trainer, ended=True)

    def _stop_evaluation_if_signalled(self, trainer: Trainer, ended: bool = False) -> None:
        """In ``validate`` or ``test``, after the first held-out batch and every :data:`AGREE_EVERY_N_BATCHES` that
        every rank has, and as it ends (every rank gets there): stop every rank where any was signalled (the first
        one says so)."""
        if self._evaluated is None or trainer.state.fn not in EVALUATING:
            return
        if not ended:
            self._evaluated += 1
            if (self._evaluated - 1) % AGREE_EVERY_N_BATCHES or self._evaluated > self._every_rank_has:
                return
        signum, _ = self._agreed_stop(trainer)
        if signum is not None:
            raise Interrupted(signum, announce=trainer.is_global_zero)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage in EVALUATING:  # Lightning's teardown puts back the handlers it found
            self._evaluated, self._previous = None, {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = self.stopped_by = self.interrupted_by = self.interrupted_reason = None
        self.interrupted_announce = True
        if not self.enabled:
            self.requeue_signal = None
            if (signum := step_aside()) is not None:  # Lightning's behaviour: the signal's default action
                signal.raise_signal(signum)
            return
        # before Lightning registers its handlers: its requeue handler is never set
        self.requeue_signal = take_requeue_signal(trainer)
        self._stop_if_signalled_before_training(trainer)  # before resuming and the sanity validation
        if threading.current_thread() is threading.main_thread():
            # Lightning's SIGTERM handler, registered after on_fit_start, broadcasts from rank 0 inside the handler: a
            # SIGTERM to another rank alone hung there (the sanity validation, the run stage's barrier, the training
            # loader's set-up). From its registration until training one only sets the flag on_train_start agrees on
            after_signal_registration(trainer, self._answer_sigterm_before_training)

    def _answer_sigterm_before_training(self) -> None:
        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm_before_training)}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step, self._validation_skipped_at, self._kept_going = trainer.global_step, None, False
        self._give_back(trainer)
        if self.enabled and threading.current_thread() is threading.main_thread():
            # Lightning registered its SIGTERM handler after on_fit_start: this one replaces it until training ends
            signals = (*SIGNALS, self.requeue_signal) if self.requeue_signal else SIGNALS
            # Lightning's handlers, restored after training: the one before training replaced Lightning's SIGTERM one
            self._previous = {**{sig: signal.signal(sig, self._on_signal) for sig in signals}, **self._previous}
            self._trainer = trainer
            training_started()  # the command's handler from its start steps aside
        self._stop_if_signalled_before_training(trainer)  # read once this callback's handler is in place

    def _on_sigterm_before_training(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second one: stop at once
            self._restore()
            raise Interrupted(signum, STOPPED_IN_SETUP)
        self.received = signal.Signals(signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop at once (Lightning's KeyboardInterrupt path tears down)
            self._restore()
            raise Interrupted(signum)
        self.received = signal.Signals(signum)
        trainer = self._trainer
        if trainer is not None and trainer.validating and _training_over(trainer):  # no step follows to stop after
            say(f"{_run_ends_after_validation(self.received, trainer)} ({_what(signum)} again: at once)")
        elif trainer is not None and trainer.validating and _early_stopping(trainer):
            self._unannounced = True  # an EarlyStopping may end the run after this validation: said once it decided
        else:
            self._announce_stop()

    def _announce_stop(self) -> None:
        what = _what(self.received)
        then = ", then requeueing the job" if self.received == self.requeue_signal else ""
        again = f"({what} again: at once, without one)"
        say(f"\n{what}: stopping after this optimizer step with a checkpoint{then} {again}")

    def _announce_after_validation(self, trainer: Trainer, over: bool) -> None:
        """Say what a signal during a validation that an ``EarlyStopping`` judged does: training goes on (a step
        follows, which the stop ends), or the run ended after it (``over``)."""
        if not self._unannounced:
            return
        self._unannounced = False
        if over:
            say(_run_ends_after_validation(self.received, trainer))
        else:
            self._announce_stop()

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._announce_after_validation(trainer, over=False)
        self._log_again(trainer)  # a stop min_steps or min_epochs kept from ending fit: training goes on
        self._step_plateaus_again()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or trainer.global_step == self._step:  # mid-accumulation: no optimizer step yet
            return
        self._step = trainer.global_step
        self.stopped_by, requeue = self._agreed_stop(trainer)
        if self.stopped_by is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        due = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)  # before should_stop makes it due
        ends = _limit_ending_this_step(trainer)  # the run's last step: nothing is left to resume under its limits
        last = due and ends  # the run's last validation: no resume would run it
        # every checkpoint of this step says so: the stop's, and any other callback's after it (checkpoints run last)
        self._validation_skipped_at = trainer.global_step if due and not last else None
        unmet = None if ends else _unmet_minimum(trainer)
        if unmet is not None:  # fit cannot stop here
            self._keep_going(trainer, unmet)
            self.stopped_by = None  # until it can
            return
        saved = self._save(trainer)
        self._log_as_uninterrupted(trainer)
        if not last:
            self._hold_plateau_steps(trainer)
        trainer.should_stop = True
        # Lightning validates when fit stops early (for early stopping): here a whole validation after the save, inside
        # the scheduler's grace period and before the loggers flush; the resumed run runs the one due here first
        epoch_loop._skip_next_val = not last
        where = f"saved {saved}" if saved else "checkpointing is off"
        if ends == "max_time":  # the time limit ends the run here: exit status 0, as without the signal
            advice = f" — {raise_limit_advice(ends, str(saved), self.command_line)}" if saved else ""
            say(
                f"{self.stopped_by.name} in the step where max_time ran out ({trainer.global_step}): max_time ends the "
                f"run here{', nothing to requeue' if requeue else ''}; {where}{advice}"
            )
            self.stopped_by = None
            return
        if ends:  # not a stop: the run is complete (exit status 0), and a requeued job would only end again
            complete = f"training is complete, nothing to resume{' or requeue' if requeue else ''}"
            say(f"{self.stopped_by.name} in the last step ({trainer.global_step}): {complete}; {where}")
            self.stopped_by = None
            return
        if requeue and not saved:  # a requeued job would start over, and stop here again, until cancelled
            where = f"{where}, so the job is not requeued (it would start over)"
        elif requeue and trainer.is_global_zero:  # after the save, which the requeued job resumes
            where = f"{where}; {requeue_job()} (its command needs --ckpt_path auto to resume it)"
        elif saved:
            where = f"{where} — resume with {self._resume_advice(trainer, saved)}"
        say(f"stopped by {self.stopped_by.name} after step {trainer.global_step}; {where}")

    def _keep_going(self, trainer: Trainer, unmet: str) -> None:
        """A stop that ``min_steps`` or ``min_epochs`` keep from ending fit waits until they are met, training and
        logging as the run without it (Lightning, with ``should_stop`` set, logged every step): ``last.ckpt`` is saved
        once, at the signal's step (which a resume finishes as a stop's), and the run says so once."""
        if self._kept_going:  # saved at the signal's step: this one is a step as any other
            self._validation_skipped_at = None
            return
        self._kept_going = True
        saved = self._save(trainer)
        where = f"saved {saved}" if saved else "checkpointing is off"
        say(f"{self.stopped_by.name} after step {trainer.global_step}: {where}; {unmet} keeps training, then it stops")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_skipped_at = None  # it runs: a checkpoint saved after it holds it
        self._count_batches_of_every_rank(trainer, trainer.num_val_batches)

    def _agreed_stop(self, trainer: Trainer) -> tuple[signal.Signals | None, bool]:
        """Whether any rank was signalled (one all-reduce; once one was, one or two more): the signal the stop reports
        (the requeue signal wins; Ctrl+C where every signalled rank got Ctrl+C; else this rank's, another rank's
        counting as SIGTERM), and whether the job is to be requeued."""
        reduce = partial(ranks_agree, trainer)
        if not reduce(self.received is not None, all=False):
            return None, False
        if self.requeue_signal is not None and reduce(self.received == self.requeue_signal, all=False):
            return self.requeue_signal, True
        if reduce(self.received in (None, signal.SIGINT), all=True):
            return signal.SIGINT, False
        return (signal.SIGTERM if self.received in (None, signal.SIGINT) else self.received), False

    def _stop_if_signalled_before_training(self, trainer: Trainer) -> None:
        """Stop ``fit`` before its first step when a rank kept the requeue signal since the command started (see
        :func:`epas_lightning.slurm.remembering_requeue_signal`): nothing to save; the first rank requeues the job,
        unless it was requeued before (no progress since: a ``ConfigError``). Or when a rank got SIGTERM since
        Lightning registered its handlers (the flag of the handler that replaced Lightning's there: the run stage's
        barrier, the sanity validation, the training loader's set-up): it stops as in set-up, nothing trained or
        saved."""
        self.received = self.received or remembered()
        signum, requeue = self._agreed_stop(trainer)
        if signum is None:
            return
        if requeue and restart_count():
            raise _no_progress_since_requeue(signum, trainer.is_global_zero)
        if signum == signal.SIGTERM and not requeue:
            raise Interrupted(signum, STOPPED_IN_SETUP, announce=trainer.is_global_zero)
        what = "nothing was trained since the job started, so no checkpoint is written"
        if requeue and trainer.is_global_zero:
            what = f"{what}; {requeue_job()}"
        say(f"{signum.name} before the first step: {what}")
        raise Interrupted(signum, announce=trainer.is_global_zero)

    def _resume_advice(self, trainer: Trainer, saved: Path) -> str:
        if self.command_line:
            return "the same command and --ckpt_path last"
        # "last" finds the run's newest last.ckpt from a new Trainer only with RunCheckpoint (README, "In Python")
        last = '"last"' if isinstance(_run_checkpoint(trainer), RunCheckpoint) else repr(str(saved))
        return f"trainer.fit(..., ckpt_path={last})"

    @staticmethod
    def _save(trainer: Trainer) -> Path | None:
        """``last.ckpt``, and the checkpoint's step file where ``every_n_train_steps`` saves at this step (the file the
        uninterrupted run keeps: once ``last.ckpt`` counted the step as saved, it was never written)."""
        checkpoint = _run_checkpoint(trainer)
        if not isinstance(checkpoint, ModelCheckpoint):
            return None
        every = checkpoint._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and not checkpoint._should_skip_saving_checkpoint(trainer):
            metrics = checkpoint._monitor_candidates(trainer)
            if checkpoint.monitor is None or checkpoint.monitor in metrics:
                checkpoint._save_topk_checkpoint(trainer, metrics)
        return save_last_now(trainer, checkpoint)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._validation_skipped_at == trainer.global_step:
            checkpoint[VALIDATION_SKIPPED_KEY] = trainer.global_step
        if self._held_plateaus:  # in the stop's step, after its save: the resume takes them
            checkpoint[PLATEAU_STEPS_HELD_KEY] = trainer.global_step

    def _log_as_uninterrupted(self, trainer: Trainer) -> None:
        """Once ``should_stop`` is set, Lightning logs the step's metrics whatever ``log_every_n_steps`` says: an
        extra point on every curve at the stop's step, which the uninterrupted run did not log. Where that run does not
        log this step, logging is off (``log_every_n_steps`` 0) until the next step or the end of training."""
        every = trainer.log_every_n_steps
        if every and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every:  # Lightning's count, as it logs
            self._log_every_n_steps, trainer.log_every_n_steps = every, 0

    def _log_again(self, trainer: Trainer) -> None:
        if self._log_every_n_steps is not None:
            trainer.log_every_n_steps, self._log_every_n_steps = self._log_every_n_steps, None

    def _hold_plateau_steps(self, trainer: Trainer) -> None:
        """After the stop's save Lightning steps the ``ReduceLROnPlateau`` schedulers at the step's end (and the
        epoch's, at its last batch) without the validation the stop skipped: a strict one raised where its metric was
        not logged yet (a stop at the first validation), after ``last.ckpt`` was saved. No checkpoint holds those steps
        and the resume takes them (:func:`epas_lightning.run_checkpoint.finish_resumed_step`): they are never due until
        the next step or the end of training (a frequency no step or epoch count reaches; the schedulers themselves, as
        a checkpoint of another callback still saves them, are untouched)."""
        if not self._held_plateaus:
            self._held_plateaus = hold_plateau_steps([c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau])

    def _step_plateaus_again(self) -> None:
        release_plateau_steps(self._held_plateaus)
        self._held_plateaus = []

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._announce_after_validation(trainer, over=True)
        self._log_again(trainer)
        self._step_plateaus_again()
        self._restore()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fit that trained nothing after its sanity validation (no on_train_start or on_train_end): Lightning's
        # teardown, just before, put back the handlers it found; the one kept here was that Trainer's
        self._previous, self._trainer = {}, None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        forget_signal_registration(trainer)  # a fit that failed before Lightning registered its handlers
        self._unannounced, self._evaluated = False, None
        self._log_again(trainer)
        self._step_plateaus_again()
        self._restore()
        self._give_back(trainer)
        if self.enabled and isinstance(exception, KeyboardInterrupt):  # Ctrl+C or SIGTERM before training, a second one
            self.interrupted_by = getattr(exception, "signum", signal.SIGINT)
            self.interrupted_reason = getattr(exception, "reason", None)
            self.interrupted_announce = getattr(exception, "announce", True)
        elif self.enabled and isinstance(exception, SIGTERMException):  # SIGTERM before training: Lightning's handler
            self.interrupted_by = signal.SIGTERM  # in fit: the sanity validation (this handler answers in training)
            self.interrupted_reason = STOPPED_IN_SETUP if trainer.state.fn == TrainerFn.FITTING else None

    def _give_back(self, trainer: Trainer) -> None:
        if self.requeue_signal is not None:
            give_back_requeue(trainer)

    def _restore(self) -> None:
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous, self._trainer = {}, None


def _limit_ending_this_step(trainer: Trainer) -> str | None:
    """The limit that ends ``fit`` after the optimizer step just done, stopped or not: ``"max_steps"``, ``"max_epochs"``
    (the last batch of the last epoch), or ``"max_time"`` (its ``Timer`` ran out: a resume under the same limit goes on
    from the checkpoint's training time and trains nothing); ``None`` when training would go on. Every rank calls it:
    the ``Timer``'s verdict is the first rank's, as the ``Timer`` decides."""
    return _step_limit_reached(trainer) or ("max_time" if max_time_ran_out(trainer) else None)


def _step_limit_reached(trainer: Trainer) -> str | None:
    """``"max_steps"`` or ``"max_epochs"`` where the optimizer step just done is the run's last, else ``None``."""
    fit_loop = trainer.fit_loop
    if fit_loop.max_steps != -1 and trainer.global_step >= fit_loop.max_steps:
        return "max_steps"
    last_epoch = fit_loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= fit_loop.max_epochs
    if last_epoch and fit_loop.epoch_loop._num_ready_batches_reached():
        return "max_epochs"
    return None


def _unmet_minimum(trainer: Trainer) -> str | None:
    """The ``min_steps`` or ``min_epochs`` (Lightning's 1 with ``min_steps``) that keep fit from stopping after the
    optimizer step just done (counting the epoch it ends), as ``"min_steps=6"``; ``None`` where it can stop."""
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current.processed + fit_loop.epoch_loop._num_ready_batches_reached()
    if fit_loop.min_steps and trainer.global_step < fit_loop.min_steps:
        return f"min_steps={fit_loop.min_steps}"
    if fit_loop.min_epochs and epochs < fit_loop.min_epochs:
        default = " (Lightning's default with min_steps)" if fit_loop.min_steps and fit_loop.min_epochs == 1 else ""
        return f"min_epochs={fit_loop.min_epochs}{default}"
    return None


def _training_over(trainer: Trainer) -> bool:
    """Whether no optimizer step follows the one just done (read in a signal handler: this process's state only, no
    collective): a limit reached, or a stop the ranks agreed on (``max_time``'s ``Timer``) that ``fit`` takes."""
    return _step_limit_reached(trainer) is not None or (trainer.should_stop and trainer.fit_loop._can_stop_early)


def _what(signum: int) -> str:
    return "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name


def _run_ends_after_validation(signum: int, trainer: Trainer) -> str:
    """What a signal during the run's final validation does: nothing, the run ends after it."""
    ends = "nothing to stop, the run ends after this validation"
    return f"\n{_what(signum)} after the last step ({trainer.global_step}): {ends}"


def _early_stopping(trainer: Trainer) -> bool:
    """Whether an ``EarlyStopping`` may end the run after a validation (its verdict comes at the validation's end, or
    the epoch's)."""
    return any(isinstance(c, EarlyStopping) for c in trainer.callbacks)


def _run_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    """The checkpoint a stop saves into: the run's ``RunCheckpoint`` (where ``--ckpt_path last`` looks), else
    Lightning's first. A ``ModelCheckpoint`` of ``trainer.callbacks`` comes before it in the CLI's list."""
    run = [c for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)]
    return run[0] if run else trainer.checkpoint_callback


def _no_progress_since_requeue(signum: signal.Signals, announce: bool) -> ConfigError:
    """The error that ends a requeued job signalled again before its first step, instead of another requeue."""
    timing, count = signal_timing(), restart_count()
    error = ConfigError(
        f"the job made no progress since its last requeue: {signum.name} came again before the first optimizer step"
        f"{f', {timing},' if timing else ''} so it is not requeued (it would start and stop forever)",
        f"SLURM job {slurm_job_id()}, requeued {count} time{'s' if count > 1 else ''}",
        "raise the time limit (--time) above start-up + one step + a checkpoint + the signal's lead, or shorten the "
        "lead (--signal=USR1@<seconds>); then submit it again with --ckpt_path auto",
    )
    error.announce = announce  # every rank raises it; the command line says it once
    return error
