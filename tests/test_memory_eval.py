"""Memory ablation in evaluation: `memory="reset"` is the same model over the same tokens with an
empty memory before every segment; the memory gain is loss(reset) - loss(carried); `lamemo eval
--memory` reports both on exported folders (consolidated and hf) and says when the two are the
same by construction (memory: none). DeepSpeed checkpoints as input: tests/test_recall_train.py."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.data.streams import OrderedStreams
from lamemo_ds.evaluation import EvalResult, evaluate, memory_gain
from lamemo_ds.model import LaMemoLM

SEG = 8


def model(memory: str, seed: int = 0) -> LaMemoLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                      dropout=0.0, segment_len=SEG, mem_len=SEG, memory=memory, init_std=0.3)
    return LaMemoLM(cfg).eval()


def batches(corpus, rows: int = 2) -> OrderedStreams:
    return OrderedStreams(str(corpus), "valid", seg_len=SEG, rows=rows, loop=False)


@pytest.mark.unit
@pytest.mark.parametrize("memory", ["lamemo", "xl", "none"])
def test_reset_is_every_segment_from_an_empty_memory(corpus, memory):
    m = model(memory)
    reset = evaluate(m, batches(corpus), max_segments=5, memory="reset")
    carried = evaluate(m, batches(corpus), max_segments=5)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i, b in enumerate(batches(corpus)):
            if i == 5:
                break
            out = m(b.input, m.init_state(2), targets=b.target)
            nll += out.nll.double().sum().item()
            n += out.nll.numel()
    assert reset.memory == "reset" and carried.memory == "carried"
    assert reset.loss == pytest.approx(nll / n, rel=1e-12) and reset.tokens == n
    assert reset.by_segment[0] == pytest.approx(carried.by_segment[0], rel=1e-12)
    if memory == "none":
        assert reset.loss == pytest.approx(carried.loss, rel=1e-12)
    else:
        assert abs(reset.loss - carried.loss) > 1e-4  # memory changes the later segments
    gain = memory_gain(carried, reset)
    assert gain["memory_gain_bits_per_token"] == pytest.approx(
        (reset.loss - carried.loss) / math.log(2))
    assert gain["memory_ppl_ratio"] == pytest.approx(reset.ppl / carried.ppl)


@pytest.mark.unit
def test_target_mask_scores_a_subset(corpus):
    m = model("lamemo")
    every = evaluate(m, batches(corpus), max_segments=3,
                     target_mask=lambda b: torch.ones_like(b.target, dtype=torch.bool))
    assert every.subset_loss == pytest.approx(every.loss, rel=1e-12)
    assert every.subset_tokens == every.tokens
    first = evaluate(m, batches(corpus), max_segments=3,
                     target_mask=lambda b: torch.arange(SEG)[None, :].expand(2, -1) == 0)
    assert first.subset_tokens == 3 * 2 and first.subset_bits == first.subset_loss / math.log(2)
    assert "subset_bits" in first.as_dict() and "subset_bits" not in \
        evaluate(m, batches(corpus), max_segments=1).as_dict()
    with pytest.raises(ValueError, match="memory='off'"):
        evaluate(m, batches(corpus), memory="off")


@pytest.mark.unit
def test_integer_target_mask_scores_each_group_apart(corpus):
    """Labels 0, 1 and -1 (not scored): each group's mean NLL equals the bool-mask subset of
    the same targets, and the groups together equal their union."""
    m = model("lamemo")
    pos = torch.arange(SEG)[None, :].expand(2, -1)
    labels = torch.where(pos < 2, pos, torch.full_like(pos, -1))  # target 0 -> 0, 1 -> 1
    grouped = evaluate(m, batches(corpus), max_segments=3, target_mask=lambda b: labels)
    (l0, n0), (l1, n1) = grouped.subset_groups
    assert n0 == n1 == 3 * 2 and grouped.subset_tokens == 12
    for g, loss in ((0, l0), (1, l1)):
        alone = evaluate(m, batches(corpus), max_segments=3, target_mask=lambda b, g=g: pos == g)
        assert loss == pytest.approx(alone.subset_loss, rel=1e-12)
    both = evaluate(m, batches(corpus), max_segments=3, target_mask=lambda b: pos < 2)
    assert grouped.subset_loss == pytest.approx(both.subset_loss, rel=1e-12)
    assert both.subset_groups is None and "subset_bits_by_group" not in both.as_dict()
    assert grouped.as_dict()["subset_bits_by_group"] == pytest.approx(
        [l0 / math.log(2), l1 / math.log(2)])


def test_memory_gain_of_a_subset():
    a = EvalResult(loss=1.0, tokens=1, subset_loss=0.5)
    b = EvalResult(loss=2.0, tokens=1, subset_loss=2.5)
    g = memory_gain(a, b)
    assert g["memory_gain_subset_bits"] == pytest.approx(2.0 / math.log(2))


@pytest.mark.integration
@pytest.mark.parametrize("memory", ["lamemo", "none"])
def test_eval_cli_reports_both_passes_and_the_gain(corpus, tmp_path, lamemo, memory):
    m = model(memory)
    for fmt in ("consolidated", "hf"):
        write_target(fmt, Loaded(model=m, source="t"), tmp_path / fmt, quiet=True)
    base = ["--data", str(corpus), "--split", "valid", "--batch-size", "2", "--max-segments",
            "4", "--no-progress"]
    r = lamemo("eval", "--model", str(tmp_path / "consolidated"), *base)
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    assert both["memory"] == "carried" and both["reset"]["memory"] == "reset"
    assert both["memory_gain_bits_per_token"] == pytest.approx(
        (both["reset"]["loss"] - both["loss"]) / math.log(2), rel=1e-9)
    assert "memory gain:" in r.stderr and "(reset memory)" in r.stderr
    r = lamemo("eval", "--model", str(tmp_path / "hf"), "--memory", "reset", *base)
    assert r.returncode == 0, r.stderr
    reset = json.loads(r.stdout)
    assert reset["memory"] == "reset" and "reset" not in reset
    assert reset["loss"] == pytest.approx(both["reset"]["loss"], rel=1e-9)
    if memory == "none":
        assert both["memory_gain_bits_per_token"] == 0.0
        assert "same model" in both["memory_gain_note"]
        assert both["mem_len"] == 0
    else:
        assert both["memory_gain_bits_per_token"] != 0.0 and "memory_gain_note" not in both
    small = tmp_path / "small"  # --record scores a whole split: a small one
    assert lamemo("prepare", "--corpus", "recall", "--out", str(small), "--quiet",
                  "--split-sizes", "4000,1000,1000", "--recall-gap", "12").returncode == 0
    r = lamemo("eval", "--model", str(tmp_path / "consolidated"), "--memory", "carried",
               "--record", "--data", str(small), "--split", "valid", "--batch-size", "8",
               "--no-progress")
    assert r.returncode == 0 and "reset" not in json.loads(r.stdout), r.stderr[-2000:]
    recorded = json.loads((tmp_path / "consolidated" / "eval.json").read_text())
    assert recorded["valid/paper"]["memory"] == "carried"


@pytest.mark.integration
def test_eval_cli_scores_recall_key_symbols(tmp_path, lamemo):
    assert lamemo("prepare", "--corpus", "recall", "--out", str(tmp_path / "r"), "--quiet",
                  "--split-sizes", "20000,4000,4000", "--recall-gap", "12").returncode == 0
    write_target("consolidated", Loaded(model=model("xl"), source="t"), tmp_path / "m",
                 quiet=True)
    r = lamemo("eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "r"),
               "--split", "test", "--batch-size", "2", "--max-segments", "20", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rc = out["recall"]
    assert rc["chance_bits"] == 4.0 and rc["gap"] == [12, 12] and rc["key_symbols"] > 0
    assert set(rc["bits_per_key_symbol"]) == {"carried", "reset"}
    assert rc["bits_per_key_symbol"]["carried"] == pytest.approx(out["subset_bits"])
    assert "recall: bits per key symbol" in r.stderr
    # by key symbol (single-key episodes: no elimination reader), weighted back to the mean
    assert list(rc["by_group"]) == [f"s{j}" for j in range(1, 7)]
    assert "elimination_bits" not in rc and "recall by group (carried/reset)" in r.stderr
    groups = rc["by_group"].values()
    assert sum(g["key_symbols"] for g in groups) == rc["key_symbols"]
    assert statistics.fmean([g["carried"] for g in groups], weights=[
        g["key_symbols"] for g in groups]) == pytest.approx(rc["bits_per_key_symbol"]["carried"])


@pytest.mark.integration
def test_record_needs_an_export_folder(tmp_path, lamemo, corpus):
    (tmp_path / "run").mkdir()
    r = lamemo("eval", "--model", str(tmp_path / "run"), "--data", str(corpus), "--record")
    assert r.returncode == 2 and "--record" in r.stderr
    r = lamemo("eval", "--model", str(tmp_path / "run"), "--data", str(corpus))
    assert r.returncode == 1 and "holds no complete checkpoint" in r.stderr
