"""A linear layer whose CPU backward picks the faster GEMM layouts for wide inputs.

For a layer that narrows (out_features < in_features, like the FFN's second matrix), the
default backward computes dW = g^T x as a [out, R] x [R, in] product and dX = g W with W in its
stored layout; on CPU BLAS both run well below the transposed problems: dW^T = x^T g and
dX = g (W^T)^T. Same products, same sums, different memory order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _NarrowingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [R, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight.t().contiguous().t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = (x.reshape(-1, x.shape[-1]).t() @ g).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           ) -> torch.Tensor:
    """F.linear, with the faster backward layouts on CPU for narrowing layers."""
    if (x.device.type == "cpu" and weight.shape[0] < weight.shape[1]
            and torch.is_grad_enabled() and weight.requires_grad):
        return _NarrowingLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) through `linear`: module hooks, such as
    ZeRO-3's parameter gathering, still see a normal module call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
