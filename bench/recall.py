"""Recall study: does a model trained here retrieve a key from its memory?

Prepares the recall corpus (`lamemo prepare --corpus recall`: a random key written once and
recalled `gap` tokens later, gap > segment length), trains each memory kind with
configs/recall.yaml, then runs `lamemo eval --memory both` on the held-out test split and reports
the retrieval cost in bits per key symbol with the memory carried and with the memory reset
before every segment. A key symbol costs log2(alphabet) = 4 bits to a model that cannot see
its first copy; the recipe's targets are <= 0.5 bit carried (xl, lamemo) and >= 90% of 4 bits
with reset memory and for the no-memory model.

    python bench/recall.py                          # xl, lamemo, none; one seed
    python bench/recall.py --seeds 1,2,3 --json out.json
    python bench/recall.py --tiny                   # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from quality import REPO, ensure_data, lamemo  # bench/ is this script's folder

CONFIG = REPO / "configs" / "recall.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="recall corpus (prepared if missing; default "
                   "data/recall, data/recall-tiny with --tiny)")
    p.add_argument("--out", default="runs/recall", help="run folders")
    p.add_argument("--memories", default="xl,lamemo,none")
    p.add_argument("--seeds", default="1111", help="comma-separated training seeds")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra `--set key=value` for every training run")
    p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (CI)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def run_one(memory: str, seed: int, a) -> dict:
    out = f"{a.out}/{memory}-seed{seed}"
    sets = [f"model.memory={memory}", f"train.seed={seed}", f"train.output_dir={out}",
            f"data.path={a.data}", "checkpoint.resume=false", *a.overrides]
    if a.tiny:
        sets += ["train.max_steps=20", "train.eval_interval=0", "train.log_interval=10"]
    t0 = time.time()
    lamemo("train", "--config", str(CONFIG), "--overwrite",
           *[x for s in sets for x in ("--set", s)], stdout=subprocess.DEVNULL)
    minutes = (time.time() - t0) / 60
    r = lamemo("eval", "--model", out, "--data", a.data, "--split", "test", "--memory", "both",
               "--batch-size", "16", "--no-progress", capture_output=True, text=True)
    ev = json.loads(r.stdout)
    bits = ev["recall"]["bits_per_key_symbol"]
    return {"memory": memory, "seed": seed, "train_minutes": round(minutes, 2),
            "recall_bits_carried": bits["carried"], "recall_bits_reset": bits["reset"],
            "chance_bits": ev["recall"]["chance_bits"], "key_symbols": ev["recall"]["key_symbols"],
            "test_bpc_carried": ev["bits_per_byte"], "test_bpc_reset": ev["reset"]["bits_per_byte"],
            "memory_gain_bits_per_token": ev["memory_gain_bits_per_token"]}


def verdict(r: dict) -> str:
    chance = r["chance_bits"]
    if r["memory"] == "none":
        return "ok" if r["recall_bits_carried"] >= 0.9 * chance else "MISSED"
    ok = r["recall_bits_carried"] <= 0.5 and r["recall_bits_reset"] >= 0.9 * chance
    return "ok" if ok else "MISSED"


def main(argv=None) -> int:
    a = parse_args(argv)
    a.corpus, a.data = "recall", a.data or ("data/recall-tiny" if a.tiny else "data/recall")
    if a.tiny:
        a.out = a.out.rstrip("/") + "-tiny"
    ensure_data(a)
    runs = [run_one(m, int(s), a) for s in a.seeds.split(",") for m in a.memories.split(",")]
    print(f"\n{'memory':8} {'seed':>5} {'bits/key symbol':>16} {'reset':>7} {'chance':>7} "
          f"{'gain bpc':>9} {'train min':>10}  target")
    for r in runs:
        print(f"{r['memory']:8} {r['seed']:>5} {r['recall_bits_carried']:16.3f} "
              f"{r['recall_bits_reset']:7.3f} {r['chance_bits']:7.3f} "
              f"{r['memory_gain_bits_per_token']:+9.4f} {r['train_minutes']:10.1f}  {verdict(r)}")
    print("target: xl/lamemo <= 0.5 bit per key symbol with memory carried and >= 90% of "
          "chance with memory reset; none >= 90% of chance")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "config": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
