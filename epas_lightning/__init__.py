"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning.

The public API: the model (``Llama``, ``LlamaConfig``), the Lightning pieces (``EPASModule``, ``ProgressiveSharing``,
``TokenDataModule``), the schedule, the FLOPs model and the
redundancy analysis.
"""

from epas_lightning.analysis import RedundancyReport, analyze_model, capture_activations, linear_cka
from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.data import TokenDataModule, prepare_builtin_corpus
from epas_lightning.flops import estimate_flops, flop_cut, matmul_params
from epas_lightning.lr import WarmupCosineLR
from epas_lightning.model import Llama, LlamaConfig, SharingState
from epas_lightning.module import EPASModule
from epas_lightning.schedule import SharingSchedule, resolve_target

__version__ = "0.1.0"

__all__ = [
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
    "estimate_flops",
    "flop_cut",
    "linear_cka",
    "matmul_params",
    "prepare_builtin_corpus",
    "resolve_target",
]
