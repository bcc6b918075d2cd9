"""Model step benchmark (issue 2): forward + backward + Adam step time and peak memory on CPU
for lamemo, xl and none at one config, side by side in one run, with FLOP ratios beside time
ratios. Prints a table and (with --json) writes the numbers.

    python bench/model_step.py                # default: 4 layers, d 256, 4x64 heads, FFN 1024,
                                              # N = mem_len = 128, batch 8, vocab 256, 2 threads
    python bench/model_step.py --tiny         # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from lamemo_ds.model import LaMemoLM, ModelConfig
from lamemo_ds.model.flops import segment_flops

# The authors' implementation at exactly the default config on this kind of machine (train mode,
# dropout 0.1, median of 8 steps), as given in issue 2.
REFERENCE_TOKENS_PER_S = {"lamemo": 1454.0, "xl": 3054.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--d-inner", type=int, default=1024)
    p.add_argument("--seg-len", type=int, default=128)
    p.add_argument("--mem-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps profiled after the timed ones for the GEMM breakdown")
    p.add_argument("--memories", default="lamemo,xl,none")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run for CI")
    p.add_argument("--json", help="write results to this JSON file")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_one(memory: str, a) -> dict:
    cfg = ModelConfig(vocab_size=a.vocab, n_layer=a.layers, n_head=a.heads, d_model=a.d_model,
                      d_head=a.d_head, d_inner=a.d_inner, dropout=a.dropout, memory=memory,
                      segment_len=a.seg_len, mem_len=a.mem_len, attention_impl="eager")
    torch.manual_seed(0)
    model = LaMemoLM(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4, fused=True)  # one kernel, all params
    g = torch.Generator().manual_seed(1)
    n_seg = a.warmup + a.steps + a.profile_steps
    data = torch.randint(0, a.vocab, (a.batch, n_seg * a.seg_len + 1), generator=g)
    state, times = None, []
    rss0 = peak_rss_mib()

    def step(s: int, state):
        x = data[:, s * a.seg_len:(s + 1) * a.seg_len]
        y = data[:, s * a.seg_len + 1:(s + 1) * a.seg_len + 1]
        out = model(x, state, targets=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.state

    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        state = step(s, state)
        dt = time.perf_counter() - t0
        if s >= a.warmup:
            times.append(dt)
    first = a.warmup + a.steps
    med = statistics.median(times)
    flops = segment_flops(cfg)
    tokens = a.batch * a.seg_len
    return {"memory": memory, "step_s": med, "tokens_per_s": tokens / med,
            "flops_per_token": flops.per_target_token,
            "gflops_per_s": flops.per_target_token * tokens / med / 1e9,
            "peak_rss_mib": peak_rss_mib(), "rss_growth_mib": peak_rss_mib() - rss0,
            "profile": lambda: gemm_breakdown(step, first, state, a.profile_steps)}


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def gemm_breakdown(step, first: int, state, count: int) -> dict:
    """`count` more steps under the profiler: time and FLOP rate of their matrix multiplies.

    The GEMM time alone bounds the step from below on this machine: `gemm_ceiling` is the
    tokens/s the step would reach if everything else (softmax, dropout, LayerNorm, Adam, Python)
    took no time at all.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for s in range(first, first + count):
            state = step(s, state)
        wall = time.perf_counter() - t0
    ev = [e for e in prof.key_averages() if e.key in GEMM_OPS]
    gemm_s = sum(e.self_cpu_time_total for e in ev) / 1e6 / count  # per step
    gemm_flops = sum(e.flops for e in ev) / count
    return {"gemm_s": gemm_s, "gemm_share": gemm_s * count / wall,
            "gemm_gflops_per_s": gemm_flops / max(gemm_s, 1e-9) / 1e9}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tiny:
        a.layers, a.d_model, a.heads, a.d_head, a.d_inner = 2, 32, 2, 16, 64
        a.seg_len = a.mem_len = 16
        a.batch, a.steps, a.warmup, a.profile_steps = 2, 2, 1, 1
    torch.set_num_threads(a.threads)
    rows = [bench_one(m, a) for m in a.memories.split(",")]
    for r in rows:  # after every timing and RSS reading: the profiler's own memory is large
        gemm = r.pop("profile")()
        r.update(gemm, gemm_ceiling_tokens_per_s=a.batch * a.seg_len / gemm["gemm_s"])
    by = {r["memory"]: r for r in rows}
    print(f"config: L={a.layers} d={a.d_model} H={a.heads}x{a.d_head} FFN={a.d_inner} "
          f"N={a.seg_len} M={a.mem_len} B={a.batch} V={a.vocab} dropout={a.dropout} "
          f"threads={a.threads} torch={torch.__version__}")
    print(f"{'memory':8} {'step ms':>9} {'tok/s':>9} {'GFLOP/s':>8} {'GFLOP/tok':>10} "
          f"{'peak RSS MiB':>13} {'GEMM ms':>8} {'GEMM GF/s':>10} {'GEMM-bound tok/s':>17}")
    for r in rows:
        print(f"{r['memory']:8} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} "
              f"{r['gflops_per_s']:8.1f} {r['flops_per_token'] / 1e9:10.4f} "
              f"{r['peak_rss_mib']:13.0f} {r['gemm_s'] * 1e3:8.1f} "
              f"{r['gemm_gflops_per_s']:10.1f} {r['gemm_ceiling_tokens_per_s']:17.0f}")
    print("GEMM ms: the matrix multiplies of a profiled step; GEMM-bound tok/s: the rate if "
          "everything else were free")
    summary = {"rows": rows, "config": vars(a)}
    if "lamemo" in by and "xl" in by:
        t_ratio = by["lamemo"]["step_s"] / by["xl"]["step_s"]
        f_ratio = by["lamemo"]["flops_per_token"] / by["xl"]["flops_per_token"]
        summary.update(time_ratio=t_ratio, flop_ratio=f_ratio)
        print(f"lamemo/xl: time ratio {t_ratio:.2f}, FLOP ratio {f_ratio:.2f} "
              f"(target: time <= 1.1 x FLOP = {1.1 * f_ratio:.2f})")
        if not a.tiny:
            for m in ("lamemo", "xl"):
                ref = REFERENCE_TOKENS_PER_S[m]
                print(f"{m}: {by[m]['tokens_per_s']:.0f} tok/s vs reference {ref:.0f} "
                      f"({by[m]['tokens_per_s'] / ref:.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
