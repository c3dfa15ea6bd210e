"""Lightning callbacks: ``ProgressiveSharing`` grows the sharing region; ``TokenThroughputMonitor`` counts tokens;
``StepLearningRateMonitor`` logs the learning rate once per optimizer step."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from contextvars import ContextVar
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype  # the dtype its matmuls run in
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from epas_lightning.checkpoint_formats import read_checkpoint
from epas_lightning.errors import ConfigError
from epas_lightning.flops import flop_cut, peak_dtype_name, peak_flops
from epas_lightning.heldout_metric import HeldOutLoss
from epas_lightning.loss import heldout_mean, real_rows, token_losses
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.config import REUSED
from epas_lightning.region import REGION_KEY, TrainedRegion, layers_asked_for, region_in_growth_order
from epas_lightning.safe_load import is_weights_only, release_kept_read
from epas_lightning.schedule import (
    GrowthOrder,
    SharingSchedule,
    TargetSpec,
    check_order,
    check_pace,
    resolve_target,
)
from epas_lightning.trainer_call import NOT_KNOWN, restored_checkpoint

SCORING_A_CHECKPOINT: ContextVar[bool] = ContextVar("scoring_a_checkpoint", default=False)
"""Set while the command line builds ``validate``/``test --ckpt_path``'s objects: ``val_sharing_layers`` count the
region the checkpoint trained, which is read later, so lengths past the configured target are not refused yet."""


class ProgressiveSharing(Callback):
    """Grows the sharing region deep -> shallow during training (Algorithm 1 of the EPAS paper; see ``order``).

    The mask is a pure function of ``trainer.global_step`` (optimizer steps), applied before every training batch,
    so all ranks and all micro-batches of an accumulation window agree, and a resumed run continues exactly.

    It drives the :class:`~epas_lightning.Llama` of the LightningModule: its ``model`` (``EPASModule``'s), else the one
    ``Llama`` among the submodules of a module of one's own (built in ``__init__``; one built in ``configure_model``
    needs its ``LlamaConfig`` as the module's ``config``, as ``EPASModule`` has it).

    Args:
        target: The full region: a layer count (``6``), a fraction of the layers (``0.5``) or an explicit contiguous
            list in growth order (``[11, 10, 9]``; ``[1, 2, 3]`` with ``shallow_first``). Layer 0 can never share.
        growth: Layers added per stage (B); must divide the region size.
        interval: Optimizer steps between stages (I).
        start_step: Optimizer step of the first stage; default ``interval``.
        n_layer: Layers of the model (linked from ``model.config`` by the CLI); checked against the model.
        enabled: ``False`` trains dense (every layer computes) with the same config; the target is then not checked
            against the model (a 1-layer model trains), unless ``val_sharing_layers`` scores regions of it.
        order: ``deep_first`` (the paper): the deepest layers, growing shallower. ``shallow_first`` (an ablation):
            the layers right after layer 0, growing deeper (layer 1, then 1-2, ...).
        val_sharing_layers: Region lengths at which every validation (and ``test``) also scores the held-out batches,
            each the first N layers of ``target`` in growth order (``[0, 6]``: dense and the full region, before the
            run reaches it; ``validate``/``test`` of a checkpoint: of the target it trained), logged as
            ``val/loss_at_sharing/N`` (``test/...``) beside ``val/loss``, which stays the current region's. Each
            length costs one more forward per held-out batch (counted in the ``validate/`` throughput, its time and
            FLOPs); the training region is put back after every batch. Default: none.
    """

    def __init__(
        self,
        target: TargetSpec = 0.5,
        growth: int = 1,
        interval: int = 100,
        start_step: int | None = None,
        n_layer: int | None = None,
        enabled: bool = True,
        order: GrowthOrder = "deep_first",
        val_sharing_layers: list[int] | None = None,
    ) -> None:
        check_order(order)
        check_pace(growth, interval, start_step)  # before any data is prepared, also without n_layer
        self.val_sharing_layers = _region_lengths(val_sharing_layers)
        if hasattr(target, "tolist"):  # a numpy array or number: plain types, as a checkpoint saves and resume compares
            target = target.tolist()
        self.target = list(target) if isinstance(target, (list, tuple)) else target
        self.growth = growth
        self.interval = interval
        self.start_step = start_step
        self.n_layer = n_layer
        self.enabled = enabled
        self.order = order
        self.schedule: SharingSchedule | None = None
        self._val_regions: dict[int, list[int]] = {}  # per length of val_sharing_layers, the layers that share
        if n_layer is not None:  # fail at construction (before any data is prepared) when we can
            self.schedule = self._build(n_layer, check_lengths=not SCORING_A_CHECKPOINT.get())
        self._applied: list[int] | None = None
        self._resumed_settings: dict[str, Any] | None = None
        self._recorded_region: Any = None  # the region record of the checkpoint validate/test loaded
        self._resumed_step = 0  # the step of the checkpoint a run resumes
        self.reached_at: int | None = None
        """The step at which the region reached its full size (kept across a resume; ``None``: not yet)."""
        self._heldout: dict[int, HeldOutLoss] = {}  # per extra region length, the current validation's loss
        self._region: tuple[tuple[Any, ...], TrainedRegion] | None = None  # _region_of's last, and what it was of

    def _build(self, n_layer: int, check_lengths: bool = True) -> SharingSchedule | None:
        """The schedule for ``n_layer`` layers, checked; ``None`` when nothing reads it: sharing is off and no
        validation scores a region (a 1-layer dense model has no layer that could share). Without ``check_lengths``
        (scoring a checkpoint, whose region counts), lengths of ``val_sharing_layers`` past the target are left for
        :meth:`on_validation_start`."""
        if not self.enabled and not self.val_sharing_layers:
            self._val_regions = {}
            return None
        schedule = SharingSchedule.build(n_layer, self.target, self.growth, self.interval, self.start_step, self.order)
        target = TrainedRegion(n_layer, schedule.target_layers, self.order)
        fit = check_lengths or all(n <= target.size for n in self.val_sharing_layers)
        self._val_regions = self._regions_of(target) if fit else {}
        return schedule

    def _regions_of(self, target: TrainedRegion, whose: str = "the target region") -> dict[int, list[int]]:
        """Per length of ``val_sharing_layers``, the layers that share: the first ones of ``target`` (a region in
        growth order); a length longer than it is refused."""
        if too_long := [n for n in self.val_sharing_layers if n > target.size]:
            raise ConfigError(
                f"{layers_asked_for(too_long[0])}; {whose} has {target.size} (layers {list(target.layers)})",
                "sharing.val_sharing_layers",
                f"choose lengths in 0..{target.size}",
            )
        return {n: target.first(n) for n in self.val_sharing_layers}

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``validate``/``test`` of a checkpoint: ``val_sharing_layers`` count the region it trained (its target, in
        its growth order, restored with its state), as its run's validations did, whatever this run's
        ``sharing.target`` and ``order`` are (they counted those: a region the checkpoint never trained). A
        weights-only checkpoint holds no state: the region it records counts, where the configured target does not
        begin with it."""
        recorded, self._recorded_region = self._recorded_region, None
        if trainer.state.fn == TrainerFn.FITTING:  # on_train_start compares a resumed fit's settings
            return
        saved, self._resumed_settings = self._resumed_settings, None
        if not self.val_sharing_layers:
            return
        n_layer = sharing_model(pl_module).config.n_layer
        found = self._checkpoint_region(saved, recorded, n_layer)
        if found is None:  # the configured target counts; lengths past it were left for a region of the checkpoint
            if not self._val_regions:
                self._val_regions = self._regions_of(TrainedRegion(n_layer, self.schedule.target_layers, self.order))
            return
        trained, whose = found
        self._val_regions = self._regions_of(trained, whose)
        rank_zero_info(
            f"EPAS: sharing.val_sharing_layers count {whose}, layers {list(trained.layers)} "
            f"({trained.order}), not sharing.target's {list(self.schedule.target_layers)} ({self.order})"
        )

    on_test_start = on_validation_start

    def _checkpoint_region(
        self, saved: dict[str, Any] | None, recorded: Any, n_layer: int
    ) -> tuple[TrainedRegion, str] | None:
        """The region a scored checkpoint trained, and how errors name it: its schedule's target (``saved``), else
        the region it records (``recorded``, weights-only); ``None`` where the configured target counts (it has the
        same region, or begins with the recorded one, or the checkpoint says nothing readable)."""
        if saved:
            trained = _saved_target(saved, n_layer)
            if trained is None or (trained.layers == self.schedule.target_layers and trained.order == self.order):
                return None
            return trained, "the checkpoint's target region"
        if recorded is not None:
            trained = _recorded_region(recorded, n_layer)
            begins = trained is not None and self.schedule.target_layers[: trained.size] == trained.layers
            if trained is None or (begins and trained.order == self.order):
                return None
            return trained, "the checkpoint's region"
        return None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_alone(trainer.callbacks)
        n_layer = _n_layer(pl_module)
        if self.n_layer is not None and self.n_layer != n_layer:
            raise ConfigError(
                f"ProgressiveSharing was configured for {self.n_layer} layers, the model has {n_layer}",
                "sharing.n_layer",
                f"set it to {n_layer}, or leave it unset (the model's)",
            )
        self.schedule = self._build(n_layer, check_lengths=stage == "fit")  # validate/test: the checkpoint's region
        scored = stage in ("validate", "test") and self.val_sharing_layers
        ckpt_path = restored_checkpoint(trainer) if scored else None
        known = ckpt_path is not None and ckpt_path is not NOT_KNOWN
        if known and _is_local_file_protocol(ckpt_path):  # before Lightning loads its weights; a remote one (an fsspec
            # URL) only Lightning reads, and one not known here: on_validation_start checks it once loaded
            try:
                self.check_scored_checkpoint(read_checkpoint(ckpt_path, weights=False, flag="ckpt_path")[1], n_layer)
            finally:  # Lightning reads it whole next: a legacy file's whole read is not held beside that, or on
                release_kept_read(Path(ckpt_path).expanduser())  # after a refusal
        if stage == "fit" and self.enabled:
            refuse_static_graph(trainer.strategy, self.schedule)
            let_ddp_find_unused_parameters(trainer, self.schedule.start_step)
            rank_zero_info(
                f"EPAS: region {list(self.schedule.target_layers)} grows by {self.growth} layer(s) every "
                f"{self.interval} steps from step {self.schedule.start_step}; full at step {self.schedule.final_step}."
            )

    def _check_alone(self, callbacks: list[Callback]) -> None:
        """Refuse a second schedule among ``callbacks``: each would set the region before every batch, the last one's
        winning, and both would save their state (Lightning refuses two of one class, not a subclass beside it)."""
        others = [c for c in callbacks if isinstance(c, ProgressiveSharing) and c is not self]
        if others:
            named = " and ".join(f"{type(c).__name__}(target={c.target!r})" for c in (self, *others))
            raise ConfigError(
                f"one Trainer has {len(others) + 1} sharing schedules, {named}: each would set the region",
                "trainer.callbacks",
                "keep one ProgressiveSharing (the command line's is the `sharing` section)",
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        total = trainer.estimated_stepping_batches  # the run's optimizer steps (inf: no limit)
        final, full = self.schedule.final_step, len(self.schedule.target_layers)
        if math.isfinite(total) and final >= total > self._resumed_step:  # resumed at the end: nothing trains
            reached = len(self.schedule.shared_layers_at(int(total) - 1))
            rank_zero_warn(
                f"EPAS: the run ends after {optimizer_steps(int(total))} and reaches {reached} of the {full} "
                f"layer{'' if full == 1 else 's'} of its region (full at step {final}); raise trainer.max_steps, or "
                "lower sharing.start_step or sharing.interval, to train with the full region"
            )

    def shared_layers_at(self, step: int) -> list[int]:
        if not self.enabled:
            return []
        return self.schedule.shared_layers_at(step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        layers = self.shared_layers_at(step)
        model = sharing_model(pl_module)
        if layers != model.sharing.shared_layers:
            model.set_shared_layers(layers)
            rank_zero_info(f"EPAS: step {step}: {len(layers)} sharing layer(s) {self.in_growth_order(layers)}")
            if self.enabled and self.reached_at is None and len(layers) == len(self.schedule.target_layers):
                self.reached_at = step
        self._applied = layers
        model.trained_region = self._region_of(model)  # set_region counts N in it after fit, as in a checkpoint of it
        pl_module.log("sharing/layers", host_scalar(len(layers)), on_step=True, on_epoch=False)
        seq_len = batch.shape[1] - 1 if isinstance(batch, torch.Tensor) else model.config.block_size
        # of dense training FLOPs, this step
        cut = flop_cut(model.config, len(layers), seq_len, model.attention_reuse) if layers else 0.0
        pl_module.log("sharing/flop_cut", host_scalar(cut), on_step=True, on_epoch=False)

    @property
    def scored_lengths(self) -> list[int]:
        """The region lengths the validation (or test) running, or the last one, also scores every held-out batch at."""
        return list(self._heldout)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # created anew, not reset: like EPASModule's held-out metrics, whatever happened to the tensors in between
        self._heldout = {n: heldout_mean(pl_module.device) for n in self._val_regions}

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        if not self._heldout:
            return
        model = sharing_model(pl_module)
        current = model.sharing.shared_layers
        try:  # in the precision validation_step ran in (this hook runs outside its autocast)
            with trainer.precision_plugin.val_step_context():
                for n, layers in self._val_regions.items():
                    model.set_shared_layers(layers)
                    losses, real = token_losses(model, batch)
                    self._heldout[n].update(losses, real)
        finally:
            model.set_shared_layers(current)  # the region training (or the checkpoint) has, exactly

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_heldout(pl_module, "val")

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_heldout(pl_module, "test")

    def _log_heldout(self, pl_module: LightningModule, prefix: str) -> None:
        """Token-weighted means, reduced over the ranks by ``compute()`` (so the same on each: ``max`` keeps them)."""
        for n, loss in self._heldout.items():
            pl_module.log(f"{prefix}/loss_at_sharing/{n}", loss.compute(), sync_dist=True, reduce_fx="max")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # plain types at the top level, so every reader finds the region without knowing the callback's state key
        checkpoint[REGION_KEY] = self._region_of(sharing_model(pl_module)).to_record()

    def _region_of(self, model: Llama) -> TrainedRegion:
        """The region ``model`` shares now, in growth order: what a checkpoint records, and ``set_region`` counts in.

        Built again only when what it is made of changes (the mask, the schedule, the order), not at every
        micro-batch: the same mask, schedule and order give the same (frozen) region."""
        key = (model.config.n_layer, model.sharing.flags, self.schedule, self.order)
        if self._region is not None and self._region[0] == key:
            return self._region[1]
        shared = model.sharing.shared_layers
        in_order = sorted(shared, reverse=self.order == "deep_first")  # no schedule: the direction's order
        if self.schedule is not None:
            in_order = region_in_growth_order(self.schedule.target_layers, shared)
        region = TrainedRegion(model.config.n_layer, tuple(in_order), self.order)
        self._region = (key, region)
        return region

    def in_growth_order(self, layers: list[int]) -> list[int]:
        """Sharing ``layers`` (the mask's, ascending) as the messages list them, in the order "N sharing layers"
        counts them: the order the schedule's target adds them (with no schedule, its order's direction), any outside
        the target after them."""
        if self.schedule is None:
            return sorted(layers, reverse=self.order == "deep_first")
        ordered = list(region_in_growth_order(self.schedule.target_layers, layers))
        return ordered + sorted(set(layers).difference(ordered))

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resumed_step = int(checkpoint.get("global_step") or 0)
        if is_weights_only(checkpoint):  # (EPASModule calls this for one): its one record of the region
            self._recorded_region = checkpoint.get(REGION_KEY)

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "growth": self.growth,
            "interval": self.interval,
            "start_step": self.start_step,
            "enabled": self.enabled,
            "order": self.order,
            "shared_layers": self._applied,
            "reached_at": self.reached_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reached_at = state_dict.get("reached_at")
        self._resumed_settings = _saved_settings(state_dict)

    def check_scored_checkpoint(self, checkpoint: dict[str, Any], n_layer: int | None = None) -> None:
        """``validate``/``test`` of a checkpoint, before it loads: lengths of ``val_sharing_layers`` past the region it
        trained are refused from ``checkpoint``, its metadata (its state of this callback; of a weights-only one, the
        region it records), as :meth:`on_validation_start` refuses them once it has loaded. ``n_layer``: the model's
        (default: the configured ``n_layer``; :meth:`setup` calls it with the model's for a ``Trainer`` call)."""
        n_layer = self.n_layer if n_layer is None else n_layer
        if not self.val_sharing_layers or self.schedule is None or n_layer is None:
            return
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        saved = _saved_settings(state) if isinstance(state, dict) else None
        recorded = checkpoint.get(REGION_KEY) if is_weights_only(checkpoint) else None
        configured = (TrainedRegion(n_layer, self.schedule.target_layers, self.order),)
        self._regions_of(*(self._checkpoint_region(saved, recorded, n_layer) or configured))

    def _same_schedule(self, saved: dict[str, Any], n_layer: int) -> bool:
        """Whether the checkpoint's settings ``saved`` grow the same region at the same steps as the configured ones
        (``target: 0.5`` and its list of layers, an unset ``start_step`` and one equal to ``interval``)."""
        if saved["enabled"] != self.enabled:
            return False
        if not self.enabled:  # dense in both: no layer shares at any step
            return True
        try:
            knobs = (saved["target"], saved["growth"], saved["interval"], saved["start_step"], saved["order"])
            return SharingSchedule.build(n_layer, *knobs) == self.schedule
        except (ConfigError, TypeError):  # settings this version no longer reads: they differ
            return False

    def _same_target(self, saved: dict[str, Any], n_layer: int) -> bool:
        """Whether the checkpoint's settings ``saved`` have the configured target region (none without a schedule)."""
        if self.schedule is None:
            return False
        try:
            return resolve_target(saved["target"], n_layer, saved["order"]) == self.schedule.target_layers
        except ConfigError:  # the target of a run without sharing, never checked
            return False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After a resume with other settings than the checkpoint's, say what the configured schedule does to the
        region at the resumed step: layers that leave it compute again with the q/k (kv mode: k/v) weights they had
        before they shared (those got no update since)."""
        read_from_resumed_position(trainer)
        saved, self._resumed_settings = self._resumed_settings, None
        current = {k: getattr(self, k) for k in saved or {}}
        if saved is None or saved == current:
            return
        model = sharing_model(pl_module)
        if self._same_schedule(saved, model.config.n_layer):  # spelled otherwise: start_step 100 for the default
            return
        if not self._same_target(saved, model.config.n_layer):
            self.reached_at = None  # the step the checkpoint's region was full at is not this region's
        step, trained = trainer.global_step, model.sharing.shared_layers
        layers = self.shared_layers_at(step)
        changed = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in saved if saved[k] != current[k])
        said = f"EPAS: resumed at step {step} with another sharing schedule than the checkpoint's ({changed}): "
        before = _saved_target(saved, model.config.n_layer)  # each region listed in its schedule's growth order
        trained = before.in_growth_order(trained) if before is not None else self.in_growth_order(trained)
        if sorted(layers) == sorted(trained):
            said += f"the region stays {trained or 'empty'} at this step and follows the configured schedule from here"
        else:
            said += f"the region goes from layers {trained or 'none'} to {self.in_growth_order(layers) or 'none'}"
        if left := [i for i in trained if i not in layers]:
            said += (
                f"; layers {left} compute again with the {REUSED[model.config.sharing_mode].lower()} weights they had "
                "before they shared (keep the checkpoint's sharing settings to continue its region)"
            )
        rank_zero_warn(said)


def _saved_settings(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The schedule settings of a checkpoint's state of :class:`ProgressiveSharing` (its ``state_dict``)."""
    saved = {k: state_dict.get(k) for k in ("target", "growth", "interval", "start_step", "enabled")}
    saved["order"] = state_dict.get("order", "deep_first")  # checkpoints from before the option grew deep-first
    return saved


def _saved_target(saved: dict[str, Any], n_layer: int) -> TrainedRegion | None:
    """The target region of a checkpoint's schedule settings ``saved``; ``None`` for settings this version no longer
    reads."""
    try:
        return TrainedRegion(n_layer, resolve_target(saved["target"], n_layer, saved["order"]), saved["order"])
    except (ConfigError, TypeError):
        return None


def _recorded_region(record: Any, n_layer: int) -> TrainedRegion | None:
    """The region a checkpoint records (:data:`REGION_KEY`); ``None`` for a record that is not one."""
    try:
        return TrainedRegion.from_record(record, n_layer)
    except ConfigError:
        return None


def _region_lengths(lengths: Any) -> list[int]:
    """``val_sharing_layers`` as sorted distinct layer counts; anything else is one line naming the setting."""
    if lengths is None:
        return []
    if hasattr(lengths, "tolist"):  # a numpy array
        lengths = lengths.tolist()
    counts = isinstance(lengths, (list, tuple)) and all(isinstance(n, numbers.Integral) for n in lengths)
    if not counts or any(isinstance(n, bool) or n < 0 for n in lengths):
        raise ConfigError(
            f"region lengths must be a list of layer counts (0 and up), not {lengths!r}",
            "sharing.val_sharing_layers",
            "give e.g. [0, 6]: dense and the first 6 layers of the target region",
        )
    return sorted({int(n) for n in lengths})


def sharing_model(pl_module: LightningModule) -> Llama:
    """The ``Llama`` whose region ``ProgressiveSharing`` sets: ``pl_module.model`` (``EPASModule``'s), else the one
    ``Llama`` among the module's submodules; a :class:`ConfigError` saying what is needed when there is none."""
    model = getattr(pl_module, "model", None)
    if isinstance(model, Llama):
        return model
    found = [module for module in pl_module.modules() if isinstance(module, Llama)]
    if len(found) == 1:
        return found[0]
    raise ConfigError(
        f"ProgressiveSharing found {len(found) or 'no'} epas_lightning.Llama in {type(pl_module).__name__}",
        "ProgressiveSharing",
        "keep the Llama to grow as the module's `model` (as EPASModule does), or as its only Llama submodule; one "
        "built in configure_model needs its LlamaConfig as the module's `config`",
    )


def _n_layer(pl_module: LightningModule) -> int:
    """The layer count of the model ``ProgressiveSharing`` will drive, known before ``configure_model`` built it."""
    config = getattr(pl_module, "config", None)
    return config.n_layer if isinstance(config, LlamaConfig) else sharing_model(pl_module).config.n_layer


def batch_size(batch: torch.Tensor) -> int:
    """Samples in a token batch of shape (B, T + 1) (for ``ThroughputMonitor.batch_size_fn``)."""
    return batch.shape[0]


def optimizer_steps(n: int) -> str:
    """``"1 optimizer step"``, ``"2 optimizer steps"``: a count of steps as messages write it."""
    return f"{n} optimizer step{'' if n == 1 else 's'}"


def batch_tokens(batch: torch.Tensor) -> int:
    """Trained tokens in a batch of shape (B, T + 1) (for ``ThroughputMonitor.length_fn``: items/s = tokens/s)."""
    return batch.shape[0] * (batch.shape[1] - 1)


RUN_TOTALS = ("time", "batches", "samples", "lengths")
"""``TokenThroughputMonitor``'s counters of the whole run (Lightning's ``Throughput`` names), kept in checkpoints."""

COUNTS = ("batches", "samples", "lengths")
"""``Throughput``'s counts, which it keeps per device (rank zero's): logged for all processes, as its rates are."""

GLOBAL_RATES = ("batches_per_sec", "samples_per_sec", "items_per_sec", "flops_per_sec")
"""``Throughput``'s rates of all processes, which it takes as its device's (rank zero's) times the world size."""

HELDOUT_STAGES = (RunningStage.VALIDATING, RunningStage.TESTING)
"""The stages ``TokenThroughputMonitor`` counts held-out batches in (their real rows)."""

PEAK_MEMORY_KEY = "train/device/peak_memory_gib"
"""Logged on CUDA: the most memory the device has allocated so far (``torch.cuda.max_memory_allocated``), GiB."""


def read_from_resumed_position(trainer: Trainer) -> None:
    """Start the resumed fit's training data again, now that the checkpoint is restored: a run with ``max_epochs``
    (whose step count ``configure_optimizers`` and ``ProgressiveSharing`` ask for) made Lightning build and start the
    loader before it restored the loops, and then neither handed the loader its saved position nor started it again,
    so the resumed run read from the start of an epoch where the uninterrupted run was mid-epoch or in a later one."""
    fit_loop = trainer.fit_loop
    if not fit_loop._combined_loader_states_to_load or fit_loop._data_fetcher is None:
        return  # nothing resumed, or Lightning restored the position before it started the loader
    fit_loop._load_combined_loader_states()  # mid-epoch: the saved position
    fit_loop._combined_loader_states_to_load = []  # also at an epoch end, where Lightning restores none
    iter(fit_loop._data_fetcher)


def let_ddp_find_unused_parameters(trainer: Trainer, first_sharing_step: int) -> None:
    """Sharing layers skip their Q/K projections, so under DDP those weights get no gradient from the step the region
    first grows: DDP must look for unused parameters or it fails mid-run. Switch that on before DDP wraps the model
    (a plain ``strategy: ddp`` leaves it off), and say so: also that torch's warning, once per rank, that it found no
    unused parameters (a C++ warning, which no Python filter reaches) is expected before ``first_sharing_step``, also
    where the configuration switched it on itself."""
    strategy = trainer.strategy
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(strategy, DDPStrategy) or not isinstance(ddp_kwargs, dict):
        return
    already = bool(ddp_kwargs.get("find_unused_parameters"))
    if already and first_sharing_step == 0:
        return  # nothing to say: no torch warning comes
    ddp_kwargs["find_unused_parameters"] = True
    expected = (
        f"; torch's warning that it 'did not find any unused parameters' before step {first_sharing_step} is "
        "expected: keep the flag on"
        if first_sharing_step > 0
        else ""
    )
    state = "finds unused parameters" if already else "set to find_unused_parameters=True"
    rank_zero_info(
        f"EPAS: DDP {state} (sharing layers' q/k projections get no grad from step {first_sharing_step}){expected}"
    )


def refuse_static_graph(strategy: object, schedule: SharingSchedule) -> None:
    """Refuse DDP's ``static_graph=True`` for a region that grows during the run: it failed at the first growth, on
    every rank, with a traceback that asked for ``find_unused_parameters=True`` (which was set). A region whole from
    step 0 (``start_step`` 0, one stage) leaves the same parameters without gradients every step: that trains."""
    if not isinstance(strategy, DDPStrategy) or not getattr(strategy, "_ddp_kwargs", {}).get("static_graph"):
        return
    if schedule.final_step == 0:
        return
    grows = schedule.start_step or schedule.interval  # the first step whose region is not step 0's
    raise ConfigError(
        "DDP's static_graph=True cannot train a growing sharing region: the sharing layers' q/k projections stop "
        f"getting gradients at step {grows}, and a static graph fails there",
        "trainer.strategy: static_graph",
        "leave static_graph unset (find_unused_parameters=True is set for you)",
    )


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting tokens: ``train/device/items_per_sec`` is tokens/s per device.

    FLOPs (``train/device/flops_per_sec``) follow the sharing mask through ``EPASModule.flops_per_batch``, and
    ``train/device/mfu`` divides them by the device's dense peak in the run's precision (32-true: tf32's unless
    float32 matmul precision is ``highest``): ``epas_lightning.flops.peak_flops`` for the GPUs it knows (the H200
    too, which Lightning's table misses), else Lightning's figure; no MFU where neither knows it (CPUs). On CUDA it
    also logs the peak memory allocated (``train/device/peak_memory_gib``). The validations of a ``fit`` log their
    throughput (``validate/...``) once each, at the step ``val/loss`` is logged at.

    Under gradient accumulation the training rates are those of whole optimizer steps: the window holds one entry per
    step (its micro-batches, the gradient synchronisation and the update), where Lightning's held one per micro-batch
    and so weighted the update by where the window happened to start.

    The run's totals, ``train/time`` (training seconds), ``train/batches``, ``train/samples`` and ``train/lengths``
    (micro-batches, sequences and tokens trained), count the whole run: a resumed run continues them from its
    checkpoint (Lightning's started again from 0). Like the rates without ``device/``, the counts are those of all
    processes (Lightning's were rank zero's), ``validate/...``'s too. Held-out batches count (and their FLOPs cover)
    their real rows, not the pad rows that fill them: over W processes, the counts and the rates of all processes are
    every rank's where the held-out loader says them (``TokenDataModule``'s; a batch of pad rows alone counts as none),
    else rank zero's W times (it holds the most: up to W - 1 sequences, and batches, too many).

    Args:
        window_size: Entries over which the rates are averaged: optimizer steps in training, batches in validation;
            2 or more.
    """

    def __init__(self, window_size: int = 5) -> None:
        if not isinstance(window_size, int) or window_size < 2:  # Lightning's `assert window_size > 1`, at setup
            raise ConfigError(
                f"the throughput window must hold at least 2 entries, not {window_size}",
                "throughput.window_size",
                "set 2 or more (the rates are differences between its entries)",
            )
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self._resumed = dict.fromkeys(RUN_TOTALS, 0)  # the totals of the sessions before this one
        self._world_size = 1
        self._pending_flops: dict[RunningStage, float] = {}  # the FLOPs of the step's micro-batches so far
        self._trained_s = 0.0  # the training time when the validation now running started
        self._every_rank: dict[RunningStage, Throughput | None] = {}  # the held-out counts of all ranks

    def _start(self, trainer: Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        self._pending_flops.pop(stage, None)
        if stage in HELDOUT_STAGES and not self._samples.get(stage):  # Lightning's counts start again
            self._every_rank[stage] = Throughput(**self.kwargs)  # one device: rank zero's window, of every rank

    @torch.inference_mode()
    def _update(self, trainer: Trainer, pl_module: LightningModule, batch: Any, iter_num: int) -> None:
        """Count the batch (of a held-out one its real rows, not its pad rows); in training, update the rates only at
        the micro-batch that ends an optimizer step."""
        stage = trainer.state.stage
        every_rank = self._rows_of_each_rank(trainer, stage) if stage in HELDOUT_STAGES else None
        rows = batch_size(batch) if stage == RunningStage.TRAINING else int(real_rows(batch))
        if not rows:
            return  # all pad rows: no held-out batch (its time counts in the next one's)
        self._lengths[stage] += rows * (batch.shape[1] - 1)
        self._samples[stage] += rows
        self._batches[stage] += 1
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is not None:
            self._pending_flops[stage] = self._pending_flops.get(stage, 0.0) + flops
        if stage == RunningStage.TRAINING and trainer.fit_loop._should_accumulate():
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, flops = time.perf_counter() - self._t0s[stage], self._pending_flops.pop(stage, None)
        self._throughputs[stage].update(
            time=elapsed,
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=flops,
        )
        if every_rank is not None and (counts := self._every_rank.get(stage)) is not None:
            batches, samples, lengths = _last_counts(counts)
            rows_of_all = sum(every_rank)
            batches += sum(1 for rows_of_one in every_rank if rows_of_one)  # a rank's batch of pad rows alone: none
            lengths += rows_of_all * (batch.shape[1] - 1)
            flops = None if flops is None else flops * rows_of_all / rows  # a batch's FLOPs: its rows' (per row alike)
            counts.update(time=elapsed, batches=batches, samples=samples + rows_of_all, lengths=lengths, flops=flops)

    def _rows_of_each_rank(self, trainer: Trainer, stage: RunningStage) -> list[int] | None:
        """The samples that this held-out batch number holds on each rank, where the loader says them
        (``HeldOutBatches.rows_of_each_rank``); else ``None``, and the counts are rank zero's W times from here on."""
        loop = trainer._evaluation_loop
        loader = loop._combined_loader.iterables if loop._combined_loader is not None else None  # one: a DataLoader
        rows_of_each_rank = getattr(getattr(loader, "dataset", None), "rows_of_each_rank", None)
        if rows_of_each_rank is None:
            self._every_rank[stage] = None
            return None
        return rows_of_each_rank(loop.batch_progress.current.ready - 1)  # this batch's number in the pass

    def _of_all_processes(self, stage: RunningStage, metrics: dict[str, Any], world_size: int) -> dict[str, Any]:
        """:func:`_all_processes`, with the held-out counts, and the rates of all processes, of every rank where they
        were counted."""
        metrics = _all_processes(metrics, world_size)
        counts = self._every_rank.get(stage) if stage in HELDOUT_STAGES else None
        if counts is not None and counts._time:
            exact = counts.compute()
            metrics.update({key: exact[key] for key in COUNTS})
            for rate in GLOBAL_RATES:
                if rate in metrics:  # world_size > 1, the window full
                    metrics[rate] = exact[f"device{counts.separator}{rate}"]
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self._run_totals()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = {key: state_dict.get(key, 0) for key in RUN_TOTALS}

    def _run_totals(self) -> dict[str, Any]:
        """The run's totals so far: those of the sessions before this one plus this session's (rank zero counted its
        own batches: every process trains as many, of the same shape)."""
        stage = RunningStage.TRAINING
        times = self._throughputs[stage]._time if stage in self._throughputs else []
        session = {
            "time": times[-1] if times else 0.0,
            "batches": self._batches.get(stage, 0),
            "samples": self._samples.get(stage, 0),
            "lengths": self._lengths.get(stage, 0),
        }
        return {key: self._resumed[key] + value for key, value in _all_processes(session, self._world_size).items()}

    def _compute(self, trainer: Trainer, iter_num: int | None = None) -> None:
        """Lightning's, with the counts of all processes, and in training the run's totals in place of the session's."""
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        throughput = self._throughputs[stage]
        if not throughput._time:
            return  # nothing counted yet: a held-out batch of pad rows alone
        metrics = self._of_all_processes(stage, throughput.compute(), trainer.world_size)
        if stage == RunningStage.TRAINING:
            metrics.update(self._run_totals())
        metrics = {f"{stage.value}{throughput.separator}{k}": v for k, v in metrics.items()}
        if iter_num is None:  # the step Lightning would take, given: without one it adds `epoch`, logged already
            iter_num = trainer.fit_loop.epoch_loop._batches_that_stepped
        trainer._logger_connector.log_metrics(metrics, step=iter_num)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed checkpoint's totals are loaded
            self._resumed = dict.fromkeys(RUN_TOTALS, 0)
        self._world_size = trainer.world_size
        peak = peak_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        with warnings.catch_warnings():
            if peak is not None:  # Lightning's own table lacks it (e.g. the H200) and says so: ours is used below
                warnings.filterwarnings("ignore", message="FLOPs not found for")
            super().setup(trainer, pl_module, stage)
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(peak)
        if self.available_flops:  # what MFU is a fraction of, said once: a figure to check against the datasheet
            device = trainer.strategy.root_device
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            dtype = peak_dtype_name(_plugin_to_compute_dtype(trainer.precision_plugin))
            tflops = self.available_flops / 1e12
            rank_zero_info(
                f"MFU (train/device/mfu) divides each device's FLOP/s by {tflops:,.1f} TFLOP/s: the dense "
                f"{dtype} peak taken for its {name}"
            )

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        """Within ``fit``, count the batch only: Lightning logged at every validation batch, at the count of validation
        batches as the step, which put ``validate/...`` among the training steps where no validation ran."""
        if trainer.state.fn != TrainerFn.FITTING:
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        elif not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = RunningStage.VALIDATING
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._batches.get(stage):
            throughput = self._throughputs[stage]
            metrics = self._of_all_processes(stage, throughput.compute(), trainer.world_size)
            metrics = {f"{stage.value}{throughput.separator}{k}": v for k, v in metrics.items()}
            trainer._logger_connector.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            # training time goes on from where the validation stopped it, also in the middle of a step (Lightning's
            # from the last update, which counted the step's micro-batches before the validation as validation time)
            self._t0s[RunningStage.TRAINING] = time.perf_counter() - self._trained_s

    @rank_zero_only
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self._trained_s = time.perf_counter() - self._t0s[RunningStage.TRAINING]
        super().on_validation_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        peak = peak_memory_gib(trainer.strategy.root_device)
        if peak is not None:
            pl_module.log(PEAK_MEMORY_KEY, host_scalar(peak), on_step=True, on_epoch=False)


def _last_counts(throughput: Throughput) -> tuple[int, int, int]:
    """The batches, samples and lengths ``throughput`` was last updated with (0 before its first update)."""
    if not throughput._time:
        return 0, 0, 0
    counted = throughput.compute()
    return counted["batches"], counted["samples"], counted["lengths"]


def _all_processes(metrics: dict[str, Any], world_size: int) -> dict[str, Any]:
    """``Throughput`` metrics with its per-device counts (:data:`COUNTS`) made those of all ``world_size`` processes."""
    return {key: value * world_size if key in COUNTS else value for key, value in metrics.items()}


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (same arguments), logging the learning rate once per optimizer step.

    Under gradient accumulation it logs at the micro-batch that steps the optimizer, with the rate that step uses
    (Lightning's logged at every micro-batch, each step's rate as many times as the step has micro-batches)."""

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop._should_accumulate():
            super().on_train_batch_start(trainer, *args, **kwargs)

    def _extract_stats(self, trainer: Trainer, interval: str) -> dict[str, float]:
        """Lightning's, with the rates it puts into ``callback_metrics`` as CPU tensors: it made each on the root
        device, on CUDA a blocking host-to-device copy (a device sync) per rate at every step it logs."""
        on_host = SimpleNamespace(
            lr_scheduler_configs=trainer.lr_scheduler_configs,
            optimizers=trainer.optimizers,
            callback_metrics={},
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        stats = super()._extract_stats(on_host, interval)
        trainer.callback_metrics.update(on_host.callback_metrics)
        return stats


def host_scalar(value: float) -> torch.Tensor:
    """``value`` as a float32 CPU tensor, to ``LightningModule.log`` at every step: from a Python number Lightning makes
    the tensor on the module's device, on CUDA a blocking host-to-device copy (a device sync) each time."""
    return torch.tensor(float(value), dtype=torch.float32)


def peak_memory_gib(device: torch.device) -> float | None:
    """The peak memory allocated on a CUDA device so far, in GiB; ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
