"""Honest units: the tokenizer of the data, not the vocabulary size, decides what a loss is
reported in (bits per byte, bits per character, perplexity per word; perplexity per token and
bits per byte of the text for BPE, from the UTF-8 bytes prepare records per split)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from train_support import PY, env, spawn, write_config

from lamemo_ds.evaluation import EvalResult, Units, describe

LN2 = math.log(2)


@pytest.mark.unit
def test_units_follow_the_tokenizer_kind():
    assert Units("byte").scores(LN2) == {"bits_per_byte": 1.0}
    assert Units("char").scores(2 * LN2) == {"bits_per_char": 2.0}
    assert Units("word").scores(math.log(50)) == {"ppl_per_word": pytest.approx(50.0)}
    bpe = Units("bpe", tokens=100, text_bytes=400).scores(2 * LN2)
    assert bpe == {"ppl_per_token": pytest.approx(4.0), "bits_per_byte": pytest.approx(0.5)}
    assert [Units(k).headline for k in ("byte", "char", "word", "bpe")] == \
        ["bits_per_byte", "bits_per_char", "ppl_per_word", "ppl_per_token"]
    old = Units.from_manifest({"tokenizer": {"kind": "bpe"}, "splits": {"valid": {"tokens": 9}}},
                              "valid")
    assert old.scores(1.0)["bits_per_byte"] is None and "unavailable" in old.bytes_note
    assert Units("byte").bytes_note is None
    line = describe(EvalResult(loss=2 * LN2, tokens=1234), Units("bpe", 100, 400))
    assert line == "loss 1.3863 | ppl_per_token 4.0000 | bits_per_byte 0.5000 | 1,234 tokens"
    assert "bits_per_byte" not in describe(EvalResult(loss=1.0, tokens=1), old)


@pytest.mark.integration
def test_a_bpe_run_reports_perplexity_per_token_and_bits_per_byte(tmp_path):
    data = tmp_path / "bpe"
    subprocess.run([PY, "-m", "lamemo_ds.cli", "prepare", "--corpus", "stdlib", "--tokenizer",
                    "bpe", "--bpe-vocab", "320", "--out", str(data), "--max-bytes", "200K",
                    "--quiet"], check=True, env=env(), timeout=300)
    manifest = json.loads((data / "manifest.json").read_text())
    valid = manifest["splits"]["valid"]
    assert valid["text_bytes"] > valid["tokens"] > 0  # BPE: several bytes per token
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run",
                       model={"vocab_size": manifest["vocab_size"]},
                       train={"max_steps": 2, "log_interval": 2, "eval_max_segments": 2},
                       parallel={"zero_stage": 0}, logging={"tensorboard": True})
    (res,) = spawn(cfg, nproc=1)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "ppl_per_token" in res.stdout and "bits_per_byte" in res.stdout
    assert "bpc" not in res.stdout
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    ev = [r["eval"] for r in recs if "eval" in r][-1]
    assert ev["ppl_per_token"] == pytest.approx(math.exp(ev["loss"]))
    ratio = valid["tokens"] / valid["text_bytes"]
    assert ev["bits_per_byte"] == pytest.approx(ev["loss"] / LN2 * ratio)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"eval/valid_ppl_per_token", "eval/valid_bits_per_byte", "train/ppl_per_token",
            "train/bits_per_byte"} <= set(events.Tags()["scalars"])
