"""`make demo` end to end (the --quick variant) and the demo config kept in one piece."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from train_support import PY, REPO, env

from lamemo_ds.demo import DEMO_CONFIG, summary


@pytest.mark.unit
def test_configs_demo_yaml_matches_the_embedded_default():
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()) == DEMO_CONFIG


@pytest.mark.integration
def test_demo_quick_end_to_end(tmp_path):
    res = subprocess.run([PY, "-m", "lamemo_ds.demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    s = summary(run)
    assert s["last_loss"] < s["first_loss"] - 0.5, s
    assert s["eval"]["tokens"] > 0 and 0 < s["eval"]["bits_per_byte"] < 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/valid_memory_gain_bits_per_token", "eval/valid_bits_per_byte",
            "eval/valid_memory_ppl_ratio", "eval_by_segment/valid_seg0000-0000",
            "eval_by_segment/valid_reset_seg0000-0000", "train/bits_per_byte"} <= set(tags), tags
    gain = events.Scalars("eval/valid_memory_gain_bits_per_token")[-1].value
    assert gain == pytest.approx(s["eval"]["memory_gain_bits_per_token"], abs=1e-5)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "manifest.json").is_file()
    assert f"tensorboard --logdir {run / 'tensorboard'}" in res.stdout
    assert str(run / "checkpoints" / latest) in res.stdout
    # ends by exporting the model, evaluating the export and sampling from it
    assert (run / "hf" / "config.json").is_file() and list((run / "hf").glob("*.safetensors"))
    test = json.loads((run / "test_eval.json").read_text())
    assert test["tokens"] > 0 and 0 < test["bits_per_byte"] < 8
    assert "test (export):" in res.stdout and "sample       :" in res.stdout
    assert test["reset"]["memory"] == "reset" and "memory gain" in res.stdout
