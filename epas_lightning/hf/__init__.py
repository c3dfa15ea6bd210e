"""Hugging Face interop: import HF LLaMA checkpoints (``model.init_from``) and export ours (``export``)."""

from typing import TYPE_CHECKING

from epas_lightning.lazy import lazy_exports

if TYPE_CHECKING:
    from epas_lightning.hf.convert import HFCheckpointError, config_from_hf, hf_to_ours, load_hf_state, ours_to_hf

__all__, __getattr__, __dir__ = lazy_exports(__name__)
