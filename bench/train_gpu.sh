#!/usr/bin/env bash
# One prepared GPU run (issue 4): enwik8_base (12 layers, d 512, N = mem_len = 512, batch 20) in
# bf16 on one GPU, lamemo and then xl, printing target tokens/s, TFLOP/s, MFU and peak memory.
# The byte-level stdlib corpus stands in for enwik8 (same vocabulary size, 257): throughput does
# not depend on the text. Run from the repository root on the GPU machine:
#     OUT=/tmp/gpu bash bench/train_gpu.sh            # ~5 minutes on an H200
# Environment: PYTHON (default python3), STEPS (default 60), PEAK_TFLOPS (default 989, H100/H200
# dense bf16), OUT (default bench/gpu_out).
set -euo pipefail
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-60}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
"$PYTHON" -m lamemo_ds.cli prepare --corpus stdlib --tokenizer byte --out "$OUT/data" \
    --max-bytes 16M --quiet
for memory in lamemo xl; do
    "$PYTHON" -m lamemo_ds.cli train --config configs/enwik8_base.yaml --overwrite \
        --set data.path="$OUT/data" --set model.memory="$memory" \
        --set train.max_steps="$STEPS" --set train.log_interval=$((STEPS / 3)) \
        --set train.eval_interval=0 --set train.eval_max_segments=2 \
        --set checkpoint.interval=0 --set checkpoint.resume=false \
        --set parallel.zero_stage=0 --set logging.peak_tflops="$PEAK_TFLOPS" \
        --set train.output_dir="$OUT/$memory"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for memory in ("lamemo", "xl"):
    recs = [json.loads(l) for l in (out / memory / "metrics.jsonl").read_text().splitlines()]
    last = [r["interval"] for r in recs if "interval" in r][-1]  # steady state, not warm-up
    rows[memory] = last
    print(f"{memory:7} {last['perf/target_tokens_per_s']:>12,.0f} tok/s "
          f"{last['perf/tflops']:8.1f} TFLOP/s  MFU {100 * (last['perf/mfu'] or 0):5.1f}%  "
          f"peak {last['perf/peak_memory_gib']:.1f} GiB")
(out / "train_gpu.json").write_text(json.dumps(rows, indent=2))
PY
