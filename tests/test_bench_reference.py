"""bench/reference_model.py: loading the authors' code from a user's clone for side-by-side
timing. The live checks need that clone (LAMEMO_REFERENCE_DIR = its `pytorch/` folder): it is
not vendored, so without it they are reported as skipped, never as passed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lamemo_ds.convert import from_reference
from lamemo_ds.model import ModelConfig

REPO = Path(__file__).resolve().parents[1]
# by file path: putting bench/ on sys.path would let its train.py, loader.py, ... shadow names
_spec = importlib.util.spec_from_file_location("reference_model",
                                               REPO / "bench" / "reference_model.py")
reference_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_model)

LIVE = os.environ.get("LAMEMO_REFERENCE_DIR")
needs_clone = pytest.mark.skipif(
    not LIVE, reason="set LAMEMO_REFERENCE_DIR to the pytorch/ folder of a thu-coai/LaMemo clone")


@pytest.mark.unit
def test_a_folder_without_their_model_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no mem_transformer\.py.*thu-coai/LaMemo"):
        reference_model.load(tmp_path)


@pytest.mark.unit
def test_import_snags_of_their_folder_are_bridged_without_touching_it(tmp_path):
    """Their utils parse torch.version.cuda at import and `log_uniform_sampler` is absent from
    their repository: both are bridged, the placeholder is removed after the import, and the
    stand-in sampler refuses to be used. Runs in a fresh interpreter (it imports modules)."""
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "proj_adaptive_softmax.py").write_text(
        "import torch\nCUDA_MAJOR = int(torch.version.cuda.split('.')[0])\n")
    (tmp_path / "mem_transformer.py").write_text(textwrap.dedent("""
        import sys
        sys.path.append('utils')
        from proj_adaptive_softmax import CUDA_MAJOR
        from log_uniform_sampler import LogUniformSampler, sample_logits
        """))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "bench")!r})
        import reference_model
        before = torch.version.cuda
        mod = reference_model.load({str(tmp_path)!r})
        assert torch.version.cuda == before, torch.version.cuda
        try:
            mod.sample_logits()
        except NotImplementedError:
            print("ok")
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def _shape(**over) -> SimpleNamespace:
    base = dict(vocab=50, layers=2, heads=2, d_model=16, d_head=8, d_inner=32, dropout=0.0,
                seg_len=5, mem_len=5)
    return SimpleNamespace(**{**base, **over})


@pytest.mark.unit
@needs_clone
@pytest.mark.parametrize("memory,mem_len", [("lamemo", 5), ("lamemo", 3), ("xl", 7)])
def test_their_live_model_and_ours_agree_through_from_reference(memory, mem_len):
    """The model the benchmark times is the one we match: their freshly built model, converted
    with from_reference, gives our model the same NLL over consecutive segments (float64)."""
    mod = reference_model.load(LIVE)
    a = _shape(mem_len=mem_len)
    torch.manual_seed(3)
    theirs = reference_model.build(mod, memory, a, init_std=0.3).double().eval()
    cfg = ModelConfig(vocab_size=a.vocab, n_layer=a.layers, n_head=a.heads, d_model=a.d_model,
                      d_head=a.d_head, d_inner=a.d_inner, dropout=0.0, dropatt=0.0,
                      memory=memory, segment_len=a.seg_len, mem_len=a.mem_len,
                      attention_impl="eager")
    ours = from_reference(theirs.state_dict(), cfg, dtype=torch.float64).eval()
    tokens = torch.randint(0, a.vocab, (2, 4 * a.seg_len + 1),
                           generator=torch.Generator().manual_seed(4))
    mems, state = [], None
    with torch.no_grad():
        for s in range(4):
            x = tokens[:, s * a.seg_len:(s + 1) * a.seg_len]
            y = tokens[:, s * a.seg_len + 1:(s + 1) * a.seg_len + 1]
            ret, _ = theirs(x.t().contiguous(), y.t().contiguous(), *mems)
            mems = ret[1:]
            out = ours(x, state, targets=y)
            state = out.state
            torch.testing.assert_close(out.nll, ret[0].t(), atol=1e-5, rtol=0,
                                       msg=f"segment {s}")


@pytest.mark.unit
@needs_clone
def test_their_training_step_runs_and_learns():
    """The timed step is a real training step: the loss on one repeated segment falls."""
    mod = reference_model.load(LIVE)
    a = _shape(dropout=0.1)
    data = torch.randint(0, a.vocab, (2, a.seg_len + 1),
                         generator=torch.Generator().manual_seed(5))
    step = reference_model.make_step(mod, "lamemo", a, data)
    losses = torch.tensor([step(0) for _ in range(80)])
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean() - 0.3, losses


# ---- bench/reference_curve.py: their curve, trained like one of our runs -------------------
sys.modules.setdefault("reference_model", reference_model)  # its import of the module above
_cspec = importlib.util.spec_from_file_location("reference_curve",
                                                REPO / "bench" / "reference_curve.py")
reference_curve = importlib.util.module_from_spec(_cspec)
_cspec.loader.exec_module(reference_curve)


def _run_folder(root: Path, corpus: Path, *sets: str) -> Path:
    """A configured run folder (config.yaml only): debug.yaml's tiny model on `corpus`."""
    from lamemo_ds.config.load import dump_config, load_config

    cfg = load_config(REPO / "configs" / "debug.yaml", [
        f"data.path={corpus}", "model.init_std=0.088", "optim.lr=3e-3", "optim.warmup_steps=1",
        "train.log_interval=1", "train.eval_max_segments=3", "eval.batch_size=4",
        "eval.memory_gain=true", f"train.output_dir={root / 'ours'}", "checkpoint.interval=0",
        "logging.tensorboard=false", *sets])
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


@pytest.mark.unit
def test_reference_curve_bad_inputs_are_one_line_exit_2(tmp_path, corpus, capsys):
    """No config.yaml, a memory kind the reference lacks, no clone at --reference-dir."""
    none = _run_folder(tmp_path / "a", corpus, "model.memory=none")
    good = _run_folder(tmp_path / "b", corpus)
    out = str(tmp_path / "x.json")
    cases = [([str(tmp_path), str(tmp_path)], "no config.yaml there"),
             ([str(none), str(tmp_path)], "model.memory='none', which the reference lacks"),
             ([str(good), str(tmp_path / "nope")], "no mem_transformer.py there")]
    for (run, ref), words in cases:
        capsys.readouterr()
        code = reference_curve.main(["--run", run, "--reference-dir", ref, "--out", out])
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert not Path(out).exists()


@pytest.mark.unit
@needs_clone
def test_reference_curve_tiny_writes_quality_json_and_learns(tmp_path, corpus):
    run = _run_folder(tmp_path, corpus)
    out = tmp_path / "ref.json"
    assert reference_curve.main(["--run", str(run), "--reference-dir", LIVE, "--out", str(out),
                                 "--tiny"]) == 0
    rec = json.loads(out.read_text())
    assert {"memory", "seed", "seconds", "threads", "evals", "train_curve"} <= set(rec)
    assert (rec["memory"], rec["seed"], rec["source"]) == ("lamemo", 1111, "reference")
    assert [e["step"] for e in rec["evals"]] == [3, 6]
    assert [s for s, _ in rec["train_curve"]] == [1, 2, 3, 4, 5, 6]
    for e in rec["evals"]:
        assert {"train_seconds", "bpc", "bpc_reset", "gain_bpc", "by_segment"} <= set(e)
        assert all(math.isfinite(v) for v in (e["bpc"], e["bpc_reset"], *e["by_segment"]))
    assert 0 < rec["evals"][0]["train_seconds"] < rec["evals"][1]["train_seconds"]
    assert rec["evals"][1]["bpc"] < rec["evals"][0]["bpc"] - 0.1, rec["evals"]
    bpc = [b for _, b in rec["train_curve"]]
    assert sum(bpc[-2:]) < sum(bpc[:2]), bpc


@pytest.mark.integration
@needs_clone
@pytest.mark.parametrize("memory,sets", [("lamemo", ()), ("xl", ("train.grad_accum=2",
                                                                  "train.micro_batch_size=2"))])
def test_reference_curve_is_our_trainers_curve(tmp_path, corpus, memory, sets):
    """Same weights, batches, loss scaling, Adam, schedule, clipping and eval segments: with
    dropout off, their curve is our trainer's (step 1 to 1e-5, then to 1e-4), evals included."""
    run = _run_folder(tmp_path, corpus, f"model.memory={memory}", "train.max_steps=6",
                      "train.eval_interval=3", *sets)
    res = subprocess.run([sys.executable, "-m", "lamemo_ds.cli", "train", "--config",
                          str(run / "config.yaml")], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO),
                                            OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = (tmp_path / "ours" / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in metrics.splitlines()]
    ours = [e["interval"]["train/loss"] / math.log(2) for e in lines if "interval" in e]
    our_evals = [(e["step"], e["eval"]["loss"] / math.log(2),
                  e["eval"]["reset"]["loss"] / math.log(2)) for e in lines if "eval" in e]
    out = tmp_path / "ref.json"
    assert reference_curve.main(["--run", str(run), "--reference-dir", LIVE,
                                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    theirs = [b for _, b in rec["train_curve"]]
    assert len(theirs) == len(ours) == 6
    assert abs(theirs[0] - ours[0]) < 1e-5, (theirs[0], ours[0])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert [s for s, _, _ in our_evals] == [e["step"] for e in rec["evals"]] == [3, 6]
    torch.testing.assert_close([(e["bpc"], e["bpc_reset"]) for e in rec["evals"]],
                               [(b, r) for _, b, r in our_evals], atol=1e-4, rtol=0)
