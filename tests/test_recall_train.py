"""End to end: `lamemo train` teaches xl and lamemo to retrieve a key from memory.

A smaller version of configs/recall.yaml (fixed seed, loose bounds): on the recall corpus every
key symbol is recalled `gap` = 24 tokens after its first copy while a segment holds only 16, so a
recall target is predictable only through the memory carried from earlier segments. After
training, `lamemo eval --memory both` on the DeepSpeed checkpoint must find

- memory carried: well under the 3 bits per key symbol of a model that cannot see the key;
- memory reset before every segment: near those 3 bits.

That only holds if training carried each stream's memory into its next segment, step after step:
one process, 2 data-parallel processes (with a NaN-skipped step, whose memory must not be
committed) and 2 pipeline stages (stage-local memory banks). One run is also converted to the
consolidated and Hugging Face formats and evaluated there with `--memory reset`.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from train_support import PY, REPO, env, spawn, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CHANCE = 3.0  # log2 of the 8-symbol alphabet
MODEL = {"n_layer": 2, "n_head": 4, "d_model": 128, "d_head": 32, "d_inner": 512,
         "segment_len": 16, "mem_len": 32, "init_std": 0.088}
TRAIN = {"micro_batch_size": 8, "max_steps": 700, "log_interval": 100, "eval_interval": 350,
         "eval_max_segments": 16, "seed": 1234}
LAYOUTS = {  # name -> (processes, config sections)
    "single": (1, {}),
    "dp2": (2, {"parallel": {"zero_stage": 2}}),
    "pp2": (2, {"parallel": {"pipeline_stages": 2, "zero_stage": 0},
                "train": {"grad_accum": 2, "micro_batch_size": 4}}),
}


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall") / "data"
    subprocess.run([PY, "-m", "lamemo_ds.cli", "prepare", "--corpus", "recall", "--out",
                    str(out), "--quiet", "--split-sizes", "400000,16384,16384",
                    "--recall-gap", "24", "--recall-key-len", "4",
                    "--recall-alphabet", "01234567", "--recall-spacing", "8"],
                   check=True, env=env(), cwd=REPO, timeout=300)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, recall_data):
    """(memory, layout) -> (run folder, each rank's output), each trained once per module."""
    done: dict = {}

    def get(memory: str, layout: str):
        if (memory, layout) not in done:
            extra = ("--nan-at", "100", "--fault-rank", "1") if layout == "dp2" else ()
            done[memory, layout] = train(tmp_path_factory.mktemp(f"{memory}-{layout}"),
                                         recall_data, memory, layout, *extra)
        return done[memory, layout]

    return get


def train(tmp_path, data, memory: str, layout: str, *extra: str):
    nproc, sections = LAYOUTS[layout]
    sections = {k: dict(v) for k, v in sections.items()}
    cfg = write_config(
        tmp_path / "c.yaml", data, tmp_path / "run",
        model=dict(MODEL, memory=memory),
        optim={"lr": 0.001, "warmup_steps": 50, "min_lr": 0.0001},
        train=dict(TRAIN, **sections.pop("train", {})), eval={"batch_size": 8},
        **sections)
    results = spawn(cfg, nproc=nproc, args=extra, timeout=900)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank}:\n{r.stdout[-3000:]}"
    return tmp_path / "run", results


def recall_bits(lamemo, model, data, *flags: str) -> dict:
    r = lamemo("eval", "--model", str(model), "--data", str(data), "--split", "test",
               "--batch-size", "8", "--no-progress", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    gain = out.get("memory_gain_bits_per_token")
    return out["recall"]["bits_per_key_symbol"] | {"gain_bpc": gain}


@pytest.mark.parametrize("memory, layout", [
    ("lamemo", "single"), ("xl", "single"),
    ("lamemo", "dp2"), ("xl", "dp2"),
    ("lamemo", "pp2"), ("xl", "pp2"),
])
def test_training_carries_memory_so_keys_are_recalled(trained, recall_data, lamemo, memory,
                                                      layout):
    run, results = trained(memory, layout)
    bits = recall_bits(lamemo, run, recall_data)
    assert bits["carried"] < 0.4 * CHANCE, bits
    assert bits["reset"] > 0.85 * CHANCE, bits
    assert bits["gain_bpc"] > 0.1, bits
    evals = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text()
             .splitlines() if '"eval"' in line]
    assert evals[-1]["memory_gain_bits_per_token"] > 0.1 and evals[-1]["reset"]["memory"] == "reset"
    if layout != "pp2":  # the pipeline's last stage reports a mean loss per micro-batch only
        # (a short valid pass: the keys of each stream's first segments have no memory yet)
        assert evals[-1]["subset_bits"] < evals[-1]["reset"]["subset_bits"] - 1.0
    if layout == "dp2":
        assert "step 101: skipped" in results[0].stdout


def test_exported_model_recalls_in_every_format(trained, tmp_path, recall_data, lamemo):
    run, _ = trained("lamemo", "single")
    ds = recall_bits(lamemo, run, recall_data, "--memory", "reset")
    assert set(ds) == {"reset", "gain_bpc"} and ds["reset"] > 0.85 * CHANCE
    for fmt in ("consolidated", "hf"):
        r = lamemo("convert", "--from", "deepspeed", str(run), "--to", fmt,
                   str(tmp_path / fmt), "--quiet")
        assert r.returncode == 0, r.stderr
        got = recall_bits(lamemo, tmp_path / fmt, recall_data)
        assert got["reset"] == pytest.approx(ds["reset"], rel=1e-6)
        assert got["carried"] < 0.4 * CHANCE and math.isfinite(got["gain_bpc"])
