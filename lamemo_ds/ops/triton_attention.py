"""Fused Triton attention for LaMemo's two branches, with the eager functions' exact contract.

Both public functions take and return what their namesakes in lamemo_ds/ops/attention.py do
(q/k/v [B,H,T,D], r [X,H,D], u/vb [H,D], valid [B] int64) and are differentiable in q, k, v, r,
u and vb, including through the returned logsumexp (the look-ahead merge uses it). The kernels
(_rel_kernels.py) never write an [N, M+N] matrix: memory is O(B·H·T·D) in both directions.

Each branch is mapped to one generic geometry: a score pair (row i, column j) reads table row
f(j - i + off) (f = identity, or abs for the unmasked window) and is allowed iff
dmin <= j - i + off <= dmax and j >= colmin[b].
  causal:    rows t < N, cols j < M+N, off = N-1 (table order K-1..0), dmax = K-1 (j <= M+t),
             dmin = N with same_length (distance < M), colmin = M - valid;
  look-ahead: rows i < M, cols w < W (position p = window_start + w); masked variants
             off = window_start - 1 (index p-i-1), dmin = 0 (p > i); unmasked_window off =
             window_start with abs; colmin = min(M - valid, M - 1) + 1 - window_start.
Limits: attention dropout must be 0 (dispatch falls back to eager otherwise), and fp64 is left
to the eager path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BIG = 1 << 30  # "no bound" for dmin/dmax; small enough that index arithmetic stays in int32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """Triton imports and can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton
    except ImportError:
        return False
    return torch.cuda.is_available() or bool(triton.knobs.runtime.interpret)


def supports_device(device_type: str) -> bool:
    """Whether tensors on this device type can run the kernels (CPU: only the interpreter)."""
    if not available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret) == (device_type == "cpu")


@dataclass(frozen=True)
class Geometry:
    """Index/mask rule of one branch (see the module docstring)."""

    off: int
    dmin: int
    dmax: int
    abs_index: bool


def causal_geometry(*, mem_len: int, seg_len: int, same_length: bool) -> Geometry:
    dmin = seg_len if (same_length and mem_len > 0) else -_BIG
    return Geometry(off=seg_len - 1, dmin=dmin, dmax=mem_len + seg_len - 1, abs_index=False)


def lookahead_geometry(*, window_start: int, variant: str) -> Geometry:
    if variant == "unmasked_window":
        return Geometry(off=window_start, dmin=-_BIG, dmax=_BIG, abs_index=True)
    return Geometry(off=window_start - 1, dmin=0, dmax=_BIG, abs_index=False)


@dataclass(frozen=True)
class _Launch:
    bm: int
    bn: int
    bw: int
    bd: int
    warps: int
    stages: int


# (block_m, block_n, num_warps) per kernel and padded head dim, chosen from sm_90 builds
# (ptxas resource usage, compiled ahead of time without a GPU): the largest tiles that do not
# spill registers. The in-register band gather is what limits them; see bench/attention.py.
_GPU_TILES = {
    ("fwd", 64): (64, 64, 8),
    ("dkdv", 64): (32, 32, 8),
    ("dq", 64): (32, 32, 8),
    ("fwd", 128): (32, 32, 4),
    ("dkdv", 128): (32, 32, 4),
    ("dq", 128): (32, 32, 8),
}


def _launch_config(d_head: int, interpret: bool, kernel: str) -> _Launch:
    """Tile sizes of one kernel ('fwd', 'dkdv', 'dq'); bw covers the bm + bn - 1 table rows a
    tile touches. Head dims pad to a power of two >= 16 (41 -> 64) inside the kernel."""
    bd = max(16, 1 << (d_head - 1).bit_length())
    if interpret:
        bm = bn = 16
        warps, stages = 1, 1
    else:
        bm, bn, warps = _GPU_TILES[(kernel, min(max(bd, 64), 128))]
        stages = 2
    if bd > 128:
        raise ValueError(
            f"fused attention supports head dims up to 128, got {d_head}; "
            "use model.attention_impl=eager"
        )
    bw = 1 << (bm + bn - 2).bit_length()
    return _Launch(bm=bm, bn=bn, bw=bw, bd=bd, warps=warps, stages=stages)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _common_args(q, k, v, r, geom: Geometry, scale: float):
    """Positional scalar arguments shared by the three kernels (after the pointers)."""
    return (
        *_strides(q),
        *_strides(k),
        *_strides(v),
        r.stride(0),
        r.stride(1),
        q.shape[1],
        q.shape[2],
        k.shape[2],
        r.shape[0],
        geom.off,
        geom.dmin,
        geom.dmax,
        scale,
    )


def _meta(cfg: _Launch, d_head: int, geom: Geometry, dtype: torch.dtype, interpret: bool) -> dict:
    """Compile-time arguments. fp32 products: exact in the interpreter (the tests' tight
    tolerance), tf32x3 on the GPU (three tensor-core passes, ~fp32 accuracy; 'ieee' would fall
    back to scalar FMAs and take minutes to compile)."""
    fp32_prec = "ieee" if interpret else "tf32x3"
    return dict(
        D=d_head,
        ABS=geom.abs_index,
        BM=cfg.bm,
        BN=cfg.bn,
        BW=cfg.bw,
        BD=cfg.bd,
        PREC=fp32_prec if dtype == torch.float32 else "tf32",
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )


def _forward(q, k, v, r, u, vb, colmin, geom: Geometry):
    """o [B,H,T,D] (input dtype), lse [B,H,T] fp32."""
    import triton

    from . import _rel_kernels as kern

    b, h, t, d = q.shape
    interpret = bool(triton.knobs.runtime.interpret)
    cfg = _launch_config(d, interpret, "fwd")
    o = torch.empty(b, h, t, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(t, cfg.bm), b * h)
    kern._fwd_kernel[grid](
        q,
        k,
        v,
        r,
        u,
        vb,
        colmin,
        o,
        lse,
        *_common_args(q, k, v, r, geom, 1.0 / math.sqrt(d)),
        **_meta(cfg, d, geom, q.dtype, interpret),
    )
    return o, lse


def _backward(saved, geom: Geometry, do, delta):
    """Gradients (dq, dk, dv, dr, du, dvb) of the scores' inputs given dO and delta."""
    import triton

    from . import _rel_kernels_bwd as kern

    q, k, v, r, u, vb, colmin, lse = saved
    b, h, t, d = q.shape
    interpret = bool(triton.knobs.runtime.interpret)
    cfg = _launch_config(d, interpret, "dkdv")
    args = _common_args(q, k, v, r, geom, 1.0 / math.sqrt(d))
    dk = torch.empty(b, h, k.shape[2], d, device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk, dtype=v.dtype)
    kern._bwd_dkdv_kernel[(triton.cdiv(k.shape[2], cfg.bn), b * h)](
        q,
        k,
        v,
        r,
        u,
        vb,
        colmin,
        do,
        lse,
        delta,
        dk,
        dv,
        *args,
        **_meta(cfg, d, geom, q.dtype, interpret),
    )
    cfg = _launch_config(d, interpret, "dq")
    n_mblk = triton.cdiv(t, cfg.bm)
    dq = torch.empty(b, h, t, d, device=q.device, dtype=q.dtype)
    dr = torch.zeros(r.shape[0], h, d, device=q.device, dtype=torch.float32)
    du_part = torch.empty(b, h, n_mblk, d, device=q.device, dtype=torch.float32)
    dvb_part = torch.empty_like(du_part)
    kern._bwd_dq_kernel[(n_mblk, b * h)](
        q,
        k,
        v,
        r,
        u,
        vb,
        colmin,
        do,
        lse,
        delta,
        dq,
        dr,
        du_part,
        dvb_part,
        *args,
        **_meta(cfg, d, geom, q.dtype, interpret),
    )
    du = du_part.sum(dim=(0, 2))  # [H, D]
    dvb = dvb_part.sum(dim=(0, 2))
    return dq, dk, dv, dr.to(r.dtype), du.to(u.dtype), dvb.to(vb.dtype)


class _RelAttention(torch.autograd.Function):
    """Differentiable fused relative attention; the backward honours a gradient on lse."""

    @staticmethod
    def forward(ctx, q, k, v, r, u, vb, colmin, geom):
        q, k, v, r = (_unit_last(x) for x in (q, k, v, r))
        u, vb = u.contiguous(), vb.contiguous()
        o, lse = _forward(q, k, v, r, u, vb, colmin, geom)
        ctx.save_for_backward(q, k, v, r, u, vb, colmin, o, lse)
        ctx.geom = geom
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, r, u, vb, colmin, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # [B,H,T]: rowsum(dO * O)
        if dlse is not None:
            delta = delta - dlse.float()  # d lse / d s = P folds into the same dS formula
        grads = _backward((q, k, v, r, u, vb, colmin, lse), ctx.geom, do, delta.contiguous())
        return (*grads, None, None)


def _check(q, k, v, r, dropatt: float, training: bool) -> None:
    if dropatt > 0 and training:
        raise ValueError(
            f"fused attention has no attention dropout (dropatt={dropatt}); "
            "set model.dropatt=0 or model.attention_impl=eager"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("r", r)):
        if x.dtype not in _DTYPES:
            raise TypeError(
                f"fused attention takes fp32/bf16/fp16, got {name}.dtype={x.dtype}; "
                "use model.attention_impl=eager for fp64"
            )
    if not supports_device(q.device.type):
        raise RuntimeError(
            f"Triton kernels cannot run on {q.device.type} tensors here (CUDA "
            "tensors need a GPU; CPU tensors need TRITON_INTERPRET=1)"
        )


def causal_rel_attention(
    q,
    k,
    v,
    r,
    u,
    vb,
    *,
    valid,
    mem_len: int,
    same_length: bool = False,
    dropatt: float = 0.0,
    training: bool = False,
):
    """Fused causal attention of the current rows over [memory ; current] (docs/algorithm.md §2).

    Same contract as model.attention.causal_rel_attention: q [B,H,N,D], k/v [B,H,M+N,D],
    r [M+N,H,D] (distances K-1..0), u/vb [H,D]; returns o [B,H,N,D], lse [B,H,N] fp32.
    """
    _check(q, k, v, r, dropatt, training)
    k, v, r = (x.to(q.dtype) for x in (k, v, r))  # autocast may leave them in another dtype
    geom = causal_geometry(mem_len=mem_len, seg_len=q.shape[2], same_length=same_length)
    colmin = (mem_len - valid).to(device=q.device, dtype=torch.int32)  # [B]
    return _RelAttention.apply(q, k, v, r, u, vb, colmin, geom)


def lookahead_attention(
    q,
    k,
    v,
    r,
    u,
    vb,
    *,
    valid,
    mem_len: int,
    window_start: int,
    variant: str = "default",
    dropatt: float = 0.0,
    training: bool = False,
):
    """Fused look-ahead attention of the memory rows over their window (docs/algorithm.md §3).

    Same contract as model.attention.lookahead_attention: q [B,H,M,D], k/v [B,H,W,D] (buffer
    positions window_start..), r [X,H,D] the look-ahead table; returns e [B,H,M,D], lse [B,H,M].
    """
    _check(q, k, v, r, dropatt, training)
    k, v, r = (x.to(q.dtype) for x in (k, v, r))
    if mem_len == 0:  # no memory rows: nothing to attend from
        b, h, _, d = q.shape
        return q.new_zeros(b, h, 0, d), q.new_zeros(b, h, 0, dtype=torch.float32)
    geom = lookahead_geometry(window_start=window_start, variant=variant)
    first_real = torch.clamp(mem_len - valid, max=mem_len - 1)  # [B]
    colmin = (first_real + 1 - window_start).to(device=q.device, dtype=torch.int32)
    return _RelAttention.apply(q, k, v, r, u, vb, colmin, geom)
