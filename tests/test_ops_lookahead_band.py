"""The banded look-ahead position term equals the old full-matrix computation.

The old way (kept below as the reference) multiplied every memory query by the whole look-ahead
table, [B,H,M,X], and gathered each (row, window key) entry. The banded way multiplies each
block of memory rows by only the table rows it reaches. Forward values and every gradient must
agree in float64, for memories shorter than, equal to and longer than the segment.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lamemo_ds.model.positional import SinusoidTable, lookahead_distances
from lamemo_ds.ops import attention

B, H, D = 2, 2, 4
# (N, M): M = N/2, N, 2N, 4N, and odd sizes on both sides of 2N
SIZES = [(6, 3), (6, 6), (6, 12), (6, 24), (5, 7), (5, 11), (5, 23), (3, 1), (1, 4)]
VARIANTS = ["default", "unmasked_window"]


def _old_lookahead(q, k, v, r, u, vb, *, valid, mem_len, window_start, variant):
    """The full-matrix look-ahead attention as it was: [B,H,M,X] table product, then a gather."""
    w = k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    ac = ((q + u[None, :, None, :]) * scale) @ k.transpose(-1, -2)  # [B,H,M,W]
    bd_full = torch.einsum("bhmd,xhd->bhmx", (q + vb[None, :, None, :]) * scale, r)
    idx = attention.lookahead_index(mem_len=mem_len, window_start=window_start, window_len=w,
                                    variant=variant)  # [M, W]
    bd = bd_full.gather(-1, idx.expand(*bd_full.shape[:2], -1, -1))  # [B,H,M,W]
    allowed = attention.lookahead_mask(valid, mem_len=mem_len, window_start=window_start,
                                       window_len=w, variant=variant)
    scores = (ac + bd).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _inputs(n, m, variant, clamp_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start, width = attention.lookahead_window(mem_len=m, seg_len=n)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    dist = lookahead_distances(variant, mem_len=m, dtype=torch.float64)
    table = SinusoidTable(8).double()(dist, clamp_len=clamp_len)  # [X, 8]
    proj = torch.randn(8, H * D, generator=gen, dtype=torch.float64).requires_grad_()
    leaves = [rand(B, H, m, D), rand(B, H, width, D), rand(B, H, width, D), rand(H, D),
              rand(H, D)]
    valid = torch.tensor([m, max(m // 2, 1)])
    kw = dict(valid=valid, mem_len=m, window_start=start, variant=variant)
    return leaves, proj, table, kw


def _grads(fn, leaves, proj, table, kw):
    q, k, v, u, vb = leaves
    r = (table @ proj).view(-1, H, D)  # [X, H, D]
    e, lse = fn(q, k, v, r, u, vb, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (e * torch.randn(e.shape, generator=gen, dtype=e.dtype)).sum() + (lse * 0.3).sum()
    grads = torch.autograd.grad(loss, [*leaves, proj])
    return e.detach(), lse.detach(), grads


def _assert_same(n, m, variant, clamp_len, new_fn):
    leaves, proj, table, kw = _inputs(n, m, variant, clamp_len)
    e0, lse0, g0 = _grads(_old_lookahead, leaves, proj, table, kw)
    e1, lse1, g1 = _grads(new_fn, leaves, proj, table, kw)
    torch.testing.assert_close(e1, e0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse1, lse0, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["q", "k", "v", "u", "vb", "r"], g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("clamp_len", [-1, 4])
@pytest.mark.parametrize("n,m", SIZES)
def test_banded_lookahead_equals_full_matrix(n, m, variant, clamp_len):
    """The plan the model uses (one block for M < 2N, blocks of W rows beyond)."""
    _assert_same(n, m, variant, clamp_len, attention.lookahead_attention)


@pytest.mark.parametrize("block_rows", [1, 2, 5])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m", [(6, 3), (6, 6), (5, 7), (5, 23)])
def test_any_block_size_equals_full_matrix(n, m, variant, block_rows, monkeypatch):
    """Forced block sizes reach the partial last block, single-row blocks and bands shorter
    than the window at small M."""
    forced = functools.partial(attention.lookahead_band, block_rows=block_rows)
    monkeypatch.setattr(attention, "lookahead_band", forced)
    _assert_same(n, m, variant, 4, attention.lookahead_attention)


@pytest.mark.parametrize("variant", VARIANTS)
def test_band_work_is_linear_in_memory(variant):
    """At M = 16N the band holds about M * 2N entries per (stream, head), not M * M."""
    n, m = 32, 512
    start, width = attention.lookahead_window(mem_len=m, seg_len=n)
    x = len(lookahead_distances(variant, mem_len=m))
    band = attention.lookahead_band(mem_len=m, window_start=start, window_len=width,
                                    table_len=x, variant=variant)
    assert band.blocks * band.rows * band.length <= (m + n) * 2 * n
