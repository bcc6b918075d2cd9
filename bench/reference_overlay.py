"""Our training curve beside the authors': their code trained like our runs, overlaid (issue 23.5).

For each seed of one of our studies (`bench/quality.py`, e.g. the budget study's runs under
runs/quality/stdlib-budget/lamemo-seed<N>), `bench/reference_curve.py` trains the authors'
model with that run's settings, starting weights and batches (in parallel, one thread each;
a finished reference JSON whose step count matches is kept). Then, at every evaluation step:

- ours: mean +- sd of the valid bpc over all our seeds (the seed noise);
- theirs: each seed's valid bpc, and its difference from our run of the same seed (paired:
  same start, same batches, so it measures only the implementations' float drift);
- a verdict: theirs lies within our seed noise when |theirs - our mean| <= 2 sd.

    LAMEMO_REFERENCE_DIR=<clone of thu-coai/LaMemo>/pytorch python bench/reference_overlay.py \\
        --json bench/reference_overlay.json
    python bench/reference_overlay.py --tiny    # seconds: 6 steps of the tiny budget study

Without a reference directory it says so and writes nothing (run_all reports it skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quality import REPO, pyplot, save_figure  # bench/: this script's folder

HERE = REPO / "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", help="folder of our <memory>-seed<N> runs (default: the budget "
                   "study, runs/quality[-tiny]/stdlib-budget)")
    p.add_argument("--memory", default="lamemo", choices=("lamemo", "xl"))
    p.add_argument("--seeds", default="1,2", help="our seeds the authors' code is trained as")
    p.add_argument("--reference-dir", default=os.environ.get("LAMEMO_REFERENCE_DIR"),
                   help="the pytorch/ folder of a thu-coai/LaMemo clone (default: "
                   "$LAMEMO_REFERENCE_DIR)")
    p.add_argument("--jobs", type=int, default=2, help="reference runs trained at once")
    p.add_argument("--plots", default=str(HERE), help="folder for the PNG plot")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    a.study = REPO / (a.study or ("runs/quality-tiny/stdlib-budget" if a.tiny
                                  else "runs/quality/stdlib-budget"))
    return a


def ours(a) -> dict[int, dict]:
    """seed -> our run (quality.py's record) for every finished run of --memory in --study."""
    runs = {}
    for f in sorted(a.study.glob(f"{a.memory}-seed*/quality_run.json")):
        run = json.loads(f.read_text())["run"]
        runs[run["seed"]] = run
    if not runs:
        sys.exit(f"error: --study {a.study}: no finished {a.memory}-seed<N> run (its "
                 "quality_run.json); run bench/quality.py for that study first")
    return runs


def theirs(seed: int, run: dict, a) -> dict:
    """The authors' code trained as our run of `seed`; kept if already done to the same step."""
    folder = a.study / f"{a.memory}-seed{seed}"
    out = folder / "reference_curve.json"
    last = run["evals"][-1]["step"]
    kept = json.loads(out.read_text()) if out.is_file() else None
    if kept and kept["evals"] and kept["evals"][-1]["step"] == last:
        return kept
    cmd = [sys.executable, str(HERE / "reference_curve.py"), "--run", str(folder),
           "--reference-dir", a.reference_dir, "--out", str(out)]  # a tiny study is tiny already
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: reference_curve.py for seed {seed} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def compare(mine: dict[int, dict], refs: dict[int, dict]) -> list[dict]:
    """Per evaluation step the reference reached: our seed spread, theirs, paired differences."""
    rows = []
    for e in next(iter(refs.values()))["evals"]:
        step = e["step"]
        at = {s: next((x for x in r["evals"] if x["step"] == step), None) for s, r in mine.items()}
        vals = [x["bpc"] for x in at.values() if x is not None]
        if len(vals) < 2:
            continue
        mean, sd = statistics.fmean(vals), statistics.stdev(vals)
        row = {"step": step, "ours": [mean, sd], "theirs": {}, "paired_diff": {}}
        for s, r in refs.items():
            t = next(x["bpc"] for x in r["evals"] if x["step"] == step)
            row["theirs"][s] = t
            if at.get(s) is not None:
                row["paired_diff"][s] = t - at[s]["bpc"]
        row["within_noise"] = all(abs(t - mean) <= 2 * sd for t in row["theirs"].values())
        rows.append(row)
    return rows


def report(rows: list[dict], a) -> str:
    seeds = list(rows[0]["theirs"]) if rows else []
    lines = [f"{a.memory}: valid bpc, ours (mean +- sd over seeds) and the authors' code trained "
             f"as our seeds {seeds} (same start, batches, settings)",
             f"{'step':>6} {'ours':>17} " + " ".join(f"{'theirs s' + str(s):>11} "
                                                    f"{'vs our s' + str(s):>10}" for s in seeds)
             + "  verdict"]
    for r in rows:
        cells = " ".join(f"{r['theirs'][s]:11.4f} {r['paired_diff'].get(s, float('nan')):+10.4f}"
                         for s in seeds)
        lines.append(f"{r['step']:6d} {r['ours'][0]:8.4f} +- {r['ours'][1]:.4f} {cells}  "
                     + ("within seed noise" if r["within_noise"] else "BEYOND seed noise"))
    if rows:
        ok = all(r["within_noise"] for r in rows)
        lines.append("the authors' curve lies " + ("within" if ok else "outside") + " our seed "
                     "noise (2 sd) at " + ("every" if ok else "some") + " evaluation")
    return "\n".join(lines)


def plot(mine: dict[int, dict], refs: dict[int, dict], a) -> str:
    plt = pyplot()
    name = f"reference_overlay_{a.memory}.png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, (group, runs, style) in enumerate((("ours", mine, "-"), ("authors'", refs, "--"))):
        for s, r in runs.items():
            lab = f"{group} seed {s}"
            ax1.plot([x for x, _ in r["train_curve"]], [y for _, y in r["train_curve"]], style,
                     color=f"C{i}", alpha=0.6, lw=1, label=lab)
            ax2.plot([e["step"] for e in r["evals"]], [e["bpc"] for e in r["evals"]], style,
                     color=f"C{i}", marker="o", ms=3, alpha=0.7, label=lab)
    ax1.set(xlabel="step", ylabel="train bpc", title=f"{a.memory}: training")
    ax2.set(xlabel="step", ylabel="valid bpc (memory carried)", title="validation")
    ax2.legend(fontsize=7)
    return save_figure(fig, Path(a.plots) / name)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.reference_dir:
        print("skipped: no reference directory (set LAMEMO_REFERENCE_DIR or --reference-dir to "
              "the pytorch/ folder of a thu-coai/LaMemo clone)")
        return 0
    mine = ours(a)
    seeds = [int(s) for s in a.seeds.split(",")]
    missing = [s for s in seeds if s not in mine]
    if missing:
        sys.exit(f"error: --seeds {a.seeds}: no run of seed {missing[0]} in {a.study}")
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads wait on subprocesses
        refs = dict(zip(seeds, pool.map(lambda s: theirs(s, mine[s], a), seeds)))
    rows = compare(mine, refs)
    text = report(rows, a)
    print(text)
    plots = [plot(mine, refs, a)]
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "report": text, "plots": plots,
                                            "reference": refs, "study": str(a.study)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
