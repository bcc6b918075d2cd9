"""Memory layouts of the eager model's CPU fast paths: layers.split_heads (contiguous per-head
Q/K/V equal the permuted views; the backward writes every gradient back to its projection
column, zeros for an unused chunk) and attention.per_head_positions (heads-first position
terms whose gradients keep that layout, and any other layout still gets right gradients)."""

from __future__ import annotations

import pytest
import torch

from lamemo_ds.model.layers import split_heads
from lamemo_ds.ops import attention

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("chunks", [2, 3])
def test_values_and_gradients_equal_the_permuted_views(chunks):
    torch.manual_seed(0)
    b, t, h, d = 2, 5, 3, 4
    x = torch.randn(b, t, chunks * h * d, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    got = split_heads(x, chunks, h)
    ref = x2.view(b, t, chunks, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert len(got) == chunks
    for g_, r_ in zip(got, ref):
        assert g_.shape == (b, h, t, d) and g_.is_contiguous() and torch.equal(g_, r_)
    weights = [torch.randn(b, h, t, d, dtype=torch.float64) for _ in range(chunks)]
    sum((g_ * w).sum() for g_, w in zip(got, weights)).backward()
    sum((r_ * w).sum() for r_, w in zip(ref, weights)).backward()
    assert torch.equal(x.grad, x2.grad)


def test_unused_chunk_gets_zero_gradient():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3 * 2 * 5, requires_grad=True)
    q, k, v = split_heads(x, 3, 2)
    (k * 2).sum().backward()  # q and v take no part
    g = x.grad.view(2, 4, 3, 2, 5)
    assert torch.all(g[:, :, 0] == 0) and torch.all(g[:, :, 2] == 0)
    assert torch.all(g[:, :, 1] == 2)


def test_gradcheck():
    x = torch.randn(1, 3, 2 * 2 * 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 2, 2), (x,))


def test_per_head_positions_is_the_per_head_product():
    torch.manual_seed(2)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    r = torch.randn(7, 2, 4, dtype=torch.float64)
    got = attention.per_head_positions(x, r)
    assert got.shape == (3, 2, 5, 7)
    assert torch.allclose(got, torch.einsum("bhtd,xhd->bhtx", x, r), rtol=1e-12, atol=1e-12)
    assert got.stride()[-2:] == (7, 1)  # each [T, X] block contiguous, as the shifts need


@pytest.mark.parametrize("shift", ["causal", "band"])
def test_position_gradient_is_right_in_any_layout(shift):
    """The score softmax returns d(bd) in bd's own layout when that is dense with contiguous
    [T, X] blocks (heads-first here) and row-major otherwise (a broadcast bd)."""
    torch.manual_seed(3)
    b, h, t, k = 2, 3, 4, 6
    ac = torch.randn(b, h, t, k, dtype=torch.float64)
    bd_rows = torch.randn(b, h, t, k, dtype=torch.float64)
    heads_first = bd_rows.transpose(0, 1).contiguous().transpose(0, 1)
    broadcast = bd_rows[:1].expand(b, -1, -1, -1)
    allowed = torch.rand(b, 1, t, k) > 0.3
    allowed[..., -1] = True  # no empty row
    w = torch.randn(b, h, t, k, dtype=torch.float64)
    grads = []
    layouts = (bd_rows, heads_first, broadcast.contiguous(), broadcast)
    if shift == "band":  # the look-ahead band: [B, H, blocks=1, T, L]
        layouts = tuple(x.unsqueeze(2) for x in layouts)
        heads_first = layouts[1]
    for bd in layouts:
        bd = bd.detach().requires_grad_()  # a stride-0 leaf for the broadcast one
        probs, lse = attention._ScoresSoftmax.apply(ac.clone(), bd, allowed, shift, 2,
                                                    torch.float64)
        ((probs * w).sum() + lse.sum()).backward()
        grads.append(bd.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[1].stride() == heads_first.stride()
    assert torch.equal(grads[2], grads[3])  # no writes through overlapping (stride-0) memory
