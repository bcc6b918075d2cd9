"""`lamemo train` with parallel.pipeline_stages=2 on CPU: resume, evaluation, layouts, config."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from train_support import PY, RUNNER, env, free_port, losses, spawn, write_config

from lamemo_ds.checkpoint.layer_map import logical_state_dict
from lamemo_ds.checkpoint.manager import CheckpointManager, step_dir_name
from lamemo_ds.config.derive import World, resolve
from lamemo_ds.config.load import load_config
from lamemo_ds.config.schema import ConfigError
from lamemo_ds.model import LaMemoLM
from lamemo_ds.parallel.dist import Comm

PIPE = {"pipeline_stages": 2, "zero_stage": 0}
TRAIN = {"grad_accum": 2, "max_steps": 6}


@pytest.fixture(scope="module")
def data(corpus):
    return corpus


def _ok(results) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stdout[-3000:]}"


def _kill_run(config, *, kill_at: int) -> int:
    """Start 2 ranks; stage 1 SIGKILLs itself after step `kill_at`; then stop stage 0 (blocked
    in a point-to-point receive that gloo never times out) as a job launcher would."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [PY, str(RUNNER), "--config", str(config), "--kill-at", str(kill_at),
         "--fault-rank", "1"],
        env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(2)]
    code = procs[1].wait(timeout=240)
    procs[0].kill()
    procs[0].wait(timeout=30)
    return code


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_bit_exact_after_kill_9(data, tmp_path, lamemo):
    """P=2: 6 steps with evaluations every 2 steps == 3 steps, checkpoint, kill -9 of stage 1
    in step 4, resume to 6 without evaluations (so evaluation leaves training memory alone)."""
    a = write_config(tmp_path / "a.yaml", data, tmp_path / "a", parallel=PIPE,
                     train=dict(TRAIN, eval_interval=2, eval_max_segments=2))
    _ok(spawn(a))
    n_layer = load_config(str(a), []).model.n_layer
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
              .splitlines() if '"interval"' in line]
    assert logged and all(len(r["alpha"]) == n_layer for r in logged)  # every stage's layers
    assert all(0.0 <= x < 1.0 for r in logged for x in r["alpha"])
    assert any(x > 0.0 for x in logged[-1]["alpha"])  # memory is real after the first step
    b = write_config(tmp_path / "b.yaml", data, tmp_path / "b", parallel=PIPE, train=TRAIN,
                     checkpoint={"interval": 3, "keep_last": 3})
    assert _kill_run(b, kill_at=4) == -9
    resumed = spawn(b)
    _ok(resumed)
    assert "resumed from" in resumed[0].stdout
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == list(range(1, 7)) and sorted(lb) == list(range(1, 7))
    assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]
    ds = tmp_path / "b" / "checkpoints" / step_dir_name(6) / "deepspeed"
    assert sorted(p.name for p in ds.glob("layer_*-model_00-model_states.pt"))
    sd = logical_state_dict(ds)
    ref = LaMemoLM(load_config(str(b), []).model).state_dict()
    assert set(sd) == set(ref)
    assert all(sd[k].shape == ref[k].shape for k in ref)
    torch.testing.assert_close(sd["crit.out_layers.0.weight"], sd["word_emb.emb_layers.0.weight"],
                               rtol=0, atol=0)
    _converted_pipeline_checkpoint_reproduces_its_evaluation(data, tmp_path, b, lamemo)


@pytest.mark.distributed
def test_nan_loss_on_the_last_stage_skips_the_step_everywhere(data, tmp_path):
    """P=2: a NaN loss on stage 1 in step 2 -> both stages skip it (no update, memory of the
    step dropped), training goes on, and the checkpoint holds finite weights and memory."""
    c = write_config(tmp_path / "n.yaml", data, tmp_path / "run", parallel=PIPE,
                     train=dict(TRAIN, max_steps=3), checkpoint={"interval": 3})
    res = spawn(c, args=("--fault-rank", "1", "--nan-at", "1"))
    _ok(res)
    recs = losses(tmp_path / "run")
    assert sorted(recs) == [1, 2, 3] and math.isnan(recs[2])
    assert math.isfinite(recs[1]) and math.isfinite(recs[3])
    assert "step 2: skipped" in res[0].stdout
    found = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3,
                              comm=Comm()).find_latest()
    assert found.step == 3
    sd = logical_state_dict(found.path / "deepspeed")
    assert all(torch.isfinite(t).all() for t in sd.values())
    for rank in (0, 1):
        st = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3,
                               comm=Comm()).load_rank_state(found, rank)
        assert st["progress"]["skipped_total"] == 1
        slots = [slot for layer in st["memory"].values() for slot in layer.values()]
        assert slots and all(torch.isfinite(t.float()).all() for s in slots for t in s.values())


def _converted_pipeline_checkpoint_reproduces_its_evaluation(data, tmp_path, config,
                                                             lamemo) -> None:
    """`lamemo convert --from deepspeed` on a P=2 checkpoint gives one model whose eager
    evaluation equals the pipeline's own final evaluation of the same weights."""
    run = tmp_path / "b"
    out = tmp_path / "consolidated"
    r = lamemo("convert", "--from", "deepspeed", str(run / "checkpoints"), "--to",
               "consolidated", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "pipeline layout" in r.stdout
    cfg = load_config(str(config), [])
    piped = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text()
             .splitlines() if '"eval"' in line][-1]
    result = tmp_path / "eval.json"
    r = lamemo("eval", "--model", str(out), "--data", str(data), "--split",
               cfg.data.valid_split, "--batch-size", str(cfg.eval.batch_size),
               "--max-segments", str(cfg.train.eval_max_segments), "--no-progress",
               "--output", str(result))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    eager = json.loads(result.read_text())
    assert eager["tokens"] == piped["tokens"]
    assert abs(eager["loss"] - piped["loss"]) <= 1e-5 * abs(piped["loss"]), (eager, piped)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_from_other_layout_says_so(data, tmp_path):
    """A data-parallel (P=1) checkpoint resumes under P=2: weights through the names, memory
    reset, streams re-partitioned, and the log says so."""
    c = write_config(tmp_path / "c.yaml", data, tmp_path / "c",
                     parallel={"pipeline_stages": 1, "zero_stage": 0},
                     train=dict(TRAIN, max_steps=2), checkpoint={"interval": 2})
    _ok(spawn(c, nproc=1))
    d = write_config(tmp_path / "d.yaml", data, tmp_path / "c", parallel=PIPE,  # 2 more steps
                     train=dict(TRAIN, max_steps=4, allow_schedule_change=True),
                     checkpoint={"interval": 2})
    res = spawn(d)
    _ok(res)
    assert "layout changed" in res[0].stdout and "memory reset" in res[0].stdout
    assert sorted(losses(tmp_path / "c")) == [1, 2, 3, 4]


@pytest.mark.unit
def test_zero2_with_pipeline_rejected_before_any_process(tmp_path, lamemo):
    """The config check names the alternatives, and `lamemo train` exits before starting."""
    with pytest.raises(ConfigError, match="ZeRO 0 or 1.*pipeline_stages=1 with ZeRO 2/3"):
        resolve(load_config(None, ["parallel.pipeline_stages=2", "parallel.zero_stage=3",
                                   "model.n_layer=2"]), World(world_size=2))
    cfg = write_config(tmp_path / "z.yaml", tmp_path / "nodata", tmp_path / "z",
                       parallel={"pipeline_stages": 2, "zero_stage": 2})
    r = lamemo("train", "--config", str(cfg))
    assert r.returncode == 2
    assert "zero_stage" in r.stderr and "pipeline" in r.stderr
    assert not (tmp_path / "z").exists()  # nothing started, nothing written
    assert not torch.distributed.is_initialized()
