"""`lamemo eval` on an exported model: the JSON result equals evaluation in-process, names its
protocol and lengths, and --record stores it in the model folder's card."""

from __future__ import annotations

import json

import pytest
import torch

from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.consolidated import load_model_folder
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.data.streams import OrderedStreams
from lamemo_ds.evaluation import evaluate
from lamemo_ds.model import LaMemoLM


@pytest.mark.integration
def test_eval_cli_matches_evaluate_and_records(tmp_path, corpus, lamemo):
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, d_model=16, d_head=8, d_inner=32,
                      dropout=0.0, segment_len=8, mem_len=8)
    torch.manual_seed(0)
    write_target("consolidated", Loaded(model=LaMemoLM(cfg), source="t"), tmp_path / "m",
                 quiet=True)
    base = ["eval", "--model", str(tmp_path / "m"), "--data", str(corpus), "--split", "valid",
            "--batch-size", "2", "--max-segments", "3", "--no-progress"]
    r = lamemo(*base)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: mem_len" not in r.stderr  # the training lengths: no clamp needed
    res = json.loads(r.stdout)
    model, _ = load_model_folder(tmp_path / "m")
    want = evaluate(model, OrderedStreams(str(corpus), "valid", seg_len=8, rows=2, loop=False),
                    max_segments=3)
    assert res["protocol"] == "paper" and res["mem_len"] == 8 and res["segment_len"] == 8
    assert res["loss"] == pytest.approx(want.loss, rel=1e-9)
    assert res["bits_per_byte"] == pytest.approx(want.bits_per_token, rel=1e-9)
    assert res["tokens"] == 3 * 2 * 8
    assert len(res["loss_by_segment"]) == 3
    # --record stores a score of the whole split only (a partial one is refused)
    r = lamemo(*base, "--record")
    assert r.returncode == 2 and "--max-segments" in r.stderr
    small = tmp_path / "small"  # a whole split, kept small
    assert lamemo("prepare", "--corpus", "recall", "--out", str(small), "--quiet",
                  "--split-sizes", "4000,1000,1000", "--recall-gap", "12").returncode == 0
    whole = ["eval", "--model", str(tmp_path / "m"), "--data", str(small), "--split", "valid",
             "--batch-size", "8", "--memory", "carried", "--no-progress", "--record"]
    r = lamemo(*whole)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert "valid/paper" in json.loads((tmp_path / "m" / "eval.json").read_text())
    assert f"{rec['bits_per_byte']}" in (tmp_path / "m" / "README.md").read_text()

    # lengths work without naming a protocol (they make it xl); same_length is the model's
    r = lamemo(*base, "--mem-len", "24", "--seg-len", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    xl = json.loads(r.stdout)
    assert (xl["protocol"], xl["mem_len"], xl["segment_len"], xl["same_length"]) == \
        ("xl", 24, 4, cfg.same_length)
    assert "mem_len=24" in r.stderr
    # lamemo beyond the N + M of training with no clamp: a note names the clamp to use
    assert cfg.memory == "lamemo" and "add --clamp-len 16" in r.stderr
    r = lamemo(*base, "--mem-len", "24", "--seg-len", "4", "--clamp-len", "16")
    assert r.returncode == 0 and "note: mem_len" not in r.stderr
    assert json.loads(r.stdout)["clamp_len"] == 16
    # --protocol xl alone: the model's lengths (no eval section stored with this export)
    r = lamemo(*base, "--protocol", "xl")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (json.loads(r.stdout)["mem_len"], json.loads(r.stdout)["loss"]) == (8, res["loss"])
    r = lamemo(*base, "--mem-len", "8,x")
    assert r.returncode == 2 and "'x' is not a whole number" in r.stderr
    assert "Traceback" not in r.stderr
