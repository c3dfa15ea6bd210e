"""Hugging Face interop: import HF LLaMA checkpoints (``model.init_from``) and export ours (``export``)."""

from epas_lightning.hf.convert import HFCheckpointError, config_from_hf, hf_to_ours, load_hf_state, ours_to_hf

__all__ = ["HFCheckpointError", "config_from_hf", "hf_to_ours", "load_hf_state", "ours_to_hf"]
