"""``DivergenceGuard``: a run whose loss or gradients become non-finite stops, and no checkpoint holds such weights.

The check runs before every optimizer step, after backward: a non-finite loss in any micro-batch of the step, or a
non-finite gradient on any rank, is a bad step. Ranks agree through one boolean all-reduce, so they all stop (or
skip) together, and the bad gradients are never applied. Under fp16 loss scaling (``16-mixed``) a non-finite
gradient is the ``GradScaler``'s business (it skips the step and halves the scale) until the scale is down to
``min_loss_scale``: a run whose gradients overflow at that scale has diverged. Before any checkpoint is written the
weights and the optimizer state are checked too. The ``fit`` command turns the guard on by default (``divergence:``
in YAML).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor

from epas_lightning.errors import CheckpointError, ConfigError, TrainingDiverged, UserError, listed
from epas_lightning.loss_scaling import loss_scaler, unscale_fused_gradients
from epas_lightning.optim import state_entry, state_tensors
from epas_lightning.rank_agreement import ranks_agree
from epas_lightning.safe_load import is_weights_only

log = logging.getLogger(__name__)

DivergenceAction = Literal["stop", "skip", "off"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor (each rank's local shard) is finite. No host sync."""
    local = [_local(t) for t in tensors if t is not None and t.numel()]
    if not local:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(local, math.inf))).all()  # max |x|: NaN or inf if any is


class DivergenceGuard(Callback):
    """Stops training at the first step whose loss or gradients are not finite (or skips a few such steps first).

    Args:
        action: ``stop`` (default): raise :class:`TrainingDiverged` at the first bad step, before its update, naming
            the step and the last checkpoint written. ``skip``: drop the bad step's gradients (no update) up to
            ``max_skips`` times in the run, then stop. ``off``: no checks.
        max_skips: With ``action: skip``, how many bad steps to drop before stopping.
        check_weights: Refuse to write a checkpoint whose weights (or optimizer state) are not all finite.
        min_loss_scale: Under fp16 loss scaling, non-finite gradients make a bad step only once the scale is at or
            below this (the scaler halves it at each overflow; from its first 65536, 16 overflows in a row reach 1).
    """

    def __init__(
        self,
        action: DivergenceAction = "stop",
        max_skips: int = 10,
        check_weights: bool = True,
        min_loss_scale: float = 1.0,
    ) -> None:
        if action not in ("stop", "skip", "off"):
            raise ConfigError(f"unknown action {action!r}", "divergence.action", "use 'stop', 'skip' or 'off'")
        if max_skips < 0:
            raise ConfigError(f"max_skips must be >= 0, got {max_skips}", "divergence.max_skips", "set 0 or more")
        self.action = action
        self.max_skips = max_skips
        self.check_weights = check_weights
        self.min_loss_scale = min_loss_scale
        self.skipped = 0
        self.command_line = False
        """Set by ``python -m epas_lightning fit``: the stop says to resume with ``--ckpt_path``; otherwise (a script of
        your own) with ``trainer.fit(..., ckpt_path=...)``."""
        self._loss_finite: torch.Tensor | None = None
        self._written: set[str] = set()  # the checkpoints the run's ModelCheckpoints wrote (or resumed) so far
        self._skipped_at: set[int] = set()  # the steps skipped in this fit: a checkpoint of one holds bad weights

    # ------------------------------------------------------------------------------------------------ the checks

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._written = {str(trainer.ckpt_path)} if trainer.ckpt_path else set()
        self._skipped_at = set()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Note the checkpoints written so far: a callback names only its newest (``save_top_k: -1`` kept the rest
        unnamed), and a divergence at the step of the newest needs an earlier one."""
        self._written |= checkpoints_named(trainer)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.action == "off":
            return
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.action == "off":
            return
        loss_ok = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # fp16 with a GradScaler: inf gradients are the scaler's business (it skips the step and lowers the scale) until
        # the scale is down to min_loss_scale
        scaler = loss_scaler(trainer)
        scaled = scaler is not None and scaler.get_scale() > self.min_loss_scale
        grads_ok = torch.tensor(True) if scaled else all_finite(grads)
        local_bad = not bool(loss_ok.to(grads_ok.device) & grads_ok)
        if not ranks_agree(trainer, local_bad, all=False):
            return
        step = trainer.global_step
        # another rank's non-finite loss reaches this rank as non-finite gradients: every rank names the loss
        reason = "loss" if ranks_agree(trainer, not bool(loss_ok), all=False) else "gradients"
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            self._skipped_at.add(step)
            unscale_fused_gradients(trainer, optimizer)  # so the loss scaler has seen this step before they go
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            if trainer.is_global_zero:  # every rank skips it: the first one says so
                log.warning(
                    "Divergence guard: non-finite %s at step %d; skipped its update (%d of %d allowed).",
                    reason,
                    step,
                    self.skipped,
                    self.max_skips,
                )
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            return
        what = f"non-finite {reason} at step {step}"
        if scaler is not None and reason == "gradients":
            what += f" with the fp16 loss scale down to {scaler.get_scale():g}"
        raise TrainingDiverged(self._message(trainer, what), trainer.is_global_zero)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check_before_save(trainer, pl_module)

    def check_before_save(self, trainer: Trainer, pl_module: LightningModule, weights_only: bool = False) -> None:
        """Refuse to write a checkpoint whose weights or optimizer state are not all finite (a resume refuses it: an
        ``exp_avg_sq`` overflowed by a finite gradient froze its parameter). ``EPASModule`` calls it for a weights-only
        save, for which Lightning calls no callback's ``on_save_checkpoint``."""
        if self.action == "off" or not self.check_weights:
            return
        weights = [t for t in pl_module.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
        state = [] if weights_only else [t for _, _, t in optimizer_state(trainer.optimizers)]
        if not ranks_agree(trainer, not bool(all_finite(weights + state)), all=False):
            return
        bad = "weights" if ranks_agree(trainer, not bool(all_finite(weights)), all=False) else None
        what = f"non-finite {bad or 'optimizer state'} at step {trainer.global_step}; no checkpoint written"
        raise TrainingDiverged(self._message(trainer, what), trainer.is_global_zero)

    # ------------------------------------------------------------------------------------------------ reporting

    def _message(self, trainer: Trainer, what: str) -> str:
        written = self._written | checkpoints_named(trainer)
        good, at_step = checkpoint_before(written, trainer.global_step, self._skipped_at)
        if good is None and at_step is not None and self.action == "stop":  # skipping it: when no skip was tried
            where = f"no checkpoint before this step: {at_step} holds its weights (a resume computes the same step)"
            skip = "--divergence.action skip" if self.command_line else "DivergenceGuard('skip')"
            resume = f"--ckpt_path {at_step}" if self.command_line else f"trainer.fit(..., ckpt_path={at_step!r})"
            fix = f"resume with {resume} and {skip} to drop that step (with a lower learning rate, model.optimizer)"
            return f"training diverged: {what} — {where} — {fix}, or train again"
        if good is None:
            fix = "lower the learning rate (model.optimizer), lengthen the warmup or set trainer.gradient_clip_val"
            return f"training diverged: {what} — no good checkpoint was written before it — {fix}, then train again"
        path, step, resumable = good
        # not a longer warmup: a resumed run keeps the warmup it has finished (WarmupCosineLR)
        fix = "lower the learning rate (model.optimizer) or set trainer.gradient_clip_val, then "
        if resumable:
            where = f"last good checkpoint: {path} (written after step {step})"
            resume = f"--ckpt_path {path}" if self.command_line else f"trainer.fit(..., ckpt_path={path!r})"
            fix += f"resume with {resume}"
        else:  # a weights-only save: no training state to resume
            where = f"last good checkpoint: {path} (written after step {step}; weights only)"
            start = f"--model.init_from {path}" if self.command_line else f"EPASModule(init_from={path!r})"
            fix += f"start a new run from its weights with {start}"
        return f"training diverged: {what} — {where} — {fix}"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def checkpoints_named(trainer: Trainer) -> set[str]:
    """The checkpoints the ``ModelCheckpoint`` callbacks name now: each one's newest, last and best (top k)."""
    keys = ("_last_checkpoint_saved", "last_model_path", "best_model_path")
    named = {getattr(c, key, "") for c in trainer.checkpoint_callbacks for key in keys}
    return {str(p) for c in trainer.checkpoint_callbacks for p in getattr(c, "best_k_models", {})} | named - {""}


def checkpoint_before(
    paths: set[str], step: int, skipped: Collection[int] = ()
) -> tuple[tuple[str, int, bool] | None, str | None]:
    """The newest of the checkpoints ``paths`` that still exist saved before optimizer step ``step`` (and not at a
    ``skipped`` one, whose weights gave a bad step), with the step it holds and whether it holds the training state to
    resume (not a weights-only save), and the newest saved at ``step`` that holds it, if any: it holds the weights that
    step starts from, so a resume from it computes the same non-finite loss or gradients again, whatever the learning
    rate. Read newest first."""
    at_step = None
    for path in sorted((Path(p) for p in paths if Path(p).exists()), key=lambda p: p.stat().st_mtime, reverse=True):
        saved_at, resumable = saved_step(path)
        if saved_at is not None and saved_at < step and saved_at not in skipped:
            return (str(path), saved_at, resumable), at_step
        if saved_at == step and resumable:  # a weights-only one cannot be resumed, skipping the step
            at_step = at_step or str(path)
    return None, at_step


def saved_step(path: Path) -> tuple[int | None, bool]:
    """The optimizer step the checkpoint ``path`` holds (``None`` when it does not load or say), and whether it holds
    the training state to resume: Lightning writes no callback states into a weights-only one."""
    from epas_lightning.checkpoint_formats import read_checkpoint

    try:
        metadata = read_checkpoint(path, weights=False, flag="checkpoint")[1]
    except UserError:
        return None, False
    step = metadata.get("global_step")
    return (step if isinstance(step, int) else None), not is_weights_only(metadata)


def last_checkpoint(trainer: Trainer) -> str | None:
    """The newest checkpoint file or directory that this run's ``ModelCheckpoint`` callbacks wrote, if any."""
    written = []
    for callback in trainer.checkpoint_callbacks:
        for name in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
            path = getattr(callback, name, "")
            if path and Path(path).exists():
                written.append(Path(path))
    return str(max(written, key=lambda p: p.stat().st_mtime)) if written else None


def check_resumed_finite(trainer: Trainer, model: torch.nn.Module) -> None:
    """Refuse the checkpoint ``trainer.ckpt_path`` restored when its weights or optimizer state hold NaN or inf (a run
    without the guard, a bad copy), before they are used: training from it stopped a step later as a divergence
    whose advice (a lower learning rate) could not help, and ``validate`` scored it ``nan``. Ranks agree (each checks
    its shards), so they all stop together; the first says it."""
    weights, state = non_finite_restored(model, trainer.optimizers)
    if not ranks_agree(trainer, bool(weights or state), all=False):
        return
    from epas_lightning.weight_checks import NOT_FINITE_FIX

    path = trainer.ckpt_path
    weights, state = every_ranks(weights), every_ranks(state)  # a sharded checkpoint's are on some ranks only
    if weights:
        what = f"the weights hold NaN or inf ({listed(weights)})"
        fix = NOT_FINITE_FIX
    else:
        what = f"the optimizer state holds NaN or inf ({listed(state)})"
        fix = f"resume an earlier checkpoint of the run, or start a new run from its weights: --model.init_from {path}"
    error = CheckpointError(what, f"--ckpt_path {path}", fix)
    error.announce = trainer.is_global_zero  # every rank raises it; the command line says it once
    raise error


def every_ranks(names: list[str]) -> list[str]:
    """``names`` of every rank (once each, in rank order) when a process group runs, else ``names``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return names
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return list(dict.fromkeys(name for rank_names in gathered for name in rank_names or []))


def optimizer_state(optimizers: list[torch.optim.Optimizer]) -> Iterator[tuple[torch.Tensor, str, torch.Tensor]]:
    """Each floating-point tensor of the optimizers' per-parameter state (``exp_avg``, ``exp_avg_sq``; not AdamW's
    step count), as (parameter, key, tensor)."""
    for optimizer in optimizers:
        yield from state_tensors(optimizer.state)


def non_finite_restored(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[list[str], list[str]]:
    """The names of this rank's weights (its shards) and optimizer-state entries (``exp_avg of norm.weight``) that
    hold NaN or inf; one device sync when there are none."""
    weights = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    names = {p: name for name, p in model.named_parameters()}
    state = {state_entry(key, names.get(p, "a parameter")): t for p, key, t in optimizer_state(optimizers)}
    if bool(all_finite([*weights.values(), *state.values()])):
        return [], []
    return [n for n, t in weights.items() if not all_finite([t])], [n for n, t in state.items() if not all_finite([t])]
