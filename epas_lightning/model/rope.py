"""Rotary position embedding, rotate-half convention (the HF/LitGPT layout: HF weights need no permutation)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from epas_lightning.model.config import LlamaConfig, RopeScaling


class RotaryEmbedding(nn.Module):
    """Produces the fp32 ``(cos, sin)`` tables, once per forward, for every layer to use.

    The frequencies are recomputed in fp32 on every call instead of living in a buffer: a buffer would be cast to
    bf16 by ``bf16-true`` training (``module.to(torch.bfloat16)``) and distort the angles at long positions, and
    there is nothing to initialise after meta-device materialisation.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling

    @classmethod
    def of(cls, config: LlamaConfig) -> RotaryEmbedding:
        return cls(config.head_dim, config.rope_theta, config.rope_scaling)

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """theta^(-2i/D) for i < D/2, in fp32, rescaled by ``scaling`` if any."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / self.theta**exponent  # (D / 2,)
        if self.scaling is None:
            return inv_freq
        if self.scaling.rope_type == "linear":
            return inv_freq / self.scaling.factor
        return llama3_inv_freq(inv_freq, self.scaling)

    def forward(
        self, seq_len: int, device: torch.device | str | None = None, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq(device))  # (T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaling (transformers' ``llama3`` rope_type): frequencies whose wavelength exceeds the original
    context over ``low_freq_factor`` turn ``factor`` times slower, those shorter than it over ``high_freq_factor`` keep
    their speed, and those between blend the two linearly in original-context / wavelength."""
    wavelen = 2 * math.pi / inv_freq  # (D / 2,)
    low, high = s.low_freq_factor, s.high_freq_factor
    smooth = ((s.original_max_position_embeddings / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow, 1: keep
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, n_head, T, head_dim) by position; math in fp32, result in x's dtype.

    ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = (-x2, x1): written as the roll (x2, x1) times sin
    negated on the first half, the same numbers without a concatenation, so a compiler makes it one kernel instead
    of writing and rereading the rotated copy (and eager runs one pass fewer over x).
    """
    half = x.shape[-1] // 2
    xf = x.float()
    signed_sin = torch.where(torch.arange(x.shape[-1], device=x.device) < half, -sin, sin)
    return (xf * cos + torch.roll(xf, half, dims=-1) * signed_sin).to(x.dtype)
