"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning."""

from epas_lightning.flops import estimate_flops, flop_cut, matmul_params
from epas_lightning.model import Llama, LlamaConfig, SharingState
from epas_lightning.schedule import SharingSchedule, resolve_target

__version__ = "0.1.0"
