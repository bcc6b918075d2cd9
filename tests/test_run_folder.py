"""The run-folder checks of `lamemo train` (checkpoint/run_folder.py) on hand-made folders:
which checkpoint config a resume is compared with, and what is refused."""

from __future__ import annotations

import json

import pytest

from lamemo_ds.config.load import load_config


@pytest.mark.unit
def test_resume_check_reads_the_newest_intact_config(tmp_path):
    """check_resume compares with the newest step whose config.yaml matches its manifest; a
    pipeline checkpoint needs its stage count back."""
    from lamemo_ds.checkpoint.run_folder import check_resume
    from lamemo_ds.config.errors import UserError
    from lamemo_ds.config.load import dump_config
    from lamemo_ds.fileio import sha256_file

    def save(step: int, cfg, *, intact: bool = True) -> None:
        d = tmp_path / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(dump_config(cfg))
        sha = sha256_file(d / "config.yaml") if intact else "0" * 64
        (d / "manifest.json").write_text(json.dumps({"files": {"config.yaml": {"sha256": sha}}}))

    base = load_config(None, ["model.n_layer=2", "parallel.pipeline_stages=2"])
    save(1, base)
    save(2, load_config(None, ["model.n_layer=4"]), intact=False)  # skipped: not intact
    check_resume(base, tmp_path)  # the same config resumes
    with pytest.raises(UserError, match="pipeline_stages=2"):
        check_resume(load_config(None, ["model.n_layer=2"]), tmp_path)
    with pytest.raises(UserError, match=r"model.n_layer: 2 in the checkpoint, 3 now"):
        check_resume(load_config(None, ["model.n_layer=3", "parallel.pipeline_stages=2"]),
                     tmp_path)


@pytest.mark.unit
def test_supersede_moves_the_old_run_and_keeps_hidden_files(tmp_path):
    from lamemo_ds.checkpoint.run_folder import refuse_fresh_start, supersede
    from lamemo_ds.config.errors import UserError

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "tensorboard").mkdir()
    (run / ".lock").write_text("")
    with pytest.raises(UserError, match="--overwrite"):
        refuse_fresh_start(run)
    first = supersede(run)
    assert sorted(p.name for p in run.iterdir()) == [".lock", first.name]
    assert sorted(p.name for p in first.iterdir()) == ["checkpoints", "metrics.jsonl",
                                                       "tensorboard"]
    refuse_fresh_start(run)  # nothing left to overtake a new run
    (run / "metrics.jsonl").write_text("{}\n")
    second = supersede(run)
    assert second != first and (second / "metrics.jsonl").is_file() and first.is_dir()
    assert supersede(run) is None
