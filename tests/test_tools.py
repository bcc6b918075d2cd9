"""tools/: every program's --help, and real inspections, verifications and conversions of a
`lamemo train` checkpoint (1 process, ZeRO-2) and of a pipeline checkpoint (2 stages) that
tools/convert_checkpoint.py writes from it. The programs run as files, as slurm/*.sbatch runs
them; they share their code with `lamemo convert`, `lamemo inspect` and `lamemo verify`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from train_support import PY, REPO, env, spawn, write_config

TOOLS = REPO / "tools"
PROGRAMS = {"convert_checkpoint": "convert", "inspect_checkpoint": "inspect",
            "verify_checkpoint": "verify"}


def tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(TOOLS / f"{name}.py"), *map(str, args)], env=env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_every_tool_has_help():
    assert sorted(p.stem for p in TOOLS.glob("*.py")) == sorted(PROGRAMS)
    for name, command in PROGRAMS.items():
        r = tool(name, "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: {name}.py") and f"`lamemo {command}`" in r.stdout


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A finished 4-step training run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("tools")
    cfg = write_config(root / "run.yaml", corpus, root / "run", train={"max_steps": 4},
                       checkpoint={"interval": 2})
    (r,) = spawn(cfg, nproc=1)
    assert r.returncode == 0, r.stdout[-3000:]
    return root / "run"


@pytest.mark.distributed
def test_inspect_and_verify_a_training_run(run, tmp_path, lamemo):
    r = tool("inspect_checkpoint", run, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["format"] == "deepspeed" and rep["step"] == 4
    assert rep["path"].endswith("step-00000004") and rep["manifest"]["ok"]
    assert rep["layout"]["zero_stage"] == 2 and rep["layout"]["world_size"] == 1
    progress = rep["training_state"]["progress"]
    assert rep["training_state"]["rank_files"] == 1 and progress["train_seconds"] > 0
    assert {k: progress[k] for k in ("step", "skipped_total", "consecutive_skips")} == {
        "step": 4, "skipped_total": 0, "consecutive_skips": 0}
    assert rep["tensors"]["word_emb.emb_layers.0.weight"]["shape"] == [257, 32]
    assert rep["model"]["n_layer"] == 2
    same = lamemo("inspect", str(run), "--json")  # the same program under `lamemo`
    assert same.returncode == 0 and json.loads(same.stdout) == rep
    text = tool("inspect_checkpoint", run / "checkpoints" / "step-00000002", "--tensors")
    assert text.returncode == 0 and "step        : 2" in text.stdout
    assert "word_emb.emb_layers.0.weight" in text.stdout and "ZeRO 2" in text.stdout

    r = tool("verify_checkpoint", run)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "FAIL" not in r.stdout and r.stdout.rstrip().endswith("verified")

    # a corrupt newest checkpoint: verifying it names the file; the run falls back to step 2
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    shard = bad / "checkpoints" / "step-00000004" / "deepspeed" / \
        "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = tool("verify_checkpoint", bad / "checkpoints" / "step-00000004")
    assert r.returncode == 1 and "FAIL manifest" in r.stdout and shard.name in r.stdout
    r = tool("inspect_checkpoint", bad / "checkpoints" / "step-00000004", "--json")
    assert r.returncode == 1 and shard.name in json.loads(r.stdout)["manifest"]["check"]
    r = tool("inspect_checkpoint", bad, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == 2
    assert "step-00000004 skipped" in r.stderr and shard.name in r.stderr


@pytest.mark.distributed
def test_convert_tool_writes_hf_and_a_pipeline_layout(run, tmp_path):
    hf, pipe = tmp_path / "hf", tmp_path / "pipe"
    r = tool("convert_checkpoint", "--from", "deepspeed", run, "--to", "hf", hf)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000004" in r.stdout  # the run folder's newest complete checkpoint
    r = tool("verify_checkpoint", hf)
    assert r.returncode == 0 and "ok   hf code" in r.stdout, r.stdout + r.stderr[-2000:]
    rep = json.loads(tool("inspect_checkpoint", hf, "--json").stdout)
    assert rep["format"] == "hf" and "modeling_lamemo.py" in rep["layout"]["files"]

    r = tool("convert_checkpoint", "--from", "hf", hf, "--to", "deepspeed", pipe, "--set",
             "parallel.pipeline_stages=2", "--set", "parallel.zero_stage=0", "--world-size", "2",
             "--step", "4", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(tool("inspect_checkpoint", pipe, "--json").stdout)
    assert rep["step"] == 4 and rep["layout"]["pipeline_stages"] == 2
    assert {row["stage"] for row in rep["layout"]["layers"]} == {0, 1}
    assert rep["meta"]["converted_by"] == "lamemo convert --to deepspeed"
    assert rep["training_state"]["rank_files"] == 2
    r = tool("verify_checkpoint", pipe)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]

    from lamemo_ds.checkpoint.layer_map import logical_state_dict
    from lamemo_ds.convert.consolidated import load_model_folder

    model, _ = load_model_folder(hf)
    got = logical_state_dict(pipe / "checkpoints" / "step-00000004" / "deepspeed")
    for name, t in model.state_dict().items():
        assert torch.equal(got[name], t), name
