"""Benchmarks must not rot: run_all drives each CPU benchmark in its tiny mode and records a
result (no timing is asserted: these machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_run_all_tiny_writes_results_and_markdown(tmp_path):
    names = "model_step,loader,train,pipeline,quality"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--tiny",
                          "--only", names, "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    by = {b["name"]: b for b in doc["benchmarks"]}
    assert set(by) == set(names.split(","))
    for name, b in by.items():
        assert b["status"] == "ok", (name, b.get("error"))
    rows = {r["memory"]: r for r in by["model_step"]["result"]["rows"]}
    assert set(rows) == {"lamemo", "xl", "none"} and all(r["tokens_per_s"] > 0 for r in
                                                         rows.values())
    assert by["loader"]["result"]["loader_tokens_per_s"] > 0
    assert len(by["quality"]["result"]["runs"]) == 3
    md = (tmp_path / "RESULTS.md").read_text()
    assert "model_step" in md and doc["commit"] in md
    assert (tmp_path / "model_step.png").is_file()
