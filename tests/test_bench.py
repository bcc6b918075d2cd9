"""Benchmarks must not rot: run_all drives each CPU benchmark in its tiny mode and records a
result (no timing is asserted: these machines are noisy)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# by file path, as tests/test_bench_reference.py does (bench/ on sys.path would shadow names)
_spec = importlib.util.spec_from_file_location("scaling_report",
                                               REPO / "bench" / "scaling_report.py")
scaling_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling_report)


@pytest.mark.unit
def test_scaling_fits_tell_linear_from_quadratic_extra_cost():
    xs = [64, 128, 256, 512, 1024]
    xl = [1e-3 * x for x in xs]
    assert scaling_report.loglog(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert scaling_report.loglog(xs[:1], [1.0]) is None  # one point: no fit
    linear = scaling_report.extra_fit(xs, [t + 5e-4 * x for t, x in zip(xl, xs)], xl)
    assert linear["linear"] and linear["upper_half"] == pytest.approx(1.0)
    quad = scaling_report.extra_fit(xs, [t + 1e-6 * x * x for t, x in zip(xl, xs)], xl)
    assert not quad["linear"] and quad["last_step"] == pytest.approx(2.0)
    assert quad["quadratic_share_at_max"] == pytest.approx(1.0)
    res = {"train_mem": {m: [{"x": x, "step_s": t, "peak_mib": 1.0} for x, t in zip(
        xs, ts)] for m, ts in (("lamemo", [t + 1e-6 * x * x for t, x in zip(xl, xs)]),
                               ("xl", xl), ("none", xl))}}
    fit = scaling_report.fits(res)
    assert "NOT linear" in scaling_report.verdict(fit, "train_mem", xs)


@pytest.mark.integration
def test_run_all_tiny_writes_results_and_markdown(tmp_path):
    names = "model_step,loader,train,pipeline,recall,quality,quality_recall,mem_sweep,scaling"
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
    peak = by["model_step"]["result"]["gemm_peak_gflops_per_s"]
    assert peak > 0 and all(r["fraction_of_peak"] == pytest.approx(r["gflops_per_s"] / peak)
                            for r in rows.values())
    assert "fp32 GEMM peak" in by["model_step"]["stdout"]
    assert by["loader"]["result"]["loader_tokens_per_s"] > 0
    check_scaling(by["scaling"]["result"], tmp_path)
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


def check_scaling(res: dict, out: Path) -> None:
    """Every curve of bench/scaling.py has one point per size and model, and its fits."""
    sizes, fits = res["sizes"], res["fits"]
    for curve in ("train_mem", "train_seg", "eval_mem"):
        for m in ("lamemo", "xl", "none"):
            assert [r["x"] for r in res[curve][m]] == sizes[curve]
            assert all(r["peak_mib"] >= 0 for r in res[curve][m])
            assert set(fits[curve][m]) == {"time", "peak_mib"}
            assert isinstance(fits[curve][m]["time"]["all"], float)
    for curve in ("train_mem", "eval_mem"):  # lamemo's cost above xl's, one per M
        extra = fits[curve]["lamemo_minus_xl"]["time"]
        assert len(extra["extra"]) == len(sizes[curve]) and isinstance(extra["linear"], bool)
        assert f"{'training step time' if curve == 'train_mem' else 'evaluation'}" in res["report"]
    assert set(res["ckpt"]) == {f"zero{s}" for s in sizes["ckpt_stages"]}
    for stage, rows in res["ckpt"].items():
        assert [r["d_model"] for r in rows] == sizes["ckpt_d"]
        assert all(r["save_s"] > 0 and r["load_s"] > 0 and r["bytes"] > 0 for r in rows)
        assert isinstance(fits["ckpt"][stage]["save_s"], float)
    params = [r["x"] for r in res["ckpt"]["zero3"]]
    assert params == sorted(params) and params[0] > 0  # counted before ZeRO-3 partitions them
    toks = res["config"]["tokenizers"].split(",")
    assert set(fits["prepare"]) == set(toks)
    for t in toks:
        assert [r["x"] for r in res["prepare"][t]] == [
            mb for mb in sizes["prepare_mb"] if mb <= sizes["prepare_cap_mb"].get(t, mb)]
        assert all(r["mb_per_s"] > 0 for r in res["prepare"][t])
    assert [r["x"] for r in res["loader"]] == sizes["loader_rows"]
    assert isinstance(fits["loader"]["tokens_per_s"], float)
    state = {(r["memory"], r["layers"]): r["bytes_per_stream"] for r in res["state"]}
    assert state[("none", 4)] == 0 and state[("xl", 4)] == 2 * state[("xl", 2)]
    for png in res["plots"]:
        assert (out / png).is_file()
