"""DeepSpeed's private API: present in the installed version, and used only by the adapter."""

from __future__ import annotations

import re
from pathlib import Path

import deepspeed
import pytest
import torch

from lamemo_ds.model import LaMemoLM, ModelConfig
from lamemo_ds.model.step import Flow, memory_kind
from lamemo_ds.parallel import ds_adapter
from lamemo_ds.parallel.pipeline import LaMemoPipe, Window, pack, unpack

PACKAGE = Path(ds_adapter.__file__).resolve().parents[1]

pytestmark = pytest.mark.unit


def test_installed_deepspeed_has_every_private_name_we_use():
    missing = ds_adapter.missing_private_api()
    assert not missing, (f"DeepSpeed {deepspeed.__version__} lacks {missing}; "
                         f"parallel/ds_adapter.py was written against {ds_adapter.WRITTEN_AGAINST}")
    assert ds_adapter.has_compatible_ops(), (
        f"DeepSpeed {deepspeed.__version__} lacks deepspeed.ops.__compatible_ops__ (written "
        f"against {ds_adapter.WRITTEN_AGAINST}): skip_cpu_shm_kernel no longer skips")


def test_a_missing_name_is_named_with_both_versions(monkeypatch):
    gone = ((deepspeed.pipe.PipelineModule, "_set_bounds"),
            (deepspeed.pipe.PipelineModule, "_no_such_attribute"))
    monkeypatch.setattr(ds_adapter, "PRIVATE_API", gone)
    assert ds_adapter.missing_private_api() == ["PipelineModule._no_such_attribute"]
    with pytest.raises(RuntimeError) as err:
        ds_adapter.require_private_api()
    msg = str(err.value)
    assert "PipelineModule._no_such_attribute" in msg and "_set_bounds" not in msg
    assert deepspeed.__version__ in msg and ds_adapter.WRITTEN_AGAINST in msg


def test_no_module_but_the_adapter_uses_the_private_names():
    names = {name for _, name in ds_adapter.PRIVATE_API} | {
        "ds_pipe_replicated", "model_parallel", "__compatible_ops__"}
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if p.name != "ds_adapter.py" and pattern.search(p.read_text()))
    assert users == [], f"DeepSpeed's private API outside parallel/ds_adapter.py: {users}"


@pytest.mark.parametrize("memory", ["lamemo", "xl", "none"])
def test_pack_then_unpack_gives_the_flow_back(memory):
    b, m, n, d = 2, 3, 4, 5
    kind = memory_kind(memory, m)
    cur, mem = torch.randn(b, n, d), torch.randn(b, m, d)
    flow = Flow(cur, mem if kind.refreshed else None)
    h = pack(flow)
    assert h.shape == (b, m + n if kind.refreshed else n, d)
    back = unpack(h, kind, m)
    assert torch.equal(back.cur, cur)
    assert (back.mem is None) if not kind.refreshed else torch.equal(back.mem, mem)


def test_a_pipeline_of_one_stage_is_refused_before_deepspeed_runs():
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=8, d_head=4, d_inner=16,
                      segment_len=4, mem_len=4)
    w = Window(mem_len=4, clamp_len=-1, same_length=False)
    with pytest.raises(ValueError, match="at least 2 stages, got 1"):
        LaMemoPipe(LaMemoLM(cfg), stages=1, dp=1, train=w, eval=w)
