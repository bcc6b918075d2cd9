"""Backward kernels of the fused relative attention (the forward and the shared tile helpers are
in _rel_kernels.py, whose docstring explains the score, the band and the masks).

dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse: the gradient reaching the logsumexp
(the look-ahead merge differentiates through it) folds into the same formula, since
d lse / d s = P. dK, dV accumulate in registers per key block; dQ per query block, where dS is
also regrouped into band coordinates for d(q + vb) and the atomically accumulated dR.
"""

from __future__ import annotations

# Kernel signatures carry ~30 scalars: packed lines read better than one per line.
# fmt: off
import triton
import triton.language as tl

from ._rel_kernels import _col_range, _load_q, _load_rows, _row_range, _tile_scores


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, R, U, VB, COLMIN, DO, LSE, DELTA, DK, DV,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sr_x, sr_h,
                     H, n_rows, n_cols, n_r, off, dmin, dmax, scale,
                     D: tl.constexpr, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BW: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    n0 = tl.program_id(0) * BN
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    colmin = tl.load(COLMIN + b)
    cols = n0 + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    k = _load_rows(K + b * sk_b + h * sk_h, cols, dd, sk_t, n_cols, D)  # [BN, BD]
    v = _load_rows(V + b * sv_b + h * sv_h, cols, dd, sv_t, n_cols, D)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    start, hi = _row_range(n0, colmin, n_rows, off, dmin, dmax, BM, BN)
    for m0 in range(start, hi, BM):
        rows = m0 + tl.arange(0, BM)
        qu, qv = _load_q(Q + b * sq_b + h * sq_h, rows, dd, sq_t, n_rows, U + h * D,
                         VB + h * D, D)
        s, rb, base = _tile_scores(qu, qv, k, R + h * sr_h, sr_x, n_r, m0, n0, colmin, n_rows,
                                   n_cols, off, dmin, dmax, scale, D, ABS, BM, BN, BW, BD, PREC)
        lse = tl.load(LSE + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        delta = tl.load(DELTA + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        do = _load_rows(DO + bh * n_rows * D, rows, dd, D, n_rows, D)  # [BM, BD]
        p = tl.exp(s - lse[:, None])  # [BM, BN], 0 where masked
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(qu.dtype)), qu, input_precision=PREC)
    mask = (cols[:, None] < n_cols) & (dd[None, :] < D)
    ptr = bh * n_cols * D + cols[:, None] * D + dd[None, :]
    tl.store(DK + ptr, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _to_band(ds, m0, n0, base, off, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BW: tl.constexpr):
    """Regroup dS [BM, BN] by table index: out[i, c] = sum of dS[i, j] with f(j-i+OFF) = base+c."""
    rows = m0 + tl.arange(0, BM)
    tgt = base + tl.arange(0, BW)  # table index of each band column
    c1 = tgt[None, :] + rows[:, None] - off - n0  # local key column with j - i + OFF = tgt
    ok1 = (c1 >= 0) & (c1 < BN)
    out = tl.where(ok1, tl.gather(ds, tl.minimum(tl.maximum(c1, 0), BN - 1), axis=1), 0.0)
    if ABS:  # j - i + OFF = -tgt maps to the same entry (once: tgt = 0 is already counted)
        c2 = rows[:, None] - tgt[None, :] - off - n0
        ok2 = (c2 >= 0) & (c2 < BN) & (tgt[None, :] != 0)
        out += tl.where(ok2, tl.gather(ds, tl.minimum(tl.maximum(c2, 0), BN - 1), axis=1), 0.0)
    return out


@triton.jit
def _bwd_dq_kernel(Q, K, V, R, U, VB, COLMIN, DO, LSE, DELTA, DQ, DR, DU_P, DVB_P,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sr_x, sr_h,
                   H, n_rows, n_cols, n_r, off, dmin, dmax, scale,
                   D: tl.constexpr, ABS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BW: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    m0 = pid_m * BM
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    colmin = tl.load(COLMIN + b)
    rows = m0 + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    qu, qv = _load_q(Q + b * sq_b + h * sq_h, rows, dd, sq_t, n_rows, U + h * D, VB + h * D, D)
    lse = tl.load(LSE + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
    delta = tl.load(DELTA + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
    do = _load_rows(DO + bh * n_rows * D, rows, dd, D, n_rows, D)
    dqc = tl.zeros([BM, BD], tl.float32)
    dqp = tl.zeros([BM, BD], tl.float32)
    K_bh = K + b * sk_b + h * sk_h
    V_bh = V + b * sv_b + h * sv_h
    start, hi = _col_range(m0, colmin, n_cols, off, dmin, dmax, BM, BN)
    for n0 in range(start, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k = _load_rows(K_bh, cols, dd, sk_t, n_cols, D)
        v = _load_rows(V_bh, cols, dd, sv_t, n_cols, D)
        s, rb, base = _tile_scores(qu, qv, k, R + h * sr_h, sr_x, n_r, m0, n0, colmin, n_rows,
                                   n_cols, off, dmin, dmax, scale, D, ABS, BM, BN, BW, BD, PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # [BM, BN] fp32
        dqc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dband = _to_band(ds, m0, n0, base, off, ABS, BM, BN, BW).to(rb.dtype)  # [BM, BW]
        dqp += tl.dot(dband, rb, input_precision=PREC)
        dr = tl.dot(tl.trans(dband), qv, input_precision=PREC)  # [BW, BD]
        ridx = base + tl.arange(0, BW)
        tl.atomic_add(DR + ridx[:, None] * (H * D) + h * D + dd[None, :], dr * scale,
                      mask=(ridx[:, None] >= 0) & (ridx[:, None] < n_r) & (dd[None, :] < D))
    dqc = dqc * scale
    dqp = dqp * scale
    dmask = dd < D
    tl.store(DQ + bh * n_rows * D + rows[:, None] * D + dd[None, :],
             (dqc + dqp).to(DQ.dtype.element_ty), mask=(rows[:, None] < n_rows) & dmask[None, :])
    part = (bh * tl.num_programs(0) + pid_m) * D + dd
    tl.store(DU_P + part, tl.sum(dqc, 0), mask=dmask)
    tl.store(DVB_P + part, tl.sum(dqp, 0), mask=dmask)
