"""Evaluation memory-length sweep: how xl and lamemo extrapolate beyond their training memory.

Trains one xl and one lamemo model with the stdlib recipe of bench/quality.py (or reuses run
folders given with --runs), then evaluates each with `lamemo eval --mem-len 32,64,128,...` on the
valid split (memory carried; the segment length as in training; the clamp as in training, and
each other `--clamp-lens` value) and writes one table and one plot of valid bits per byte against
the evaluation memory length for both models.

    python bench/mem_sweep.py --json bench/mem_sweep.json        # trains (~10 min on 2 cores)
    python bench/mem_sweep.py --runs xl=runs/x,lamemo=runs/y --data demo/data --json out.json
    python bench/mem_sweep.py ... --clamp-lens train,128   # also with relative distances clamped
    python bench/mem_sweep.py --tiny                              # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import quality

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mem-lens", default="16,32,64,128,256", help="evaluation memory lengths")
    p.add_argument("--clamp-lens", default="train",
                   help="clamp_len values to sweep with: 'train' (the model's own) and/or numbers")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model")
    p.add_argument("--eval-segments", type=int, default=64,
                   help="segments per stream evaluated at each memory length")
    p.add_argument("--runs", help="memory=RUN_FOLDER,... to sweep trained runs instead")
    p.add_argument("--data", help="prepared corpus (default: quality.py's stdlib folder)")
    p.add_argument("--plots", default=str(HERE), help="folder for the PNG plot")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.tiny:
        a.mem_lens, a.eval_segments = "8,16,32", 3
    return a


def train(a) -> dict[str, Path]:
    """Train xl and lamemo with quality.py's stdlib recipe (seed 1); returns the run folders."""
    q = quality.parse_args(["--memories", "xl,lamemo", "--seeds", "1", "--eval-points", "1",
                            "--steps", str(a.steps), "--out", "runs/mem_sweep"]
                           + (["--tiny"] if a.tiny else []))
    q.data = a.data or q.data
    quality.ensure_data(q)
    a.data = q.data
    runs = {}
    for memory in ("xl", "lamemo"):
        quality.train_one(memory, 1, q)
        runs[memory] = quality.REPO / q.out / q.corpus / f"{memory}-seed1"
    return runs


def sweep(memory: str, run: Path, a, clamp: str = "train") -> dict:
    out = Path(a.plots) / f"mem_sweep_{memory}.json"
    quality.lamemo("eval", "--model", str(run), "--data", str(a.data), "--split", "valid",
                   "--mem-len", a.mem_lens, "--memory", "carried", "--max-segments",
                   str(a.eval_segments), "--no-progress", "--output", str(out),
                   *([] if clamp == "train" else ["--clamp-len", clamp]),
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    for suffix in (".json", ".txt", ".png"):  # the combined table and plot replace them
        out.with_suffix(suffix).unlink(missing_ok=True)
    return result


def table(results: dict[str, dict], train_mem: dict[str, int]) -> str:
    unit = next(iter(results.values()))["unit"]
    lens = [r["mem_len"] for r in next(iter(results.values()))["rows"]]
    lines = [f"valid {unit} by evaluation memory length (memory carried; N as in training)",
             f"{'model':8} {'train M':>8} {'clamp':>6} " + " ".join(f"{m:>8}" for m in lens)]
    for key, res in results.items():
        memory = key.split()[0]
        vals = " ".join(f"{r[unit]:8.4f}" for r in res["rows"])
        lines.append(f"{memory:8} {train_mem[memory]:>8} {res['clamp_len']:>6} {vals}")
    first = next(iter(results.values()))
    lines.append(f"({first['rows'][0]['tokens']:,} tokens per length, segment length "
                 f"{first['segment_len']}; clamp -1: relative distances not clamped)")
    return "\n".join(lines)


def plot(results: dict[str, dict], train_mem: dict[str, int], a) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors: dict[str, str] = {}
    for key, res in results.items():
        memory, unit, clamped = key.split()[0], res["unit"], " " in key
        line, = ax.plot([r["mem_len"] for r in res["rows"]], [r[unit] for r in res["rows"]],
                        "o--" if clamped else "o-", color=colors.get(memory),
                        label=f"{memory} (trained with M={train_mem[memory]}, clamp_len "
                        f"{res['clamp_len']})")
        if memory not in colors:
            colors[memory] = line.get_color()
            ax.axvline(train_mem[memory], color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation memory length M", ylabel=f"valid {unit}",
           title="stdlib: loss vs evaluation memory length")
    ax.legend()
    fig.tight_layout()
    name = "mem_sweep.png"
    fig.savefig(Path(a.plots) / name, dpi=100)
    plt.close(fig)
    return name


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.runs:
        runs = {k: Path(v) for k, v in (item.split("=", 1) for item in a.runs.split(","))}
        a.data = a.data or quality.DEFAULTS["stdlib"][1]
    else:
        runs = train(a)
    clamps = a.clamp_lens.split(",")
    results = {(m if c == "train" else f"{m} clamp{c}"): sweep(m, run, a, c)
               for m, run in runs.items() for c in clamps}
    import yaml

    train_mem = {m: yaml.safe_load((run / "config.yaml").read_text())["model"]["mem_len"]
                 for m, run in runs.items()}
    text = table(results, train_mem)
    print(text)
    plots = [plot(results, train_mem, a)]
    if a.json:
        Path(a.json).write_text(json.dumps({"report": text, "plots": plots, "results": results,
                                            "runs": {k: str(v) for k, v in runs.items()},
                                            "clamp_lens": clamps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
