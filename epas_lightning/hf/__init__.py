"""Hugging Face interop: import HF LLaMA checkpoints (``model.init_from``) and export ours (``export``)."""

from epas_lightning.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__, {".convert": ["HFCheckpointError", "config_from_hf", "hf_to_ours", "load_hf_state", "ours_to_hf"]}
)
