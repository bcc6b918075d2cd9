"""The local Slurm cluster itself, and the rank/rendezvous environment train.sbatch gives ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, pid_alive

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def test_srun_runs_two_tasks(slurm: SlurmCluster) -> None:
    out = slurm.cmd("srun", "-n2", "bash", "-c", "echo $SLURM_PROCID/$SLURM_NTASKS").stdout
    assert sorted(out.split()) == ["0/2", "1/2"], out


def test_sbatch_wait_returns_the_job_exit_code(slurm: SlurmCluster, tmp_path: Path) -> None:
    job_id, rc = slurm.sbatch(_script(tmp_path, "exit 3"), "-o", str(tmp_path / "out"),
                              wait=True, timeout_s=120)
    assert rc == 3
    record = slurm.wait_finished(job_id, timeout_s=60)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "3:0"), record


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.sh"
    path.write_text(f"#!/bin/bash\n{body}\n")
    return path


def test_train_sbatch_gives_each_rank_its_place(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The real train.sbatch, with PYTHON pointing at a probe that records dist.discover()."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"#!{sys.executable}\n" + PROBE.format(out=str(tmp_path)))
    probe.chmod(0o755)
    env = dict(slurm.env, PYTHON=str(probe), CONFIG="configs/debug.yaml",
               RUN_DIR=str(tmp_path / "run"), TRAIN_ARGS="--set train.max_steps=7",
               PYTHONPATH=str(REPO))
    job_id, rc = slurm.sbatch(REPO / "slurm" / "train.sbatch", f"--chdir={REPO}",
                              *slurm.overrides(ntasks=2, output=tmp_path / "job.out"),
                              wait=True, timeout_s=180, env=env)
    log = (tmp_path / "job.out").read_text()
    assert rc == 0, log + slurm.logs_tail()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert (seen["rank"], seen["local_rank"], seen["world_size"]) == (r, r, 2), seen
        assert seen["launcher"] == "srun", seen
        assert (seen["master_addr"], seen["master_port"]) == (slurm.node, 15000 + job_id % 20000)
        assert seen["argv"] == ["-m", "lamemo_ds.cli", "train", "--config", "configs/debug.yaml",
                                "--set", f"train.output_dir={tmp_path / 'run'}",
                                "--set", "train.max_steps=7"]
    assert f"job {job_id} restart 0" in log


# Runs as PYTHON: records where lamemo_ds's launcher discovery puts this task.
PROBE = """
import dataclasses, json, os, sys
from lamemo_ds.parallel.dist import discover
seen = dataclasses.asdict(discover())
seen["argv"] = sys.argv[1:]
with open(os.path.join({out!r}, "rank%s.json" % os.environ["SLURM_PROCID"]), "w") as f:
    json.dump(seen, f)
"""


def test_fixture_leaves_no_daemon_behind(tmp_path: Path) -> None:
    """stop() ends exactly the daemons start() began, found through their PID files."""
    cluster = SlurmCluster(tmp_path / "c2")
    try:
        cluster.start()
        pids = {name: cluster._pid(name) for name in ("slurmctld", "slurmd")}
        assert all(pids.values()), pids
    finally:
        cluster.stop()
    for name, pid in pids.items():
        assert not pid_alive(pid, name), f"{name} (pid {pid}) still running"
