"""The mpirun path inside a Slurm allocation: `mpirun -n 2` (mpich from PyPI) runs lamemo train.

Inside an allocation every process also inherits SLURM_PROCID/SLURM_NTASKS (mpich's hydra even
starts its proxies with srun), so launcher discovery has to believe mpirun's ranks, not Slurm's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, free_port

from lamemo_ds.train.metrics import read_losses

REPO = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"
STEPS = 4
pytestmark = pytest.mark.slurm

JOB = """#!/bin/bash
set -euo pipefail
# First where discovery puts each process (fails fast, and the log says why), then the training.
# One write per line: both ranks share the log, and print() under PYTHONUNBUFFERED=1 writes
# each word on its own, so the two lines could interleave.
"$MPIRUN" -n "$SLURM_NTASKS" "$PYTHON" -c "import sys
from lamemo_ds.parallel.dist import discover
d = discover(); sys.stdout.write(f'discovered {{d.launcher}} {{d.rank}} of {{d.world_size}}\\n')
raise SystemExit(d.world_size != $SLURM_NTASKS)"
"$MPIRUN" -n "$SLURM_NTASKS" "$PYTHON" -m lamemo_ds.cli train --config configs/debug.yaml \\
    --set train.output_dir="$RUN_DIR" --set data.path="$DATA_DIR" --set train.max_steps={steps} \\
    --set train.eval_max_segments=1 --set checkpoint.interval=0 --set parallel.backend=gloo
"""


def test_mpirun_two_processes_inside_an_allocation(slurm: SlurmCluster, corpus: Path,
                                                   tmp_path: Path) -> None:
    assert MPIRUN.exists(), f"{MPIRUN} missing: pip install mpich (a test dependency)"
    script = tmp_path / "mpirun.sbatch"
    script.write_text(JOB.format(steps=STEPS))
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(slurm.env, PYTHON=sys.executable, PYTHONPATH=str(REPO), MPIRUN=str(MPIRUN),
               RUN_DIR=str(run_dir), DATA_DIR=str(corpus), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    _, rc = slurm.sbatch(script, f"--chdir={REPO}", "-p", "debug", "-n2", "--time=10",
                         "-o", str(log), wait=True, timeout_s=600, env=env)
    text = log.read_text() if log.exists() else "(no job log)"
    assert rc == 0, text + slurm.logs_tail()
    assert sorted(re.findall(r"discovered (\S+ \d+ of \d+)", text)) == ["mpirun 0 of 2",
                                                                      "mpirun 1 of 2"], text
    assert "2 process(es) via mpirun" in text, text
    final = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (final / "lamemo").iterdir()) == ["rank-00000.pt",
                                                                     "rank-00001.pt"]
    assert sorted(read_losses(run_dir / "metrics.jsonl")) == list(range(1, STEPS + 1))
