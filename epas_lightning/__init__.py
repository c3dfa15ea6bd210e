"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning.

The public API: the model (``Llama``, ``LlamaConfig``), the Lightning pieces (``EPASModule``, ``ProgressiveSharing``,
``TokenDataModule``), the schedule, the FLOPs model, inference, HF import/export, evaluation and the
redundancy analysis. Each name is imported on first use, so ``import epas_lightning`` loads neither torch nor
Lightning.
"""

from typing import TYPE_CHECKING

from epas_lightning.lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from epas_lightning.analysis import RedundancyReport, analyze_model, capture_activations, linear_cka
    from epas_lightning.callbacks import ProgressiveSharing, StepLearningRateMonitor, TokenThroughputMonitor
    from epas_lightning.checkpoint import LoadedModel, load_model
    from epas_lightning.checkpoint_io import AtomicCheckpointIO
    from epas_lightning.child_ranks import EndChildRanksOnError
    from epas_lightning.consolidation import consolidate
    from epas_lightning.data import TokenDataModule, prepare_builtin_corpus, prepare_dataset
    from epas_lightning.divergence import DivergenceGuard
    from epas_lightning.errors import TrainingDiverged, UserError
    from epas_lightning.evaluation import evaluate_perplexity, evaluate_task
    from epas_lightning.flops import estimate_flops, flop_cut, matmul_params
    from epas_lightning.hf import config_from_hf, load_hf_state
    from epas_lightning.hf.export import export
    from epas_lightning.inference import GenerationResult, generate, set_region
    from epas_lightning.init_from import source_config
    from epas_lightning.interrupt import GracefulStop
    from epas_lightning.loss import lm_loss, next_token_loss
    from epas_lightning.lr import WarmupCosineLR, WarmupStableDecayLR
    from epas_lightning.model import KVCache, Llama, LlamaConfig, SharingState
    from epas_lightning.module import EPASModule
    from epas_lightning.optim import param_groups
    from epas_lightning.region import TrainedRegion
    from epas_lightning.run_checkpoint import RunCheckpoint, StepCheckpoint
    from epas_lightning.schedule import SharingSchedule, resolve_target
    from epas_lightning.strategy import FSDP2Strategy

__all__, __getattr__, __dir__ = lazy_exports(__name__)
