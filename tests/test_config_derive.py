"""resolve(cfg, world) -> Plan and the generated DeepSpeed config."""

from __future__ import annotations

import json

import pytest

from lamemo_ds.config.deepspeed_config import deepspeed_config, merge
from lamemo_ds.config.derive import World, resolve
from lamemo_ds.config.load import load_config
from lamemo_ds.config.schema import ConfigError

pytestmark = pytest.mark.unit


def cfg(*overrides: str):
    return load_config("configs/debug.yaml", list(overrides))


def test_plan_batch_is_micro_times_accum_times_dp():
    plan = resolve(cfg("train.micro_batch_size=3", "train.grad_accum=2"), World(world_size=4))
    assert (plan.dp_size, plan.global_batch, plan.rows_per_rank) == (4, 24, 6)
    assert plan.tokens_per_step == 24 * 16
    assert plan.backend == "gloo"


def test_global_batch_mismatch_names_every_number():
    c = cfg("train.micro_batch_size=4", "train.grad_accum=2", "train.global_batch_size=20")
    with pytest.raises(ConfigError) as e:
        resolve(c, World(world_size=2))
    msg = str(e.value)
    for part in ("train.global_batch_size=20", "train.micro_batch_size=4",
                 "train.grad_accum=2", "data-parallel size 2", "= 16"):
        assert part in msg


def test_cpu_rejects_nccl_and_fp16():
    with pytest.raises(ConfigError, match="parallel.backend"):
        resolve(cfg("parallel.backend=nccl"), World(world_size=1))
    with pytest.raises(ConfigError, match="train.precision"):
        resolve(cfg("train.precision=fp16"), World(world_size=1))
    assert resolve(cfg("train.precision=fp16"), World(world_size=1, cuda=True)).backend == "nccl"


def test_pipeline_rejected_with_key():
    with pytest.raises(ConfigError, match="parallel.pipeline_stages"):
        resolve(cfg("parallel.pipeline_stages=3"), World(world_size=2))  # does not divide


def test_eval_protocols():
    paper = resolve(cfg("eval.mem_len=99"), World()).eval
    assert (paper.protocol, paper.mem_len, paper.segment_len) == ("paper", 16, 16)
    xl = resolve(cfg("eval.protocol=xl", "eval.mem_len=64", "eval.segment_len=8",
                     "eval.clamp_len=40", "eval.same_length=true"), World()).eval
    assert (xl.mem_len, xl.segment_len, xl.clamp_len, xl.same_length) == (64, 8, 40, True)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_config_follows_plan(stage, precision):
    c = cfg(f"parallel.zero_stage={stage}", f"train.precision={precision}",
            "train.grad_accum=3", "train.grad_clip=0.25")
    plan = resolve(c, World(world_size=2))
    ds = deepspeed_config(c, plan)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * \
        ds["gradient_accumulation_steps"] * 2 == plan.global_batch
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16")
    assert ds["gradient_clipping"] == 0.25


def test_fp16_has_dynamic_loss_scale():
    c = cfg("train.precision=fp16")
    ds = deepspeed_config(c, resolve(c, World(cuda=True)))
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


def test_user_json_merged_under_ours(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
                                 "train_batch_size": 999, "communication_data_type": "fp32"}))
    c = cfg(f"parallel.deepspeed_config={extra}", "parallel.zero_stage=1")
    ds = deepspeed_config(c, resolve(c, World()))
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["train_batch_size"] == 4 and ds["communication_data_type"] == "fp32"


def test_user_json_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    c = cfg(f"parallel.deepspeed_config={bad}")
    with pytest.raises(ConfigError, match="parallel.deepspeed_config.*optimizer"):
        deepspeed_config(c, resolve(c, World()))
    c = cfg(f"parallel.deepspeed_config={tmp_path / 'missing.json'}")
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(c, resolve(c, World()))


def test_merge_does_not_modify_inputs():
    a, b = {"x": {"y": 1}}, {"x": {"z": 2}}
    assert merge(a, b) == {"x": {"y": 1, "z": 2}}
    assert a == {"x": {"y": 1}} and b == {"x": {"z": 2}}


def test_one_eval_protocol_derivation_for_training_and_lamemo_eval():
    from lamemo_ds.config.derive import eval_plan

    xl = cfg("eval.protocol=xl", "eval.mem_len=48", "eval.segment_len=8", "eval.batch_size=3")
    m = xl.model
    assert resolve(xl, World()).eval == eval_plan(m, xl.eval)  # training uses the same rule
    run = eval_plan(m, xl.eval)  # no flags: the run's own settings
    assert (run.protocol, run.segment_len, run.mem_len, run.same_length, run.batch_size) == \
        ("xl", 8, 48, m.same_length, 3)
    paper = eval_plan(m, xl.eval, protocol="paper")
    assert (paper.protocol, paper.segment_len, paper.mem_len) == ("paper", 16, 16)
    # lengths without a protocol: xl with those lengths, the rest from the run's eval section
    longer = eval_plan(m, cfg().eval, mem_len=64)
    assert (longer.protocol, longer.segment_len, longer.mem_len) == ("xl", 16, 64)
    assert eval_plan(m, None, protocol="xl").mem_len == m.mem_len  # xl alone works
    none = cfg("model.memory=none").model
    assert eval_plan(none, None, mem_len=64).mem_len == 0  # no memory whatever it says


def test_memory_none_keeps_no_memory_in_every_plan():
    """One rule (config.schema.memory_len): a 'none' model's evaluation memory is 0 whatever
    mem_len says; other kinds keep theirs."""
    from lamemo_ds.config.schema import keeps_memory, memory_len

    assert [keeps_memory(k) for k in ("lamemo", "xl", "none")] == [True, True, False]
    assert memory_len("none", 64) == 0 and memory_len("xl", 64) == 64
    for kind, mem in (("none", 0), ("xl", 64)):
        c = cfg(f"model.memory={kind}", "eval.protocol=xl", "eval.mem_len=64")
        assert resolve(c, World(1)).eval.mem_len == mem, kind
