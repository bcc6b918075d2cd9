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
    names = "model_step,loader,train,pipeline,recall,quality,quality_recall,mem_sweep"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--tiny",
                          "--only", names, "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, cwd=REPO)
    if res.returncode != 0:  # name each failed benchmark's own error, not only the tail
        errors = ""
        if (tmp_path / "results.json").is_file():
            doc = json.loads((tmp_path / "results.json").read_text())
            errors = "\n".join(f"{b['name']}: {b.get('error', '')}" for b in doc["benchmarks"]
                               if b["status"] != "ok")
        pytest.fail(f"run_all exit {res.returncode}\n{errors}\n{res.stderr[-3000:]}")
    doc = json.loads((tmp_path / "results.json").read_text())
    by = {b["name"]: b for b in doc["benchmarks"]}
    assert set(by) == set(names.split(","))
    for name, b in by.items():
        assert b["status"] == "ok", (name, b.get("error"))
    rows = {r["memory"]: r for r in by["model_step"]["result"]["rows"]}
    assert set(rows) == {"lamemo", "xl", "none"} and all(r["tokens_per_s"] > 0 for r in
                                                         rows.values())
    assert by["loader"]["result"]["loader_tokens_per_s"] > 0
    for name in ("quality", "quality_recall"):
        q = by[name]["result"]
        assert len(q["runs"]) == 3 * 2  # memories x seeds
        assert set(q["summary"]["models"]) == {"lamemo", "xl", "none"}
        assert q["summary"]["models"]["none"]["gain_bpc@steps"][0] == 0.0
        for png in q["plots"]:
            assert (tmp_path / png).is_file()
    assert "recall_bits@steps" in by["quality_recall"]["result"]["summary"]["models"]["xl"]
    assert {r["memory"] for r in by["recall"]["result"]["runs"]} == {"xl", "lamemo", "none"}
    sweep = by["mem_sweep"]["result"]["results"]
    assert set(sweep) == {"xl", "lamemo", "xl clamp128", "lamemo clamp128"}
    assert sweep["lamemo clamp128"]["clamp_len"] == 128
    assert [r["mem_len"] for r in sweep["xl"]["rows"]] == [8, 16, 32]
    assert all(r["bits_per_byte"] > 0 for r in sweep["lamemo"]["rows"])
    assert (tmp_path / "mem_sweep.png").is_file()
    md = (tmp_path / "RESULTS.md").read_text()
    assert "model_step" in md and doc["commit"] in md and "memory gain" in md
    assert str(REPO) not in md and str(tmp_path) not in md  # portable: no machine paths
    assert (tmp_path / "model_step.png").is_file()
    # a reused result shows its figures and the commit that made them
    again = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--only",
                            "recall", "--reuse", f"recall={tmp_path / 'recall.json'}", "--out",
                            str(tmp_path / "again")], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    md = (tmp_path / "again" / "RESULTS.md").read_text()
    assert "bits/key symbol" in md and f"made at commit {doc['commit']}" in md
