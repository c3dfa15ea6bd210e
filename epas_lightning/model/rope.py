"""Rotary position embedding, rotate-half convention (the HF/LitGPT layout: HF weights need no permutation)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces the fp32 ``(cos, sin)`` tables, once per forward, for every layer to use.

    The frequencies are recomputed in fp32 on every call instead of living in a buffer: a buffer would be cast to
    bf16 by ``bf16-true`` training (``module.to(torch.bfloat16)``) and distort the angles at long positions, and
    there is nothing to initialise after meta-device materialisation.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """theta^(-2i/D) for i < D/2, in fp32."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / self.theta**exponent

    def forward(
        self, seq_len: int, device: torch.device | str | None = None, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq(device))  # (T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, n_head, T, head_dim) by position; math in fp32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
