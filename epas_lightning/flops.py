"""Analytic training FLOPs in the EPAS paper's convention (Table 1).

FLOPs per sample = 3 * s * (2 * P_matmul + 4 * L * s * d): forward plus backward (3x forward) of every linear
weight (the LM head included, the embedding lookup not) and of the attention products QK^T and PV, counted
without causal halving. A sharing layer drops the projections it reuses: q_proj and k_proj in ``qk`` mode,
k_proj and v_proj in ``kv`` mode. The attention products still run in every layer, but for ``attention_reuse``
(``qk`` mode), where a sharing layer takes the source layer's probabilities and computes PV alone. Activation
checkpointing's recompute is not counted (model FLOPs, as MFU counts them).
"""

from __future__ import annotations

import numbers
import re

import torch

from epas_lightning.errors import ConfigError
from epas_lightning.model.config import LlamaConfig, check_is_config
from epas_lightning.runtime import dtype_name, is_real_number

DENSE_PEAK_TFLOPS = (  # name: (bf16/fp16, tf32, fp32)
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 80GB HBM2e", (756.0, 378.0, 51.2)),  # the H100 PCIe's name on some hosts (the SXM's is "H100 80GB HBM3")
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H200 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),  # the Grace Hopper superchip's H100/H200 GPU
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.05, 183.0, 91.6)),  # Lightning's table takes an L40S or L40 for an L4
    ("L40", (181.05, 90.5, 90.5)),
)
"""Dense (no sparsity) peaks per GPU name, from the vendors' datasheets: bf16/fp16 and tf32 tensor cores, and fp32
without them; first match wins."""


def matmul_params(config: LlamaConfig, n_shared: int = 0) -> int:
    """Number of weights that take part in a matmul when ``n_shared`` layers share."""
    check_is_config(config, "config")
    whole = isinstance(n_shared, numbers.Integral) and not isinstance(n_shared, bool)
    if not whole or not 0 <= n_shared <= config.n_layer - 1:
        raise ConfigError(
            f"n_shared={n_shared} is not a whole number of layers in 0..{config.n_layer - 1}",
            "n_shared",
            "layer 0 never shares: count 0 to n_layer - 1 sharing layers",
        )
    d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    q, k, v, o = d * d, d * kv_dim, d * kv_dim, d * d
    mlp = 3 * d * config.intermediate_size
    skipped = q + k if config.sharing_mode == "qk" else k + v
    per_layer = q + k + v + o + mlp
    return config.n_layer * per_layer - n_shared * skipped + d * config.padded_vocab_size


def estimate_flops(
    config: LlamaConfig, n_shared: int, seq_len: int, backward: bool = True, attention_reuse: bool = False
) -> float:
    """Training FLOPs (forward + backward) per sample of ``seq_len`` tokens with ``n_shared`` sharing layers;
    ``backward=False``: the forward pass alone (a third: the convention counts the backward as two forwards).
    ``attention_reuse``: the sharing layers reuse the source layer's attention probabilities (no QK^T)."""
    check_is_config(config, "config")
    if not is_real_number(seq_len):  # "2048" failed comparing str and int
        raise ConfigError(f"seq_len must be a number of tokens, got {seq_len!r}", "seq_len", "pass an int, e.g. 2048")
    if not seq_len >= 1:
        raise ConfigError(f"seq_len={seq_len} must be at least 1 token", "seq_len", "pass 1 or more")
    params = matmul_params(config, n_shared)
    products = 2 * config.n_layer - (n_shared if attention_reuse and config.sharing_mode == "qk" else 0)
    attention = 2 * products * seq_len * config.n_head * config.head_dim  # QK^T and PV: 2 s d each, per token
    passes = 3.0 if backward else 1.0
    return passes * seq_len * (2 * params + attention)


def flop_cut(config: LlamaConfig, n_shared: int, seq_len: int, attention_reuse: bool = False) -> float:
    """Fraction of training FLOPs that ``n_shared`` sharing layers remove (with ``attention_reuse``: their QK^T too)."""
    return 1.0 - estimate_flops(config, n_shared, seq_len, attention_reuse=attention_reuse) / estimate_flops(
        config, 0, seq_len
    )


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The dense peak FLOP/s of a known GPU (``DENSE_PEAK_TFLOPS``) for matmuls in ``dtype``: float32 ones at the
    tf32 peak unless ``torch.get_float32_matmul_precision()`` is ``"highest"``; else ``None``."""
    column = {torch.bfloat16: 0, torch.float16: 0, torch.float32: 1 if _tf32() else 2}.get(dtype)
    if device.type != "cuda" or column is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[column] * 1e12 for key, peaks in DENSE_PEAK_TFLOPS if _names(key, name)), None)


def peak_dtype_name(dtype: torch.dtype) -> str:
    """The name of the peak ``peak_flops`` takes for ``dtype``: ``tf32`` for float32 matmuls that run in tf32."""
    return "tf32" if dtype == torch.float32 and _tf32() else dtype_name(dtype)


def _tf32() -> bool:
    """Float32 matmuls run on tf32 tensor cores (Lightning's reading too)."""
    return torch.get_float32_matmul_precision() != "highest"


def _names(key: str, name: str) -> bool:
    """``key`` is a whole word run of the device ``name``: "A100" names "NVIDIA A100-SXM4-80GB", not "RTX A1000"."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name) is not None
