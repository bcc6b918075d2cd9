"""Triton kernels for relative-position attention with a query-dependent position term.

One generic kernel family serves both LaMemo branches. A query row `i` and a key column `j` form
the score

    s[i, j] = scale * ( (q_i + u) . k_j + (q_i + vb) . R[f(j - i + OFF)] )

where f is the identity or abs (the unmasked look-ahead window), and the pair is allowed iff
j >= COLMIN[b] (real memory rows), DMIN <= j - i + OFF <= DMAX (causal / look-right / same_length),
and both indices are in range. The wrapper (triton_attention.py) turns each branch into
(OFF, DMIN, DMAX, ABS, COLMIN).

The position term, exactly: inside a [BM, BN] tile the table index f(j - i + OFF) spans at most
BM + BN - 1 consecutive rows of R starting at `base`. The kernel loads that band (BW >= BM+BN-1
rows), computes (q + vb) @ band^T as a [BM, BW] tensor-core product, and selects each pair's
column with `tl.gather` along the band axis: a pure register selection, no arithmetic, so every
score equals the eager one up to the dot-product summation order. The backward runs the same
selection in reverse (a gather of dS into band coordinates; two gathers for abs, whose map is
two-to-one) and accumulates dR with fp32 atomics on the band rows. Nothing of size [N, M+N] is
ever written to global memory: the forward keeps the online-softmax state in registers; the
backward recomputes P from the saved logsumexp (flash-attention-2 style) in two kernels, one
per key block (dK, dV) and one per query block (dQ, dR, and the bias-gradient partial sums);
those live in _rel_kernels_bwd.py.
"""

from __future__ import annotations

# Kernel signatures carry ~30 scalars: packed lines read better than one per line.
# fmt: off
import triton
import triton.language as tl


@triton.jit
def _col_range(m0, colmin, n_cols, off, dmin, dmax, BM: tl.constexpr, BN: tl.constexpr):
    """Key-block loop bounds [start, hi) for query rows [m0, m0+BM)."""
    lo = tl.maximum(tl.maximum(colmin, dmin - off + m0), 0)
    hi = tl.minimum(n_cols, dmax - off + m0 + BM)
    return (lo // BN) * BN, hi


@triton.jit
def _row_range(n0, colmin, n_rows, off, dmin, dmax, BM: tl.constexpr, BN: tl.constexpr):
    """Query-block loop bounds [start, hi) for key columns [n0, n0+BN)."""
    lo = tl.maximum(n0 - dmax + off, 0)
    hi = tl.minimum(n_rows, n0 + BN - dmin + off)
    hi = tl.where(n0 + BN <= colmin, 0, hi)  # the whole key block is unused memory
    return (lo // BM) * BM, hi


@triton.jit
def _band_base(m0, n0, off, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Smallest table index f(j - i + OFF) over the tile."""
    lo = n0 - (m0 + BM - 1) + off
    hi = n0 + BN - 1 - m0 + off
    if ABS:
        return tl.maximum(lo, 0) + tl.maximum(-hi, 0)
    return lo


@triton.jit
def _load_q(Q_bh, rows, dd, s_t, n_rows, U_h, VB_h, D: tl.constexpr):
    """(q + u, q + vb) in the input dtype: [BM, BD] each; padded rows/dims load as q = 0."""
    dmask = dd < D
    q = tl.load(Q_bh + rows[:, None] * s_t + dd[None, :],
                mask=(rows[:, None] < n_rows) & dmask[None, :], other=0.0)
    u = tl.load(U_h + dd, mask=dmask, other=0.0).to(tl.float32)
    vb = tl.load(VB_h + dd, mask=dmask, other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    qu = tl.where(dmask[None, :], qf + u[None, :], 0.0).to(q.dtype)
    qv = tl.where(dmask[None, :], qf + vb[None, :], 0.0).to(q.dtype)
    return qu, qv


@triton.jit
def _load_rows(X_bh, idx, dd, s_t, n, D: tl.constexpr):
    """Rows idx of a [n, D] slab (stride s_t, unit last stride), zero outside."""
    return tl.load(X_bh + idx[:, None] * s_t + dd[None, :],
                   mask=(idx[:, None] < n) & (idx[:, None] >= 0) & (dd[None, :] < D), other=0.0)


@triton.jit
def _tile_scores(qu, qv, k, R_h, sr_x, n_r, m0, n0, colmin, n_rows, n_cols, off, dmin, dmax,
                 scale, D: tl.constexpr, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BW: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Masked scaled scores [BM, BN] (fp32, -inf where not allowed), the R band [BW, BD] and
    its first table index."""
    rows = m0 + tl.arange(0, BM)
    cols = n0 + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    ac = tl.dot(qu, tl.trans(k), input_precision=PREC)  # [BM, BN]
    base = _band_base(m0, n0, off, ABS, BM, BN)
    rb = _load_rows(R_h, base + tl.arange(0, BW), dd, sr_x, n_r, D).to(qv.dtype)  # [BW, BD]
    band = tl.dot(qv, tl.trans(rb), input_precision=PREC)  # [BM, BW]
    diff = cols[None, :] - rows[:, None] + off  # [BM, BN]
    if ABS:
        fidx = tl.abs(diff)
    else:
        fidx = diff
    bd = tl.gather(band, fidx - base, axis=1)  # [BM, BN]: band[i, f(diff) - base]
    allowed = ((cols[None, :] >= colmin) & (cols[None, :] < n_cols) & (rows[:, None] < n_rows)
               & (diff >= dmin) & (diff <= dmax))
    s = tl.where(allowed, (ac + bd) * scale, float("-inf"))
    return s, rb, base


@triton.jit
def _fwd_kernel(Q, K, V, R, U, VB, COLMIN, O, LSE,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sr_x, sr_h,
                H, n_rows, n_cols, n_r, off, dmin, dmax, scale,
                D: tl.constexpr, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BW: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    m0 = tl.program_id(0) * BM
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    colmin = tl.load(COLMIN + b)
    rows = m0 + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    qu, qv = _load_q(Q + b * sq_b + h * sq_h, rows, dd, sq_t, n_rows, U + h * D, VB + h * D, D)
    K_bh = K + b * sk_b + h * sk_h
    V_bh = V + b * sv_b + h * sv_h
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    start, hi = _col_range(m0, colmin, n_cols, off, dmin, dmax, BM, BN)
    for n0 in range(start, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k = _load_rows(K_bh, cols, dd, sk_t, n_cols, D)
        s, rb, base = _tile_scores(qu, qv, k, R + h * sr_h, sr_x, n_r, m0, n0, colmin, n_rows,
                                   n_cols, off, dmin, dmax, scale, D, ABS, BM, BN, BW, BD, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V_bh, cols, dd, sv_t, n_cols, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    out = O + bh * n_rows * D
    tl.store(out + rows[:, None] * D + dd[None, :], o.to(O.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (dd[None, :] < D))
    tl.store(LSE + bh * n_rows + rows, lse, mask=rows < n_rows)
