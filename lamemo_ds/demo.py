"""`make demo` (`python -m lamemo_ds.demo`): the whole main job, small, on 2 CPU processes.

1. prepare the Python standard library sources as a byte-level corpus in demo/data (skipped when
   it is already there);
2. train a small LaMemo with ZeRO-2 on 2 processes (torchrun) for a few minutes;
3. evaluate valid bpc, write TensorBoard logs and a checkpoint;
4. export the checkpoint as a Hugging Face folder, evaluate it on the test split and sample a
   short generation from it, then say where everything is.

`--quick` is the CI variant (tiny model, a few dozen steps).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DEMO_CONFIG: dict = {
    "model": {"vocab_size": 257, "n_layer": 4, "n_head": 4, "d_model": 128, "d_head": 32,
              "d_inner": 512, "dropout": 0.0, "memory": "lamemo", "segment_len": 64,
              "mem_len": 64, "init_std": 0.088},
    "data": {"path": "demo/data"},
    "optim": {"lr": 0.002, "schedule": "cosine", "warmup_steps": 20},
    "train": {"micro_batch_size": 8, "grad_accum": 1, "max_steps": 200, "log_interval": 25,
              "eval_interval": 0, "eval_max_segments": 20, "output_dir": "demo/run"},
    "eval": {"batch_size": 8},
    "parallel": {"zero_stage": 2},
    "checkpoint": {"interval": 100, "keep_last": 2},
}
QUICK: dict = {
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_head": 16, "d_inner": 64,
              "segment_len": 32, "mem_len": 32},
    "optim": {"lr": 0.003, "warmup_steps": 0},
    "train": {"micro_batch_size": 4, "max_steps": 40, "log_interval": 10,
              "eval_max_segments": 4},
    "eval": {"batch_size": 4},
    "checkpoint": {"interval": 20},
}


def demo_config(out: Path, *, quick: bool, steps: int | None) -> dict:
    cfg = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    for k, v in (QUICK if quick else {}).items():
        cfg[k].update(v)
    cfg["data"]["path"] = str(out / "data")
    cfg["train"]["output_dir"] = str(out / "run")
    if steps:
        cfg["train"]["max_steps"] = steps
    return cfg


def prepare(data: Path, *, max_bytes: str) -> None:
    if (data / "manifest.json").is_file():
        print(f"demo: corpus already prepared in {data}")
        return
    subprocess.run([sys.executable, "-m", "lamemo_ds.cli", "prepare", "--corpus", "stdlib",
                    "--tokenizer", "byte", "--out", str(data), "--max-bytes", max_bytes],
                   check=True)


def train(config: Path, *, nproc: int) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "lamemo_ds.cli", "train", "--config", str(config),
           "--overwrite"]  # a fresh run each time; an earlier one is moved aside, not resumed
    print("demo: " + " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd).returncode


def lamemo(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run one `lamemo` subcommand in this Python; raise if it fails."""
    cmd = [sys.executable, "-m", "lamemo_ds.cli", *args]
    print("demo: lamemo " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=capture)


def export_and_use(run: Path, data: Path, *, quick: bool) -> dict:
    """Checkpoint -> HF folder -> test bpc (JSON) and a short generation."""
    hf = run / "hf"
    lamemo("convert", "--from", "deepspeed", str(run / "checkpoints"), "--to", "hf", str(hf),
           "--force")
    result = run / "test_eval.json"
    lamemo("eval", "--model", str(hf), "--data", str(data), "--split", "test",
           "--max-segments", "8" if quick else "64", "--no-progress", "--output", str(result))
    gen = lamemo("generate", "--model", str(hf), "--prompt", "def main(", "--max-new-tokens",
                 "48" if quick else "160", "--temperature", "0.8", "--top-k", "40", "--seed", "0",
                 "--no-stream", capture=True)
    return {"hf": hf, "test": json.loads(result.read_text()), "sample": gen.stdout.strip()}


def summary(run: Path) -> dict:
    """First/last training losses and the final evaluation from metrics.jsonl."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if "loss" in r and math.isfinite(r["loss"])]
    evals = [r["eval"] for r in recs if "eval" in r]
    k = max(1, min(10, len(train) // 4))
    return {"first_loss": sum(train[:k]) / k, "last_loss": sum(train[-k:]) / k,
            "eval": evals[-1] if evals else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lamemo_ds.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI variant: tiny model, 40 steps")
    p.add_argument("--out", default="demo", help="folder for data/ and run/ (default: demo)")
    p.add_argument("--steps", type=int, help="override train.max_steps")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    a = p.parse_args(argv)
    out = Path(a.out)
    prepare(out / "data", max_bytes="2M" if a.quick else "8M")
    cfg = demo_config(out, quick=a.quick, steps=a.steps)
    run = Path(cfg["train"]["output_dir"])
    shutil.rmtree(run, ignore_errors=True)  # the demo always trains from scratch
    run.mkdir(parents=True)
    config = run / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = train(config, nproc=a.nproc)
    if code != 0:
        print(f"demo: training failed with exit code {code}", file=sys.stderr)
        return code
    s = summary(run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    exported = export_and_use(run, out / "data", quick=a.quick)
    ev, test = s["eval"], exported["test"]
    print("\n=== lamemo demo done ===")
    print(f"train loss   : {s['first_loss']:.3f} -> {s['last_loss']:.3f} (nats/byte)")
    if ev:
        print(f"valid        : {ev['bits_per_byte']:.3f} bits per byte over {ev['tokens']:,} "
              "bytes")
    print(f"test (export): {test['bits_per_byte']:.3f} bits per byte over {test['tokens']:,} "
          f"bytes; memory gain {test['memory_gain_bits_per_token']:+.3f} bits per byte (memory "
          f"reset before every segment: {test['reset']['bits_per_byte']:.3f})")
    print(f"sample       : {exported['sample']!r}")
    print(f"checkpoint   : {run / 'checkpoints' / latest}")
    print(f"HF export    : {exported['hf']} (transformers.AutoModelForCausalLM.from_pretrained("
          "..., trust_remote_code=True))")
    print(f"metrics      : {run / 'metrics.jsonl'}")
    print(f"TensorBoard  : tensorboard --logdir {run / 'tensorboard'}")
    print(f"resume/extend: lamemo train --config {config} --set train.max_steps=600 "
          "(under torchrun --nproc_per_node 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
