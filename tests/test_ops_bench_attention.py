"""bench/attention.py --tiny runs end to end (CPU interpreter without a GPU) and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


def test_bench_attention_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "attention.py"), "--tiny", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"].values())
    impls = {(r["kind"], r["impl"]) for r in report["rows"] if "error" not in r}
    assert {
        ("causal", "ours"),
        ("causal", "eager"),
        ("lookahead", "ours"),
        ("causal", "sdpa"),
    } <= impls
    assert all(r["ms"] > 0 for r in report["rows"] if "error" not in r)
