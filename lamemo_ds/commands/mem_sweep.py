"""`lamemo eval --mem-len 32,64,128`: the table and plot of a memory-length sweep.

How a memory model extrapolates to a longer memory than it was trained with is read off the
loss against the evaluation memory length: `write_sweep` turns one `lamemo eval` result per
length into a JSON table (the return value, and --output), a text table (stem.txt) and a PNG
plot (stem.png, matplotlib with the Agg backend).
"""

from __future__ import annotations

import sys
from pathlib import Path


def sweep_rows(results: list[dict], units) -> list[dict]:
    """One compact row per memory length: loss, unit scores, reset pass and memory gain."""
    rows = []
    for r in results:
        row = {"mem_len": r["mem_len"], "loss": r["loss"], **units.scores(r["loss"]),
               "tokens": r["tokens"], "memory": r["memory"]}
        if "reset" in r:
            row.update(reset_loss=r["reset"]["loss"],
                       memory_gain_bits_per_token=r["memory_gain_bits_per_token"])
        rows.append(row)
    return rows


def table_text(out: dict) -> str:
    """The sweep as an aligned text table (one line per memory length)."""
    rows = out["rows"]
    keys = [k for k in rows[0] if k not in ("memory", "tokens")]
    lines = [f"{out['model']} on {out['data']} ({out['split']}, N={out['segment_len']}, "
             f"clamp_len={out['clamp_len']}, {rows[0]['memory']} memory, "
             f"{rows[0]['tokens']:,} tokens per length)",
             "  ".join(f"{k:>{max(len(k), 8)}}" for k in keys)]
    for row in rows:
        lines.append("  ".join(
            f"{row[k]!s:>{max(len(k), 8)}}" if isinstance(row[k], int) or row[k] is None
            else f"{row[k]:>{max(len(k), 8)}.4f}" for k in keys))
    return "\n".join(lines)


def plot(out: dict, path: Path, label: str | None = None) -> Path:
    """Loss (the data's headline unit when it is in bits, else nats per token) against the
    evaluation memory length, reset memory as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    unit = out["unit"] if out["unit"].startswith("bits") else "loss"
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["mem_len"] for r in rows]
    ax.plot(xs, [r[unit] for r in rows], "o-", label=label or "carried memory")
    if "reset_loss" in rows[0] and unit == "loss":
        ax.axhline(rows[0]["reset_loss"], ls="--", color="gray", label="memory reset")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation memory length", ylabel=f"{out['split']} {unit}",
           title=f"{Path(out['model']).name}: loss vs evaluation memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep(results: list[dict], units, output: str | None) -> dict:
    """The sweep's JSON; with `output` also writes it there, stem.txt and stem.png."""
    first = results[0]
    out = {k: first[k] for k in ("model", "data", "split", "protocol", "segment_len",
                                 "clamp_len", "same_length", "batch_size")}
    out.update(unit=units.headline, rows=sweep_rows(results, units), results=results)
    print(table_text(out), file=sys.stderr)
    if output is None:
        print("lamemo eval: give --output FILE.json to write the table and its plot "
              "(FILE.txt, FILE.png)", file=sys.stderr)
        return out
    path = Path(output)
    out["files"] = {"json": str(path), "text": str(path.with_suffix(".txt")),
                    "plot": str(path.with_suffix(".png"))}
    path.with_suffix(".txt").write_text(table_text(out) + "\n")
    try:
        plot(out, path.with_suffix(".png"))
    except ImportError:
        out["files"]["plot"] = None
        print("lamemo eval: no plot: matplotlib is not installed (pip install "
              "'lamemo_ds[plot]')", file=sys.stderr)
    import json

    path.write_text(json.dumps(out, indent=2) + "\n")
    return out
