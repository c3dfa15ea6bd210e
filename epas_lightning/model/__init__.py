"""The LLaMA model with switchable EPAS sharing (plain PyTorch: nothing here imports Lightning)."""

from epas_lightning.model.attention import Attention
from epas_lightning.model.config import PRESETS, LlamaConfig
from epas_lightning.model.kv_cache import KVCache, StaticKVCache
from epas_lightning.model.llama import DecoderLayer, Llama
from epas_lightning.model.sharing import SharingState

__all__ = ["PRESETS", "Attention", "DecoderLayer", "KVCache", "Llama", "LlamaConfig", "SharingState", "StaticKVCache"]
