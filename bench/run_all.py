"""`make bench`: run every benchmark in bench/ and write bench/RESULTS.md + bench/results.json.

Each benchmark is a script taking `--json PATH` (and `--tiny` for a seconds-long CI run); this
driver records the machine, the commit and the command beside every result, draws the plots a
reader would rather look at than read, and never judges timings (numbers only).

    python bench/run_all.py            # full CPU suite (tens of minutes on 2 cores)
    python bench/run_all.py --tiny     # every script in its tiny mode (CI keeps them from rotting)
    python bench/run_all.py --only model_step,loader
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# name -> (script, extra args, what it measures)
SUITE: dict[str, tuple[str, list[str], str]] = {
    "model_step": ("model_step.py", [], "fwd+bwd+Adam step, lamemo vs xl vs none (CPU)"),
    "loader": ("loader.py", [], "ordered stream loader vs raw memmap read"),
    "train": ("train.py", [], "training tokens/s on 2 CPU processes (ZeRO-2)"),
    "pipeline": ("pipeline.py", [], "pipeline P=1 vs P=2 step time and bubble estimate"),
    "attention": ("attention.py", [], "fused attention kernels (GPU; tiny under the interpreter)"),
    "recall": ("recall.py", [], "recall recipe: bits per key symbol, memory carried vs reset"),
    "quality": ("quality.py", [], "stdlib: lamemo / xl / none over seeds, equal steps and "
                "equal time, memory gain"),
    "quality_recall": ("quality.py", ["--corpus", "recall"], "recall corpus: lamemo / xl / "
                       "none over seeds, equal steps and equal time, memory gain"),
    "quality_recall_multi": ("quality.py", ["--corpus", "recall_multi", "--jobs", "2",
                                            "--reuse"],
                             "multi-query recall (configs/recall_multi.yaml): lamemo / xl / none "
                             "over seeds, equal steps and equal time"),
    "recall_sweep": ("recall_sweep.py", [], "multi-query recall: the trained models against the "
                     "number of pending pairs and the gap, at the trained and a longer memory"),
    "quality_budget": ("quality.py", ["--steps", "3000", "--schedule", "constant",
                                      "--eval-points", "6", "--study", "budget", "--jobs", "2",
                                      "--reuse"],
                       "stdlib: 3k steps at a constant lr, evaluated every 0.5k (the runs the "
                       "reference overlay retraces); lamemo / xl / none over seeds"),
    "quality_budget_cosine": ("quality.py", ["--budgets", "1000,3000,5000", "--eval-points", "1",
                                             "--eval-segments", "256", "--study",
                                             "cosine-budget", "--jobs", "2", "--reuse"],
                              "stdlib: quality against budget, one cosine run per budget (1k, "
                              "3k, 5k steps) evaluated on 131k valid bytes; lamemo / xl / none "
                              "over seeds, equal steps, equal time and the memory gain"),
    "reference_overlay": ("reference_overlay.py", [], "stdlib: our lamemo curve beside the "
                          "authors' code trained with the same settings, start and batches"),
    "bad_inputs": ("bad_inputs.py", [], "bad inputs: exit code, one-line error, nothing left "
                   "behind (tests/test_bad_inputs.py)"),
    "mem_sweep": ("mem_sweep.py", ["--clamp-lens", "train,128"], "stdlib: xl and lamemo "
                  "evaluated with memory lengths 16-256 (trained with 64), unclamped and with "
                  "clamp_len 128"),
    "scaling": ("scaling.py", [], "scaling curves: step time, eval tokens/s and peak memory "
                "against M and N (lamemo / xl / none) with fitted exponents; checkpoint, "
                "prepare and loader costs as they grow"),
}


# name -> a file in bench/ whose text (what the numbers mean, written by whoever ran the study)
# opens that benchmark's section
NOTES: dict[str, str] = {"scaling": "SCALING.md"}

PLACES: dict[str, str] = {}  # machine path -> how RESULTS.md names it (set by main)


def portable(text: str) -> str:
    """Paths of the machine that ran a benchmark, made relative to the repository (or named by
    the variable or option that gave them), so RESULTS.md reads the same anywhere."""
    ref = os.environ.get("LAMEMO_REFERENCE_DIR")
    if ref:
        text = text.replace(ref.rstrip("/"), "$LAMEMO_REFERENCE_DIR")
    for path, name in PLACES.items():
        text = text.replace(path, name)
    return text.replace(str(REPO) + "/", "").replace(sys.executable, "python")


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(name: str, tiny: bool, out_dir: Path, timeout: int) -> dict:
    script, extra, what = SUITE[name]
    path = HERE / script
    if not path.is_file():
        return {"name": name, "what": what, "status": "missing", "error": f"{script} not found"}
    out = out_dir / f"{name}.json"
    if script in ("quality.py", "mem_sweep.py", "scaling.py", "reference_overlay.py"):
        extra = [*extra, "--plots", str(out_dir)]
    if script == "recall_sweep.py":
        extra = [*extra, "--plot", str(out_dir / "recall_sweep.png")]
    cmd = [sys.executable, str(path), *extra, "--json", str(out)] + (["--tiny"] if tiny else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    row = {"name": name, "what": what, "command": portable(" ".join(cmd[1:])),
           "seconds": round(time.time() - t0, 1), "stdout": portable(proc.stdout[-8000:])}
    if proc.returncode != 0:
        row.update(status="failed", error=portable(proc.stderr[-4000:]))
    elif out.is_file():
        result = json.loads(out.read_text())
        # the printed figures and the commit travel with the result, so `--reuse` shows them
        result.update(stdout=row["stdout"], commit=commit(), command=row["command"])
        out.write_text(json.dumps(result, indent=2))
        row.update(status="ok", result=result)
    else:
        row.update(status="skipped", error=portable((proc.stdout + proc.stderr)[-2000:]))
    return row


def reused_row(name: str, path: str) -> dict:
    """A result taken from an earlier run's JSON: its figures, the command and commit that
    made them (older files without them show their numbers as JSON)."""
    result = json.loads(Path(path).read_text())
    figures = result.get("stdout") or result.get("report") or result.get("table") or json.dumps(
        {k: v for k, v in result.items() if k not in ("runs", "config")}, indent=1)[:3000]
    made = result.get("command", f"bench/{SUITE[name][0]}")
    return {"name": name, "what": SUITE[name][2], "status": "ok", "result": result,
            "command": f"{made} (result reused from {portable(str(Path(path).resolve()))}, "
                       f"made at commit {result.get('commit', 'unknown')})",
            "stdout": portable(figures)}


def plot(rows: list[dict], out_dir: Path) -> list[str]:
    """PNG plots for the results that have a curve; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    by = {r["name"]: r for r in rows if r.get("status") == "ok"}
    if "model_step" in by:
        res = by["model_step"]["result"]["rows"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([r["memory"] for r in res], [r["tokens_per_s"] for r in res])
        ax.set_ylabel("target tokens/s")
        ax.set_title("model step (fwd+bwd+Adam), CPU")
        fig.tight_layout()
        fig.savefig(out_dir / "model_step.png", dpi=120)
        made.append("model_step.png")
    plt.close("all")
    return made


def write_markdown(rows: list[dict], info: dict, sha: str, plots: list[str], path: Path) -> None:
    lines = ["# Benchmark results", "",
             f"Generated by `python bench/run_all.py` at commit `{sha}` on "
             f"{info.get('gpu') or info['cpu']} ({info['cores']} cores), torch {info['torch']}.",
             "Numbers only: no test asserts a timing. Each section names the command that made "
             "it.", ""]
    findings = HERE / "FINDINGS.md"  # what the numbers mean, written by whoever ran the study
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    for r in rows:
        lines += [f"## {r['name']}: {r['what']}", ""]
        notes = NOTES.get(r["name"])
        if notes and (HERE / notes).is_file():
            lines += [(HERE / notes).read_text().strip(), ""]
        lines += [f"status: **{r['status']}**"]
        if "command" in r:
            took = f" ({r['seconds']} s)" if "seconds" in r else ""
            lines += ["", f"command: `python {r['command']}`{took}"]
        if r.get("stdout"):
            lines += ["", "```", r["stdout"].strip()[-8000:], "```"]
        for p in (r.get("result") or {}).get("plots", []):
            lines += ["", f"![{p}]({p})"]
        if r.get("error") and r["status"] != "ok":
            lines += ["", "```", r["error"].strip()[-1500:], "```"]
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny mode of every benchmark (CI)")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(SUITE))
    ap.add_argument("--out", default=str(HERE), help="folder for RESULTS.md, results.json, PNGs")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    ap.add_argument("--reuse", action="append", default=[], metavar="NAME=JSON",
                    help="take NAME's result from a JSON file its script wrote earlier "
                    "(e.g. quality=bench/quality.json) instead of running it again")
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        ap.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(SUITE)}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not out_dir.resolve().is_relative_to(REPO):
        PLACES[str(out_dir.resolve())] = "$OUT"
    info, sha = machine(), commit()
    reused = dict(item.split("=", 1) for item in a.reuse)
    rows = []
    for n in names:
        print(f"== {n}", flush=True)
        if n == "attention" and not a.tiny and not machine_has_gpu():
            rows.append({"name": n, "what": SUITE[n][2], "status": "skipped",
                         "error": "needs a CUDA GPU (run `python bench/attention.py` on one; "
                         "--tiny runs it on CPU through Triton's interpreter)"})
            continue
        if n in reused:
            rows.append(reused_row(n, reused[n]))
            continue
        rows.append(run_one(n, a.tiny, out_dir, a.timeout))
        print(rows[-1].get("stdout", "") or rows[-1].get("error", ""), flush=True)
    plots = plot(rows, out_dir)
    (out_dir / "results.json").write_text(portable(json.dumps(
        {"machine": info, "commit": sha, "tiny": a.tiny, "benchmarks": rows}, indent=2)))
    write_markdown(rows, info, sha, plots, out_dir / "RESULTS.md")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    print(f"wrote {out_dir / 'RESULTS.md'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
