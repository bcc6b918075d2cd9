"""Training logs: the logged loss and grad norm are means over the log interval, the console says
step/total, tokens, elapsed and ETA and ends with a one-line summary, the per-segment eval curves
are drawn over training steps, and a 2-stage pipeline logs the same (real) grad norm as one
process training the same streams."""

from __future__ import annotations

import json
import math

import pytest
from train_support import spawn, write_config

TRAIN = {"max_steps": 6, "log_interval": 3, "eval_interval": 3, "eval_max_segments": 3}


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_interval_means_progress_summary_and_pipeline_grad_norm(corpus, tmp_path):
    cfg = write_config(tmp_path / "one.yaml", corpus, tmp_path / "one", train=TRAIN,
                       parallel={"zero_stage": 0}, logging={"tensorboard": True})
    (res,) = spawn(cfg, nproc=1)
    assert res.returncode == 0, res.stdout[-3000:]
    recs = _records(tmp_path / "one")
    steps = {r["step"]: r["loss"] for r in recs if "loss" in r and "eval" not in r}
    intervals = {r["step"]: r["interval"] for r in recs if "interval" in r}
    assert sorted(intervals) == [3, 6]
    for end, iv in intervals.items():
        mean = sum(steps[s] for s in range(end - 2, end + 1)) / 3
        assert iv["train/loss"] == pytest.approx(mean, rel=1e-12)
        assert iv["train/loss"] != pytest.approx(steps[end], rel=1e-9)  # not the last step's
        assert iv["train/bits_per_byte"] == pytest.approx(mean / math.log(2), rel=1e-12)
        assert iv["progress/tokens"] == end * 2 * 16  # micro 2 × N 16 per step
        assert math.isfinite(iv["train/grad_norm"]) and iv["train/grad_norm"] > 0
    out = res.stdout
    assert "step 3/6 | loss " in out and "| ETA 0:" in out and "| elapsed 0:" in out
    assert "| 96 tokens |" in out and "bits_per_byte" in out
    summary = [r["summary"] for r in recs if "summary" in r]
    assert len(summary) == 1 and summary[0]["step"] == 6 and summary[0]["tokens"] == 192
    evals = [r for r in recs if "eval" in r]
    best = min(evals, key=lambda r: r["eval"]["loss"])
    assert summary[0]["best_eval"]["loss"] == best["eval"]["loss"]
    assert summary[0]["last_eval"]["step"] == 6
    last_line = out.strip().splitlines()[-1]
    assert last_line.startswith("done: step 6 | 192 tokens") and "best eval valid" in last_line

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "one" / "tensorboard"))
    events.Reload()
    curve = events.Scalars("eval_by_segment/valid_seg0002-0002")
    assert [e.step for e in curve] == [3, 6]  # over training steps, not segment indices
    assert curve[-1].value == pytest.approx(evals[-1]["eval"]["loss_by_segment"][2], rel=1e-6)
    assert "eval/valid_bits_per_byte" in events.Tags()["scalars"]

    pipe_cfg = write_config(tmp_path / "pipe.yaml", corpus, tmp_path / "pipe", train=TRAIN,
                            parallel={"zero_stage": 0, "pipeline_stages": 2})
    results = spawn(pipe_cfg, nproc=2)
    assert all(r.returncode == 0 for r in results), results[0].stdout[-3000:]
    piped = {r["step"]: r["interval"] for r in _records(tmp_path / "pipe") if "interval" in r}
    for end, iv in intervals.items():
        assert piped[end]["train/loss"] == pytest.approx(iv["train/loss"], rel=1e-5)
        assert piped[end]["train/grad_norm"] == pytest.approx(iv["train/grad_norm"], rel=1e-4)
    assert "gnorm nan" not in results[0].stdout


@pytest.mark.unit
def test_segment_buckets_and_eval_progress(tmp_path, capsys):
    from lamemo_ds.evaluation import EvalResult
    from lamemo_ds.train.metrics import Metrics, bucket_losses, segment_buckets

    assert segment_buckets(10) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 9)]
    r = EvalResult(loss=0.0, tokens=6, by_segment=[1.0, 2.0, 3.0, 6.0],
                   tokens_by_segment=[1, 1, 2, 1])
    assert bucket_losses(r) == {"seg0000-0000": 1.0, "seg0001-0001": 2.0,
                                "seg0002-0003": pytest.approx(4.0)}  # token-weighted
    m = Metrics(tmp_path, enabled=True, tensorboard=False)
    tick = m.eval_progress(7, "valid", "reset", every_s=0.0)
    tick(1, 4)
    tick(4, 4)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("eval        7 | valid (reset memory) segment 1/4 |")
    assert "segment 4/4" in out[1] and "ETA 0:00:00" in out[1]
    m.close()
