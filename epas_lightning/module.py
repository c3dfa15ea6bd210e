"""The LightningModule: owns the LLaMA (and with it the sharing mask), the loss, metrics and optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor

from epas_lightning.attention_kernels import sdpa_order
from epas_lightning.callbacks import ProgressiveSharing, optimizer_steps, read_from_resumed_position
from epas_lightning.checkpoint_formats import MODEL_PREFIX, SHARING_MASK
from epas_lightning.checkpoint_io import load_safely
from epas_lightning.divergence import DivergenceGuard, check_resumed_finite
from epas_lightning.errors import CheckpointError, ConfigError, DataError
from epas_lightning.flops import estimate_flops
from epas_lightning.global_batch import GLOBAL_BATCH_KEY, global_batch, global_batch_change
from epas_lightning.init_from import (
    check_init_source,
    check_init_weights,
    check_same_architecture,
    keeping_source_context,
    load_initial_weights,
    resumed_instead,
)
from epas_lightning.loss import heldout_mean, real_rows, token_losses, train_loss
from epas_lightning.loss_scaling import unscale_fused_gradients
from epas_lightning.lr import WarmupCosineLR, WarmupSchedule
from epas_lightning.memory_plan import on_device_bytes, plan_checkpointing
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.config import check_is_config
from epas_lightning.model.llama import check_attention_reuse
from epas_lightning.optim import (
    DEFAULT_ADAMW,
    check_same_optimizer,
    default_optimizer,
    optimizer_settings,
    param_groups,
    restore_settings,
)
from epas_lightning.parallel import PRECISIONS, checkpointed_blocks, mixed_precision_policy, parallelize
from epas_lightning.provenance import HELDOUT_KEY, LAST_VALIDATION_KEY
from epas_lightning.repeated_samples import warn_repeated_validation_samples
from epas_lightning.run_checkpoint import (
    StepCheckpoint,
    adopt_model_checkpoint_states,
    end_restart,
    finish_resume,
    keep_epoch_finished,
    resume_record,
    step_checkpoints,
)
from epas_lightning.runtime import DTYPES, dtype_name, has_native_bf16
from epas_lightning.safe_load import is_weights_only, plain_numbers, release_kept_read, verify_checkpoint
from epas_lightning.step_logging import (
    mean_over_ranks,
    on_lightnings_progress_bar,
    read_alike_on_every_rank,
    replace_logged,
    step_is_logged,
)
from epas_lightning.trainer_call import check_restored, restored_checkpoint
from epas_lightning.trainer_checks import check_gradient_clip

if TYPE_CHECKING:
    from epas_lightning.data.tokenizer import RecordedTokenizer
    from epas_lightning.region import TrainedRegion

WEIGHTS_DTYPE_KEY = "weights_dtype"
"""Checkpoint entry: the dtype the run stored its weights in (``float32``, ``bfloat16``)."""
CLI_CONFIG_FIX = "use the model.config it was trained with (its run folder keeps config.yaml)"
PYTHON_CONFIG_FIX = "pass the config it was trained with: epas_lightning.checkpoint.recorded_config(path)"
LOAD_CONFIG_FIX = "leave config= out: the checkpoint's own is used"
TRAIN_LOSS = "train/loss"


class EPASModule(LightningModule):
    """Causal-LM training of a :class:`Llama` whose sharing region ``ProgressiveSharing`` grows.

    Args:
        config: The model shape; ``config: {name: demo}`` in YAML picks a preset. With ``init_from``, the fields
            the YAML or flags leave unset are the source model's (``config: {block_size: 2048}`` is enough); in Python,
            ``epas_lightning.source_config(init_from, block_size=2048)`` builds that config.
        optimizer: Builds the optimizer from parameter groups (weight decay on matrices only).
            Default: ``AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)``.
        lr_scheduler: Builds a per-step LR scheduler from the optimizer. Default: ``WarmupCosineLR`` with
            ``warmup_steps=min(100, total // 10)``; a ``WarmupCosineLR`` or ``WarmupStableDecayLR`` with
            ``max_steps=None`` decays by the trainer's total number of optimizer steps; a run without a step limit
            (``max_steps`` and ``max_epochs`` -1) keeps the peak learning rate after the warmup (100 steps by
            default), with a warning.
        activation_checkpointing: Recompute decoder blocks' activations in backward (less memory, ~1/3 more compute
            per checkpointed block): ``True`` every block, an integer k the first k blocks, ``"auto"`` as many as a
            micro-batch needs to fit the GPU's free memory (``epas_lightning.memory_plan``; none on CPUs).
        compile: ``torch.compile`` each decoder block (``fullgraph``; ``True``: inductor, a string names another
            backend) and the training loss's softmax and gradient (``linear_cross_entropy``); a region switch costs
            at most one new graph.
        attention_reuse: With ``qk`` sharing, the source layer keeps its attention probabilities and every sharing
            layer computes only P @ V (exactly the same model; the sharing layers' dP flows back into the source).
            It materialises P (B, n_head, T, T) instead of a fused attention kernel: on GPUs FlashAttention is faster
            (leave it off); on CPUs it can win at long sequences once ``epas_lightning.cpu.tune_glibc_malloc()`` stops
            large tensors from page-faulting (``benchmarks/RESULTS.md``). ``generate``, ``chat``, ``bench``, ``serve``
            and ``evaluate`` turn it on.
        init_from: Start ``fit`` from these weights instead of a random init (continual pretraining): a local HF
            LLaMA directory (config.json + safetensors) or an EPAS checkpoint. ``config`` must describe the same
            architecture (checked, with every difference named, before any work, as are the names and shapes of
            the stored weights, read from the files' headers); a resumed checkpoint wins, and does not need them (gone
            or unreadable since, they are refused by a fit that starts from them: :meth:`check_init_from`). A
            source with more positions than ``block_size`` keeps them (``config.max_position_embeddings``), so the
            run's exports and inference take prompts as long as the source model did.
            ``validate``/``test`` (``predict``) without a checkpoint score (run) these weights (the run's baseline).
        attention_kernel: The fused attention kernel tried first (``epas_lightning.attention_kernels``): ``auto``
            cuDNN's on Hopper GPUs once a start-up check found it agrees with FlashAttention on this model's
            attention, elsewhere torch's own order; ``torch`` torch's order; ``cudnn`` or ``flash`` that kernel.
            The same model whichever runs.

    The :class:`Llama` (``module.model``, ``None`` until then) is built by ``configure_model``, which the trainer
    calls at the start of each stage; call it yourself to use the model outside a trainer. Under a strategy with a
    device mesh (``epas_lightning.strategy.FSDP2Strategy``) the model is built on the meta device and sharded per
    block with FSDP2, so no rank ever holds the full model.
    """

    def __init__(
        self,
        config: LlamaConfig,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        activation_checkpointing: bool | int | Literal["auto"] = False,
        compile: bool | str = False,
        attention_reuse: bool = False,
        init_from: str | None = None,
        attention_kernel: Literal["auto", "torch", "cudnn", "flash"] = "auto",
    ) -> None:
        super().__init__()
        check_is_config(
            config,
            "EPASModule(config=...)",
            "build it with LlamaConfig.from_name('demo', block_size=...), LlamaConfig(**fields), or "
            "source_config(init_from, block_size=...)",
        )
        check_builds("optimizer", optimizer, "functools.partial(torch.optim.AdamW, lr=1e-3)")
        check_builds("lr_scheduler", lr_scheduler, "functools.partial(epas_lightning.WarmupCosineLR, warmup_steps=100)")
        self._init_from_refusal: CheckpointError | None = None  # gone or unreadable: refused unless a fit resumes
        if init_from is not None:
            try:
                config = keeping_source_context(config, check_init_source(init_from, config))
            except CheckpointError as e:
                if Path(init_from).expanduser().exists():  # there, and not of this config: said at once
                    raise
                self._init_from_refusal = e
        self.config = config
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        self.attention_reuse = attention_reuse
        self.attention_kernel = attention_kernel
        check_attention_reuse(config, attention_reuse)  # before any model is built
        if init_from is not None and self._init_from_refusal is None:  # its files' headers: before any data
            try:
                check_init_weights(init_from, config, attention_reuse)
            except CheckpointError as e:
                self._init_from_refusal = e
        check_compile_backend(compile)
        if activation_checkpointing != "auto":
            try:
                checkpointed_blocks(activation_checkpointing, config.n_layer)
            except ValueError as e:
                raise ConfigError(
                    str(e).rstrip("."), "model.activation_checkpointing", "give true, false, auto or a block count"
                ) from e
        self.init_from = init_from
        self.model: Llama | None = None
        self._new_heldout_metrics()
        self._tokens_shape: tuple[int | torch.Tensor, int] | None = None  # rows (held-out: real ones), tokens
        self._built_on_meta = False
        self._start_weights_set = False  # the weights a stage starts from are set once (a later stage keeps them)
        self._last_validation: dict[str, float | int] | None = None  # fit's latest val/loss, for the checkpoints
        self._init_rng_state: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._loss_step: int | None = None  # the optimizer step whose micro-batch losses _loss_sum adds up
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._loss_reduced = True  # the train/loss this micro-batch logged is the mean over the ranks already
        self._optimizer_settings: list[dict] | None = None  # as configured, before a checkpoint's are loaded
        self._restored_checked = False  # the checkpoint this stage restored was checked for NaN and inf
        self._repeats_checked = False  # fit's validation loaders were checked for samples scored twice
        self._resumed_global_batch: object = None  # a resumed checkpoint's record, until training compares it
        self._resplit_note: str | None = None  # the datamodule's word on a resumed position, said with the above
        self._resume: tuple | None = None  # what a resume finishes where no StepCheckpoint does (checkpointing off)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO[bytes],
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> EPASModule:
        """Lightning's ``load_from_checkpoint`` for one ``.ckpt`` file, read without running code from it (always
        ``weights_only``: a file that needs more is refused in one line), with the ``config`` it records unless
        ``config=`` is given (a different one is refused, every differing field named)."""
        if isinstance(checkpoint_path, str | Path):
            where = "EPASModule.load_from_checkpoint"
            path = Path(checkpoint_path).expanduser()
            if path.is_dir():
                raise CheckpointError(
                    "a folder, not a .ckpt file", f"{where} {path}", "load folders with epas_lightning.load_model(path)"
                )
            verify_checkpoint(path, where)
            if "config" not in kwargs:
                from epas_lightning.checkpoint import recorded_config

                kwargs["config"] = recorded_config(path, where)
            release_kept_read(path)  # Lightning reads it whole: not held beside that
            checkpoint_path = path
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, True, **kwargs)

    @property
    def source_tokenizer(self) -> RecordedTokenizer | None:
        """The tokenizer file of the ``init_from`` model, where it has one (an HF folder's ``tokenizer.json`` or
        ``tokenizer.model``, the one our checkpoint recorded, with its hash): the training data must hold its ids."""
        if self.init_from is None or self._init_from_refusal is not None:
            return None
        from epas_lightning.checkpoint import describe_checkpoint  # reads HF folders and our checkpoints alike

        return describe_checkpoint(self.init_from, "model.init_from").recorded_tokenizer

    @property
    def source_tokenizer_sha256(self) -> str | None:
        """The hash of the tokenizer file ``init_from``'s weights trained with, where it records one: all a
        consolidated folder whose tokenizer was gone when it was consolidated keeps of it."""
        if self.init_from is None or self._init_from_refusal is not None:
            return None
        from epas_lightning.checkpoint import describe_checkpoint

        return describe_checkpoint(self.init_from, "model.init_from").tokenizer_sha256

    @property
    def starts_from_untokenized_source(self) -> bool:
        """Whether this call starts from ``init_from`` weights that name no tokenizer (an HF folder without
        ``tokenizer.json``/``tokenizer.model``): the data's ids cannot be checked against the ones they learned.
        Called from a hook of a ``Trainer`` call; a call that resumes a checkpoint reads no ``init_from``."""
        if self.init_from is None or self._init_from_refusal is not None:
            return False
        if self._trainer is None or restored_checkpoint(self.trainer) is not None:
            return False
        return self.source_tokenizer is None

    def check_init_from(self) -> None:
        """Refuse ``init_from`` where it was gone, or its weights did not read or fit, as the module was built: a fit
        that resumes a checkpoint never reads it (only then is that known), one that starts from it does. The command
        line calls it at once for a run that resumes nothing, before any data is prepared."""
        if self._init_from_refusal is not None:
            raise self._init_from_refusal

    def configure_callbacks(self) -> list[Callback]:
        """None of its own. The first hook of a ``Trainer`` call, before any data is prepared and before the loggers
        make their folders: a fit that starts from ``init_from`` (resumes nothing) refuses it here where it was gone,
        or its weights did not read or fit, as the module was built (:meth:`check_init_from`). Where the call's
        checkpoint is not known here, the refusal waits for training to start (a subclass's own
        ``configure_callbacks`` keeps it by extending ``super().configure_callbacks()``)."""
        if self.trainer.state.fn == TrainerFn.FITTING and restored_checkpoint(self.trainer) is None:
            self.check_init_from()
        return []

    def setup(self, stage: str) -> None:
        self._restored_checked = self._repeats_checked = False
        self._resumed_global_batch = self._resume = self._resplit_note = None  # until this stage's checkpoint is read
        load_safely(self.trainer.strategy)  # before Lightning opens a ckpt_path: a plain Trainer unpickled anything
        if stage == "fit":
            check_trainable_precision(self.trainer.precision)
            check_gradient_clip(self.trainer.gradient_clip_val)  # the command line checked its own
            warn_without_sharing_schedule(self.trainer.callbacks)
            warn_mid_step_checkpoints(self.trainer.callbacks, self.trainer.accumulate_grad_batches)
            if self.reads_checkpoints_as_saved():
                check_restored(self.trainer, self._check_resumed_metadata)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            check_sharded_precision(self.trainer.precision)
        warn_emulated_bf16(self.trainer.precision, self._root_device())

    def reads_checkpoints_as_saved(self) -> bool:
        """Whether this module reads a checkpoint as it lies on disk, so its metadata may be checked before the load:
        not where an ``on_load_checkpoint`` of one's own (a subclass's) may rewrite it first (an older run's)."""
        return type(self).on_load_checkpoint is EPASModule.on_load_checkpoint

    def _check_resumed_metadata(self, ckpt_path: str, checkpoint: dict) -> None:
        """Refuse what a resumed fit's checkpoint says against this run from its metadata (``checkpoint``, without
        its weights), before Lightning loads it (weights and optimizer state: minutes for a large model): another
        model config, data of another tokenizer, and what :meth:`check_resumable` refuses. The same checks run again
        as it loads (:meth:`on_load_checkpoint`)."""
        if recorded := checkpoint.get("model_config"):
            where = f"ckpt_path {ckpt_path}"
            check_resumed_model(self.config, LlamaConfig.from_dict(recorded), where, PYTHON_CONFIG_FIX)
        self.check_resumable(checkpoint, ckpt_path)
        check_data_tokenizer(getattr(self.trainer, "datamodule", None), checkpoint)

    def check_resumable(self, checkpoint: dict, ckpt_path: object) -> None:
        """Refuse a checkpoint a fit resumes (``checkpoint``: its metadata, without its weights) that holds no training
        state (a weights-only save), or another optimizer's state than the configured one's, before it loads. The
        command line calls it before any data is prepared."""
        check_holds_training_state(checkpoint, ckpt_path)
        saved_groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups") or []
        if saved_groups and (configured := self._configured_optimizer()) is not None:
            check_same_optimizer(configured, saved_groups, f"--ckpt_path {ckpt_path}")

    def _configured_optimizer(self) -> torch.optim.Optimizer | None:
        """The configured optimizer built on one stand-in parameter, for its type and settings before the model is
        built; ``None`` where it cannot be built so (an optimizer of one's own wanting the model's parameters), or
        where a ``configure_optimizers`` of one's own (a subclass's) builds another: the check waits for the run's."""
        if getattr(self.configure_optimizers, "__func__", None) is not EPASModule.configure_optimizers:
            return None
        stand_in = [torch.nn.Parameter(torch.zeros(1))]
        try:
            if self.optimizer_factory is None:
                return torch.optim.AdamW(stand_in, **DEFAULT_ADAMW)
            return self.optimizer_factory(stand_in)
        except Exception:  # noqa: BLE001 - a refused setting is said where the run's optimizer is built
            return None

    def configure_model(self) -> None:
        """Build the model and apply AC / compile / FSDP2 (idempotent).

        A model built on the meta device is materialised by the strategy and initialised in ``on_fit_start``.
        """
        if self.model is not None:
            return
        mesh = self.device_mesh
        if mesh is None:
            model = Llama(self.config, attention_reuse=self.attention_reuse)
        else:
            self._init_rng_state = _rng_state()  # `init_weights` draws from here later, whatever ran in between
            with torch.device("meta"):  # shard first, then allocate only the local shards
                model = Llama(self.config, attention_reuse=self.attention_reuse)
            mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        self.model = parallelize(
            model,
            mesh,
            mp_policy=mixed_precision_policy(precision) if mesh is not None else None,
            activation_checkpointing=self._checkpointing(mesh, model),
            compile=self.compile_blocks,
        )
        self.model.sdpa_order = sdpa_order(self.attention_kernel, self._root_device(), self.config)
        if self.model.sdpa_order is not None:
            names = ", ".join(kernel.name for kernel in self.model.sdpa_order)
            rank_zero_info(f"attention_kernel={self.attention_kernel!r}: SDPA kernels tried in the order {names}")
        self._built_on_meta = any(p.is_meta for p in self.model.parameters())

    def _root_device(self) -> torch.device:
        return self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def _checkpointing(self, mesh, model: torch.nn.Module) -> bool | int:  # noqa: ANN001
        """The ``activation_checkpointing`` setting, with ``"auto"`` resolved for this device and micro-batch."""
        if self.activation_checkpointing != "auto":
            return self.activation_checkpointing
        device = self._root_device()
        if device.type != "cuda":
            return False
        batch_size = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None)
        if batch_size is None:
            rank_zero_info("activation_checkpointing='auto': micro-batch size unknown, checkpointing every block")
            return True
        free, _ = torch.cuda.mem_get_info(device)
        free += on_device_bytes(model, device)  # one device, DDP: the weights are there already; the plan counts them
        k = plan_checkpointing(self.config, batch_size * self.config.block_size, free, mesh.size() if mesh else 1)
        rank_zero_info(f"activation_checkpointing='auto': {k} of {self.config.n_layer} blocks checkpointed")
        return k

    def on_fit_start(self) -> None:
        """Runs after the strategy materialised a meta-device model. One device and DDP restored a resumed checkpoint
        before it; FSDP2 restores it after (into the initialised shards), so there Lightning does not know yet
        whether one is resumed: ``init_from`` waits until training (or its sanity validation) starts."""
        self._initialise_meta_built()
        if self.init_from is None or not self.trainer.strategy.restore_checkpoint_after_setup:
            self._set_start_weights()

    def on_train_start(self) -> None:
        """A resumed optimizer keeps the configured settings (betas, weight decay, ...), as the learning rate follows
        the configured schedule: loading the checkpoint's optimizer state had put the saved ones back, silently."""
        self._set_start_weights()  # FSDP2's, after the restore
        self._check_restored()
        take_note = getattr(self.trainer.datamodule, "take_resplit_note", None)  # TokenDataModule's; before a batch
        self._resplit_note = take_note() if callable(take_note) else None
        read_from_resumed_position(self.trainer)
        if self._resume is not None:  # checkpointing off: no StepCheckpoint finished the resume
            resume, self._resume = self._resume, None
            finish_resume(self.trainer, *resume)
        if self.trainer.ckpt_path is None or self._optimizer_settings is None:
            return
        if changed := restore_settings(self.trainer.optimizers[0], self._optimizer_settings):
            rank_zero_info(f"optimizer: resumed with the configured {changed}")

    def on_train_epoch_end(self) -> None:
        if not step_checkpoints(self.trainer):  # else the first one does
            end_restart(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Say once, at the resumed fit's first batch (a ``GradientAccumulationScheduler`` has set the epoch's
        accumulation), when it trains other tokens per optimizer step than the checkpoint: the schedules count steps.
        What the same change of batch size or processes does to the data's position (the datamodule's note) is said
        in that line, not in one of its own."""
        if self._resumed_global_batch is None and self._resplit_note is None:
            return
        saved, self._resumed_global_batch = self._resumed_global_batch, None
        note, self._resplit_note = self._resplit_note, None
        if change := global_batch_change(saved, global_batch(self.trainer, self._train_seq_len())):
            rank_zero_warn(change if note is None else f"{change}; {note}")
        elif note is not None:
            rank_zero_info(note)

    def _train_seq_len(self) -> int:
        """Tokens a training sequence: the datamodule's ``seq_len``, else the model's ``block_size``."""
        seq_len = getattr(getattr(self.trainer, "datamodule", None), "seq_len", None)
        return seq_len if isinstance(seq_len, int) and seq_len > 0 else self.config.block_size

    def on_validation_start(self) -> None:
        # `validate`/`test` on their own run this after a checkpoint was restored: only without one are weights set;
        # in `fit` (FSDP2's sanity validation) after the restore, like `on_train_start`
        if self.trainer.state.fn == TrainerFn.FITTING or self.trainer.ckpt_path is None:
            self._set_start_weights()
        self._start_weights_set = True
        self._check_restored()
        if not self._repeats_checked:  # once a fit: its loaders are set up by now (sanity validation's too)
            self._repeats_checked = True
            warn_repeated_validation_samples(self.trainer)

    def on_test_start(self) -> None:
        self.on_validation_start()

    def on_predict_start(self) -> None:
        # predicted with the random init (and a meta-built model's uninitialised shards): nothing read init_from
        self.on_validation_start()

    def _check_restored(self) -> None:
        """Refuse a restored checkpoint holding NaN or inf, once a stage, after everything is restored (the weights
        and the optimizer state, FSDP2's too) and before anything runs on it (fit's sanity validation included)."""
        if self._restored_checked or self.trainer.ckpt_path is None:
            return
        self._restored_checked = True
        check_resumed_finite(self.trainer, self.model)

    def _set_start_weights(self) -> None:
        """Initialise a meta-built model, then load ``init_from`` unless a checkpoint is resumed; once per module,
        so a later stage (``validate`` after ``fit``) keeps the weights it finds."""
        if self._start_weights_set:
            return
        self._start_weights_set = True
        self._initialise_meta_built()
        if self.init_from is None:
            return
        if self.trainer.ckpt_path is None:
            self.check_init_from()
            load_initial_weights(self.model, self.init_from, self.trainer.state.fn.value)
            rank_zero_info(f"init_from: the weights start from {self.init_from}")
        else:
            rank_zero_info(resumed_instead(self.trainer.ckpt_path))

    def _initialise_meta_built(self) -> None:
        """Initialise a model built on the meta device (and materialised by the strategy), once."""
        if not self._built_on_meta:
            return
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            _set_rng_state(self._init_rng_state)
            self.model.init_weights()
        self._built_on_meta = False

    def set_shared_layers(self, layers: Iterable[int]) -> None:
        """Switch exactly ``layers`` to sharing (``ProgressiveSharing`` does it before every training batch)."""
        self._built_model().set_shared_layers(layers)

    @property
    def n_shared(self) -> int:
        return self._built_model().sharing.n_shared

    def _built_model(self) -> Llama:
        """``model``, or one line saying how to build it (it was "'NoneType' object is not callable")."""
        if self.model is None:
            raise ConfigError(
                "the model is not built yet: a Trainer builds it when fit, validate or test starts",
                "EPASModule.model",
                "call module.configure_model() first to use it outside a Trainer",
            )
        return self.model

    @property
    def last_validation(self) -> dict[str, float | int] | None:
        """``{"loss", "step"}`` of fit's latest validation: this run's, or the resumed checkpoint's until it validates
        again (``None`` where the resume changed the held-out data it was measured on)."""
        return None if self._last_validation is None else dict(self._last_validation)

    @property
    def flops_per_batch(self) -> float | None:
        """FLOPs of the last batch under the current mask (read by ``ThroughputMonitor``): forward and backward of a
        training batch; of a validation or test batch (the module is in eval mode there) the forward of its real rows
        (not its pad rows), and one more at each region length ``ProgressiveSharing`` also scores it at
        (``val_sharing_layers``)."""
        if self._tokens_shape is None or self.model is None:
            return None
        batch_size, seq_len = int(self._tokens_shape[0]), self._tokens_shape[1]
        reuse = self.model.attention_reuse
        flops = estimate_flops(self.config, self.n_shared, seq_len, backward=self.training, attention_reuse=reuse)
        if not self.training:
            lengths = self._scored_lengths()
            flops += sum(estimate_flops(self.config, n, seq_len, False, reuse) for n in lengths)
        return batch_size * flops

    def _scored_lengths(self) -> list[int]:
        """The region lengths the trainer's ``ProgressiveSharing`` scores each held-out batch at, besides the model's
        own region, in this validation or test (none elsewhere)."""
        trainer = self._trainer
        if trainer is None or not (trainer.validating or trainer.testing or trainer.sanity_checking):
            return []
        return [n for c in trainer.callbacks if isinstance(c, ProgressiveSharing) for n in c.scored_lengths]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if is_weights_only(checkpoint):  # Lightning called no callback's on_save_checkpoint
            for guard in (c for c in self.trainer.callbacks if isinstance(c, DivergenceGuard)):
                guard.check_before_save(self.trainer, self, weights_only=True)
            for sharing in (c for c in self.trainer.callbacks if isinstance(c, ProgressiveSharing)):
                sharing.on_save_checkpoint(self.trainer, self, checkpoint)  # the region, in its growth order
        # Plain types only, so the checkpoint stays loadable with ``weights_only=True``.
        checkpoint["model_config"] = self.config.to_dict()
        checkpoint[WEIGHTS_DTYPE_KEY] = dtype_name(self._weights_dtype())  # a sharded resume loads no state_dict
        if self.trainer.state.fn == TrainerFn.FITTING and (record := global_batch(self.trainer, self._train_seq_len())):
            checkpoint[GLOBAL_BATCH_KEY] = record
        if self._last_validation is not None:
            checkpoint[LAST_VALIDATION_KEY] = dict(self._last_validation)
        data = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:  # so `generate`, `export` and `evaluate` can find it without being told
            checkpoint["tokenizer"] = {
                "path": str(Path(tokenizer.path).resolve()),
                "bos_id": int(tokenizer.bos_id),
                "eos_id": int(tokenizer.eos_id),
                "sha256": tokenizer.sha256,  # as read: the file may be replaced (its data folder prepared again)
            }
            if hasattr(data, "heldout"):  # what `evaluate`, `bench` and `analyze` score without --data
                checkpoint[HELDOUT_KEY] = data.heldout().to_record()
        plain_numbers(checkpoint)  # the last hook to see it (after the callbacks'): settings given as numpy numbers

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # before Lightning loads the weights: a Trainer of one's own gets the check the CLI makes when it parses;
        # `EPASModule.load_from_checkpoint(path, config=...)` gets it too, with no trainer
        trainer = self._trainer
        if recorded := checkpoint.get("model_config"):
            where, fix = (
                ("EPASModule.load_from_checkpoint", LOAD_CONFIG_FIX)
                if trainer is None
                else (f"ckpt_path {trainer.ckpt_path}", PYTHON_CONFIG_FIX)
            )
            check_resumed_model(self.config, LlamaConfig.from_dict(recorded), where, fix)
        if trainer is not None:  # before Lightning restores the callbacks
            check_training_state(trainer, checkpoint)
            adopt_model_checkpoint_states(trainer, checkpoint)
            keep_epoch_finished(checkpoint)  # before Lightning restores the loops
        if trainer is not None and is_weights_only(checkpoint):  # no callback's hook is called
            for sharing in (c for c in trainer.callbacks if isinstance(c, ProgressiveSharing)):
                sharing.on_load_checkpoint(trainer, self, checkpoint)  # the region it records
        data = getattr(trainer, "datamodule", None)
        check_data_tokenizer(data, checkpoint)
        self._say_if_narrowed(checkpoint)
        if self.model is not None:  # built (load_from_checkpoint, a single-file restore): before its weights load
            self.model.trained_region = checkpoint_region(checkpoint, self.config.n_layer)
        saved_groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups") or []
        if trainer is not None and trainer.optimizers:  # FSDP2 restores after setup: built already
            check_same_optimizer(trainer.optimizers[0], saved_groups, f"--ckpt_path {trainer.ckpt_path}")
        else:  # one device, DDP: checked once configure_optimizers has built it
            self._saved_optimizer_groups = saved_groups
        self._last_validation = self._restored_validation(checkpoint, data)  # until the resumed run validates again
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:  # a resume, not weights loaded to start from
            self._resumed_global_batch = checkpoint.get(GLOBAL_BATCH_KEY)
            if not step_checkpoints(trainer):
                self._resume = resume_record(checkpoint)
        # a resume does not read init_from again: keep the context length the run inherited from it
        recorded = (recorded or {}).get("max_position_embeddings")
        if self.config.max_position_embeddings is None and recorded and recorded > self.config.block_size:
            self.config.max_position_embeddings = recorded

    @staticmethod
    def _restored_validation(checkpoint: dict, data: object) -> dict | None:
        """The checkpoint's latest validation, unless it was measured on other held-out data than the run's (a resume
        with another data.val_dir or data folders): the next checkpoints paired its loss with the new data."""
        validation, recorded = checkpoint.get(LAST_VALIDATION_KEY), checkpoint.get(HELDOUT_KEY)
        if validation is None or recorded is None or getattr(data, "tokenizer", None) is None:
            return validation
        return validation if not hasattr(data, "heldout") or recorded == data.heldout().to_record() else None

    def _weights_dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)

    def _say_if_narrowed(self, checkpoint: dict) -> None:
        """A resume whose weights (and AdamW state) will be stored narrower than the checkpoint's (a ``32-true`` run
        resumed in ``bf16-true``) rounds them for good: said once, since the run's own precision would keep them.
        The checkpoint's dtype is its ``state_dict``'s, or the one it records (a sharded one's loads straight into
        the model)."""
        state = checkpoint.get("state_dict") or {}
        saved = next((t.dtype for t in state.values() if torch.is_floating_point(t)), None)
        saved = saved or DTYPES.get(str(checkpoint.get(WEIGHTS_DTYPE_KEY)))
        now = self._weights_dtype()
        if saved is not None and now is not None and now.itemsize < saved.itemsize:
            rank_zero_warn(
                f"resuming {dtype_name(saved)} weights with {dtype_name(now)} parameters (trainer.precision "
                f"{self.trainer.precision}): they and AdamW's state are rounded to {dtype_name(now)} for good; resume "
                "with the run's own precision to keep them"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._built_model()(input_ids)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        check_batch(batch)
        self._tokens_shape = (batch.shape[0], batch.shape[1] - 1)
        # the logits are never materialised (validation keeps token_losses); compiled blocks, a compiled loss
        loss = train_loss(self.model, batch, compile=self.compile_blocks)
        self._log_train_loss(self._step_mean_loss(loss))
        return loss

    def _log_train_loss(self, step_loss: torch.Tensor) -> None:
        """Log ``train/loss``, averaged over the ranks (one collective) where its value is read as the run's: at the
        last micro-batch of a step Lightning writes to the loggers (every rank alike, whether it has a logger or not),
        and at every micro-batch where a callback or plateau scheduler decides on it (``monitor``) or a checkpoint's
        file name holds it (a validation may come between two micro-batches of a step: it reads the running mean).
        Elsewhere it is this rank's: the progress bar (rank zero's) and ``callback_metrics`` show the rank's own loss
        between the steps the loggers write. ``sync_dist`` made the collective (a barrier and an all-reduce; on CUDA a
        wait for the loss) at every micro-batch of every step. It is a progress-bar metric only for a bar that reads
        Lightning's (which Lightning converts to a number after every batch, a device sync)."""
        trainer = self.trainer
        last = not trainer.fit_loop._should_accumulate()
        self._loss_reduced = read_alike_on_every_rank(trainer, TRAIN_LOSS) or (last and step_is_logged(trainer))
        value = mean_over_ranks(trainer, step_loss) if self._loss_reduced else step_loss
        self.log(TRAIN_LOSS, value, prog_bar=on_lightnings_progress_bar(trainer))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A callback that set ``should_stop`` in this step (``max_time``'s ``Timer``) made Lightning write it, whatever
        ``log_every_n_steps`` says: the loggers get the mean over the ranks there too."""
        trainer = self.trainer
        if not self._loss_reduced and not trainer.fit_loop._should_accumulate() and step_is_logged(trainer):
            step_loss = mean_over_ranks(trainer, self._loss_sum / self._loss_count)
            replace_logged(trainer, "training_step", TRAIN_LOSS, step_loss)

    def _step_mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The mean loss of the micro-batches of this optimizer step so far (the step's loss at its last one).

        Lightning keeps the value logged by the step's last micro-batch; logging the running mean makes ``train/loss``
        the step's loss under gradient accumulation too.
        """
        step = self.trainer.global_step
        if self._loss_step != step:
            self._loss_step, self._loss_sum, self._loss_count = step, torch.zeros_like(loss, dtype=torch.float32), 0
        self._loss_sum = self._loss_sum + loss.detach().float()
        self._loss_count += 1
        return self._loss_sum / self._loss_count

    def on_after_backward(self) -> None:
        """An optimizer step of fewer micro-batches than ``trainer.accumulate_grad_batches`` (an epoch's last, where
        its batches do not fill a step): Lightning divided each micro-batch's loss by the full count, so the step's
        gradient was that fraction of the mean (and clipping, the logged norm and AdamW saw it so). At its last
        micro-batch the gradients are scaled to the mean over the micro-batches it had, as every full step's are."""
        trainer, full = self.trainer, self.trainer.accumulate_grad_batches
        if self._loss_count >= full or trainer.fit_loop._should_accumulate():
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(full / self._loss_count)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the trainer says, and log the total L2 norm of the gradients before clipping (``train/grad_norm``).

        Clipping by norm computes that norm anyway, so it is logged every step at no cost; otherwise it is computed
        only on the steps the loggers write. Under fp16 loss scaling the norm is that of the unscaled gradients (inf on
        a step the scaler skips); an optimizer that unscales inside its step (fused AdamW, the default on GPUs), which
        Lightning refuses to clip, gets its gradients unscaled here first.
        """
        if gradient_clip_val is not None and gradient_clip_val <= 0:  # Lightning's "no clipping" (a negative max_norm
            gradient_clip_val = None  # flipped the gradients' sign: gradient ascent)
        by_norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        logs_now = step_is_logged(self.trainer)
        if not (gradient_clip_val or logs_now):
            return  # nothing to clip or to log
        unscaled_here = unscale_fused_gradients(self.trainer, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if by_norm or logs_now:
            # the same call the precision plugin makes to clip; an infinite max_norm only measures
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val if by_norm else math.inf)
            self.log("train/grad_norm", norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if gradient_clip_val and not by_norm:  # by value
            if unscaled_here:  # what the precision plugin does, had it not refused the optimizer
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        check_batch(batch)
        self._tokens_shape = (real_rows(batch), batch.shape[1] - 1)  # FLOPs: of real rows; read only when asked
        losses, real = token_losses(self.model, batch)  # a held-out batch's pad rows are not real
        self.val_loss.update(losses, real)

    def on_validation_epoch_start(self) -> None:
        self._new_heldout_metrics()

    def on_test_epoch_start(self) -> None:
        self._new_heldout_metrics()

    def _new_heldout_metrics(self) -> None:
        """A fresh held-out loss (and its token count). Materialising a meta-device module (FSDP2) turns every tensor
        of the LightningModule into uninitialised memory, torchmetrics' stored defaults too, so ``reset()`` cannot
        help."""
        self.val_loss = heldout_mean(self.device)  # the mean over real tokens, reduced across ranks by compute()

    def on_validation_epoch_end(self) -> None:
        self._log_heldout("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_heldout("test")

    def _log_heldout(self, prefix: str) -> None:
        # the held-out loss of `evaluate` and `bench` too; each reports the tokens it scored, as <prefix>/tokens does
        loss = self.val_loss.compute()
        tokens = self.val_loss.total_tokens()
        # Already the same on every rank: a max over ranks keeps the values exactly and tells Lightning they are synced
        synced = {"sync_dist": True, "reduce_fx": "max"}
        if prefix == "val" and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._last_validation = {"loss": float(loss), "step": self.trainer.global_step}
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", **synced)
        self.log(f"{prefix}/ppl", loss.exp(), **synced)
        self.log(f"{prefix}/tokens", tokens, **synced)

    def configure_optimizers(self):  # noqa: ANN201
        if self.optimizer_factory is not None:
            optimizer = built_from_config(self.optimizer_factory, param_groups(self), "model.optimizer")
        else:
            optimizer = default_optimizer(self)
        total = self.trainer.estimated_stepping_batches  # inf: no max_steps and max_epochs=-1 (a max_time run)
        total_steps = int(total) if math.isfinite(total) else None
        if self.lr_scheduler_factory is None:
            warmup = 100 if total_steps is None else min(100, total_steps // 10)
            scheduler = WarmupCosineLR(optimizer, warmup_steps=warmup, max_steps=total_steps)
        else:
            scheduler = built_from_config(self.lr_scheduler_factory, optimizer, "model.lr_scheduler")
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ConfigError(
                    "ReduceLROnPlateau is not supported: it steps on a metric, this scheduler per optimizer step",
                    "model.lr_scheduler",
                    "use a per-step scheduler (epas_lightning.WarmupCosineLR, or one of torch.optim.lr_scheduler)",
                )
            if isinstance(scheduler, WarmupSchedule) and scheduler.max_steps is None:
                scheduler.max_steps = total_steps
        self._optimizer_settings = optimizer_settings(optimizer)
        if saved := getattr(self, "_saved_optimizer_groups", None):  # one device, DDP: the checkpoint was read first
            self._saved_optimizer_groups = None  # once: a later fit of this module resumes nothing, or reads again
            check_same_optimizer(optimizer, saved, f"--ckpt_path {self.trainer.ckpt_path}")
        if isinstance(scheduler, WarmupSchedule) and scheduler.max_steps is not None:
            check_warmup_fits(scheduler)
        elif isinstance(scheduler, WarmupSchedule):
            rank_zero_warn(
                "the run has no step limit (trainer.max_steps and trainer.max_epochs are -1): the learning rate warms "
                f"up for {optimizer_steps(scheduler.warmup_steps)} and then stays at its peak; set trainer.max_steps, "
                f"or the max_steps of model.lr_scheduler (epas_lightning.{type(scheduler).__name__}), for the decay"
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def checkpoint_region(checkpoint: dict, n_layer: int) -> TrainedRegion | None:
    """The region a checkpoint of fit trained, read as ``load_model`` reads it; ``None`` where its state dict holds no
    readable sharing mask (a sharded checkpoint: its shards load later) or its region record is unreadable (a resume
    needs none: ``ProgressiveSharing`` sets the region)."""
    from epas_lightning.checkpoint import recorded_region

    mask = (checkpoint.get("state_dict") or {}).get(MODEL_PREFIX + SHARING_MASK)
    if not isinstance(mask, torch.Tensor) or mask.is_meta or mask.shape != (n_layer,):  # load_state_dict says why
        return None
    try:
        return recorded_region(checkpoint, [i for i, shares in enumerate(mask.tolist()) if shares], n_layer)
    except ConfigError:  # load_model refuses it in one line
        return None


def check_data_tokenizer(data: object, checkpoint: dict) -> None:
    """Refuse data of another tokenizer than ``checkpoint``'s (it, or its metadata), where ``data`` (a run's data
    module, or None) is a ``TokenDataModule``: its ids are the checkpoint's tokens."""
    if hasattr(data, "check_checkpoint_tokenizer"):
        held_out = (checkpoint.get(HELDOUT_KEY) or {}).get("data_dirs")
        data.check_checkpoint_tokenizer(checkpoint.get("tokenizer"), held_out)


def check_training_state(trainer: Trainer, checkpoint: dict) -> None:
    """A checkpoint ``fit`` resumes holds the training state (:func:`check_holds_training_state`)."""
    if trainer.state.fn == TrainerFn.FITTING:
        check_holds_training_state(checkpoint, trainer.ckpt_path)


def check_holds_training_state(checkpoint: dict, ckpt_path: object) -> None:
    """A checkpoint a fit resumes (``ckpt_path``; ``checkpoint``: it, or its metadata) holds the training state (a
    weights-only save has none): Lightning failed on it with a ``KeyError`` traceback once the weights were loaded."""
    if "lr_schedulers" not in checkpoint:
        raise CheckpointError(
            "a weights-only checkpoint (checkpoint.save_weights_only) holds no training state to resume",
            f"--ckpt_path {ckpt_path}",
            f"start a new run from its weights with --model.init_from {ckpt_path}",
        )


def check_compile_backend(compile: bool | str) -> None:
    """A ``compile`` string must name a ``torch.compile`` backend: an unknown one was torch's ``InvalidBackend``
    traceback once ``fit`` built the model, after the data was prepared."""
    if not isinstance(compile, str):
        return
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(compile)
    except InvalidBackend:
        raise ConfigError(
            f"{compile!r} is not a torch.compile backend",
            "model.compile",
            "give true (inductor), false, or a backend torch._dynamo.list_backends() lists (e.g. aot_eager)",
        ) from None


def built_from_config(factory: Any, argument: Any, section: str) -> Any:
    """``factory(argument)``: the configured optimizer or LR scheduler; a value its constructor refuses (torch's
    ``Invalid learning rate: -0.01``) is one :class:`ConfigError` naming ``section``, not a traceback mid-setup."""
    try:
        return factory(argument)
    except ConfigError:
        raise
    except ValueError as e:
        built = next((a for a in getattr(factory, "args", ()) if isinstance(a, type)), None)  # jsonargparse's partial
        name = built.__name__ if built is not None else section
        what = f"{name} refused its arguments: {' '.join(str(e).split()).rstrip('.')}"
        raise ConfigError(what, section, "fix its init_args") from e


def check_warmup_fits(scheduler: WarmupSchedule) -> None:
    """Warn when the warmup lasts the whole run: the learning rate would never reach its peak nor decay (a
    ``WarmupStableDecayLR`` keeps its 100 warmup steps in a short run, where the default cosine's shrink)."""
    warmup, total = scheduler.warmup_steps, scheduler.max_steps
    if warmup >= total:
        rank_zero_warn(
            f"model.lr_scheduler ({type(scheduler).__name__}) warms up for {optimizer_steps(warmup)} but the run has "
            f"{total}: the learning rate never reaches its peak (it ends at {scheduler.lr_factor(total - 1):.0%} of "
            "it) and never decays; set model.lr_scheduler.init_args.warmup_steps below trainer.max_steps"
        )


def warn_without_sharing_schedule(callbacks: list[Callback]) -> None:
    """A fit without ``ProgressiveSharing`` grows no region: in a script of one's own that is easily an omission (the
    command line always has it, ``sharing.enabled: false`` for the dense baseline), so it is said."""
    if not any(isinstance(callback, ProgressiveSharing) for callback in callbacks):
        rank_zero_warn(
            "no ProgressiveSharing among the Trainer's callbacks: no sharing region grows (the model keeps the layers "
            "it shares now, none in a new one, and trains dense); add ProgressiveSharing(target=..., interval=...), "
            "or ProgressiveSharing(enabled=False) for the dense baseline"
        )


def warn_mid_step_checkpoints(callbacks: list[Callback], accumulate_grad_batches: int) -> None:
    """Under gradient accumulation, Lightning's own ``ModelCheckpoint`` saves inside an optimizer step (at a
    validation or ``train_time_interval`` there), and a resume loses the step's earlier micro-batches. The command line
    makes every listed one a ``StepCheckpoint``; a ``Trainer`` of one's own, or a subclass of ``ModelCheckpoint``
    (whose overrides the command line does not reorder), is told to."""
    if accumulate_grad_batches <= 1:
        return
    mid_step = (
        f"saves inside an optimizer step under accumulate_grad_batches={accumulate_grad_batches} when a validation or "
        "its train_time_interval falls there, and a resume from that checkpoint loses the step's earlier micro-batches"
    )
    if any(type(callback) is ModelCheckpoint for callback in callbacks):
        rank_zero_warn(
            f"a ModelCheckpoint (Lightning's default one too) {mid_step}; use epas_lightning.StepCheckpoint (the same "
            "arguments) or RunCheckpoint, which save between steps only"
        )
    if subclasses := mid_step_subclasses(callbacks):
        rank_zero_warn(
            f"{', '.join(subclasses)} (ModelCheckpoint's subclass, not StepCheckpoint's) {mid_step}; derive it from "
            "epas_lightning.StepCheckpoint instead (the same arguments: it saves between steps only), or set "
            "accumulate_grad_batches to 1"
        )


def mid_step_subclasses(callbacks: list[Callback]) -> list[str]:
    """The names of the ``ModelCheckpoint`` subclasses among ``callbacks`` not derived from ``StepCheckpoint``."""
    return sorted(
        {
            type(callback).__name__
            for callback in callbacks
            if isinstance(callback, ModelCheckpoint)
            and not isinstance(callback, StepCheckpoint)
            and type(callback) is not ModelCheckpoint
        }
    )


def check_batch(batch: object) -> None:
    """A batch is a (batch_size, seq_len + 1) tensor of token ids; a ``TensorDataset``'s (a list holding one) failed
    with "'list' object has no attribute 'shape'"."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
        got = f"shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else f"a {type(batch).__name__}"
        raise DataError(
            f"a batch must be a (batch_size, seq_len + 1) tensor of token ids, got {got}",
            "the Trainer's dataloader",
            "use TokenDataModule, or a dataset whose items are 1-D tensors of seq_len + 1 ids (a TensorDataset's "
            "are tuples)",
        )


def check_builds(name: str, factory: object, example: str) -> None:
    """``optimizer``/``lr_scheduler`` are callables that build one from the parameter groups/the optimizer; an
    instance (built before the model had parameters) failed in ``configure_optimizers`` as "object is not callable"."""
    if factory is not None and not callable(factory):
        raise ConfigError(
            f"{name} must be a callable that builds one, not a {type(factory).__name__} object",
            f"EPASModule({name}=...)",
            f"pass e.g. {example}",
        )


def check_resumed_model(config: LlamaConfig, recorded: LlamaConfig, where: str, fix: str = CLI_CONFIG_FIX) -> None:
    """The checkpoint (at ``where``), whose model config is ``recorded``, holds a model of ``config``'s architecture;
    else one line naming every field that differs (instead of a wall of size mismatches from ``load_state_dict``, or,
    with the same shapes, silently another function)."""
    check_same_architecture(config, recorded, where, fix)


def check_trainable_precision(precision: str) -> None:
    """Refuse ``16-true`` for training: fp16 weights and AdamW state with no loss scaling cannot train a LLaMA."""
    if str(precision) != "16-true":
        return
    raise ConfigError(
        "16-true cannot train: it keeps the weights and AdamW's state in fp16 with no loss scaling, where AdamW's "
        "eps (1e-8) rounds to 0 and small gradients and second moments underflow, so the first update writes NaN",
        "trainer.precision: 16-true",
        "train in bf16-mixed or bf16-true, or 16-mixed (fp32 weights, loss scaling; Lightning runs it as bf16-mixed on "
        "a CPU); "
        "16-true is fine for validate and test",
    )


def check_sharded_precision(precision: str) -> None:
    """FSDP2 (``parallelize``'s mixed-precision policies) trains in ``PRECISIONS`` only; anything else is one line
    before the model is built (``16-mixed`` has no sharded loss scaling here)."""
    if str(precision) not in PRECISIONS:
        raise ConfigError(
            f"FSDP2 trains in {', '.join(PRECISIONS)}",
            f"trainer.precision: {precision}",
            "choose one of those, or strategy: ddp for 16-mixed (fp16 with loss scaling)",
        )


def warn_emulated_bf16(precision: str, device: torch.device) -> None:
    """Warn that a bf16 precision on a GPU without native bfloat16 (V100, T4) runs emulated, far slower."""
    if str(precision).startswith("bf16") and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        rank_zero_warn(
            f"trainer.precision: {precision} on a GPU of compute capability {major}.{minor}, which has no native "
            "bfloat16: every bf16 operation is emulated, far slower. Train in 16-mixed there (fp16 with loss "
            "scaling; with DDP or on one GPU), or in 32-true under FSDP2."
        )


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default CPU and current-CUDA-device generator states."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
