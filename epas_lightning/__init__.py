"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning.

The public API: the model (``Llama``, ``LlamaConfig``), the Lightning pieces (``EPASModule``, ``ProgressiveSharing``,
``TokenDataModule``), the schedule, the FLOPs model, inference, HF import/export, evaluation and the
redundancy analysis.
"""

from epas_lightning.analysis import RedundancyReport, analyze_model, capture_activations, linear_cka
from epas_lightning.callbacks import ProgressiveSharing, TokenThroughputMonitor
from epas_lightning.checkpoint import LoadedModel, consolidate, load_model
from epas_lightning.checkpoint_io import AtomicCheckpointIO
from epas_lightning.data import TokenDataModule, prepare_builtin_corpus, prepare_dataset
from epas_lightning.divergence import DivergenceGuard, TrainingDiverged
from epas_lightning.errors import UserError
from epas_lightning.evaluation import evaluate_perplexity, evaluate_task
from epas_lightning.flops import estimate_flops, flop_cut, matmul_params
from epas_lightning.hf import config_from_hf, load_hf_state
from epas_lightning.hf.export import export
from epas_lightning.inference import GenerationResult, generate, set_region
from epas_lightning.interrupt import GracefulStop
from epas_lightning.loss import lm_loss, next_token_loss
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import KVCache, Llama, LlamaConfig, SharingState
from epas_lightning.module import EPASModule
from epas_lightning.optim import param_groups
from epas_lightning.region import TrainedRegion
from epas_lightning.run_checkpoint import RunCheckpoint
from epas_lightning.schedule import SharingSchedule, resolve_target
from epas_lightning.strategy import FSDP2Strategy

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "DivergenceGuard",
    "GenerationResult",
    "GracefulStop",
    "KVCache",
    "EPASModule",
    "FSDP2Strategy",
    "Llama",
    "LlamaConfig",
    "LoadedModel",
    "ProgressiveSharing",
    "RedundancyReport",
    "RunCheckpoint",
    "SharingSchedule",
    "SharingState",
    "TokenDataModule",
    "TokenThroughputMonitor",
    "TrainedRegion",
    "TrainingDiverged",
    "UserError",
    "WarmupCosineLR",
    "analyze_model",
    "capture_activations",
    "config_from_hf",
    "consolidate",
    "estimate_flops",
    "evaluate_perplexity",
    "evaluate_task",
    "export",
    "flop_cut",
    "generate",
    "linear_cka",
    "lm_loss",
    "load_hf_state",
    "load_model",
    "matmul_params",
    "next_token_loss",
    "param_groups",
    "prepare_builtin_corpus",
    "prepare_dataset",
    "resolve_target",
    "set_region",
]
