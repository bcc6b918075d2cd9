"""Quality study: does memory help? Train lamemo, xl and none with the same budget and seed on
the byte-level Python-stdlib corpus, then report valid bpc and valid bpc by segment index.

Segment 0 of every evaluation stream has no memory, so the curve's first point is the same
task for all three models; the gap that opens at later segments is what memory buys.

    python bench/quality.py                   # CPU default: each run well under 15 min here
    python bench/quality.py --steps 20000 --d-model 512 --layers 12   # a GPU-sized study
    python bench/quality.py --tiny            # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO / "demo" / "data"),
                   help="byte-level stdlib corpus (prepared here if missing)")
    p.add_argument("--out", default=str(REPO / "runs" / "quality"), help="run folders")
    p.add_argument("--memories", default="lamemo,xl,none")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seg-len", type=int, default=64)
    p.add_argument("--mem-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--eval-segments", type=int, default=64,
                   help="segments per evaluation stream (the length of the by-segment curve)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def lamemo_cmd() -> list[str]:
    return [sys.executable, "-m", "lamemo_ds.cli"]


def ensure_data(data: Path, tiny: bool) -> None:
    if (data / "manifest.json").is_file():
        return
    cmd = lamemo_cmd() + ["prepare", "--corpus", "stdlib", "--tokenizer", "byte", "--out",
                          str(data), "--quiet"] + (["--max-bytes", "2M"] if tiny else [])
    subprocess.run(cmd, check=True)


def train_one(memory: str, a) -> dict:
    out = Path(a.out) / memory
    sets = {
        "model.vocab_size": 257, "model.n_layer": a.layers, "model.n_head": a.heads,
        "model.d_model": a.d_model, "model.d_head": a.d_model // a.heads,
        "model.d_inner": 4 * a.d_model, "model.dropout": 0.0, "model.memory": memory,
        "model.segment_len": a.seg_len, "model.mem_len": a.mem_len, "data.path": a.data,
        "optim.lr": a.lr, "optim.warmup_steps": min(100, a.steps // 10),
        "train.micro_batch_size": a.batch, "train.max_steps": a.steps, "train.seed": a.seed,
        "train.log_interval": max(1, a.steps // 10), "train.eval_interval": 0,
        "train.eval_max_segments": a.eval_segments, "train.output_dir": str(out),
        "eval.batch_size": a.batch, "checkpoint.interval": 0, "checkpoint.resume": False,
    }
    cmd = lamemo_cmd() + ["train", "--config", str(REPO / "configs" / "debug.yaml")] + [
        x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    evals = [json.loads(line)["eval"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    valid = [e for e in evals if e.get("split") == "valid"][-1]
    ln2 = math.log(2)
    return {"memory": memory, "seconds": round(time.time() - t0, 1),
            "valid_bpc": valid["loss"] / ln2, "valid_tokens": valid["tokens"],
            "bpc_by_segment": [x / ln2 for x in valid["loss_by_segment"]]}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tiny:
        a.steps, a.layers, a.d_model, a.heads = 6, 1, 32, 2
        a.seg_len = a.mem_len = 16
        a.batch, a.eval_segments = 2, 3
        a.out = str(Path(a.out).with_name("quality-tiny"))
    ensure_data(Path(a.data), a.tiny)
    runs = [train_one(m, a) for m in a.memories.split(",")]
    print(f"\n{'memory':8} {'valid bpc':>10} {'seg 0':>8} {'seg 1':>8} {'last seg':>9} "
          f"{'minutes':>8}")
    for r in runs:
        seg = r["bpc_by_segment"]
        print(f"{r['memory']:8} {r['valid_bpc']:10.4f} {seg[0]:8.4f} "
              f"{seg[1] if len(seg) > 1 else float('nan'):8.4f} {seg[-1]:9.4f} "
              f"{r['seconds'] / 60:8.1f}")
    best = min(runs, key=lambda r: r["valid_bpc"])
    print(f"best valid bpc: {best['memory']} ({best['valid_bpc']:.4f}) with {a.steps} steps, "
          f"L={a.layers} d={a.d_model} N={a.seg_len} M={a.mem_len} B={a.batch}, seed {a.seed}")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "config": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
