"""slurm/chain.sh on a real Slurm cluster: prepare -> train -> eval -> convert, each `afterok`.

Every step is the real sbatch script with only its resource lines overridden on the command line,
and each step's output is checked: shards, a checkpoint, an evaluation, a Hugging Face folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
STEPS = ("prepare", "train", "eval", "convert")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def run_chain(slurm: SlurmCluster, work: Path) -> dict[str, int]:
    """Submit the pipeline from `work` (as a user would from their checkout); step -> job id."""
    env = dict(slurm.env, PYTHON=sys.executable, PYTHONPATH=str(REPO), CORPUS="stdlib",
               PREPARE_ARGS="--max-docs 20",
               TRAIN_ARGS="--set train.max_steps=12 --set train.eval_max_segments=1 "
                          "--set parallel.backend=gloo",
               EVAL_ARGS="--max-segments 2 --batch-size 2 --device cpu",
               CONVERT_ARGS="--quiet")
    cmd = ["bash", str(REPO / "slurm" / "chain.sh"), "--config", str(REPO / "configs/debug.yaml"),
           "--run-dir", str(work / "run"), "--data-dir", str(work / "data"),
           "--train-opts", "--ntasks-per-node=2",
           "--", "-p", "debug", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
           "-o", str(work / "%x-%j.out")]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines())
    assert list(jobs) == list(STEPS), proc.stdout
    return {step: int(job) for step, job in jobs.items()}


def test_chain_runs_every_step_in_order(slurm: SlurmCluster, tmp_path: Path) -> None:
    jobs = run_chain(slurm, tmp_path)
    # Dependencies are held by Slurm, not by the script: all four are queued right away.
    assert slurm.job(jobs["convert"]).get("Dependency", "").startswith(f"afterok:{jobs['eval']}")

    records = {}
    for step in STEPS:
        records[step] = slurm.wait_finished(jobs[step], timeout_s=900)
        log = tmp_path / f"lamemo-{step}-{jobs[step]}.out"
        text = log.read_text() if log.exists() else "(no log)"
        assert records[step]["JobState"] == "COMPLETED", f"{step}: {text}{slurm.logs_tail()}"
    for before, after in zip(STEPS, STEPS[1:]):  # afterok: each starts after the previous ended
        assert records[after]["StartTime"] >= records[before]["EndTime"], (before, after)

    data, run = tmp_path / "data", tmp_path / "run"
    assert json.loads((data / "manifest.json").read_text())["corpus"] == "stdlib"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000012"
    assert (run / "model" / "config.json").is_file()  # eval consolidated the checkpoint
    result = json.loads((run / "eval-test-paper.json").read_text())
    assert result["split"] == "test" and 0 < result["loss"] < 10, result
    hf = run / "hf"
    assert (hf / "config.json").is_file(), sorted(p.name for p in run.iterdir())
    assert list(hf.glob("*.safetensors")), sorted(p.name for p in hf.iterdir())
