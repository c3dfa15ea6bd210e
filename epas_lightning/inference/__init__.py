"""Inference with a trained EPAS model: KV-cache generation at any sharing region, and the many-in-one benchmark."""

from epas_lightning.inference.generate import GenerationResult, deepest_layers, generate, set_region
from epas_lightning.inference.sampling import sample

__all__ = ["GenerationResult", "deepest_layers", "generate", "sample", "set_region"]
