"""Configuration of an EPAS LLaMA exported by epas_lightning (HF remote code: imports only torch and transformers).

It is a ``LlamaConfig`` with the sharing region: ``epas_shared_layers`` (the layers that reuse the Q/K, or K/V, of the
last computing layer before them) and ``epas_sharing_mode`` ("qk" as in the EPAS paper, or "kv").
``epas_trained_region`` lists the layers the weights were trained to share, in the order they joined the region
(``epas_growth_order``: deep_first or shallow_first); ``epas_max_shared_layers`` is its length. Any first N layers of
it (including none) is a valid region. Pick one at load time with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True, epas_shared_layers=[...])`` or afterwards with
``model.set_region(n)``. ``epas_attention_bias`` says which attention projections carry a bias: "qkv" (a Qwen2: q, k
and v, not o), "qkvo" (all four, as ``attention_bias``) or none.
"""

from transformers import LlamaConfig


class EpasLlamaConfig(LlamaConfig):
    model_type = "epas_llama"

    def __init__(
        self,
        epas_shared_layers=None,
        epas_sharing_mode="qk",
        epas_max_shared_layers=None,
        epas_trained_region=None,
        epas_growth_order="deep_first",
        epas_attention_bias=None,
        **kwargs,
    ):
        self.epas_shared_layers = sorted(int(i) for i in (epas_shared_layers or []))
        self.epas_sharing_mode = epas_sharing_mode
        self.epas_trained_region = [int(i) for i in (epas_trained_region or sorted(self.epas_shared_layers)[::-1])]
        self.epas_growth_order = epas_growth_order
        self.epas_attention_bias = epas_attention_bias
        if epas_attention_bias is not None:
            kwargs["attention_bias"] = True  # LlamaAttention's switch; the model drops o_proj's for "qkv"
        self.epas_max_shared_layers = (
            len(self.epas_trained_region) if epas_max_shared_layers is None else int(epas_max_shared_layers)
        )
        super().__init__(**kwargs)
        if self.epas_attention_bias not in (None, "qkv", "qkvo"):
            raise ValueError(f"epas_attention_bias must be 'qkv', 'qkvo' or None, got {self.epas_attention_bias!r}.")
        if self.epas_sharing_mode not in ("qk", "kv"):
            raise ValueError(f"epas_sharing_mode must be 'qk' or 'kv', got {self.epas_sharing_mode!r}.")
        bad = [i for i in self.epas_shared_layers if not 1 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"epas_shared_layers {bad} outside 1..{self.num_hidden_layers - 1} (layer 0 computes).")
