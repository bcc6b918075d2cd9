"""Retrieval cost against the number of pending pairs and the gap, for trained recall models.

The models `bench/quality.py --corpus recall_multi` trained (configs/recall_multi.yaml: 4 pairs,
every value asked for 32-64 tokens after its first copy, N = 32, M = 64) are evaluated, unchanged,
on test corpora that vary one knob of that task at a time:

- pending pairs K = 1, 2, 3, 4 at the trained gap 32-64. K = 8 cannot keep every gap inside 32-64
  (8 pairs of 5-token lines spread the gaps over >= 70 tokens), so it is asked at gap 32-102;
- the gap in segment lengths at K = 4: 4-36 tokens (mostly the segment itself or the one before),
  32-64 (1-2 segments back, as trained) and 64-96 (2-3 segments back).

Each cell is evaluated with the trained memory M = 64 and with M = 128: a gap beyond M cannot be
recalled from memory (a control: the cost must go to chance, log2(8) = 3 bits per key symbol),
and M = 128 asks whether recall carries over to a memory longer than the one trained with.
Relative distances are clamped at the training N + M (bench/FINDINGS.md §5: lamemo needs it
beyond its training memory; it changes nothing within it). The reported number is bits per
recalled key symbol on the test split, memory carried (and reset).

    python bench/recall_sweep.py --json bench/recall_sweep.json  # runs/quality/recall_multi-...
    python bench/recall_sweep.py --tiny                # runs/quality-tiny/..., seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

from quality import REPO, ensure_data, lamemo, pyplot, save_figure  # bench/: this folder

CHANCE = 3.0  # log2 of the recipe's 8-symbol alphabet
# (sweep, pairs, gap): every cell the models are evaluated on
CELLS = ([("pairs", k, "32-64") for k in (1, 2, 3, 4)] + [("pairs", 8, "32-102")]
         + [("gap", 4, g) for g in ("4-36", "32-64", "64-96")])
TINY_CELLS = [("pairs", 1, "16-32"), ("pairs", 2, "16-32"), ("gap", 2, "32-48")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", help="folder of <memory>-seed<N> run folders (default: where "
                   "bench/quality.py --corpus recall_multi [--tiny] writes them)")
    p.add_argument("--mem-lens", default="64,128", help="evaluation memory lengths")
    p.add_argument("--max-segments", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-root", default="data", help="where the sweep's corpora are prepared")
    p.add_argument("--plot", default=str(REPO / "bench" / "recall_sweep.png"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="CI: small corpora, 3 cells")
    a = p.parse_args(argv)
    if a.tiny:
        a.mem_lens, a.max_segments, a.batch_size = "16,32", 4, 4
    a.runs = a.runs or ("runs/quality-tiny/recall_multi-k4-g32-64" if a.tiny
                        else "runs/quality/recall_multi-k4-g32-64")
    return a


def trained_runs(folder: Path) -> list[tuple[str, int, Path]]:
    """(memory, seed, run folder) for every finished run under `folder`, sorted."""
    runs = []
    for d in sorted(folder.glob("*-seed*")):
        m = re.fullmatch(r"(\w+)-seed(\d+)", d.name)
        if m and (d / "checkpoints" / "latest").exists():
            runs.append((m.group(1), int(m.group(2)), d))
    if not runs:
        sys.exit(f"error: --runs {folder}: no finished <memory>-seed<N> run folder there; "
                 "train them first with bench/quality.py --corpus recall_multi")
    return runs


def trained_window(run: Path) -> int:
    """N + M of the run's training: the longest relative distance it ever saw."""
    import yaml

    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    return int(model["segment_len"]) + int(model["mem_len"])


def corpus(pairs: int, gap: str, a) -> str:
    """The test corpus of one cell, prepared once like bench/quality.py prepares its own."""
    data = f"{a.data_root}/recall_multi-k{pairs}-g{gap}" + ("-tiny" if a.tiny else "")
    ensure_data(Namespace(corpus="recall_multi", data=data, pairs=pairs, gap=gap, tiny=a.tiny))
    return data


def evaluate(run: Path, memory: str, data: str, a) -> list[dict]:
    """`lamemo eval` of one model on one corpus: a row per memory length ('none' keeps none)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        mems = [] if memory == "none" else ["--mem-len", a.mem_lens,
                                            "--clamp-len", str(trained_window(run))]
        try:
            lamemo("eval", "--model", str(run), "--data", data, "--split", "test", *mems,
                   "--max-segments", str(a.max_segments), "--batch-size", str(a.batch_size),
                   "--no-progress", "--output", str(out), threads=1, capture_output=True,
                   text=True)
        except subprocess.CalledProcessError as e:
            sys.exit(f"error: lamemo eval of {run} on {data} failed:\n{e.stderr[-2000:]}")
        found = json.loads(out.read_text())
        results = found.get("results", [found])  # one memory length: the result itself
    return [{"mem_len": r["mem_len"], "bits": r["subset_bits"],
             "bits_reset": r["reset"]["subset_bits"]} for r in results]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds for every (sweep, pairs, gap, memory, mem_len)."""
    keys = sorted({(r["sweep"], r["pairs"], r["gap"], r["memory"], r["mem_len"]) for r in rows},
                  key=lambda k: (k[0] != "pairs", k[1], int(k[2].split("-")[0]), k[3], k[4]))
    out = []
    for k in keys:
        mine = [r for r in rows if (r["sweep"], r["pairs"], r["gap"], r["memory"],
                                    r["mem_len"]) == k]
        cell = dict(zip(("sweep", "pairs", "gap", "memory", "mem_len"), k), seeds=len(mine))
        for key in ("bits", "bits_reset"):
            xs = [r[key] for r in mine]
            cell[key] = [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
        out.append(cell)
    return out


def table(cells: list[dict]) -> str:
    """Markdown: one row per (sweep, K, gap), one column per memory kind and eval memory."""
    cols = sorted({(c["memory"], c["mem_len"]) for c in cells},
                  key=lambda x: (["lamemo", "xl", "none"].index(x[0])
                                 if x[0] in ("lamemo", "xl", "none") else 9, x[1]))
    head = "| sweep | K | gap (tokens) | " + " | ".join(
        f"{m} M={ml}" if m != "none" else "none" for m, ml in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for sweep, k, gap in dict.fromkeys((c["sweep"], c["pairs"], c["gap"]) for c in cells):
        by = {(c["memory"], c["mem_len"]): c for c in cells
              if (c["sweep"], c["pairs"], c["gap"]) == (sweep, k, gap)}
        vals = ["{:.2f} ± {:.2f}".format(*by[col]["bits"]) if col in by else "–" for col in cols]
        lines.append(f"| {sweep} | {k} | {gap} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(cells: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    series = sorted({(c["memory"], c["mem_len"]) for c in cells})
    for ax, sweep in zip(axes, ("pairs", "gap")):
        mine = [c for c in cells if c["sweep"] == sweep]
        xs = list(dict.fromkeys((c["pairs"], c["gap"]) for c in mine))
        labels = [f"K={k}\n{g}" if sweep == "pairs" else g for k, g in xs]
        for i, (m, ml) in enumerate(series):
            pts = [(j, c) for j, x in enumerate(xs) for c in mine
                   if (c["pairs"], c["gap"]) == x and (c["memory"], c["mem_len"]) == (m, ml)]
            if pts:
                ax.errorbar([j for j, _ in pts], [c["bits"][0] for _, c in pts],
                            yerr=[c["bits"][1] for _, c in pts], marker="o", ms=4, capsize=3,
                            color=f"C{i}", label=m if m == "none" else f"{m} M={ml}")
        ax.axhline(CHANCE, color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(xs)), labels, fontsize=7)
        ax.set(ylabel="bits per key symbol (carried)",
               title="pending pairs K" if sweep == "pairs" else "gap (tokens), K = 4")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    runs = trained_runs(REPO / a.runs)
    rows = []
    for sweep, k, gap in TINY_CELLS if a.tiny else CELLS:
        data = corpus(k, gap, a)
        for memory, seed, run in runs:
            for r in evaluate(run, memory, data, a):
                rows.append(dict(r, sweep=sweep, pairs=k, gap=gap, memory=memory, seed=seed))
                print(f"{sweep:5} K={k} gap {gap:6} {memory:6} seed {seed} M={r['mem_len']:3}: "
                      f"{r['bits']:.3f} bits per key symbol (reset {r['bits_reset']:.3f})",
                      flush=True)
    cells = summarize(rows)
    text = table(cells)
    print(text)
    plot(cells, a.plot)
    if a.json:
        Path(a.json).write_text(json.dumps({"cells": cells, "rows": rows, "table": text,
                                            "plots": [Path(a.plot).name],
                                            "runs": a.runs, "chance_bits": CHANCE}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
