"""slurm/train.sbatch on a real Slurm cluster: a 2-task CPU training run, and a preemption drill.

The drill is the reason the scripts exist: SIGUSR1 (what `--signal=USR1@90` sends before the wall
time) must make every rank save at the same step, rank 0 requeue the job, and the requeued job
resume and finish with exactly the per-step losses of a run that was never interrupted.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, wait_until

from lamemo_ds.train.metrics import read_losses

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
# Enough steps that the signal lands mid-run (the tiny model does tens of steps per second).
STEPS = 150
pytestmark = pytest.mark.slurm


def train_env(slurm: SlurmCluster, run_dir: Path, data: Path) -> dict[str, str]:
    """What a user sets in train.sbatch's `run` block, passed through sbatch's environment."""
    extra = (f"--set train.max_steps={STEPS} --set train.log_interval=10 "
             "--set train.eval_max_segments=1 --set checkpoint.interval=0 "
             "--set parallel.backend=gloo")
    return dict(slurm.env, PYTHON=sys.executable, PYTHONPATH=str(REPO),
                CONFIG="configs/debug.yaml", RUN_DIR=str(run_dir), DATA_DIR=str(data),
                TRAIN_ARGS=extra)


def submit_train(slurm: SlurmCluster, run_dir: Path, data: Path, *,
                 wait: bool) -> tuple[int, int, Path]:
    """train.sbatch with 2 tasks on this CPU node; returns (job id, sbatch rc, log path)."""
    log = run_dir.parent / f"{run_dir.name}.out"
    job_id, rc = slurm.sbatch(SCRIPT, f"--chdir={REPO}",
                              *slurm.overrides(ntasks=2, output=log), wait=wait,
                              timeout_s=600, env=train_env(slurm, run_dir, data))
    return job_id, rc, log


@pytest.fixture(scope="module")
def reference_run(slurm: SlurmCluster, corpus: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 2-task run: (run folder, job log)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _, rc, log = submit_train(slurm, run_dir, corpus, wait=True)
    text = log.read_text() if log.exists() else "(no job log)"
    assert rc == 0, text + slurm.logs_tail()
    return run_dir, text


def test_two_task_run_writes_checkpoint_metrics_and_tensorboard(reference_run) -> None:
    run_dir, log = reference_run
    assert "2 process(es) via srun" in log, log
    ckpt = run_dir / "checkpoints"
    final = f"step-{STEPS:08d}"
    assert (ckpt / "latest").read_text().strip() == final
    for name in ("manifest.json", "meta.json", "lamemo/rank-00000.pt", "lamemo/rank-00001.pt"):
        assert (ckpt / final / name).is_file(), name
    assert sorted(read_losses(run_dir / "metrics.jsonl")) == list(range(1, STEPS + 1))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss_steps = [e.step for e in events.Scalars("train/loss")]
    assert loss_steps == list(range(10, STEPS + 1, 10))


@pytest.mark.slow
def test_usr1_saves_requeues_resumes_and_matches_an_uninterrupted_run(
        slurm: SlurmCluster, corpus: Path, reference_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id, rc, log = submit_train(slurm, run_dir, corpus, wait=False)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(read_losses(metrics)) >= 3, timeout_s=300,
               what=f"job {job_id} to train 3 steps ({log})", poll_s=0.1)
    slurm.cmd("scancel", "--signal=USR1", str(job_id))

    # Rank 0 requeues: the job is back in the queue, restarted once. Slurm holds a requeued job
    # for ~120 s (BeginTime); the test lets it start now (the scripts never rely on this).
    def requeued() -> bool:
        job = slurm.job(job_id)
        return job.get("Restarts") == "1" and job.get("JobState") == "PENDING"

    wait_until(requeued, timeout_s=300, what=f"job {job_id} to be requeued ({log})")
    # slurmd refuses a launch credential created in the same second its previous run's was
    # revoked ("Job credential revoked": the job FAILS), so start it no earlier than the next.
    time.sleep(1.5)
    slurm.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    record = slurm.wait_finished(job_id, timeout_s=600)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", text + slurm.logs_tail()

    stopped = re.search(r"stop signal received: saving step (\d+)", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 3 <= step < STEPS, f"the signal should land mid-run, got step {step}"
    assert f"requeued Slurm job {job_id}" in text
    assert f"job {job_id} restart 1" in text  # SLURM_RESTART_COUNT=1 in the second run
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in text
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").is_file()

    reference = read_losses(reference_run[0] / "metrics.jsonl")
    assert read_losses(metrics) == reference  # every step, bit for bit


@pytest.mark.slow
def test_torchrun_variant_survives_usr1_and_requeues(slurm: SlurmCluster, corpus: Path,
                                                     tmp_path: Path) -> None:
    """train_torchrun.sbatch: torchrun's workers get USR1, save at one step, and requeue the job.

    Slurm signals every process of the step, torchrun included, which the script therefore makes
    ignore USR1. With this tiny model the workers would also win the race against a dying
    torchrun, so this checks the variant end to end, not the trap alone. Resuming is the same
    code as in the srun drill above; here the requeued job is cancelled.
    """
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(train_env(slurm, run_dir, corpus), PROCS_PER_NODE="2")
    job_id, _ = slurm.sbatch(REPO / "slurm" / "train_torchrun.sbatch", f"--chdir={REPO}",
                             *slurm.overrides(ntasks=1, output=log), "--cpus-per-task=2",
                             env=env)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(read_losses(metrics)) >= 3, timeout_s=300,
               what=f"job {job_id} to train 3 steps ({log})", poll_s=0.1)
    slurm.cmd("scancel", "--signal=USR1", str(job_id))
    wait_until(lambda: slurm.job(job_id).get("Restarts") == "1", timeout_s=300,
               what=f"job {job_id} to be requeued ({log})")
    slurm.cmd("scancel", str(job_id))
    text = log.read_text()
    assert "2 process(es) via torchrun" in text, text
    stopped = re.search(r"stop signal received: saving step (\d+)", text)
    assert stopped, text
    saved = run_dir / "checkpoints" / f"step-{int(stopped.group(1)):08d}"
    assert json.loads((saved / "meta.json").read_text())["world_size"] == 2
    assert f"requeued Slurm job {job_id}" in text


def test_same_job_twice_into_one_run_folder_refuses_the_second(
        slurm: SlurmCluster, corpus: Path, tmp_path: Path) -> None:
    """train.sbatch submitted twice into one RUN_DIR (one task each, so both fit on the 2-CPU
    node at once): the second exits 2 naming the first job; the first finishes untouched."""
    steps = 1500  # long enough to still run while the second job starts up
    run_dir = tmp_path / "run"
    env = dict(train_env(slurm, run_dir, corpus),
               TRAIN_ARGS=f"--set train.max_steps={steps} --set train.log_interval=100 "
                          "--set checkpoint.interval=500 --set train.eval_max_segments=1 "
                          "--set parallel.backend=gloo")
    logs = {name: tmp_path / f"{name}.out" for name in ("first", "second")}
    first, _ = slurm.sbatch(SCRIPT, f"--chdir={REPO}",
                            *slurm.overrides(ntasks=1, output=logs["first"]), env=env)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(read_losses(metrics)) >= 3, timeout_s=300,
               what=f"job {first} to train 3 steps ({logs['first']})", poll_s=0.1)
    second, rc = slurm.sbatch(SCRIPT, f"--chdir={REPO}",
                              *slurm.overrides(ntasks=1, output=logs["second"]), wait=True,
                              timeout_s=300, env=env)
    text = logs["second"].read_text()
    assert slurm.job(first).get("JobState") == "RUNNING", \
        f"job {first} ended before job {second} tried the folder: raise `steps`"
    assert rc == 2, text + slurm.logs_tail()
    assert "is in use by another run (host " in text and f"Slurm job {first}," in text, text
    assert "Traceback" not in text and "resumed from" not in text, text

    record = slurm.wait_finished(first, timeout_s=600)
    log = logs["first"].read_text()
    assert record["JobState"] == "COMPLETED", log + slurm.logs_tail()
    assert "taking over" not in log and "resumed from" not in log, log
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{steps:08d}"
