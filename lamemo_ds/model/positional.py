"""Sinusoid position tables and the distances each attention branch needs.

Names: B batch, N segment length, M memory buffer length (fixed per state), K = M + N keys.
"""

from __future__ import annotations

import torch
from torch import nn


class SinusoidTable(nn.Module):
    """P(x) = [sin(x f_k) ; cos(x f_k)], f_k = 10000^(-2k/d) (sin block first, as the reference)."""

    def __init__(self, d_model: int):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, clamp_len: int = -1) -> torch.Tensor:
        """x: [X] float distances -> [X, d_model]."""
        if clamp_len > 0:
            x = x.clamp(max=clamp_len)
        angles = torch.outer(x, self.inv_freq.to(x.dtype))  # [X, d/2]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def causal_distances(*, mem_len: int, seg_len: int, device=None, dtype=torch.float32):
    """Distances K-1, ..., 0 (descending, Transformer-XL order) for the causal branch."""
    k = mem_len + seg_len
    return torch.arange(k - 1, -1, -1.0, device=device, dtype=dtype)


def lookahead_distances(variant: str, *, mem_len: int, device=None, dtype=torch.float32):
    """Distances indexed by the look-ahead branch.

    default / separate_content_bias: x = 1..M (index x-1, a key to the right at distance x);
    signed_distance: x = -1..-M (same index, the sign carries the direction);
    unmasked_window: x = 0..M (index |p - i|: keys on both sides).
    """
    if variant == "unmasked_window":
        return torch.arange(0, mem_len + 1, device=device, dtype=dtype)
    x = torch.arange(1, mem_len + 1, device=device, dtype=dtype)
    return -x if variant == "signed_distance" else x
