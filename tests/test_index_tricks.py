"""Every index trick of lamemo_ds/ops/attention.py against a slow loop that is obviously right.

Buffer convention (attention.py): memory buffer positions 0..M-1 with the `valid` real rows
right-aligned (position j is real iff j >= M - valid), current token t at position M + t. The
loops below state each rule of docs/algorithm.md §2-§3 directly, one (query, key) pair at a time.
"""

from __future__ import annotations

import pytest
import torch

from lamemo_ds.model.positional import lookahead_distances
from lamemo_ds.ops.attention import (
    causal_mask,
    lookahead_index,
    lookahead_mask,
    lookahead_window,
    rel_shift,
)

pytestmark = pytest.mark.unit

# (M, N): M = 0, M < N, M = N, M > N, N = 1 (with and without memory).
SHAPES = [(0, 3), (0, 1), (2, 5), (4, 4), (7, 3), (5, 1), (1, 1), (6, 2)]
VARIANTS = ["default", "signed_distance", "separate_content_bias", "unmasked_window"]
IDS = [f"M{m}-N{n}" for m, n in SHAPES]


def _valids(m: int) -> torch.Tensor:
    """Every real-row count 0..M, one stream each."""
    return torch.arange(m + 1, dtype=torch.int64)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 5), (3, 3), (3, 7), (4, 9), (5, 6)])
def test_rel_shift_matches_loop(n, k):
    x = torch.randn(2, 3, n, k)
    y = rel_shift(x)
    assert y.shape == x.shape
    for t in range(n):
        for j in range(k - n + t + 1):  # keys at or before the query; the rest is masked later
            assert torch.equal(y[..., t, j], x[..., t, j + n - 1 - t]), (t, j)


@pytest.mark.parametrize("m,n", SHAPES, ids=IDS)
def test_rel_shift_aligns_causal_distances(m, n):
    """With the table in Transformer-XL order (entry c is distance K-1-c), the shifted score
    of query t and key j is the one for distance M + t - j (docs/algorithm.md §2)."""
    k = m + n
    table_dist = torch.tensor([float(k - 1 - c) for c in range(k)])
    y = rel_shift(table_dist.expand(n, k).clone())
    for t in range(n):
        for j in range(m + t + 1):
            assert y[t, j].item() == m + t - j, (t, j)


@pytest.mark.parametrize("same_length", [False, True])
@pytest.mark.parametrize("m,n", SHAPES, ids=IDS)
def test_causal_mask_matches_loop(m, n, same_length):
    valid = _valids(m)
    mask = causal_mask(valid, mem_len=m, seg_len=n, same_length=same_length)
    assert mask.shape == (len(valid), 1, n, m + n) and mask.dtype == torch.bool
    for b, vb in enumerate(valid.tolist()):
        for t in range(n):
            for j in range(m + n):
                real = j >= m or j >= m - vb  # a current token or a real memory row
                causal = j <= m + t
                # same_length: at most M keys per query (Transformer-XL eval); meaningless at M=0
                window = not same_length or m == 0 or (m + t - j) < m
                assert mask[b, 0, t, j].item() == (real and causal and window), (b, t, j)


@pytest.mark.parametrize("m,n", SHAPES, ids=IDS)
def test_lookahead_window_matches_loop(m, n):
    start, width = lookahead_window(mem_len=m, seg_len=n)
    # docs/algorithm.md §3: the last N-1 memory tokens plus the first current token, never
    # position 0.
    expected = [p for p in range(m + 1) if p >= 1 and p >= m - n + 1]
    assert width == len(expected)
    if expected:
        assert list(range(start, start + width)) == expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,n", [s for s in SHAPES if s[0] > 0], ids=[i for s, i in
                                                                      zip(SHAPES, IDS) if s[0]])
def test_lookahead_index_gives_the_right_distance(m, n, variant):
    """The table entry each (memory query i, window key p) pair reads is the distance the
    variant prescribes: p - i for the masked variants, -(p - i) for signed_distance, |p - i|
    for unmasked_window; every index is in range, masked pairs included."""
    start, width = lookahead_window(mem_len=m, seg_len=n)
    idx = lookahead_index(mem_len=m, window_start=start, window_len=width, variant=variant)
    table = lookahead_distances(variant, mem_len=m, dtype=torch.float64)
    assert idx.shape == (m, width)
    for i in range(m):
        for w in range(width):
            p = start + w
            c = idx[i, w].item()
            assert 0 <= c < len(table), (i, p, c)
            if variant == "unmasked_window":
                assert table[c].item() == abs(p - i), (i, p)
            elif p > i:
                want = -(p - i) if variant == "signed_distance" else p - i
                assert table[c].item() == want, (i, p)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,n", [s for s in SHAPES if s[0] > 0], ids=[i for s, i in
                                                                      zip(SHAPES, IDS) if s[0]])
def test_lookahead_mask_matches_loop(m, n, variant):
    valid = _valids(m)
    start, width = lookahead_window(mem_len=m, seg_len=n)
    mask = lookahead_mask(valid, mem_len=m, window_start=start, window_len=width,
                          variant=variant)
    assert mask.shape == (len(valid), 1, m, width) and mask.dtype == torch.bool
    for b, vb in enumerate(valid.tolist()):
        for i in range(m):
            for w in range(width):
                p = start + w
                # a usable key: the first current token, or a real memory row that is not the
                # oldest real one (the window never starts at memory position 0,
                # docs/algorithm.md §3)
                key_ok = p == m or (m - vb < p < m)
                right = variant == "unmasked_window" or p > i
                assert mask[b, 0, i, w].item() == (key_ok and right), (b, i, p)
            assert mask[b, 0, i].any(), "every row keeps at least the first current token"


@pytest.mark.parametrize("m,n", [s for s in SHAPES if s[0] > 0], ids=[i for s, i in
                                                                      zip(SHAPES, IDS) if s[0]])
def test_lookahead_keys_in_memory_coordinates(m, n):
    """Window + mask together, restated without the buffer: real memory token a (0-based
    among the `valid` real rows) looks at the keys a' with max(valid-N+1, 1) <= a' <= valid
    (valid = the first current token) and a' > a (docs/algorithm.md §3, M = valid there)."""
    valid = _valids(m)
    start, width = lookahead_window(mem_len=m, seg_len=n)
    mask = lookahead_mask(valid, mem_len=m, window_start=start, window_len=width,
                          variant="default")
    for b, vb in enumerate(valid.tolist()):
        shift = m - vb  # buffer position of real row 0
        for a in range(vb):
            got = {start + w - shift for w in range(width) if mask[b, 0, a + shift, w]}
            want = {q for q in range(max(vb - n + 1, 1), vb + 1) if q > a}
            assert got == want, (b, a)
