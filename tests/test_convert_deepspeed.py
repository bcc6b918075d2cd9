"""DeepSpeed checkpoints (ZeRO-2 and ZeRO-3, 2 gloo processes) -> consolidated -> the same logits
over 3 segments with carried memory as the live engine; partial/corrupt checkpoints are refused.

The checkpoints are written by deepspeed.initialize + save_checkpoint on the model itself (the
format `lamemo train` writes into its step folders), after a few optimizer steps so the weights
are not the initial ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import run_ranks

from lamemo_ds.convert.consolidated import load_model_folder

SEG = 16
MODEL_YAML = """model:
  vocab_size: 257
  n_layer: 2
  n_head: 2
  d_model: 32
  d_head: 16
  d_inner: 64
  dropout: 0.0
  segment_len: 16
  mem_len: 16
"""

WORKER = '''
import os, sys, torch, deepspeed
from lamemo_ds.config import load_config
from lamemo_ds.model import LaMemoLM
from lamemo_ds.parallel.ds_adapter import skip_cpu_shm_kernel
root, stages = sys.argv[1], [int(s) for s in sys.argv[2:]]
skip_cpu_shm_kernel()
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
for stage in stages:  # one launch writes every layout: process start-up is most of the cost
    outdir = os.path.join(root, f"z{stage}")
    torch.manual_seed(0)
    model = LaMemoLM(load_config(os.path.join(outdir, "config.yaml")).model)
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    x = torch.randint(0, 257, (2, 3 * 16 + 1), generator=torch.Generator().manual_seed(1 + rank))
    state = None
    for i in range(3):
        out = eng(x[:, i * 16:(i + 1) * 16], state, targets=x[:, i * 16 + 1:(i + 1) * 16 + 1])
        eng.backward(out.loss)
        eng.step()
        state = out.state.detach()
    eng.save_checkpoint(outdir, tag="step-3")
    eng.eval()
    xs = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(7))
    s, logits = None, []
    with torch.no_grad():
        for i in range(3):
            o = eng(xs[:, i * 16:(i + 1) * 16], s, return_logits=True)
            s = o.state
            logits.append(o.logits)
    if rank == 0:
        torch.save({"x": xs, "logits": torch.stack(logits)}, os.path.join(outdir, "live.pt"))
'''


def make_checkpoints(root: Path, stages: tuple[int, ...]) -> dict[int, Path]:
    """One 2-process launch that trains and saves a checkpoint per ZeRO stage: stage -> the
    step folder (its parent holds config.yaml and the live engine's logits, live.pt)."""
    for stage in stages:
        (root / f"z{stage}").mkdir(parents=True, exist_ok=True)
        (root / f"z{stage}" / "config.yaml").write_text(MODEL_YAML)
    (root / "worker.py").write_text(WORKER)
    for r in run_ranks([str(root / "worker.py"), str(root), *map(str, stages)], timeout=600):
        assert r.returncode == 0, r.stdout[-3000:]
    return {stage: root / f"z{stage}" / "step-3" for stage in stages}


def logits_over_segments(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_model_folder(folder)
    s, out = None, []
    with torch.no_grad():
        for i in range(3):
            o = model(x[:, i * SEG:(i + 1) * SEG], s, return_logits=True)
            s = o.state
            out.append(o.logits)
    return torch.stack(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("ds"), (2, 3))


@pytest.fixture
def zero2(checkpoints) -> Path:
    return checkpoints[2]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_live_logits(stage, checkpoints, tmp_path, lamemo):
    step = checkpoints[stage]
    out = tmp_path / "cons"
    r = lamemo("convert", "--from", "deepspeed", str(step), "--to", "consolidated", str(out))
    assert r.returncode == 0, r.stderr
    assert f"ZeRO-{stage}, 2 data-parallel rank(s)" in r.stdout
    assert "wrote" in r.stdout and (out / "model.safetensors").is_file()
    live = torch.load(step.parent / "live.pt")
    got = logits_over_segments(out, live["x"])
    torch.testing.assert_close(got, live["logits"], rtol=0, atol=1e-6)
    assert "Training config" in (out / "README.md").read_text()


@pytest.mark.distributed
def test_partial_and_corrupt_checkpoints_are_refused(zero2, tmp_path, lamemo):
    import shutil

    partial = tmp_path / "partial" / "step-3"
    shutil.copytree(zero2, partial)
    shutil.copy(zero2.parent / "config.yaml", partial.parent / "config.yaml")
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    r = lamemo("convert", "--from", "deepspeed", str(partial), "--to", "consolidated", str(out))
    assert r.returncode != 0
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    corrupt = tmp_path / "corrupt" / "step-3"
    shutil.copytree(zero2, corrupt)
    shutil.copy(zero2.parent / "config.yaml", corrupt.parent / "config.yaml")
    bad = corrupt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    bad.write_bytes(bytes(data))
    r = lamemo("convert", "--from", "deepspeed", str(corrupt), "--to", "hf", str(out))
    assert r.returncode != 0
    assert bad.name in r.stderr and "corrupt" in r.stderr
    assert not out.exists()
