"""Training throughput of lamemo vs xl at the demo config on 2 CPU processes (ZeRO-2).

Prints target tokens/s, step time and the fraction of time spent waiting for data, measured over
the second half of the run (the first half absorbs start-up). `--tiny` is the CI variant.

    python bench/train.py [--tiny] [--steps 40] [--nproc 2] [--memory lamemo xl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lamemo_ds.demo import QUICK, demo_config


def run_one(work: Path, data: Path, *, memory: str, steps: int, nproc: int, tiny: bool) -> dict:
    cfg = demo_config(work, quick=tiny, steps=steps)
    cfg["data"]["path"] = str(data)
    cfg["model"]["memory"] = memory
    cfg["train"].update(log_interval=steps // 2, eval_max_segments=1, output_dir=str(work / memory))
    cfg["checkpoint"]["interval"] = 0
    cfg["logging"] = {"tensorboard": False}
    path = work / f"{memory}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "lamemo_ds.cli", "train", "--config", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{memory} run failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    recs = [json.loads(x) for x in (work / memory / "metrics.jsonl").read_text().splitlines()]
    return [r["interval"] for r in recs if "interval" in r][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps (CI)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 40, tiny 10)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--memory", nargs="+",
                   help="memory kinds to time (default lamemo xl; --tiny: lamemo)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    a = p.parse_args()
    rows = []
    steps = a.steps or (6 if a.tiny else 40)
    a.memory = a.memory or (["lamemo"] if a.tiny else ["lamemo", "xl"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([sys.executable, "-m", "lamemo_ds.cli", "prepare", "--corpus", "stdlib",
                        "--tokenizer", "byte", "--out", str(data), "--max-bytes", "1M",
                        "--quiet"], check=True, capture_output=True)
        shape = f"demo --quick model {QUICK['model']}" if a.tiny else "configs/demo.yaml"
        print(f"bench/train.py: {shape}, {a.nproc} CPU processes, ZeRO-2, {steps} steps, "
              "second half measured")
        print(f"{'memory':8} {'tokens/s':>10} {'step s':>8} {'data wait':>10}")
        for memory in a.memory:
            s = run_one(work, data, memory=memory, steps=steps, nproc=a.nproc, tiny=a.tiny)
            rows.append({"memory": memory, **s})
            print(f"{memory:8} {s['perf/target_tokens_per_s']:>10,.0f} "
                  f"{s['perf/step_time_s']:>8.3f} {100 * s['perf/data_wait_frac']:>9.2f}%",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": steps, "nproc": a.nproc, "tiny": a.tiny,
                                            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
