"""Dropout whose CPU mask comes from numpy's PCG64 instead of torch's bernoulli_.

On CPU, torch draws dropout masks with a scalar Mersenne-Twister (~7 ns per element: a fifth
of a small model's training step). Here every element gets 16 random bits from PCG64 raw
output (four per 64-bit draw, ~0.5 ns per element): the drop probability is p rounded to a
multiple of 2^-16 (0.1 -> 0.1000061) and the kept values are scaled by the exact inverse of the
keep probability, so the layer stays unbiased. The seed of every mask is drawn from torch's CPU
generator, so `torch.manual_seed`, checkpointed RNG state and activation checkpointing (which
replays torch's RNG) reproduce the same masks bit for bit. On other devices this is
`torch.nn.functional.dropout`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _random_bits(shape: torch.Size) -> torch.Tensor:
    """int16 tensor of `shape`, uniform on [-2^15, 2^15), seeded from torch's CPU generator."""
    n = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU tensor: no device sync
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)
    return torch.from_numpy(raw.view(np.int16)[:n]).view(shape)


def _drop_level(p: float) -> tuple[int, float]:
    """(bits below which an element is dropped, scale 1 / P(keep)); at least one of the 2^16
    levels is kept, so p just below 1 does not round to dropping everything."""
    drop = min(round(p * 65536), 65535)
    return drop - 32768, 65536.0 / (65536 - drop)


def _keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """(bool keep mask of `shape`, scale 1 / P(keep))."""
    level, scale = _drop_level(p)
    return _random_bits(shape) >= level, scale


def _keep_scale(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The same mask as `_keep_mask` as numbers: scale where kept, 0 where dropped.

    Float arithmetic only (this build's bool kernels are scalar, ~5x slower): the bits are
    integers, so clamp(bits - level + 1, 0, 1) is exactly 1 when bits >= level, else 0.
    """
    level, scale = _drop_level(p)
    return _random_bits(shape).to(dtype).sub_(level - 1).clamp_(0, 1).mul_(scale)


_FLOAT_MASK_DTYPES = (torch.float32, torch.float64)  # every int16 and the scale stay exact


class _CPUDropout(torch.autograd.Function):
    """dropout(x), or dropout(relu(x)) with one mask (kept and positive): one pass each way.

    fp32/fp64 multiply by a numeric mask: dropout saves it; the ReLU form saves only its
    output (kept positive entries are exactly its nonzeros) and back-propagates with the ReLU
    backward kernel. Other dtypes select with a bool mask, rounding like `x * scale`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, relu: bool) -> torch.Tensor:
        ctx.relu = relu
        if x.dtype in _FLOAT_MASK_DTYPES:
            ctx.scale = _drop_level(p)[1]
            mask = _keep_scale(x.shape, p, x.dtype)
            if relu:
                out = torch.relu(x).mul_(mask)
                ctx.save_for_backward(out)
            else:
                out = x * mask
                ctx.save_for_backward(mask)
            return out
        keep, scale = _keep_mask(x.shape, p)
        if relu:
            keep &= x > 0
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (saved,) = ctx.saved_tensors
        if saved.dtype == torch.bool:  # the bool path of half dtypes
            return torch.where(saved, grad, 0.0).mul_(ctx.scale), None, None
        if ctx.relu:  # saved = output: nonzero exactly where kept and positive
            return torch.ops.aten.threshold_backward(grad, saved, 0).mul_(ctx.scale), None, None
        return grad * saved, None, None


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """dropout(relu(x)): fused on CPU in training, the two plain ops elsewhere."""
    if training and p > 0.0 and x.device.type == "cpu":
        return _CPUDropout.apply(x, p, True)
    return dropout(torch.relu(x), p, training)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _CPUDropout.apply(x, p, False)


class Dropout(nn.Module):
    """Drop-in for nn.Dropout (same `p`, same train/eval behaviour)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
