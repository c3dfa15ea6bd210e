"""HF remote code shipped with exported EPAS models (copied next to the weights; imports only torch + transformers)."""
