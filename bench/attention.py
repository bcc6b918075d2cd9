"""Fused LaMemo attention on one GPU: correctness, then forward+backward speed and memory.

    python bench/attention.py --json $OUT/attention.json          # H200: the real run
    python bench/attention.py --tiny --json /tmp/attention.json   # CPU: interpreter smoke run

Correctness: ours in bf16 against the fp32 eager oracle (output, logsumexp and every gradient,
as relative Frobenius errors), next to eager's own bf16 error as the yardstick; a small fp32
check of ours against eager fp32 as well. Speed: forward+backward time, TFLOP/s and peak
memory for ours, eager (bf16) and torch SDPA flash attention (causal, same shapes, no position
term: the physical anchor; its FLOPs count only the two matmuls it does), at the enwik8 shapes
(B 16, H 8, d_h 64, N = M = 512) and the wt103 shapes (B 32, H 10, d_h 41, N = M = 150).
FLOPs of the relative kernels count the three products per allowed (query, key) pair: content,
position and value, 2·D each forward, and 2.5× that backward (the flash-attention convention).
--flex adds FlexAttention with a score_mod reading a precomputed position term (this one does
materialise [B, H, N, M+N]; it is here to be measured beside ours).
Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = {
    "enwik8": dict(batch=16, heads=8, d_head=64, seg=512, mem=512),
    "wt103": dict(batch=32, heads=10, d_head=41, seg=150, mem=150),
}
TINY = {
    "enwik8-tiny": dict(batch=1, heads=2, d_head=32, seg=8, mem=8),
    "wt103-tiny": dict(batch=2, heads=2, d_head=41, seg=6, mem=10),
}
BF16_SLACK = 5e-3  # ours may exceed 2x eager's own bf16 error by this much


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes; CPU interpreter if no GPU")
    p.add_argument("--json", default="bench_attention.json", help="where to write the results")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (score_mod)")
    return p.parse_args(argv)


def make_inputs(shape: dict, kind: str, *, dtype, device, seed: int = 0):
    """(q, k, v, r, u, vb) and the keyword arguments of the given branch; every stream but the
    first has a partly filled memory so the masks are exercised in the correctness check."""
    import torch

    from lamemo_ds.ops import attention as eager

    g = torch.Generator().manual_seed(seed)
    b, h, d, n, m = (shape[x] for x in ("batch", "heads", "d_head", "seg", "mem"))
    if kind == "causal":
        n_q, n_k, n_r = n, m + n, m + n
        kwargs = dict(mem_len=m, same_length=False)
    else:
        start, n_k = eager.lookahead_window(mem_len=m, seg_len=n)
        n_q, n_r = m, m
        kwargs = dict(mem_len=m, window_start=start, variant="default")
    valid = torch.full((b,), m, dtype=torch.int64)
    valid[1:] = torch.randint(0, m + 1, (b - 1,), generator=g)
    shapes = [(b, h, n_q, d), (b, h, n_k, d), (b, h, n_k, d), (n_r, h, d), (h, d), (h, d)]
    args = tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)
    return args, dict(kwargs, valid=valid.to(device))


def fwd_bwd(fn, args, kwargs):
    """Outputs and gradients of every input for fixed random upstream gradients."""
    import torch

    ins = [a.detach().clone().requires_grad_() for a in args]
    o, lse = fn(*ins, **kwargs)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(o.shape, generator=g).to(o)
    gl = torch.randn(lse.shape, generator=g).to(lse)
    grads = torch.autograd.grad((o, lse), ins, (go, gl))
    return [o, lse, *grads]


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


NAMES = ("o", "lse", "dq", "dk", "dv", "dr", "du", "dvb")


def check(shape: dict, kind: str, device) -> dict:
    """Relative errors of ours (bf16 and fp32) and eager bf16 against eager fp32."""
    import torch

    from lamemo_ds.ops import attention as eager
    from lamemo_ds.ops import triton_attention as fused

    name = "causal_rel_attention" if kind == "causal" else "lookahead_attention"
    small = dict(shape, batch=min(shape["batch"], 4))
    args, kw = make_inputs(small, kind, dtype=torch.float32, device=device)
    ref = fwd_bwd(getattr(eager, name), args, kw)
    low = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter lacks bf16 dot
    low_args = tuple(a.to(low) for a in args)
    ours_low = fwd_bwd(getattr(fused, name), low_args, kw)
    eager_low = fwd_bwd(getattr(eager, name), low_args, kw)
    ours_fp32 = fwd_bwd(getattr(fused, name), args, kw)
    out = {"dtype": str(low).replace("torch.", ""), "tensors": {}}
    ok = True
    for i, t in enumerate(NAMES):
        e_ours, e_eager = rel_err(ours_low[i], ref[i]), rel_err(eager_low[i], ref[i])
        e_fp32 = rel_err(ours_fp32[i], ref[i])
        good = e_ours <= 2 * e_eager + BF16_SLACK and e_fp32 <= 1e-4
        ok &= good
        out["tensors"][t] = dict(ours=e_ours, eager=e_eager, ours_fp32=e_fp32, ok=good)
    out["ok"] = ok
    return out


def pairs(shape: dict, kind: str) -> int:
    """Allowed (query, key) pairs with a full memory."""
    b, h, n, m = (shape[x] for x in ("batch", "heads", "seg", "mem"))
    if kind == "causal":
        per = sum(m + t + 1 for t in range(n))
    else:
        start = max(m - n + 1, 1)
        per = sum(m - max(i + 1, start) + 1 for i in range(m))
    return b * h * per


def timed(closure, device, *, warmup: int, iters: int) -> tuple[float, float | None]:
    """Mean milliseconds per call and the peak extra memory (MiB, GPU only)."""
    import torch

    for _ in range(warmup):
        closure()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            closure()
        return (time.perf_counter() - t0) * 1e3 / iters, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        closure()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**20


def _grad_closure(fn, args, kwargs):
    import torch

    ins = [a.detach().clone().requires_grad_() for a in args]

    def step():
        out = fn(*ins, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, ins, [torch.ones_like(x) for x in outs])

    return step


def _pad_head(x, multiple: int):
    import torch.nn.functional as F

    d = x.shape[-1]
    return F.pad(x, (0, -d % multiple)) if d % multiple else x


def sdpa_closure(shape: dict, *, dtype, device):
    """Causal SDPA (flash on GPU) over [memory ; current], queries the current rows; head dim
    padded to a multiple of 8 (flash's requirement) with the true 1/sqrt(d_h) scale."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    n, m, d = shape["seg"], shape["mem"], shape["d_head"]
    args, _ = make_inputs(shape, "causal", dtype=dtype, device=device)
    q, k, v = (_pad_head(a, 8) for a in args[:3])
    mask = causal_lower_right(n, m + n)  # query t sees keys j <= M + t

    def fn(q, k, v):
        if device != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)

    return _grad_closure(fn, (q, k, v), {})


def flex_closure(shape: dict, *, dtype, device):
    """FlexAttention: content term in the kernel, the position term precomputed (shifted, as the
    eager path does) and added by a score_mod; logsumexp returned. Head dim padded to 2^k."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from lamemo_ds.ops.attention import rel_shift

    n, m, d = shape["seg"], shape["mem"], shape["d_head"]
    args, _ = make_inputs(shape, "causal", dtype=dtype, device=device)
    pad = 1 << (d - 1).bit_length()
    block = create_block_mask(
        lambda b, h, qi, kv: kv <= qi + m, None, None, n, m + n, device=device
    )

    def fn(q, k, v, r, u, vb):
        bd = rel_shift((q + vb[None, :, None]) @ r.permute(1, 2, 0)) * d**-0.5  # [B,H,N,K]

        def score_mod(score, b, h, qi, kv):
            return score + bd[b, h, qi, kv]

        qu = _pad_head(q + u[None, :, None], pad)
        o, lse = flex_attention(
            qu,
            _pad_head(k, pad),
            _pad_head(v, pad),
            score_mod=score_mod,
            block_mask=block,
            scale=d**-0.5,
            return_lse=True,
        )
        return o, lse

    # compile the whole step: the position term and the score_mod closure live inside it
    return _grad_closure(torch.compile(fn), args, {})


def rel_closure(impl: str, shape: dict, kind: str, *, dtype, device):
    from lamemo_ds.ops import attention as eager
    from lamemo_ds.ops import triton_attention as fused

    name = "causal_rel_attention" if kind == "causal" else "lookahead_attention"
    args, kw = make_inputs(shape, kind, dtype=dtype, device=device)
    kw["valid"].fill_(shape["mem"])  # timing with a full memory, as in training
    return _grad_closure(getattr(eager if impl == "eager" else fused, name), args, kw)


def measure(shape_name: str, shape: dict, args, device) -> list[dict]:
    """Timing rows of every implementation at one shape."""
    import torch

    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    plans = [(kind, impl) for kind in ("causal", "lookahead") for impl in ("ours", "eager")]
    plans += [("causal", "sdpa")] + ([("causal", "flex")] if args.flex else [])
    rows = []
    for kind, impl in plans:
        row = dict(shape=shape_name, kind=kind, impl=impl, dtype=str(dtype).replace("torch.", ""))
        try:
            if impl == "sdpa":
                step = sdpa_closure(shape, dtype=dtype, device=device)
            elif impl == "flex":
                step = flex_closure(shape, dtype=dtype, device=device)
            else:
                step = rel_closure(impl, shape, kind, dtype=dtype, device=device)
            ms, peak = timed(step, device, warmup=args.warmup, iters=args.iters)
        except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, not fatal
            rows.append(dict(row, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        per_pair = 4 if impl == "sdpa" else 6  # 2·D per product: QK, PV (+ position)
        flop = 3.5 * per_pair * shape["d_head"] * pairs(shape, kind)
        rows.append(dict(row, ms=ms, tflops=flop / ms / 1e9, peak_mib=peak))
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_report(checks: dict, rows: list[dict]) -> None:
    print(
        "\ncorrectness: relative error vs fp32 eager (ours low precision | eager low | ours fp32)"
    )
    for key, c in checks.items():
        errs = "  ".join(
            f"{t} {v['ours']:.1e}|{v['eager']:.1e}|{v['ours_fp32']:.0e}"
            for t, v in c["tensors"].items()
        )
        print(f"  {key:<22} {c['dtype']:<8} {'ok ' if c['ok'] else 'BAD'} {errs}")
    print(f"\n{'shape':<12} {'kind':<10} {'impl':<6} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<12} {r['kind']:<10} {r['impl']:<6} error: {r['error']}")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(
            f"{r['shape']:<12} {r['kind']:<10} {r['impl']:<6} {r['ms']:>9.3f} "
            f"{r['tflops']:>8.2f} {peak:>9}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        if not args.tiny:
            print("no GPU: run with --tiny for the CPU interpreter smoke run", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.iters, args.warmup = 1, 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = TINY if args.tiny else SHAPES
    checks, rows = {}, []
    for name, shape in shapes.items():
        for kind in ("causal", "lookahead"):
            checks[f"{name}/{kind}"] = check(shape, kind, device)
        rows += measure(name, shape, args, device)
    print_report(checks, rows)
    meta = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter",
        torch=torch.__version__,
        shapes=shapes,
        flop_convention=__doc__.split("FLOPs")[1],
    )
    Path(args.json).write_text(json.dumps(dict(meta=meta, checks=checks, rows=rows), indent=1))
    print(f"\nwrote {args.json}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
