"""Single-process pieces of training: launcher discovery, schedules, state banks, signals,
the non-finite-skipping optimizer, and the checkpoint manager's atomicity and verification."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from lamemo_ds.checkpoint.manager import CheckpointManager, step_dir_name, verify
from lamemo_ds.config.errors import UserError
from lamemo_ds.config.schema import OptimConfig
from lamemo_ds.model.bank import MemoryBank
from lamemo_ds.model.memory import MemoryState, empty_state
from lamemo_ds.parallel.dist import Comm, discover, expand_hostlist, slurm_job_id, slurm_port
from lamemo_ds.parallel.engine import build_optimizer
from lamemo_ds.parallel.schedule import build_scheduler, lr_at
from lamemo_ds.train.signals import StopFlag
from lamemo_ds.train.state import RNG, LRSchedule, Progress, rank_seed

pytestmark = pytest.mark.unit


def test_expand_hostlist():
    assert expand_hostlist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_hostlist("a1,b[9-11],c") == ["a1", "b9", "b10", "b11", "c"]
    assert expand_hostlist("gpu[1,3]-ib") == ["gpu1-ib", "gpu3-ib"]


def test_discover_slurm_and_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "n[07-10]", "SLURM_JOB_ID": "123456"}
    d = discover(env)
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "srun")
    assert d.master_port == slurm_port("123456") and 15000 <= d.master_port < 35000
    assert d.master_addr in ("n07",) or d.master_addr  # scontrol may expand it instead
    t = discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                  "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.master_addr, t.master_port) == (1, 2, "h", 1234)
    assert discover({}).world_size == 1


def test_discover_slurm_without_scontrol_uses_first_host(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    d = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[3-4]",
                  "SLURM_JOB_ID": "7"})
    assert d.master_addr == "x3"


def test_cosine_schedule_reference():
    opt = OptimConfig(lr=2.5e-4)
    assert lr_at(opt, step=0, total=100) == pytest.approx(2.5e-4)
    assert lr_at(opt, step=50, total=100) == pytest.approx(1.25e-4)
    assert lr_at(opt, step=100, total=100) == pytest.approx(0.0, abs=1e-12)
    warm = OptimConfig(lr=1.0, warmup_steps=4, schedule="linear")
    assert [lr_at(warm, step=s, total=8) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def _state(fill: float, valid: list[int]) -> MemoryState:
    s = empty_state("lamemo", batch_size=3, mem_len=4, n_layer=2, d_model=8, n_head=2, d_head=4,
                    dtype=torch.float32)
    return type(s)(valid=torch.tensor(valid), mem_len=4, emb=s.emb + fill, ctx=s.ctx, lse=s.lse)


def test_memory_bank_commits_only_applied_steps_and_roundtrips():
    bank = MemoryBank()
    assert bank.get(0) is None
    bank.put(0, _state(1.0, [4, 2, 1]))
    bank.put(1, _state(2.0, [4, 4, 4]))
    assert bank.get(0) is None  # pending until the step is settled
    bank.settle(applied=False)  # a skipped step leaves the memory as it was
    assert bank.get(0) is None and not bank.pending
    bank.put(0, _state(1.0, [4, 2, 1]))
    bank.put(1, _state(2.0, [4, 4, 4]))
    bank.settle(applied=True)
    bank.put(0, _state(9.0, [0, 0, 0]), training=False)  # evaluation: its own bank, at once
    assert bank.get(0, training=False).emb.max() == 9.0 and bank.get(0).emb.max() == 1.0
    other = MemoryBank()
    other.load_state_dict(bank.state_dict())
    assert sorted(other.banks["train"]) == [0, 1] and other.get(1).mem_len == 4
    assert torch.equal(other.get(1).emb, bank.get(1).emb)
    assert other.get(0).reset(torch.tensor([True, False, False])).valid.tolist() == [0, 2, 1]
    other.reset("train")
    assert other.get(0) is None
    with pytest.raises(ValueError, match="mode 'test'"):
        other.reset("test")


def test_stop_flag_only_records():
    flag = StopFlag().install()
    try:
        assert not flag.is_set
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signum == signal.SIGUSR1
    finally:
        flag.restore()


def test_training_state_pieces_are_stateful():
    """RNG, Progress and LRSchedule save and restore themselves (the checkpoint's dict)."""
    rng = RNG()
    rng.seed(rank_seed(1111, rank=1))
    saved = rng.state_dict()
    first = (torch.rand(3), np.random.rand(), random.random())
    rng.seed(5)
    rng.load_state_dict(saved)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert rank_seed(1111, rank=0) != rank_seed(1111, rank=1) != rank_seed(1111, rank=1, step=3)

    progress = Progress(step=7, skipped_total=2, consecutive_skips=1, train_seconds=3.5)
    other = Progress()
    other.load_state_dict(progress.state_dict())
    assert other.state_dict() == {"step": 7, "skipped_total": 2, "consecutive_skips": 1,
                                  "train_seconds": 3.5}

    def schedule():
        p = torch.nn.Parameter(torch.ones(1))
        opt = build_optimizer([p], OptimConfig(lr=1.0, schedule="linear"), skip_nonfinite=False)
        return LRSchedule(build_scheduler(opt, OptimConfig(lr=1.0, schedule="linear"),
                                          total_steps=10)), opt

    lr, opt = schedule()
    lr.advance_to(4)  # a checkpoint written for step 4 (lamemo convert --to deepspeed --step 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(OptimConfig(lr=1.0, schedule="linear"),
                                                            step=4, total=10))
    restored, opt2 = schedule()
    restored.load_state_dict(lr.state_dict())  # another layout: the optimizer starts fresh
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.6)
    assert restored.scheduler.last_epoch == 4


def test_skipping_optimizer_leaves_params_on_nan():
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], OptimConfig(lr=0.1), skip_nonfinite=True)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.data, torch.ones(3)) and not opt.state
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and (p.data < 1).all()


# ----------------------------------------------------------------------- checkpoint manager
class Crash(Exception):
    pass


def _save(mgr: CheckpointManager, step: int, payload: bytes = b"weights",
          meta: dict | None = None) -> None:
    def ds(folder: str, tag: str) -> None:
        os.makedirs(f"{folder}/{tag}")
        with open(f"{folder}/{tag}/mp_rank_00_model_states.pt", "wb") as f:
            f.write(payload + str(step).encode())

    mgr.save(step, save_weights=ds, state={"progress": Progress(step=step)},
             config_text="model: {}\n", meta=meta or LAYOUT)


LAYOUT = {"world_size": 1, "pipeline_stages": 1, "dp_size": 1, "micro_batch": 2, "grad_accum": 1}


def test_resume_of_a_meta_without_the_layout_is_a_user_error(tmp_path):
    """A checkpoint from before every layout recorded pipeline_stages: one clear error naming
    the missing key and the way out, not a KeyError deep in resume."""
    mgr = CheckpointManager(tmp_path, keep_last=3, comm=Comm())
    _save(mgr, 1, meta={k: v for k, v in LAYOUT.items() if k != "pipeline_stages"})
    found = mgr.find_latest()
    with pytest.raises(UserError, match=r"meta.json lacks pipeline_stages.*--overwrite"):
        mgr.require_meta(found, LAYOUT)
    mgr.require_meta(found, ["world_size", "grad_accum"])


@pytest.mark.parametrize("phase", ["begin", "deepspeed", "rank_state", "manifest"])
def test_crash_during_save_keeps_previous(tmp_path, phase):
    mgr = CheckpointManager(tmp_path, keep_last=3, comm=Comm())
    _save(mgr, 1)

    def crash(name):
        if name == phase:
            raise Crash(name)

    crashing = CheckpointManager(tmp_path, keep_last=3, comm=Comm(), on_phase=crash)
    with pytest.raises(Crash):
        _save(crashing, 2)
    found = mgr.find_latest()
    assert found.step == 1
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(1)
    _save(mgr, 3)  # the next save cleans the leftover temp folder
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("phase", ["renamed", "latest"])
def test_crash_after_rename_uses_new_complete_checkpoint(tmp_path, phase):
    _save(CheckpointManager(tmp_path, keep_last=3, comm=Comm()), 1)
    crashing = CheckpointManager(tmp_path, keep_last=3, comm=Comm(),
                                 on_phase=lambda n: (_ for _ in ()).throw(Crash(n))
                                 if n == phase else None)
    with pytest.raises(Crash):
        _save(crashing, 2)
    assert CheckpointManager(tmp_path, keep_last=3, comm=Comm()).find_latest().step == 2


def test_corrupt_file_is_named_and_skipped(tmp_path):
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=3, comm=Comm(), log=logs.append)
    _save(mgr, 1)
    _save(mgr, 2)
    shard = tmp_path / step_dir_name(2) / "deepspeed" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "deepspeed/mp_rank_00_model_states.pt" in verify(tmp_path / step_dir_name(2))
    assert mgr.find_latest().step == 1
    assert any("mp_rank_00_model_states.pt" in m and "corrupt" in m for m in logs)


def test_retention_and_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, comm=Comm())
    for s in (1, 2, 3, 4):
        _save(mgr, s)
    assert mgr.list_steps() == [3, 4]
    man = json.loads((tmp_path / step_dir_name(4) / "manifest.json").read_text())
    assert set(man["files"]) == {"deepspeed/mp_rank_00_model_states.pt", "lamemo/rank-00000.pt",
                                 "config.yaml", "meta.json"}
    assert all(len(v["sha256"]) == 64 for v in man["files"].values())
    assert not math.isnan(man["created"])


def test_mpirun_inside_a_slurm_allocation_uses_the_mpi_ranks(monkeypatch):
    """mpich's mpirun starts its proxies with srun: each rank sees SLURM_PROCID=0 and
    SLURM_NTASKS=1 beside the real PMI_RANK/PMI_SIZE, which must win."""
    import lamemo_ds.parallel.dist as dist

    seen = {}

    def fake_from_mpi(env):
        seen["env"] = env
        return dist.DistEnv(rank=int(env["PMI_RANK"]), world_size=int(env["PMI_SIZE"]),
                            launcher="mpirun")

    monkeypatch.setattr(dist, "_from_mpi", fake_from_mpi)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "PMI_RANK": "1",
           "PMI_SIZE": "2", "HYDI_CONTROL_FD": "5"}
    d = discover(env)
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "mpirun")
    # plain srun with a PMI plugin: sizes agree, Slurm's variables are used
    d = discover({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
                  "SLURM_JOB_NODELIST": "n1", "PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "srun")


def test_slurm_job_id_names_the_array_task():
    assert slurm_job_id({"SLURM_JOB_ID": "41"}) == "41"
    assert slurm_job_id({"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40",
                         "SLURM_ARRAY_TASK_ID": "1"}) == "40_1"
    assert slurm_job_id({}) is None


# -- the strategy interface ----------------------------------------------------------------
class _Engine:
    def __init__(self, applied: bool):
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


class _Comm:
    """A rank whose peers report `others_skipped` (Comm.any over every rank)."""

    def __init__(self, others_skipped: bool = False):
        self.others_skipped = others_skipped

    def any(self, flag: bool) -> bool:
        return flag or self.others_skipped


class _Memory:
    def __init__(self):
        self.settled: list[bool] = []

    def settle(self, applied: bool) -> None:
        self.settled.append(applied)


@pytest.mark.parametrize("local,others,applied", [(True, False, True), (False, False, False),
                                                   (True, True, False)])
def test_settle_step_agrees_on_every_rank(local, others, applied):
    """A step skipped on any rank is skipped everywhere and its memory dropped."""
    from lamemo_ds.train.strategy import settle_step

    mem = _Memory()
    loss = 2.0 if applied else float("nan")
    assert settle_step(_Engine(local), _Comm(others), mem, loss=loss, step=4) is applied
    assert mem.settled == [applied]


def test_settle_step_refuses_an_applied_non_finite_loss():
    from lamemo_ds.train.strategy import settle_step

    mem = _Memory()
    with pytest.raises(RuntimeError, match="step 5: non-finite loss nan but DeepSpeed applied"):
        settle_step(_Engine(True), _Comm(), mem, loss=float("nan"), step=4)
    assert mem.settled == []  # nothing of the corrupt step is kept


@pytest.mark.parametrize("name", ["data_parallel.DataParallel",
                                  "pipeline_parallel.PipelineParallel"])
def test_each_strategy_has_every_member_of_the_protocol(name):
    """Both strategies define every method and class attribute `Strategy` declares (instances
    need an engine; the Protocol's data members are set in __init__)."""
    import importlib
    import inspect

    from lamemo_ds.train.strategy import Strategy

    module, cls_name = name.split(".")
    cls = getattr(importlib.import_module(f"lamemo_ds.train.{module}"), cls_name)
    methods = [n for n, v in vars(Strategy).items()
               if inspect.isfunction(v) and not n.startswith("_")]
    assert methods and all(inspect.isfunction(getattr(cls, n, None)) for n in methods)
    for n in methods:
        want = list(inspect.signature(getattr(Strategy, n)).parameters)
        assert list(inspect.signature(getattr(cls, n)).parameters) == want, (cls_name, n)
    assert isinstance(cls.layout_change, str)
    src = inspect.getsource(cls.__init__)
    assert all(f"self.{a} =" in src or f"self.{a}," in src
               for a in ("engine", "bundle", "dp_rank", "memory")), cls_name
