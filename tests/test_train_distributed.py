"""Multi-process training on CPU (gloo): exact resume, faults, and numerical equivalences.

Each run is a tiny LaMemo (2 layers, d 32) on a few hundred kB of the stdlib corpus; ranks are
started by train_support.spawn so a test sees every exit code and can kill a single rank.
"""

from __future__ import annotations

import math

import pytest
import torch
from train_support import losses, model_states, spawn, write_config

from lamemo_ds.checkpoint.manager import CheckpointManager, step_dir_name
from lamemo_ds.parallel.dist import Comm
from lamemo_ds.train.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(corpus):
    return corpus


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]


BASE = dict(train={"max_steps": 6}, checkpoint={"interval": 3})  # 2 ranks, ZeRO-2, micro 2


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """One uninterrupted 2-rank ZeRO-2 run shared by the resume, DP and ZeRO tests."""
    work = tmp_path_factory.mktemp("baseline")
    _ok(spawn(write_config(work / "a.yaml", data, work / "run", **BASE)))
    return work / "run"


def test_resume_is_bit_exact_after_kill_9(data, baseline, tmp_path):
    """6 steps straight == 3 steps, checkpoint, kill -9 of rank 1 in step 4, resume to 6."""
    b = write_config(tmp_path / "b.yaml", data, tmp_path / "b", **BASE)
    killed = spawn(b, args=("--kill-at", "4", "--fault-rank", "1"))
    assert killed[1].returncode == -9 and killed[0].returncode != 0
    assert max(losses(tmp_path / "b")) == 4  # it got past the checkpoint before dying
    resumed = spawn(b)
    _ok(resumed)
    assert "resumed from" in resumed[0].stdout and "step-00000003" in resumed[0].stdout
    la, lb = losses(baseline), losses(tmp_path / "b")
    assert list(la) == list(range(1, 7))
    assert all(la[s] == lb[s] for s in la), (la, lb)  # == on purpose: bit-exact
    pa, pb = model_states(baseline, 6), model_states(tmp_path / "b", 6)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_crash_during_save_and_corrupt_shard_fall_back(data, tmp_path):
    """Killed while writing the step-3 manifest -> step 2; a corrupt step-2 shard -> step 1."""
    c = write_config(tmp_path / "c.yaml", data, tmp_path / "run", train={"max_steps": 3},
                     checkpoint={"interval": 1})
    crashed = spawn(c, args=("--crash-phase", "manifest", "--crash-step", "3"))
    assert crashed[0].returncode == -9
    root = tmp_path / "run" / "checkpoints"
    assert len(list(root.glob("step-00000003.tmp-*"))) == 1  # the save's own temp folder
    assert not (root / "step-00000003").exists()
    mgr = CheckpointManager(root, keep_last=3, comm=Comm())
    assert mgr.find_latest().step == 2
    shard = next((root / step_dir_name(2) / "deepspeed").glob("zero_pp_rank_1_*optim_states.pt"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    shard.write_bytes(bytes(raw))
    resumed = spawn(c)
    _ok(resumed)
    out = resumed[0].stdout
    assert f"skipped: file deepspeed/{shard.name} is corrupt" in out
    assert "resumed from" in out and "step-00000001 at step 1" in out
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_signal_to_one_rank_and_nan_on_one_rank(data, tmp_path):
    """NaN loss on rank 1 in step 2 -> skipped everywhere; SIGUSR1 to rank 1 after step 3 ->
    both ranks save step 4 and exit with EXIT_PREEMPTED."""
    c = write_config(tmp_path / "s.yaml", data, tmp_path / "run", train={"max_steps": 20})
    dump = tmp_path / "params"
    res = spawn(c, args=("--fault-rank", "1", "--nan-at", "1", "--signal-at", "3",
                         "--dump-params", str(dump)))
    assert [r.returncode for r in res] == [EXIT_PREEMPTED] * 2, res[0].stdout[-3000:]
    recs = losses(tmp_path / "run")
    assert sorted(recs) == [1, 2, 3, 4] and math.isnan(recs[2])
    assert all(math.isfinite(recs[s]) for s in (1, 3, 4))
    assert "step 2: skipped" in res[0].stdout
    p0, p1 = (torch.load(f"{dump}.rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) and torch.isfinite(p0[k]).all() for k in p0)
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3, comm=Comm())
    found = mgr.find_latest()
    assert found.step == 4
    for rank in (0, 1):
        st = mgr.load_rank_state(found, rank)
        assert st["progress"]["skipped_total"] == 1 and st["progress"]["step"] == 4
        assert sorted(st["memory"]) == [0]  # one slot per micro-batch (grad_accum 1)
        for slot in st["memory"].values():
            assert all(torch.isfinite(t.float()).all() for t in slot.values())


def test_dp2_equals_dp1_with_same_global_batch(data, baseline, tmp_path):
    """1 rank × 2 accumulated micro-batches == 2 ranks × 1 (the baseline), memory carried."""
    one = write_config(tmp_path / "1.yaml", data, tmp_path / "dp1",
                       train={"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2})
    _ok(spawn(one, nproc=1))
    l1, l2 = losses(tmp_path / "dp1"), losses(baseline)
    assert list(l1) == list(l2) == [1, 2, 3, 4, 5, 6]
    for s in l1:
        assert l1[s] == pytest.approx(l2[s], rel=2e-6, abs=2e-6), (s, l1, l2)
    assert len(set(l1.values())) == 6  # memory and updates make every step differ


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(data, baseline, tmp_path):
    runs = {2: losses(baseline)}
    for stage in (0, 1, 3):  # stage 3 also checks tied embedding/softmax weights
        c = write_config(tmp_path / f"z{stage}.yaml", data, tmp_path / f"z{stage}",
                         parallel={"zero_stage": stage}, **BASE)
        _ok(spawn(c))
        runs[stage] = losses(tmp_path / f"z{stage}")
    for stage in (0, 1, 3):
        for s in runs[2]:
            assert runs[stage][s] == pytest.approx(runs[2][s], rel=2e-6, abs=2e-6), \
                (stage, runs)


def test_bf16_runs_and_learns_on_cpu(data, tmp_path):
    c = write_config(tmp_path / "bf.yaml", data, tmp_path / "bf16",
                     train={"precision": "bf16", "max_steps": 30, "log_interval": 10},
                     optim={"lr": 3e-3, "schedule": "constant"}, parallel={"zero_stage": 1})
    _ok(spawn(c, nproc=1))
    ls = losses(tmp_path / "bf16")
    first, last = sum(ls[s] for s in range(1, 6)) / 5, sum(ls[s] for s in range(26, 31)) / 5
    assert all(math.isfinite(v) for v in ls.values())
    assert last < first - 0.5, (first, last)
