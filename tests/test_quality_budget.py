"""bench/quality.py --budgets: one full run per budget, read back as a budget study (each
budget's last evaluation, equal steps and equal time across whole runs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def run(memory: str, seed: int, steps: int, bpc: float, seconds: float) -> dict:
    """A finished run whose middle evaluation must never be read (only its last counts)."""
    mid = {"step": steps // 2, "train_seconds": seconds / 2, "bpc": 9.0, "gain_bpc": 9.0}
    return {"memory": memory, "seed": seed, "steps": steps,
            "evals": [mid, {"step": steps, "train_seconds": seconds, "bpc": bpc,
                            "gain_bpc": 0.0 if memory == "none" else 0.1}]}


@pytest.mark.unit
def test_budget_series_reads_each_budgets_last_evaluation():
    cost = {"lamemo": 2.0, "none": 1.0}  # seconds per step
    runs = [run(m, s, n, bpc=3.0 - n / 1000 - (0.3 if m == "lamemo" else 0) + 0.01 * s,
                seconds=cost[m] * n)
            for m in cost for s in (1, 2, 3) for n in (3000, 1000)]  # any order
    series = quality.budget_series(runs)
    assert len(series) == 6
    assert all([e["step"] for e in r["evals"]] == [1000, 3000] for r in series)
    rows = quality.budgets(series, ["lamemo", "none"])
    assert [r["step"] for r in rows] == [1000, 3000]
    lam3k = rows[1]["models"]["lamemo"]
    assert lam3k["bpc@steps"][0] == pytest.approx(3.0 - 3 - 0.3 + 0.02)
    # equal time at 3k: none's 3,000 s buys lamemo only its 1k run (2,000 s), not the 3k one
    assert lam3k["step@time"][0] == 1000
    assert lam3k["bpc@time"][0] == pytest.approx(3.0 - 1 - 0.3 + 0.02)
    assert rows[1]["vs_none@steps"]["lamemo"]["beyond_noise"] is True
    assert rows[1]["vs_none@time"]["lamemo"]["margin_bpc"] == pytest.approx(-1.7)


@pytest.mark.integration
def test_tiny_budget_study_trains_one_run_per_budget(tmp_path):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--tiny",
                        "--budgets", "1000,3000", "--study", "cos",
                        "--out", str(tmp_path / "runs"), "--plots", str(tmp_path),
                        "--json", str(out)], capture_output=True, text=True, timeout=900,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert sorted({x["steps"] for x in doc["runs"]}) == [6, 12] and len(doc["runs"]) == 12
    assert all(x["evals"][-1]["step"] == x["steps"] for x in doc["runs"])
    assert [row["step"] for row in doc["summary"]["budgets"]] == [6, 12]
    assert "by budget" in doc["report"] and "memory below none" in doc["report"]
    assert "quality_stdlib-cos_budgets.png" in doc["plots"]
    assert all((tmp_path / p).is_file() for p in doc["plots"])
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--budgets",
                          "1k,3k"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "--budgets 1k,3k" in bad.stderr
