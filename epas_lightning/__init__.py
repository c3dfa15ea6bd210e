"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning.

The public API: the model (``Llama``, ``LlamaConfig``), the Lightning pieces (``EPASModule``, ``ProgressiveSharing``,
``TokenDataModule``), the schedule, the FLOPs model, inference, HF import/export, evaluation and the
redundancy analysis.
"""

from epas_lightning.analysis import RedundancyReport, analyze_model, capture_activations, linear_cka
from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.data import TokenDataModule, prepare_builtin_corpus
from epas_lightning.evaluation import evaluate_perplexity, evaluate_task
from epas_lightning.flops import estimate_flops, flop_cut, matmul_params
from epas_lightning.hf import config_from_hf, load_hf_state
from epas_lightning.hf.export import export
from epas_lightning.inference import GenerationResult, generate, set_region
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import KVCache, Llama, LlamaConfig, SharingState
from epas_lightning.module import EPASModule
from epas_lightning.schedule import SharingSchedule, resolve_target

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "KVCache",
    "EPASModule",
    "Llama",
    "LlamaConfig",
    "ProgressiveSharing",
    "RedundancyReport",
    "SharingSchedule",
    "SharingState",
    "TokenDataModule",
    "WarmupCosineLR",
    "analyze_model",
    "capture_activations",
    "config_from_hf",
    "estimate_flops",
    "evaluate_perplexity",
    "evaluate_task",
    "export",
    "flop_cut",
    "generate",
    "linear_cka",
    "load_hf_state",
    "matmul_params",
    "prepare_builtin_corpus",
    "resolve_target",
    "set_region",
]
