"""Which fused attention kernel training tries first (``EPASModule(attention_kernel=...)``).

torch's scaled-dot-product attention runs the first kernel, in a priority order, that supports the call; torch's
order has put FlashAttention first (a torch release that already prefers cuDNN on Hopper makes ``auto`` change
nothing). On Hopper GPUs (compute capability 9.x) NVIDIA's cuDNN attention is the kernel tuned for the architecture,
so ``auto`` puts it first there, but only after checking, once at start-up, that it runs this model's attention
(head count, grouped KV heads, head size, causal, bf16) and that its output and gradients agree with FlashAttention's.
Everywhere else ``auto`` keeps torch's order. Whatever the order, the model computes the same function; only the
kernel changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from epas_lightning.errors import ConfigError
from epas_lightning.model.config import LlamaConfig

ORDERS: dict[str, tuple[str, ...] | None] = {
    "torch": None,
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
}
"""The kernel orders a setting names (``None``: torch's own)."""
CHOICES = ("auto", *ORDERS)
CHECK_TOKENS = 256
"""Sequence length of the start-up check (two sequences): long enough for several kernel tiles, cheap."""
AGREEMENT = 2.0
"""cuDNN's error against an fp32 reference may be at most this multiple of FlashAttention's (plus bf16's epsilon)."""


def sdpa_order(setting: str, device: torch.device, config: LlamaConfig) -> tuple[SDPBackend, ...] | None:
    """The SDPA kernel order for ``setting`` (one of ``CHOICES``) on ``device``; ``None`` keeps torch's order."""
    if setting not in CHOICES:
        raise ConfigError(f"unknown attention kernel {setting!r}", "model.attention_kernel", f"give one of {CHOICES}")
    if setting == "auto":
        setting = "cudnn" if is_hopper(device) and cudnn_agrees(config, device) else "torch"
    names = ORDERS[setting]
    return None if names is None else tuple(getattr(SDPBackend, name) for name in names)


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def cudnn_agrees(config: LlamaConfig, device: torch.device) -> bool:
    """cuDNN's attention runs this model's causal attention in bf16 and agrees with FlashAttention (``agrees``)."""
    return agrees(SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, config, device)


@torch.inference_mode(False)
@torch.enable_grad()  # also when the model is built under no_grad or inference_mode: the check runs a backward
def agrees(kernel: SDPBackend, baseline: SDPBackend, config: LlamaConfig, device: torch.device) -> bool:
    """``kernel`` runs this model's causal attention in bf16 (heads, grouped KV heads, head size), and its output and
    input gradients are as close to an fp32 reference as ``baseline``'s (``AGREEMENT``); ``False`` where either
    kernel cannot run it or ``kernel`` is further off."""
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = min(CHECK_TOKENS, config.block_size)
    q_shape = (2, config.n_head, tokens, config.head_dim)  # (B, H, T, D)
    kv_shape = (2, config.n_kv_head, tokens, config.head_dim)  # (B, H_kv, T, D)
    inputs = [torch.randn(s, generator=generator, device=device) for s in (q_shape, kv_shape, kv_shape)]
    grad_out = torch.randn(q_shape, generator=generator, device=device)
    reference = _attend(inputs, grad_out, SDPBackend.MATH, torch.float32)
    try:
        ours = _attend(inputs, grad_out, kernel, torch.bfloat16)
        theirs = _attend(inputs, grad_out, baseline, torch.bfloat16)
    except RuntimeError:  # no such kernel for this shape or device
        return False
    eps = torch.finfo(torch.bfloat16).eps
    return all(_error(a, r) <= AGREEMENT * _error(b, r) + eps for a, b, r in zip(ours, theirs, reference, strict=True))


def _attend(
    inputs: list[torch.Tensor], grad_out: torch.Tensor, kernel: SDPBackend, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Causal attention of (q, k, v) in ``dtype`` by ``kernel`` alone: [output, dq, dk, dv], in fp32."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs)
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        out.backward(grad_out.to(dtype))
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()
