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
  lookahead_mask    — the look-right mask of the window (+ invalid rows).
"""

from __future__ import annotations

import math

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


def add_lookahead_shifted_(scores: torch.Tensor, x: torch.Tensor, *,
                           window_start: int) -> torch.Tensor:
    """scores[.., i, w] += x[.., i, p - i - 1] with p = window_start + w, in place, no copies.

    x [.., M, M] holds (q_i + v') . R(x+1) for x = 0..M-1. Element (i, p-i-1) of x is element
    (window_start - 1) + i(M-1) + w of x flattened: columns 0..W-2 are a contiguous block viewed
    with row stride M-1, and the last column (p = M, the first current token) is a slice of
    stride M-1. Pairs with p <= i read unrelated values; lookahead_mask masks them.
    """
    *lead, m, xlen = x.shape
    w = scores.shape[-1]
    start = window_start - 1
    flat = x.reshape(*lead, m * xlen)
    if w > 1:
        body = flat[..., start:start + m * (xlen - 1)].view(*lead, m, xlen - 1)[..., : w - 1]
        scores[..., : w - 1] += body
    last = flat[..., m - 1:m - 1 + m * (xlen - 1):xlen - 1] if xlen > 1 else flat[..., :1]
    scores[..., w - 1] += last
    return scores


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


class _SoftmaxLSE(torch.autograd.Function):
    """probs = softmax(scores), lse = logsumexp(scores) in one pass, saving only probs.

    Backward: d scores = p * (dp - sum(dp * p)) + p * dlse.
    """

    @staticmethod
    def forward(ctx, scores):
        lse = torch.logsumexp(scores, dim=-1)  # [.., Q]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        ctx.save_for_backward(probs)
        return probs, lse

    @staticmethod
    def backward(ctx, d_probs, d_lse):
        (probs,) = ctx.saved_tensors
        if d_probs is None:
            d_probs = torch.zeros_like(probs)
        inner = (d_probs * probs).sum(-1, keepdim=True)
        if d_lse is not None:
            inner = inner - d_lse.unsqueeze(-1)
        return probs * (d_probs - inner)


def _attend(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, dropatt: float,
            training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention returning (output, logsumexp in >= fp32)."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = torch.where(allowed, scores.to(acc), NEG_INF)
    probs, lse = _SoftmaxLSE.apply(scores)
    probs = probs.to(v.dtype)
    if dropatt > 0 and training:
        probs = F.dropout(probs, p=dropatt, training=True)
    return probs @ v, lse


def causal_rel_attention(q, k, v, r, u, vb, *, valid, mem_len: int, same_length: bool = False,
                         dropatt: float = 0.0, training: bool = False):
    """Causal attention of the current rows over [memory ; current] (SPEC §2).

    q [B,H,N,D]; k, v [B,H,K,D] with K = M+N; r [K,H,D] the projected table for distances
    K-1..0; u, vb [H,D]. Returns o [B,H,N,D] and lse [B,H,N] (fp32, fp64 for fp64 inputs).
    """
    n, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ac = ((q + u[None, :, None, :]) * scale) @ k.transpose(-1, -2)  # [B,H,N,K]
    bd = ((q + vb[None, :, None, :]) * scale) @ r.permute(1, 2, 0)  # [B,H,N,D]@[H,D,K]->[B,H,N,K]
    scores = add_rel_shifted_(ac, bd)
    allowed = causal_mask(valid, mem_len=mem_len, seg_len=n, same_length=same_length)
    return _attend(scores, allowed, v, dropatt, training)


def lookahead_attention(q, k, v, r, u, vb, *, valid, mem_len: int, window_start: int,
                        variant: str = "default", dropatt: float = 0.0, training: bool = False):
    """Look-ahead attention of the memory rows over their window (SPEC §3).

    q [B,H,M,D] memory queries; k, v [B,H,W,D] the window keys (buffer positions window_start..
    window_start+W-1); r [X,H,D] the projected look-ahead table; u, vb [H,D] the content and
    position biases of this branch. Returns e [B,H,M,D] and lse [B,H,M].
    """
    w, d = k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ac = ((q + u[None, :, None, :]) * scale) @ k.transpose(-1, -2)  # [B,H,M,W]
    bd_full = ((q + vb[None, :, None, :]) * scale) @ r.permute(1, 2, 0)  # [B,H,M,X]
    if variant == "unmasked_window":  # |p - i| is no shift: gather
        idx = lookahead_index(mem_len=mem_len, window_start=window_start, window_len=w,
                              variant=variant, device=q.device)  # [M, W]
        scores = ac + bd_full.gather(-1, idx.expand(*bd_full.shape[:2], -1, -1))  # [B,H,M,W]
    else:
        scores = add_lookahead_shifted_(ac, bd_full, window_start=window_start)
    allowed = lookahead_mask(valid, mem_len=mem_len, window_start=window_start, window_len=w,
                             variant=variant)
    return _attend(scores, allowed, v, dropatt, training)
