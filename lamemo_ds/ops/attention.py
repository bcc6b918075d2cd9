"""Eager relative-position attention for LaMemo: the oracle every fused path is tested against.

Layout: heads-first inside attention, q/k/v [B, H, T, D]. The memory buffer has a fixed length M;
`valid` [B] counts the real memory rows, which are the LAST `valid` rows of the buffer, so buffer
position j is real memory iff j >= M - valid, and positions M..M+N-1 are the current segment.
Distances are measured in buffer positions, which equal the reference's positions shifted by a
constant, so every score is the reference's score.

Index tricks (named, pure, tested against loops in tests/test_index_tricks.py):
  rel_shift         — the Transformer-XL shift that aligns BD[t, k] (table order x = K-1..0) so
                      that column j holds distance M + t - j;
  causal_mask       — causal-with-memory (+ invalid memory rows, + same_length window);
  lookahead_index   — which table entry each (memory query, window key) pair uses;
  lookahead_band    — the same entries, block by block of memory rows: each block multiplies
                      only the table rows it reaches, so the look-ahead position term costs
                      O(M * N) (tests/test_ops_lookahead_band.py: equal to the full product);
  lookahead_mask    — the look-right mask of the window (+ invalid rows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """x [..., N, K] -> y with y[..., t, j] = x[..., t, j + N - 1 - t] for j <= K - N + t.

    Entries with j > K - N + t (future keys) hold unrelated values: callers mask them.
    Row t, column j < K-1 of y is element N-1 + t(K-1) + j of x flattened, so columns 0..K-2 are
    one contiguous block of x viewed with row stride K-1 (no copy); the last column is only
    needed at t = N-1, where it is x[N-1, K-1].
    """
    *lead, n, k = x.shape
    body = x.reshape(*lead, n * k)[..., n - 1:n - 1 + n * (k - 1)].view(*lead, n, k - 1)
    return torch.cat([body, x[..., k - 1:]], dim=-1)


def add_rel_shifted_(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """scores += rel_shift(x) on every entry a causal query may use, in place, without copies."""
    *lead, n, k = x.shape
    body = x.reshape(*lead, n * k)[..., n - 1:n - 1 + n * (k - 1)].view(*lead, n, k - 1)
    scores[..., :, : k - 1] += body
    scores[..., n - 1, k - 1] += x[..., n - 1, k - 1]
    return scores


class LookaheadBand(NamedTuple):
    """Which table rows the look-ahead BD term multiplies, block by block of memory rows.

    Memory row i = b*rows + a (block b) and window column w use the table key
    k = base + w - i (base = window_start - 1: index p-i-1; unmasked_window: window_start,
    the signed distance p-i). Block b multiplies its rows by `length` consecutive keys from
    base - b*rows - offset, so (a, w) reads band column offset + w - a. `index` [blocks*length]
    gives the table row of every key (the table's length for "no row": a zero row, or None when
    the band is the whole table as it is); `offset` is also the flat position of (0, 0) in a
    block's [rows, length] band, which makes the aligned term a strided view (band_pairs).
    """

    rows: int
    blocks: int
    length: int
    offset: int
    index: torch.Tensor | None


def lookahead_band(*, mem_len: int, window_start: int, window_len: int, table_len: int,
                   variant: str, block_rows: int | None = None, device=None) -> LookaheadBand:
    """The band plan: one block over the whole table while that is no longer than a band of
    window_len + rows - 1 keys (masked variants, M < 2N), else blocks of `block_rows`
    (default W) rows, so work and memory are O(M * (W + rows)) instead of O(M * X)."""
    rows = block_rows or window_len
    signed = variant == "unmasked_window"
    if block_rows is None and not signed and table_len <= window_len + rows - 1:
        # masked: key k is table row k, keys < 0 are masked, keys <= M-1 < X: no index
        return LookaheadBand(rows=mem_len, blocks=1, length=table_len,
                             offset=window_start - 1, index=None)
    blocks = -(-mem_len // rows)
    length = window_len + rows - 1
    base = window_start if signed else window_start - 1
    start = base - rows + 1 - rows * torch.arange(blocks, device=device)  # [blocks]
    keys = start[:, None] + torch.arange(length, device=device)[None, :]  # [blocks, L]
    row = keys.abs() if signed else keys
    row = torch.where((row >= 0) & (row < table_len), row, table_len)
    return LookaheadBand(rows=rows, blocks=blocks, length=length, offset=rows - 1,
                         index=row.reshape(-1))


def banded_positions(x: torch.Tensor, r: torch.Tensor, band: LookaheadBand) -> torch.Tensor:
    """x [B,H,M,D] times each block's band of the table r [X,H,D]: [B,H,blocks,rows,L].

    One GEMM per (head, block) over the block's B*rows query rows, heads-first in memory like
    per_head_positions (each [rows, L] block contiguous, as band_pairs needs).
    """
    if band.index is None:
        return per_head_positions(x, r).unsqueeze(2)  # [B,H,1,M,X]
    b, h, m, d = x.shape
    nb, rows, length = band.blocks, band.rows, band.length
    qr = F.pad(x.transpose(0, 1), (0, 0, 0, nb * rows - m))  # [H,B,nb*rows,D], zero rows
    qr = qr.view(h, b, nb, rows, d).transpose(1, 2).reshape(h * nb, b * rows, d)
    table = F.pad(r, (0, 0, 0, 0, 0, 1)).transpose(0, 1)  # [H,X+1,D], last row zero
    table = table.index_select(1, band.index).view(h * nb, length, d)  # [H*nb, L, D]
    out = torch.bmm(qr, table.transpose(1, 2))  # [H*nb, B*rows, L]
    return out.view(h, nb, b, rows, length).permute(2, 0, 1, 3, 4)  # [B,H,nb,rows,L]


def band_pairs(scores: torch.Tensor, x: torch.Tensor, *, offset: int):
    """(aligned view of x, the scores it adds to) pairs covering scores [.., M, W] once.

    x [.., blocks, rows, L] with unit column stride and row stride L: entry (a, w) of a block
    is flat element offset + a(L-1) + w of its [rows, L] block, a strided view (no copy). When
    L-1 < W one element can serve two pairs, so the last column is then its own view, keeping
    every view free of self-overlap (gradients accumulate into them in place).
    """
    *lead, nb, rows, length = x.shape
    m, w = scores.shape[-2:]
    full, rest = divmod(m, rows)
    cols = [(0, w)] if length - 1 >= w or rows == 1 else [(0, w - 1), (w - 1, w)]
    pairs = []
    for c0, c1 in cols:
        if c1 == c0:
            continue
        view = x.as_strided((*lead, nb, rows, c1 - c0),
                            (*x.stride()[:-2], length - 1, 1), x.storage_offset() + offset + c0)
        if full:
            pairs.append((view[..., :full, :, :],
                          scores[..., : full * rows, c0:c1].unflatten(-2, (full, rows))))
        if rest:
            pairs.append((view[..., full, :rest, :], scores[..., full * rows:, c0:c1]))
    return pairs


def _band_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when each [rows, L] block is contiguous (as band_pairs reads it), else a copy."""
    return x if x.stride()[-2:] == (x.shape[-1], 1) else x.contiguous()


def causal_mask(valid: torch.Tensor, *, mem_len: int, seg_len: int,
                same_length: bool = False) -> torch.Tensor:
    """Allowed (True) keys of every current query: [B, 1, N, M+N] bool.

    Query t (buffer position M+t) sees key j iff j <= M+t, j is a real memory row or current,
    and, with same_length, the distance M+t-j is below M (each query sees at most M keys).
    """
    k = mem_len + seg_len
    t = torch.arange(seg_len, device=valid.device)[:, None]  # [N, 1]
    j = torch.arange(k, device=valid.device)[None, :]  # [1, K]
    dist = mem_len + t - j  # [N, K]
    allowed = dist >= 0
    if same_length and mem_len > 0:
        allowed = allowed & (dist < mem_len)
    first_real = (mem_len - valid)[:, None, None, None]  # [B, 1, 1, 1]
    return allowed[None, None] & (j[None, None] >= first_real)  # [B, 1, N, K]


def lookahead_window(*, mem_len: int, seg_len: int) -> tuple[int, int]:
    """(start, length) of the look-ahead key window in buffer positions: [max(M-N+1, 1), M]."""
    start = max(mem_len - seg_len + 1, 1)
    return start, mem_len - start + 1


def lookahead_index(*, mem_len: int, window_start: int, window_len: int, variant: str,
                    device=None) -> torch.Tensor:
    """[M, W] index into the look-ahead distance table (positional.lookahead_distances).

    Masked variants: key p right of query i uses distance p - i >= 1 at index p - i - 1.
    unmasked_window: distance |p - i| at index |p - i|. Out-of-mask pairs are clamped to a valid
    index (their score is masked anyway).
    """
    i = torch.arange(mem_len, device=device)[:, None]
    p = window_start + torch.arange(window_len, device=device)[None, :]
    if variant == "unmasked_window":
        return (p - i).abs()
    return (p - i - 1).clamp(min=0, max=max(mem_len - 1, 0))


def lookahead_mask(valid: torch.Tensor, *, mem_len: int, window_start: int, window_len: int,
                   variant: str) -> torch.Tensor:
    """Allowed (True) window keys of every memory query: [B, 1, M, W] bool.

    Key p is usable by memory row i iff p is a real row (p > M - valid: the reference window
    never includes the first memory token; p = M, the first current token, always is) and,
    unless unmasked, p > i (look right only). Every row keeps at least the key p = M, so no row
    is empty (rows of unused buffer slots compute finite values that nothing reads).
    """
    i = torch.arange(mem_len, device=valid.device)[:, None]
    p = window_start + torch.arange(window_len, device=valid.device)[None, :]
    first_real = torch.clamp(mem_len - valid, max=mem_len - 1)  # [B]
    real = p[None, None] > first_real[:, None, None, None]  # [B, 1, 1, W]
    if variant == "unmasked_window":
        return real.expand(-1, -1, mem_len, -1)
    return real & (p > i)[None, None]


def _grad_layout(bd: torch.Tensor) -> tuple[int, ...] | None:
    """Strides for the gradient of a position term: bd's own when torch would keep them for a
    new tensor (dense, as `empty_like` decides) and each [T, X] block is contiguous, e.g. the
    heads-first layout of `per_head_positions`, so the gradient flows back into the GEMM that
    made the term without a copy; None (row-major) for any other layout."""
    stride = torch.empty_like(bd, device="meta").stride()
    return stride if stride[-2:] == (bd.shape[-1], 1) else None


def _grad_buffer(d: torch.Tensor, shape: torch.Size, stride: tuple[int, ...] | None, *,
                 zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tensor of `shape` with `stride` (row-major if None), its view with the last two
    dims flattened)."""
    g = d.new_empty(shape) if stride is None else d.new_empty_strided(shape, stride)
    if zero:
        g.zero_()
    return g, g.view(*shape[:-2], shape[-2] * shape[-1])


def _scatter_rel_shifted(d: torch.Tensor, bd_shape: torch.Size,
                         bd_stride: tuple[int, ...] | None) -> torch.Tensor:
    """Gradient of `add_rel_shifted_` w.r.t. x: every entry of x is read at most once."""
    *lead, n, k = bd_shape
    out, g = _grad_buffer(d, bd_shape, bd_stride, zero=False)
    g[..., : n - 1] = 0  # distances beyond the first query's reach: never read
    g[..., n - 1:n - 1 + n * (k - 1)].view(*lead, n, k - 1).copy_(d[..., :, : k - 1])
    g[..., n * k - 1] = d[..., n - 1, k - 1]
    return out


def _scatter_band(d: torch.Tensor, bd_shape: torch.Size, bd_stride: tuple[int, ...] | None, *,
                  offset: int) -> torch.Tensor:
    """Gradient of the band add (band_pairs) w.r.t. the band: zero where no score reads it."""
    out, _ = _grad_buffer(d, bd_shape, bd_stride, zero=True)
    for band, dd in band_pairs(d, out, offset=offset):
        band += dd
    return out


def _mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf elsewhere: masks scores by one addition, broadcast over heads."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, NEG_INF)


class _ScoresSoftmax(torch.autograd.Function):
    """scores = ac + shift(bd), masked; returns (softmax(scores), logsumexp(scores)).

    One autograd node instead of a chain of shift/mask/logsumexp/exp ops: the forward works in
    place in one buffer (the probabilities overwrite the scores), only the probabilities are
    saved, and the backward writes the position-term gradient straight into bd's layout.
    shift: "causal" (add_rel_shifted_), "band" (the look-ahead band, band_pairs at `offset`) or
    "none" (bd already aligned with ac, or None).
    Backward: d scores = p * (dp - sum(dp * p) + dlse).
    """

    @staticmethod
    def forward(ctx, ac, bd, allowed, shift: str, offset: int, acc: torch.dtype):
        if shift not in ("causal", "band", "none"):
            raise ValueError(f"shift={shift!r}: expected causal, band or none")
        scores = ac if ac.dtype == acc else ac.to(acc)
        bd_acc = None if bd is None else (bd if bd.dtype == acc else bd.to(acc))
        if shift == "causal":
            add_rel_shifted_(scores, bd_acc)
        elif shift == "band":
            for band, sc in band_pairs(scores, _band_ready(bd_acc), offset=offset):
                sc += band
        elif bd_acc is not None:
            scores += bd_acc
        scores.add_(_mask_bias(allowed, acc))  # float add: bool kernels are scalar here
        peak = scores.amax(dim=-1, keepdim=True)  # [.., Q, 1]
        probs = scores.sub_(peak).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        probs.div_(total)
        lse = (peak + total.log()).squeeze(-1)  # [.., Q]
        if scores.data_ptr() == ac.data_ptr():
            ctx.mark_dirty(ac)
        ctx.save_for_backward(probs)
        bd_meta = None if bd is None else (bd.shape, _grad_layout(bd), bd.dtype)
        ctx.meta = (shift, offset, ac.dtype, bd_meta)
        return probs, lse

    @staticmethod
    def backward(ctx, d_probs, d_lse):
        (probs,) = ctx.saved_tensors
        shift, offset, ac_dtype, bd_meta = ctx.meta
        if d_probs is None:
            d_probs = torch.zeros_like(probs)
        inner = (d_probs * probs).sum(-1, keepdim=True)
        if d_lse is not None:
            inner = inner - d_lse.unsqueeze(-1)
        d = probs * (d_probs - inner)  # masked entries: probs = 0 -> 0
        d_bd = None
        if bd_meta is not None and ctx.needs_input_grad[1]:
            shape, stride, dtype = bd_meta
            if shift == "causal":
                d_bd = _scatter_rel_shifted(d, shape, stride)
            elif shift == "band":
                d_bd = _scatter_band(d, shape, stride, offset=offset)
            else:
                d_bd = d
            d_bd = d_bd.to(dtype)
        return d.to(ac_dtype), d_bd, None, None, None, None


def _attend(ac: torch.Tensor, bd: torch.Tensor | None, allowed: torch.Tensor, v: torch.Tensor,
            dropatt: float, training: bool, *, shift: str,
            offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention over ac + shift(bd): (output, logsumexp in >= fp32)."""
    acc = torch.float64 if ac.dtype == torch.float64 else torch.float32
    probs, lse = _ScoresSoftmax.apply(ac, bd, allowed, shift, offset, acc)
    probs = probs.to(v.dtype)
    if dropatt > 0 and training:
        probs = F.dropout(probs, p=dropatt, training=True)
    return probs @ v, lse


def per_head_positions(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,D] times the position table r [X,H,D] of each head: [B,H,T,X].

    One GEMM per head over all B*T rows (the table is shared by the batch), instead of a
    batched matmul that copies r once per stream; the result is heads-first in memory
    ([H,B,T,X] transposed), with each [T, X] block contiguous as the shifts need.
    """
    b, h, t, d = x.shape
    rows = x.transpose(0, 1).reshape(h, b * t, d)
    return torch.bmm(rows, r.permute(1, 2, 0)).view(h, b, t, -1).transpose(0, 1)


def causal_rel_attention(q, k, v, r, u, vb, *, valid, mem_len: int, same_length: bool = False,
                         dropatt: float = 0.0, training: bool = False):
    """Causal attention of the current rows over [memory ; current] (docs/algorithm.md §2).

    q [B,H,N,D]; k, v [B,H,K,D] with K = M+N; r [K,H,D] the projected table for distances
    K-1..0; u, vb [H,D]. Returns o [B,H,N,D] and lse [B,H,N] (fp32, fp64 for fp64 inputs).
    """
    n, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ac = ((q + u[None, :, None, :]) * scale) @ k.transpose(-1, -2)  # [B,H,N,K]
    bd = per_head_positions((q + vb[None, :, None, :]) * scale, r)  # [B,H,N,K]
    allowed = causal_mask(valid, mem_len=mem_len, seg_len=n, same_length=same_length)
    return _attend(ac, bd, allowed, v, dropatt, training, shift="causal")


def lookahead_attention(q, k, v, r, u, vb, *, valid, mem_len: int, window_start: int,
                        variant: str = "default", dropatt: float = 0.0, training: bool = False):
    """Look-ahead attention of the memory rows over their window (docs/algorithm.md §3).

    q [B,H,M,D] memory queries; k, v [B,H,W,D] the window keys (buffer positions window_start..
    window_start+W-1); r [X,H,D] the projected look-ahead table; u, vb [H,D] the content and
    position biases of this branch. Returns e [B,H,M,D] and lse [B,H,M].
    """
    w, d = k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ac = ((q + u[None, :, None, :]) * scale) @ k.transpose(-1, -2)  # [B,H,M,W]
    band = lookahead_band(mem_len=mem_len, window_start=window_start, window_len=w,
                          table_len=r.shape[0], variant=variant, device=q.device)
    bd = banded_positions((q + vb[None, :, None, :]) * scale, r, band)  # [B,H,nb,rows,L]
    allowed = lookahead_mask(valid, mem_len=mem_len, window_start=window_start, window_len=w,
                             variant=variant)
    return _attend(ac, bd, allowed, v, dropatt, training, shift="band", offset=band.offset)
