"""Quality study: does memory help? lamemo, xl and none, several seeds, equal steps and equal time.

Every model trains with the same config and seed list; evaluations at regular steps run the valid
split twice, with the memory carried and with the memory reset before every segment, and record
the training wall time reached. Reported, as mean +- sd over seeds:

- equal steps: valid bpc at the last step, with carried and reset memory, and the memory gain
  (reset - carried, bits per token);
- equal wall time: each model at the last evaluation inside the budget of the fastest model's
  whole run (the slower models have done fewer steps by then);
- on the recall corpora (`--corpus recall`, `--corpus recall_multi`), the bits per recalled key
  symbol as well.

A gap is called "beyond noise" when the two means differ by more than twice the larger sd.
Plots: training curves (train loss by step, valid bpc by training time) and valid bpc by segment
index with carried vs reset memory.

    python bench/quality.py                       # stdlib, 3 seeds (~15 min on a quiet 2-core CPU)
    python bench/quality.py --corpus recall       # configs/recall.yaml, 3 seeds (~8 min)
    python bench/quality.py --corpus recall_multi --pairs 2 --gap 32-64  # recall_multi.yaml
    python bench/quality.py --init-std 0.02       # the reference's init (see bench/RESULTS.md)
    python bench/quality.py --tiny                # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2)
DEFAULTS = {  # corpus -> (base config, data folder, overrides of the arguments below)
    "stdlib": ("configs/debug.yaml", "demo/data",
               {"steps": 1000, "layers": 4, "d_model": 128, "heads": 4, "seg_len": 64,
                "mem_len": 64, "batch": 8, "lr": 2e-3, "init_std": 0.088, "warmup": 40,
                "eval_segments": 32}),
    "recall": ("configs/recall.yaml", "data/recall",
               {"steps": 1500, "layers": 2, "d_model": 128, "heads": 4, "seg_len": 32,
                "mem_len": 64, "batch": 16, "lr": 1e-3, "init_std": 0.088, "warmup": 100,
                "eval_segments": 32}),
    "recall_multi": ("configs/recall_multi.yaml", "data/recall_multi",
                     {"steps": 8000, "layers": 2, "d_model": 128, "heads": 4, "seg_len": 32,
                      "mem_len": 64, "batch": 16, "lr": 1e-3, "init_std": 0.088, "warmup": 100,
                      "eval_segments": 64}),
}
# the corpus of the multi-query study (FINDINGS §7), made before --recall-fresh-names; the
# recipe, configs/recall_multi.yaml, now trains on the same corpus with fresh names, 8 heads of
# 16 (DEFAULTS here: 4 of 32), 64 streams
# and 8k steps; --pairs and --gap vary it for a sweep
RECALL_MULTI = ("--split-sizes", "2000000,32768,32768", "--recall-key-len", "2",
                "--recall-alphabet", "01234567", "--recall-filler", "so it goes ",
                "--recall-spacing", "8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", choices=sorted(DEFAULTS), default="stdlib")
    p.add_argument("--data", help="prepared corpus (default: demo/data or data/recall; "
                   "prepared here if missing)")
    p.add_argument("--out", default="runs/quality", help="run folders")
    p.add_argument("--memories", default="lamemo,xl,none")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    for name, kind in (("steps", int), ("layers", int), ("d_model", int), ("heads", int),
                       ("seg_len", int), ("mem_len", int), ("batch", int), ("lr", float),
                       ("init_std", float), ("warmup", int), ("eval_segments", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help="default: per corpus (see DEFAULTS in this file)")
    p.add_argument("--eval-points", type=int, default=6, help="evaluations per run")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                   help="lr after warmup; constant keeps every evaluation of a run comparable "
                   "to a shorter run's last one (a budget study)")
    p.add_argument("--budgets", help="comma-separated step budgets (e.g. 1000,3000,5000): one "
                   "full run per budget, each with its own schedule, compared by their last "
                   "evaluations (a budget study under a cosine schedule; --steps is ignored)")
    p.add_argument("--study", help="a name for this study's run folder and plots (e.g. budget), "
                   "kept apart from the default study's")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each with "
                   "cores/jobs threads (2 on a 2-core machine: one thread each)")
    p.add_argument("--reuse", action="store_true", help="keep a finished run whose settings "
                   "match (its quality_run.json) instead of training it again")
    p.add_argument("--pairs", type=int, default=4, help="recall_multi: keys pending at once")
    p.add_argument("--gap", default="32-64", help="recall_multi: tokens from a key's first copy "
                   "to its query, LO-HI")
    p.add_argument("--plots", default=str(REPO / "bench"), help="folder for the PNG plots")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    base, data, defaults = DEFAULTS[a.corpus]
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.tag = a.corpus + (f"-k{a.pairs}-g{a.gap}" if a.corpus == "recall_multi" else "")
    data = data + a.tag[len(a.corpus):]
    a.tag += f"-{a.study}" if a.study else ""
    a.base, a.data = base, a.data or (data + "-tiny" if a.tiny else data)
    try:
        a.budget_steps = sorted({int(x) for x in a.budgets.split(",")}) if a.budgets else []
    except ValueError:
        p.error(f"--budgets {a.budgets}: write step counts separated by commas (1000,3000)")
    if any(x < 1 for x in a.budget_steps):
        p.error(f"--budgets {a.budgets}: every budget must be >= 1 step")
    if a.tiny:
        a.budget_steps = [6, 12] if a.budgets else []
        a.steps, a.layers, a.d_model, a.heads, a.batch = 12, 1, 32, 2, 2
        a.seg_len = a.mem_len = 16
        a.eval_segments, a.eval_points, a.seeds, a.warmup = 3, 2, "1,2", 2
        a.out = a.out.rstrip("/") + "-tiny"
    return a


def lamemo(*args: str, threads: int = 2, **kw) -> subprocess.CompletedProcess:
    """`lamemo ARGS` in this Python from the repository root (`threads` threads unless
    OMP_NUM_THREADS is set); raises if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    return subprocess.run([sys.executable, "-m", "lamemo_ds.cli", *args], check=True, env=env,
                          cwd=REPO, **kw)


def ensure_data(a) -> None:
    if (REPO / a.data / "manifest.json").is_file():
        return
    if a.corpus == "recall_multi":
        extra = [*RECALL_MULTI, "--recall-pairs", str(a.pairs), "--recall-gap", a.gap]
        extra += ["--split-sizes", "200000,16384,16384"] if a.tiny else []
        lamemo("prepare", "--corpus", "recall", "--out", a.data, "--quiet", *extra)
        return
    if a.corpus == "recall":
        extra = ["--split-sizes", "200000,16384,16384"] if a.tiny else []
    else:
        extra = ["--tokenizer", "byte"] + (["--max-bytes", "2M"] if a.tiny else [])
    lamemo("prepare", "--corpus", a.corpus, "--out", a.data, "--quiet", *extra)


def train_one(memory: str, seed: int, a, steps: int | None = None) -> dict:
    """Train one run (`steps` of a budget study, else --steps) unless --reuse finds it."""
    out = REPO / a.out / a.tag / (f"{memory}-seed{seed}" + (f"-{steps}" if steps else ""))
    steps = steps or a.steps
    sets = {
        "model.vocab_size": 257, "model.n_layer": a.layers, "model.n_head": a.heads,
        "model.d_model": a.d_model, "model.d_head": a.d_model // a.heads,
        "model.d_inner": 4 * a.d_model, "model.dropout": 0.0, "model.memory": memory,
        "model.segment_len": a.seg_len, "model.mem_len": a.mem_len,
        "model.init_std": a.init_std, "data.path": a.data, "optim.lr": a.lr,
        "optim.warmup_steps": a.warmup, "optim.min_lr": a.lr / 10,
        "train.micro_batch_size": a.batch, "train.max_steps": steps, "train.seed": seed,
        "train.log_interval": max(1, steps // 50),
        "train.eval_interval": max(1, steps // a.eval_points),
        "train.eval_max_segments": a.eval_segments, "train.output_dir": str(out),
        "eval.batch_size": a.batch, "eval.memory_gain": True, "checkpoint.interval": 0,
        "checkpoint.resume": False, "logging.tensorboard": False, "optim.schedule": a.schedule,
    }
    done = out / "quality_run.json"
    if a.reuse and done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("sets") == {k: str(v) for k, v in sets.items()}:
            print(f"reusing {out}", flush=True)
            return kept["run"]
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    t0 = time.time()
    checks = ("--set", "train.global_batch_size=null")  # one process: --batch is the batch
    lamemo("train", "--config", a.base, "--overwrite", *checks, *[x for k, v in sets.items()
                                                     for x in ("--set", f"{k}={v}")],
           stdout=subprocess.DEVNULL, threads=threads)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [dict(e["eval"], step=e["step"]) for e in lines if "eval" in e]
    curve = [(e["step"], e["interval"]["train/loss"] / LN2) for e in lines if "interval" in e]
    run = {"memory": memory, "seed": seed, "steps": steps, "seconds": round(time.time() - t0, 1),
           "threads": threads, "evals": [_eval_row(e) for e in evals], "train_curve": curve}
    done.write_text(json.dumps({"sets": {k: str(v) for k, v in sets.items()}, "run": run}))
    print(f"trained {out} in {run['seconds']:.0f} s", flush=True)
    return run


def _eval_row(e: dict) -> dict:
    row = {"step": e["step"], "train_seconds": e["train_seconds"], "bpc": e["loss"] / LN2,
           "bpc_reset": e["reset"]["loss"] / LN2, "gain_bpc": e["memory_gain_bits_per_token"],
           "by_segment": [x / LN2 for x in e["loss_by_segment"]],
           "by_segment_reset": [x / LN2 for x in e["reset"]["loss_by_segment"]]}
    if e.get("subset_bits") is not None:
        row.update(recall_bits=e["subset_bits"], recall_bits_reset=e["reset"]["subset_bits"])
    return row


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict], memories: list[str]) -> dict:
    """Per model, mean and sd over seeds at equal steps and at equal wall time."""
    budget = min(statistics.median(r["evals"][-1]["train_seconds"] for r in runs
                                   if r["memory"] == m) for m in memories)
    out = {"time_budget_s": budget, "models": {}}
    for m in memories:
        mine = [r for r in runs if r["memory"] == m]
        last = [r["evals"][-1] for r in mine]
        timed = [max((e for e in r["evals"] if e["train_seconds"] <= budget * 1.02),
                     key=lambda e: e["step"], default=r["evals"][0]) for r in mine]
        row = {}
        for tag, pick in (("steps", last), ("time", timed)):
            for key in ("bpc", "bpc_reset", "gain_bpc", "recall_bits", "recall_bits_reset"):
                if key in pick[0]:
                    row[f"{key}@{tag}"] = mean_sd([e[key] for e in pick])
            row[f"step@{tag}"] = mean_sd([e["step"] for e in pick])
        row["seconds_per_step"] = mean_sd([e["train_seconds"] / e["step"] for e in last])
        out["models"][m] = row
    for tag in ("steps", "time") if len(memories) > 1 else ():  # a ranking needs two models
        key = f"bpc@{tag}"
        ranked = sorted(memories, key=lambda m: out["models"][m][key][0])
        (b, bs), (c, cs) = out["models"][ranked[0]][key], out["models"][ranked[1]][key]
        seeds = len({r["seed"] for r in runs})
        out[f"best@{tag}"] = {"memory": ranked[0], "runner_up": ranked[1], "margin_bpc": c - b,
                              "beyond_noise": c - b > 2 * max(bs, cs) if seeds > 1 else None}
        if "none" in memories:  # what each memory model buys over the no-memory one
            n, ns = out["models"]["none"][key]
            out[f"vs_none@{tag}"] = {
                m: {"margin_bpc": n - out["models"][m][key][0],
                    "beyond_noise": abs(n - out["models"][m][key][0])
                    > 2 * max(ns, out["models"][m][key][1]) if seeds > 1 else None}
                for m in memories if m != "none"}
    return out


def budget_series(runs: list[dict]) -> list[dict]:
    """A budget study's runs as one series per (memory, seed): each budget's last evaluation,
    by step, so `budgets` reads them as it reads one constant-schedule run's evaluations."""
    keys = sorted({(r["memory"], r["seed"]) for r in runs}, key=str)
    return [{"memory": m, "seed": s, "evals": [r["evals"][-1] for r in sorted(
        (r for r in runs if (r["memory"], r["seed"]) == (m, s)), key=lambda r: r["steps"])]}
        for m, s in keys]


def budgets(runs: list[dict], memories: list[str]) -> list[dict]:
    """Every evaluation step all runs share, read as a budget: each model at that step (equal
    steps) and at the training time the fastest model needed to reach it (equal time), mean
    and sd over seeds, and each memory model against none. Meaningful when the evaluations of
    one run compare with shorter runs' last ones (--schedule constant, or `budget_series`)."""
    steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in runs)))
    out = []
    for step in steps:
        at = {m: [next(e for e in r["evals"] if e["step"] == step) for r in runs
                  if r["memory"] == m] for m in memories}
        budget = min(statistics.median(e["train_seconds"] for e in at[m]) for m in memories)
        row = {"step": step, "time_budget_s": budget, "models": {}}
        for m in memories:
            timed = [max((e for e in r["evals"] if e["train_seconds"] <= budget * 1.02),
                         key=lambda e: e["step"], default=r["evals"][0])
                     for r in runs if r["memory"] == m]
            row["models"][m] = {"bpc@steps": mean_sd([e["bpc"] for e in at[m]]),
                                "gain_bpc@steps": mean_sd([e["gain_bpc"] for e in at[m]]),
                                "bpc@time": mean_sd([e["bpc"] for e in timed]),
                                "step@time": mean_sd([e["step"] for e in timed])}
        for tag in ("steps", "time") if "none" in memories else ():
            n, ns = row["models"]["none"][f"bpc@{tag}"]
            row[f"vs_none@{tag}"] = {m: {"margin_bpc": n - row["models"][m][f"bpc@{tag}"][0],
                                         "beyond_noise": n - row["models"][m][f"bpc@{tag}"][0]
                                         > 2 * max(ns, row["models"][m][f"bpc@{tag}"][1])}
                                     for m in memories if m != "none"}
        out.append(row)
    return out


def budget_report(rows: list[dict]) -> str:
    """One line per budget: valid bpc at equal steps and at equal time, and where memory wins."""
    if not rows:
        return ""
    ms = list(rows[0]["models"])
    lines = ["", "by budget (valid bpc, mean +- sd; equal time = the fastest model's time to "
             "that step):", f"{'step':>6} {'time':>6} " + " ".join(
                 f"{m + ' @steps':>17} {m + ' @time':>17}" for m in ms)]
    for r in rows:
        cells = " ".join("{:.4f} +- {:.4f}".format(*r["models"][m]["bpc@steps"]) + " "
                         + "{:.4f} +- {:.4f}".format(*r["models"][m]["bpc@time"]) for m in ms)
        lines.append(f"{r['step']:6d} {r['time_budget_s']:5.0f}s {cells}")
    for tag in ("steps", "time"):
        wins = [f"{m} at step {r['step']} ({v['margin_bpc']:.4f} bpc)" for r in rows
                for m, v in r.get(f"vs_none@{tag}", {}).items() if v["beyond_noise"]]
        lines.append(f"memory below none beyond noise at equal {tag}: "
                     + (", ".join(wins) if wins else "at no budget"))
    return "\n".join(lines)


NOISE = {True: "beyond noise: more than 2 sd", False: "within noise: less than 2 sd",
         None: "one seed: no estimate of the noise"}


def report(s: dict, a) -> str:
    lines = [f"corpus {a.tag}: L={a.layers} d={a.d_model} N={a.seg_len} M={a.mem_len} "
             f"B={a.batch} lr={a.lr} init_std={a.init_std}, {a.steps} steps, seeds {a.seeds}; "
             "mean +- sd over seeds"]
    recall = any("recall_bits@steps" in r for r in s["models"].values())
    for tag, title in (("steps", f"equal steps ({a.steps})"),
                       ("time", f"equal wall time ({s['time_budget_s']:.0f} s of training)")):
        lines += ["", title + ":",
                  f"{'memory':8} {'step':>6} {'valid bpc':>17} {'reset memory':>17} "
                  f"{'memory gain':>17}" + (f" {'recall bits':>15} {'(reset)':>7}"
                                            if recall else "")]
        for m, r in s["models"].items():
            cell = {k: "{:.4f} +- {:.4f}".format(*r[f"{k}@{tag}"])
                    for k in ("bpc", "bpc_reset", "gain_bpc")}
            line = (f"{m:8} {r[f'step@{tag}'][0]:6.0f} {cell['bpc']:>17} "
                    f"{cell['bpc_reset']:>17} {cell['gain_bpc']:>17}")
            if recall:
                line += (" {:.3f} +- {:.3f}".format(*r[f"recall_bits@{tag}"]) +
                         " {:7.3f}".format(r[f"recall_bits_reset@{tag}"][0]))
            lines.append(line)
        best = s.get(f"best@{tag}")
        if best is not None:
            lines.append(f"best: {best['memory']}, {best['margin_bpc']:.4f} bpc below "
                         f"{best['runner_up']} (" + NOISE[best["beyond_noise"]] + ")")
        for m, v in s.get(f"vs_none@{tag}", {}).items():
            word = "below" if v["margin_bpc"] > 0 else "above"
            lines.append(f"{m} vs none: {abs(v['margin_bpc']):.4f} bpc {word} none ("
                         + NOISE[v["beyond_noise"]] + ")")
    sps = ", ".join(f"{m} {r['seconds_per_step'][0] * 1000:.0f} ms"
                    for m, r in s["models"].items())
    lines += ["", f"training time per step: {sps}"]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> str:
    """Lay out, write (110 dpi) and close `fig`; its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


def plot(runs: list[dict], memories: list[str], a) -> list[str]:
    plt = pyplot()
    names = [f"quality_{a.tag}_curves.png", f"quality_{a.tag}_by_segment.png"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, m in enumerate(memories):
        mine = [r for r in runs if r["memory"] == m]
        steps = [x for x, _ in mine[0]["train_curve"]]
        ys = [statistics.fmean(r["train_curve"][j][1] for r in mine) for j in range(len(steps))]
        ax1.plot(steps, ys, color=f"C{i}", label=m)
        for r in mine:
            ax2.plot([e["train_seconds"] for e in r["evals"]], [e["bpc"] for e in r["evals"]],
                     color=f"C{i}", marker="o", ms=3, alpha=0.7, label=m if r is mine[0] else None)
    ax1.set(xlabel="step", ylabel="train bpc (mean over seeds)", title=f"{a.tag}: training")
    ax2.set(xlabel="training seconds", ylabel="valid bpc (each seed)", title="valid by time")
    ax1.legend()
    save_figure(fig, Path(a.plots) / names[0])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, m in enumerate(memories):
        mine = [r["evals"][-1] for r in runs if r["memory"] == m]
        for key, style in (("by_segment", "-"), ("by_segment_reset", "--")):
            n = min(len(e[key]) for e in mine)
            ys = [statistics.fmean(e[key][j] for e in mine) for j in range(n)]
            ax.plot(range(n), ys, style, color=f"C{i}", marker="o", ms=3,
                    label=f"{m} ({'carried' if key == 'by_segment' else 'reset'})")
    ax.set(xlabel="segment index in stream (0: no memory yet)", ylabel="valid bpc",
           title=f"{a.tag}: memory carried (solid) vs reset (dashed)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, Path(a.plots) / names[1])
    return names


def plot_budgets(rows: list[dict], runs: list[dict], a) -> str:
    """Valid bpc against the budget in steps (mean +- sd) and in training seconds (each run)."""
    plt = pyplot()
    name = f"quality_{a.tag}_budgets.png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, m in enumerate(rows[0]["models"]):
        ax1.errorbar([r["step"] for r in rows], [r["models"][m]["bpc@steps"][0] for r in rows],
                     yerr=[r["models"][m]["bpc@steps"][1] for r in rows], color=f"C{i}",
                     marker="o", ms=3, capsize=2, label=m)
        for r in (r for r in runs if r["memory"] == m):
            ax2.plot([e["train_seconds"] for e in r["evals"]], [e["bpc"] for e in r["evals"]],
                     color=f"C{i}", alpha=0.6, marker=".", ms=3)
    ax1.set(xlabel="budget (steps)", ylabel="valid bpc (mean +- sd)", title=f"{a.tag}: steps")
    ax2.set(xlabel="training seconds", ylabel="valid bpc (each seed)", title="time")
    ax1.legend()
    return save_figure(fig, Path(a.plots) / name)


def main(argv=None) -> int:
    a = parse_args(argv)
    ensure_data(a)
    memories = a.memories.split(",")
    todo = [(m, int(s), n) for n in a.budget_steps[::-1] or [None]  # longest runs first
            for s in a.seeds.split(",") for m in memories]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads only wait on subprocesses
        runs = list(pool.map(lambda msn: train_one(*msn[:2], a, steps=msn[2]), todo))
    series = every = runs
    if a.budget_steps:  # the full report and plots describe the largest budget's runs
        series, runs = budget_series(runs), [r for r in runs if r["steps"] == a.budget_steps[-1]]
        a.steps = a.budget_steps[-1]
    s = summarize(series, memories)  # a budget study's equal time picks among whole runs
    text = report(s, a)
    if a.schedule == "constant" or a.budget_steps:  # evaluations read as shorter runs' last
        s["budgets"] = budgets(series, memories)
        text += "\n" + budget_report(s["budgets"])
    print(text)
    plots = plot(runs, memories, a)
    if "budgets" in s:
        plots.append(plot_budgets(s["budgets"], series, a))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": s, "report": text, "plots": plots,
                                            "runs": every, "config": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
