"""Reading a checkpoint never runs its code: a payload (an object whose unpickling runs a shell
command that creates a marker file) planted in each kind of `.pt` we read, with the manifest's
sha256 recomputed as whoever hands over a folder can, is refused by inspect, verify, convert,
eval, generate and resume (one line naming the file, the type and --trust-checkpoint; exit 2), or
the file is not read at all. Our own checkpoints hold plain data only.

One ZeRO-2 run (1 process) and one pipeline run (2 stages) of 2 steps, shared by the module.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from train_support import run_ranks, write_config

from lamemo_ds.checkpoint.manager import MANIFEST, write_manifest
from lamemo_ds.checkpoint.safe_load import ALLOWED

STEP = "step-00000002"
MODEL_STATES = f"checkpoints/{STEP}/deepspeed/mp_rank_00_model_states.pt"
OPTIM_STATES = f"checkpoints/{STEP}/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_STATE = f"checkpoints/{STEP}/lamemo/rank-00000.pt"
LAYER_FILE = f"checkpoints/{STEP}/deepspeed/layer_01-model_00-model_states.pt"


class Payload:
    """Unpickling it runs `touch MARKER` (what an attacker would hide in a .pt)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant(pt: Path, marker: Path) -> None:
    """Add the payload to `pt` and recompute the manifest of its step folder or export, if it
    has one."""
    data = torch.load(pt, map_location="cpu", weights_only=False)  # our own file: trusted
    data["extra"] = Payload(marker)
    torch.save(data, pt)
    step = next((p for p in pt.parents if (p / MANIFEST).is_file()), None)
    if step is not None:
        is_step = step.name.startswith("step-")
        write_manifest(step, int(step.name.removeprefix("step-")) if is_step else None)


def refused(r, name: str, file: Path) -> None:
    """A one-line refusal on stderr, exit 2, naming the file, the type and the flag."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if "refused:" in ln]
    assert line and line[0].startswith(f"{name}: refused: ") and str(file) in line[0], r.stderr
    assert "posix.system" in line[0] and "--trust-checkpoint" in line[0]
    assert "Traceback" not in r.stderr


def train(out: Path, *args: str, nproc: int = 1):
    """Resume the run in `out` for one more step (its own config, its folder)."""
    return run_ranks(["-m", "lamemo_ds.cli", "train", "--config", str(out / "config.yaml"),
                      "--set", f"train.output_dir={out}", "--set", "train.max_steps=3",
                      "--set", "train.allow_schedule_change=true", *args],
                     nproc=nproc, timeout=300)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Two finished 2-step runs with a checkpoint at step 2: ZeRO-2 on 1 process, and a
    2-stage pipeline; plus reference.pt written from the first."""
    root = tmp_path_factory.mktemp("untrusted")
    layouts = {"zero": ({"zero_stage": 2}, 1), "pipe": ({"zero_stage": 0, "pipeline_stages": 2}, 2)}
    out = {}
    for name, (parallel, nproc) in layouts.items():
        cfg = write_config(root / f"{name}.yaml", corpus, root / name, parallel=parallel,
                           train={"max_steps": 2}, checkpoint={"interval": 2})
        for r in run_ranks(["-m", "lamemo_ds.cli", "train", "--config", str(cfg)], nproc=nproc):
            assert r.returncode == 0, r.stdout[-3000:]
        out[name] = root / name
    from lamemo_ds.cli import main

    assert main(["convert", "--from", "deepspeed", str(out["zero"]), "--to", "reference",
                 str(root / "ref"), "--quiet"]) == 0
    out["ref"] = root / "ref"
    return out


@pytest.fixture
def copy(runs, tmp_path):
    """A fresh copy of one of the runs, to plant a payload in."""
    def make(name: str) -> Path:
        return Path(shutil.copytree(runs[name], tmp_path / name))
    return make


@pytest.mark.distributed
def test_our_checkpoints_hold_plain_data_and_the_allowlist_is_what_deepspeed_writes(runs):
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = {f"{m}.{n}" for m, n in ALLOWED}
    found = set()
    for name in ("zero", "pipe"):
        for pt in sorted((runs[name] / "checkpoints").rglob("*.pt")):
            names = set(get_unsafe_globals_in_checkpoint(pt))
            assert names <= allowed, (pt, names)
            if pt.parent.name == "lamemo":
                assert not names, pt  # our training state: tensors and plain containers
            found |= names
    # every entry is needed (DynamicLossScaler: fp16 ZeRO, GPU only)
    assert found == allowed - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}


@pytest.mark.distributed
def test_payload_in_model_states(copy, corpus, tmp_path, lamemo):
    run, mark = copy("zero"), tmp_path / "MARK"
    plant(run / MODEL_STATES, mark)
    refused(lamemo("inspect", str(run)), "lamemo inspect", run / MODEL_STATES)
    refused(lamemo("verify", str(run)), "lamemo verify", run / MODEL_STATES)
    r = lamemo("convert", "--from", "deepspeed", str(run), "--to", "consolidated",
               str(tmp_path / "out"))
    refused(r, "lamemo convert", run / MODEL_STATES)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    r = lamemo("eval", "--model", str(run), "--data", str(corpus), "--max-segments", "1",
               "--batch-size", "1", "--no-progress")
    refused(r, "lamemo eval", run / MODEL_STATES)
    r = lamemo("generate", "--model", str(run), "--max-new-tokens", "2")
    refused(r, "lamemo generate", run / MODEL_STATES)
    assert not mark.exists()
    # the payload is real: a trusted read runs it
    assert lamemo("inspect", str(run), "--trust-checkpoint").returncode == 0
    assert mark.exists()


@pytest.mark.distributed
def test_payload_in_optimizer_states(copy, corpus, tmp_path, lamemo):
    run, mark = copy("zero"), tmp_path / "MARK"
    plant(run / OPTIM_STATES, mark)
    assert lamemo("inspect", str(run)).returncode == 0  # inspect does not read optimizer files
    refused(lamemo("verify", str(run)), "lamemo verify", run / OPTIM_STATES)
    r = lamemo("convert", "--from", "deepspeed", str(run), "--to", "consolidated",
               str(tmp_path / "out"))
    refused(r, "lamemo convert", run / OPTIM_STATES)
    r = lamemo("eval", "--model", str(run), "--data", str(corpus), "--max-segments", "1",
               "--batch-size", "1", "--no-progress")
    refused(r, "lamemo eval", run / OPTIM_STATES)
    (r,) = train(run)
    r.stderr = r.stdout
    refused(r, "lamemo train", run / OPTIM_STATES)
    assert not mark.exists()
    assert not (run / "checkpoints" / "step-00000003").exists()


@pytest.mark.distributed
def test_payload_in_rank_state(copy, tmp_path, lamemo):
    run, mark = copy("zero"), tmp_path / "MARK"
    plant(run / RANK_STATE, mark)
    refused(lamemo("inspect", str(run)), "lamemo inspect", run / RANK_STATE)
    refused(lamemo("verify", str(run)), "lamemo verify", run / RANK_STATE)
    # conversion reads the weights only: it succeeds without touching the training state
    r = lamemo("convert", "--from", "deepspeed", str(run), "--to", "consolidated",
               str(tmp_path / "out"), "--quiet")
    assert r.returncode == 0, r.stderr
    (r,) = train(run)
    r.stderr = r.stdout
    refused(r, "lamemo train", run / RANK_STATE)
    assert not mark.exists()


@pytest.mark.distributed
def test_payload_in_pipeline_layer_file(copy, corpus, tmp_path, lamemo):
    run, mark = copy("pipe"), tmp_path / "MARK"
    plant(run / LAYER_FILE, mark)
    refused(lamemo("inspect", str(run)), "lamemo inspect", run / LAYER_FILE)
    refused(lamemo("verify", str(run)), "lamemo verify", run / LAYER_FILE)
    r = lamemo("convert", "--from", "deepspeed", str(run), "--to", "consolidated",
               str(tmp_path / "out"))
    refused(r, "lamemo convert", run / LAYER_FILE)
    r = lamemo("eval", "--model", str(run), "--data", str(corpus), "--max-segments", "1",
               "--batch-size", "1", "--no-progress")
    refused(r, "lamemo eval", run / LAYER_FILE)
    ranks = train(run, nproc=2)
    r = ranks[0]
    r.stderr = r.stdout
    refused(r, "lamemo train", run / LAYER_FILE)
    assert ranks[1].returncode == 2 and "refused" in ranks[1].stdout
    assert not mark.exists()


@pytest.mark.distributed
def test_payload_in_reference_pt(runs, tmp_path, lamemo):
    ref, mark = Path(shutil.copytree(runs["ref"], tmp_path / "ref")), tmp_path / "MARK"
    pt = ref / "reference.pt"
    plant(pt, mark)
    refused(lamemo("inspect", str(ref)), "lamemo inspect", pt)
    refused(lamemo("verify", str(ref)), "lamemo verify", pt)
    r = lamemo("convert", "--from", "reference", str(ref), "--to", "consolidated",
               str(tmp_path / "out"))
    refused(r, "lamemo convert", pt)
    r = lamemo("generate", "--model", str(ref), "--max-new-tokens", "2")
    assert r.returncode == 1  # no safetensors weights: nothing unpickled
    assert not mark.exists()


@pytest.mark.distributed
def test_old_format_rank_state_is_refused_with_a_way_out(copy):
    """A training-state file of the old format (numpy's RNG state pickled): resume refuses it
    and says how to proceed; with --trust-checkpoint it resumes and writes the plain form."""
    import numpy as np
    from torch.serialization import get_unsafe_globals_in_checkpoint

    run = copy("zero")
    pt = run / RANK_STATE
    data = torch.load(pt, map_location="cpu", weights_only=True)
    data["rng"]["numpy"] = np.random.get_state()
    torch.save(data, pt)
    write_manifest(pt.parent.parent, 2)
    (r,) = train(run)
    assert r.returncode == 2 and "old format" in r.stdout and "--trust-checkpoint" in r.stdout
    assert "--no-resume" in r.stdout and "Traceback" not in r.stdout
    (r,) = train(run, "--trust-checkpoint")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:]
    new = run / "checkpoints" / "step-00000003" / "lamemo" / "rank-00000.pt"
    assert get_unsafe_globals_in_checkpoint(new) == []


@pytest.mark.unit
def test_rng_state_is_plain_and_restores_every_generator(tmp_path):
    """The RNG piece saves numpy's state as a tensor and numbers: it loads with
    weights_only=True and no extra globals, and restores every generator (the cached gaussian
    included); the loader refuses a pickled function, running nothing."""
    import random

    import numpy as np

    from lamemo_ds.checkpoint.safe_load import UntrustedCheckpointError, load_pt
    from lamemo_ds.train.state import RNG

    rng = RNG()
    rng.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng.state_dict()}, tmp_path / "rank.pt")
    want = (random.random(), np.random.randn(), np.random.rand(2).tolist(), torch.rand(2))
    rng.seed(9)
    rng.load_state_dict(torch.load(tmp_path / "rank.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.randn(), np.random.rand(2).tolist(), torch.rand(2))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3])

    mark = tmp_path / "MARK"
    torch.save({"w": torch.ones(2), "x": Payload(mark)}, tmp_path / "bad.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"bad\.pt holds posix\.system"):
        load_pt(tmp_path / "bad.pt")
    import pickle  # torch's legacy format: a bare pickle first, no zip archive to list

    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(Payload(mark), protocol=2))
    with pytest.raises(UntrustedCheckpointError, match=r"legacy\.pt is not plain checkpoint"):
        load_pt(tmp_path / "legacy.pt")
    assert not mark.exists()
