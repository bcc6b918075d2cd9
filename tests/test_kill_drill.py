"""The kill drill: `kill -9` a torchrun job again and again, restart it into the same run folder.

Real processes: torchrun with 2 CPU workers (gloo). Seeded random moments: the launcher or both
workers are SIGKILLed while training steps run, or while a checkpoint save is in a given phase
(the fault runner holds the save there, so the kill lands inside it). After each kill every
process of the job must be gone (checked by pid: PR_SET_PDEATHSIG takes the workers down with
torchrun), and the next launch resumes. While a job holds the folder, a second run is refused
(exit 2, one line naming the holder). The drilled run must end with the losses, parameters and
history (one metrics.jsonl line and one TensorBoard point per step) of a run never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from train_support import PY, RUNNER, env, free_port, losses, model_states, spawn, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEED = 26
STEPS = 12
SAVE_EVERY = 3  # saves at 3, 6, 9 and the final 12
PHASES = ("begin", "deepspeed", "rank_state", "manifest", "renamed", "latest")
SECTIONS = dict(train={"max_steps": STEPS, "log_interval": 1},
                checkpoint={"interval": SAVE_EVERY, "keep_last": 2},
                logging={"tensorboard": True})


def drill_plan(rng: random.Random) -> list[tuple[str, str, int, str | None]]:
    """(what to kill, when, step, save phase) for each attempt, the steps increasing so that
    every attempt gets past the previous one's kill before it is killed."""
    return [("launcher", "step", rng.randint(2, 4), None),
            ("workers", "save", 6, rng.choice(PHASES)),
            ("launcher", "save", 9, rng.choice(PHASES)),
            ("workers", "step", rng.randint(10, 11), None)]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait(cond, timeout_s: float, what: str, job: subprocess.Popen | None = None) -> None:
    """Poll `cond`; fail after `timeout_s`, or at once (with its output) when `job` ended."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (rc {job.returncode}) before {what}:\n"
                                 + job.stdout.read()[-3000:])
        time.sleep(0.02)


def _launch(config: Path, hold: Path, *args: str) -> subprocess.Popen:
    hold.unlink(missing_ok=True)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(RUNNER), "--config", str(config), *args]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _max_step(run: Path) -> int:
    try:
        return max(losses(run), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def _second_run_is_refused(config: Path, run: Path, holder_pid: int) -> None:
    """A plain `lamemo train` into the live folder: exit 2, one line naming the holder, nothing
    written (config.yaml, which a started run rewrites, keeps its time)."""
    stamp = (run / "config.yaml").stat().st_mtime_ns
    res = subprocess.run([PY, "-m", "lamemo_ds.cli", "train", "--config", str(config)],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "is in use by another run (host " in lines[0] and f"pid {holder_pid}," in lines[0]
    assert (run / "config.yaml").stat().st_mtime_ns == stamp


def _attempt(config: Path, run: Path, hold: Path, kill: str, when: str, step: int,
             phase: str | None, *, check_refusal: bool) -> None:
    args = ("--hold-phase", phase, "--hold-step", str(step), "--hold-file", str(hold)) \
        if when == "save" else ()
    launcher = _launch(config, hold, *args)
    try:
        if when == "save":
            _wait(hold.exists, 180, f"the save of step {step} to reach phase {phase}", launcher)
        else:
            _wait(lambda: _max_step(run) >= step, 180, f"step {step}", launcher)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        if check_refusal:
            _second_run_is_refused(config, run, int(hold.read_text()))
        at_kill = _max_step(run)
        for pid in [launcher.pid] if kill == "launcher" else workers:
            os.kill(pid, signal.SIGKILL)
        if kill == "workers":
            launcher.wait(timeout=60)  # torchrun notices its failed workers and exits
        else:
            launcher.wait(timeout=10)
        _wait(lambda: not any(_alive(p) for p in workers), 10,
              f"workers {workers} to die with their {kill}")
        assert _max_step(run) <= at_kill + 1, f"workers trained on after the {kill} was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _steps_logged(run: Path) -> Counter:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return Counter(r["step"] for r in rows if "loss" in r)


def test_kill_drill(corpus, tmp_path):
    base = write_config(tmp_path / "base.yaml", corpus, tmp_path / "base", **SECTIONS)
    assert all(r.returncode == 0 for r in spawn(base))
    config = write_config(tmp_path / "drill.yaml", corpus, tmp_path / "run", **SECTIONS)
    run, hold = tmp_path / "run", tmp_path / "hold"
    plan = drill_plan(random.Random(SEED))
    for i, (kill, when, step, phase) in enumerate(plan):
        _attempt(config, run, hold, kill, when, step, phase, check_refusal=i == 1)
    final = _launch(config, hold)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out[-4000:]
    assert "resumed from" in out and "taking over the lock" in out, out[-4000:]

    la, lb = losses(tmp_path / "base"), losses(run)
    assert list(la) == list(range(1, STEPS + 1))
    assert la == lb, (plan, la, lb)  # == on purpose: bit-identical
    pa, pb = model_states(tmp_path / "base", STEPS), model_states(run, STEPS)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert set(_steps_logged(run).values()) == {1} and len(_steps_logged(run)) == STEPS

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert not list((run / "checkpoints").glob("step-*.*"))  # no temp or moved-aside folder
    assert not (run / ".lease.json").exists()  # released by the clean exit
