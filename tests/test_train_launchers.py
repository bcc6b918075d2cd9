"""`lamemo train` under each launcher with 2 CPU processes, and config errors before any group."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from train_support import PY, env, free_port, losses, write_config

BIN = Path(PY).parent


def _train_args(config: Path) -> list[str]:
    return ["-m", "lamemo_ds.cli", "train", "--config", str(config)]


def _check(res: subprocess.CompletedProcess, out: Path, launcher: str) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"2 process(es) via {launcher}" in res.stdout
    assert "shm_comm_op built" not in res.stdout  # no minute of g++ for a kernel never used
    assert sorted(losses(out)) == [1, 2, 3]
    assert (out / "checkpoints" / "latest").is_file()
    assert len(list((out / "checkpoints").glob("step-*/lamemo/rank-*.pt"))) == 2


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """The launch, its output whole; a launch that hangs fails with the workers' output (what
    one rank raised while the others waited), not only the command that timed out."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.getcwd(),
                              **kw)
    except subprocess.TimeoutExpired as e:
        def text(b) -> str:
            return (b.decode(errors="replace") if isinstance(b, bytes) else b or "")[-4000:]

        pytest.fail(f"{cmd[0]} hung for 300 s\n--- stdout\n{text(e.stdout)}\n--- stderr\n"
                    f"{text(e.stderr)}", pytrace=False)


@pytest.mark.distributed
def test_torchrun(corpus, tmp_path):
    c = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", train={"max_steps": 3})
    res = _run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", *_train_args(c)], env=env())
    _check(res, tmp_path / "run", "torchrun")


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_launcher(corpus, tmp_path):
    c = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", train={"max_steps": 3})
    res = _run([str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={free_port()}",
                "--module", "lamemo_ds.cli", "train", "--config", str(c)],
               env=env(PATH=f"{BIN}:{os.environ['PATH']}"))
    _check(res, tmp_path / "run", "deepspeed")


@pytest.mark.distributed
@pytest.mark.slow
def test_mpirun(corpus, tmp_path):
    c = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", train={"max_steps": 3})
    res = _run([str(BIN / "mpirun"), "-np", "2", PY, *_train_args(c)],
               env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    _check(res, tmp_path / "run", "mpirun")


# rank 1 fails while rank 0 waits for it in a collective (the group's timeout: 10 minutes)
_ONE_RANK_FAILS = """
import sys
import torch
from lamemo_ds import cli
from lamemo_ds.config.errors import UserError
from lamemo_ds.parallel import dist

denv = dist.discover()
dist.init_distributed(denv, backend="gloo", timeout_s=600)


def run(args):
    if denv.rank == 1:
        raise {error}("rank 1 cannot read its shard")
    torch.distributed.barrier()
    return 0


sys.exit(cli._run(run, None, "lamemo test"))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("error,code,said", [
    ("UserError", 2, "lamemo test: error: rank 1 cannot read its shard"),
    ("RuntimeError", 1, "RuntimeError: rank 1 cannot read its shard"),
])
def test_mpirun_one_failing_rank_ends_the_job_with_its_code(tmp_path, error, code, said):
    """Without MPI_Abort the failed rank waits in MPI_Finalize for rank 0, which waits in the
    barrier for it: the job would hang for the group's 10 minutes (`_run` fails it after 5)."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(_ONE_RANK_FAILS.format(error=error))
    res = _run([str(BIN / "mpirun"), "-np", "2", PY, str(script)],
               env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert res.returncode == code, res.stdout[-3000:] + res.stderr[-3000:]
    assert said in res.stderr


@pytest.mark.unit
@pytest.mark.parametrize("override,key", [
    ("train.global_batch_size=7", "train.global_batch_size=7"),
    ("train.bogus=1", "train.bogus"),
])
def test_bad_config_fails_before_any_process_group(tmp_path, override, key, lamemo):
    c = write_config(tmp_path / "c.yaml", tmp_path / "no-data", tmp_path / "run")
    res = lamemo("train", "--config", str(c), "--set", override)
    assert res.returncode == 2
    assert key in res.stderr and "config error" in res.stderr
    assert "process group" not in res.stderr.lower() and not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()  # it ran in this process: nothing started
