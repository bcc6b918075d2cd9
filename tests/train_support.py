"""Helpers of the training tests: a tiny prepared corpus, run configs, and 2-process launches.

Ranks are started either by real launchers (torchrun, deepspeed, mpirun) or by `spawn` /
`run_ranks`, which set RANK/WORLD_SIZE/MASTER_* themselves so a test can see every rank's exit
code and kill one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RUNNER = Path(__file__).with_name("train_fault_runner.py")

TINY = {
    "model": {"vocab_size": 257, "n_layer": 2, "n_head": 2, "d_model": 32, "d_head": 16,
              "d_inner": 64, "dropout": 0.0, "segment_len": 16, "mem_len": 16},
    "data": {"prefetch": 2},
    "train": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 5, "log_interval": 5,
              "eval_interval": 0, "eval_max_segments": 2},
    "eval": {"batch_size": 2},
    "parallel": {"zero_stage": 2},
    "checkpoint": {"interval": 0, "keep_last": 3},
    "logging": {"tensorboard": False},
}


def prepare_corpus(out: Path) -> Path:
    """The stdlib corpus, byte-level, a few hundred kB per split (about a second)."""
    if not (out / "manifest.json").is_file():
        subprocess.run([PY, "-m", "lamemo_ds.cli", "prepare", "--corpus", "stdlib",
                        "--tokenizer", "byte", "--out", str(out), "--max-bytes", "300K",
                        "--quiet"], check=True, env=env(), timeout=300)
    return out


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, data_dir: Path, out_dir: Path, **sections: dict) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["data"]["path"] = str(data_dir)
    cfg["train"]["output_dir"] = str(out_dir)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(config: Path, *, nproc: int = 2, args: tuple[str, ...] = (),
          timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `nproc` ranks of tests/train_fault_runner.py; wait; return each rank's result."""
    return run_ranks([str(RUNNER), "--config", str(config), *args], nproc=nproc,
                     timeout=timeout)


def run_ranks(argv: list[str], *, nproc: int = 2,
              timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """`python ARGV` as `nproc` ranks with the variables torchrun would set (without torchrun's
    own interpreter, seconds per launch); wait; return each rank's result (stdout + stderr)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        e = env(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([PY, *argv], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def losses(out_dir: Path) -> dict[int, float]:
    from lamemo_ds.train.metrics import read_losses

    return read_losses(out_dir / "metrics.jsonl")


def model_states(out_dir: Path, step: int) -> dict:
    from lamemo_ds.checkpoint.manager import step_dir_name
    from lamemo_ds.checkpoint.safe_load import load_pt

    path = out_dir / "checkpoints" / step_dir_name(step) / "deepspeed" / \
        "mp_rank_00_model_states.pt"
    return load_pt(path)["module"]  # the restricted loader reads our own checkpoints
