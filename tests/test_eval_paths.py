"""One evaluation everywhere: the same checkpoint evaluated by the 1-process trainer, by the
pipeline trainer (parallel.pipeline_stages=2) and by `lamemo eval` on its export gives the same
losses (1e-5), under both protocols, with the memory carried and reset.

The trainers evaluate by resuming the checkpoint at train.max_steps (no step runs, the final
evaluation does); `lamemo eval` without protocol flags uses the run's own eval settings."""

from __future__ import annotations

import json
import shutil

import pytest
from train_support import spawn, write_config

XL = {"protocol": "xl", "segment_len": 8, "mem_len": 24, "clamp_len": 20, "same_length": True,
      "batch_size": 2, "memory_gain": True}
TRAIN = {"max_steps": 2, "eval_interval": 0, "eval_max_segments": 4, "log_interval": 1}


def _ok(results) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stdout[-3000:]}"


def _last_eval(run) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["eval"] for line in lines if '"eval"' in line][-1]


def _trainer_eval(tmp_path, trained, name: str, *, stages: int, protocol: str) -> dict:
    """Resume a copy of the trained run with `stages` pipeline stages: only the final eval."""
    run = tmp_path / name
    shutil.copytree(trained, run)
    cfg = tmp_path / f"{name}.yaml"
    shutil.copy(trained.parent / "train.yaml", cfg)
    sets = ["--set", f"train.output_dir={run}", "--set", f"eval.protocol={protocol}",
            "--set", f"parallel.pipeline_stages={stages}"]
    _ok(spawn(cfg, nproc=stages, args=tuple(sets)))
    return _last_eval(run)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_pipeline_and_lamemo_eval_agree(corpus, tmp_path, lamemo):
    trained = tmp_path / "trained"
    cfg = write_config(tmp_path / "train.yaml", corpus, trained, eval=XL, train=TRAIN,
                       parallel={"zero_stage": 0}, checkpoint={"interval": 2})
    _ok(spawn(cfg, nproc=1))
    export = tmp_path / "export"
    r = lamemo("convert", "--from", "deepspeed", str(trained / "checkpoints"), "--to",
               "consolidated", str(export))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for protocol, flags in (("xl", ()), ("paper", ("--protocol", "paper"))):
        one = _trainer_eval(tmp_path, trained, f"one-{protocol}", stages=1, protocol=protocol)
        pipe = _trainer_eval(tmp_path, trained, f"pipe-{protocol}", stages=2, protocol=protocol)
        r = lamemo("eval", "--model", str(export), "--data", str(corpus), "--split", "valid",
                   "--max-segments", str(TRAIN["eval_max_segments"]), "--no-progress", *flags)
        assert r.returncode == 0, r.stderr[-3000:]
        cli = json.loads(r.stdout)
        want_mem = XL["mem_len"] if protocol == "xl" else 16  # the run's eval settings / model
        assert (cli["protocol"], cli["mem_len"]) == (protocol, want_mem), cli
        for got in (pipe, cli):
            keys = ("protocol", "segment_len", "mem_len", "clamp_len", "same_length")
            assert {k: got[k] for k in keys} == {k: one[k] for k in keys}
            assert got["tokens"] == one["tokens"] > 0
            assert _close(got["loss"], one["loss"]), (protocol, got["loss"], one["loss"])
            assert _close(got["reset"]["loss"], one["reset"]["loss"]), protocol
            for a, b in zip(got["loss_by_segment"], one["loss_by_segment"], strict=True):
                assert _close(a, b), (protocol, got["loss_by_segment"], one["loss_by_segment"])
        assert one["reset"]["loss"] != one["loss"]  # the memory is real in both protocols
