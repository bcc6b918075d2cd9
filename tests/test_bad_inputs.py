"""Bad inputs: every ordinary mistake ends in one line on stderr and an exit code, early, with
nothing left behind; the scenarios that have a right outcome (a fresh start then a requeue, a
bit-flipped export, a stop signal in the final evaluation) do the right thing.

Each case runs `lamemo ...` in this process (none of them may start a process group: they all
fail before) and asserts the exit code, that stderr names the problem and holds no traceback,
and that no file appeared or changed under the shared fixtures or the case's own folder. The
fixtures (one byte corpus, one BPE corpus, one 4-step run with `vocab_size: auto`, its
consolidated and hf exports, corrupt copies) are built once for the module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from train_support import PY, env, spawn, write_config

from lamemo_ds.cli import main
from lamemo_ds.config.derive import World
from lamemo_ds.config.load import load_config
from lamemo_ds.convert.convert import write_target
from lamemo_ds.convert.loaded import Loaded
from lamemo_ds.data.tokenizer import tokenizer_files
from lamemo_ds.model import LaMemoLM

pytestmark = pytest.mark.integration
RUN = {"train": {"max_steps": 4}, "checkpoint": {"interval": 2},
       "model": {"vocab_size": "auto"}}  # the shared run's sections (over train_support.TINY)


@dataclass
class World_:
    """Paths of the shared fixtures."""

    data: Path  # byte-level stdlib corpus (vocab 257)
    bpe: Path  # BPE corpus, vocab 300
    empty_valid: Path  # a corpus whose valid split holds no token
    run: Path  # a finished 4-step run (checkpoints step 2 and 4)
    exp: Path  # its consolidated export
    hf: Path  # its hf export
    bad_exp: Path  # exp with one flipped bit in model.safetensors
    bad_run: Path  # run whose newest checkpoint (step 4) has one flipped bit
    bpe_exp: Path  # a vocab-300 model with the BPE tokenizer
    tok_exp: Path  # exp with another byte tokenizer file (same vocab, another id)
    root: Path


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def _cli(*argv: str) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def w(tmp_path_factory, corpus) -> World_:
    root = tmp_path_factory.mktemp("bad_inputs")
    _cli("prepare", "--corpus", "stdlib", "--tokenizer", "bpe", "--bpe-vocab", "300",
         "--max-bytes", "40K", "--out", root / "bpe", "--quiet")
    (root / "js").mkdir()
    (root / "js" / "train.jsonl").write_text(json.dumps({"text": "some training text " * 20}))
    (root / "js" / "valid.jsonl").write_text(json.dumps({"text": "   "}))
    _cli("prepare", "--corpus", "jsonl", "--input", root / "js", "--out", root / "ev", "--quiet")
    cfg = write_config(root / "run.yaml", corpus, root / "run", **RUN)
    r = subprocess.run([PY, "-m", "lamemo_ds.cli", "train", "--config", str(cfg)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = root / "run"
    _cli("convert", "--from", "deepspeed", run, "--to", "consolidated", root / "exp", "--quiet")
    _cli("convert", "--from", "deepspeed", run, "--to", "hf", root / "hf", "--quiet")
    shutil.copytree(root / "exp", root / "bad_exp")
    _flip(root / "bad_exp" / "model.safetensors", 0.9)
    shutil.copytree(run, root / "bad_run")
    _flip(root / "bad_run" / "checkpoints" / "step-00000004" / "deepspeed" /
          "mp_rank_00_model_states.pt")
    shutil.copytree(root / "exp", root / "tok_exp")
    desc = next(p for p in (root / "tok_exp" / n for n in ("lamemo_tokenizer.json",
                                                           "tokenizer.json")) if p.is_file())
    desc.write_text(json.dumps(dict(json.loads(desc.read_text()), note="another")))
    bpe_cfg = load_config(cfg, ["model.vocab_size=300"]).model
    write_target("consolidated", Loaded(model=LaMemoLM(bpe_cfg), source="t",
                                        tokenizer_files=tokenizer_files(root / "bpe")),
                 root / "bpe_exp", quiet=True)
    return World_(data=corpus, bpe=root / "bpe", empty_valid=root / "ev", run=run,
                  exp=root / "exp", hf=root / "hf", bad_exp=root / "bad_exp",
                  bad_run=root / "bad_run", bpe_exp=root / "bpe_exp",
                  tok_exp=root / "tok_exp", root=root)


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file (size, mtime) and folder under `roots`: what a failed command must not touch."""
    out: dict[str, tuple] = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ("dir",)
    return out


# ---- the cases: name -> (argv from (world, scratch folder), exit code, what stderr says) -------
def _train(w: World_, t: Path, *extra: str, out: Path | None = None,
           folder: Path | None = None, **sections) -> list:
    cfg = write_config(t / "c.yaml", folder or w.data, out or t / "run", **sections)
    return ["train", "--config", cfg, *extra]


def _resume(w: World_, t: Path, **changes) -> list:
    """A plain `lamemo train` into the shared run, with some sections changed."""
    sections = {k: dict(v) for k, v in RUN.items()}
    for k, v in changes.items():
        sections.setdefault(k, {}).update(v)
    return _train(w, t, out=w.run, **sections)


def _eval(w: World_, *extra, model: Path | None = None, data: Path | None = None) -> list:
    return ["eval", "--model", model or w.exp, "--data", data or w.data, "--no-progress", *extra]


def _gen(w: World_, *extra, model: Path | None = None) -> list:
    return ["generate", "--model", model or w.exp, "--max-new-tokens", "3", *extra]


CASES = {
    # prepare
    "prepare: no --out": (lambda w, t: ["prepare", "--corpus", "stdlib"], 2, ["--out"]),
    "prepare: 2 split sizes": (lambda w, t: ["prepare", "--out", t / "o", "--split-sizes",
                                             "1,2"], 2, ["--split-sizes"]),
    "prepare: missing input": (lambda w, t: ["prepare", "--corpus", "jsonl", "--input",
                                             t / "nope.jsonl", "--out", t / "o"], 2,
                               ["nope.jsonl", "not found"]),
    "prepare: enwik8 without input": (lambda w, t: ["prepare", "--corpus", "enwik8", "--out",
                                                    t / "o"], 2, ["--input"]),
    "prepare: valid fraction 1.5": (lambda w, t: ["prepare", "--out", t / "o", "--valid-frac",
                                                  "1.5"], 2, ["--valid-frac 1.5"]),
    "prepare: fractions sum to 1": (lambda w, t: ["prepare", "--out", t / "o", "--valid-frac",
                                                  "0.5", "--test-frac", "0.5"], 2, ["below 1"]),
    "prepare: 0 workers": (lambda w, t: ["prepare", "--out", t / "o", "--workers", "0"], 2,
                           ["--workers 0"]),
    "prepare: tiny shard size": (lambda w, t: ["prepare", "--out", t / "o", "--shard-size",
                                               "10", "--quiet"], 2, ["--shard-size"]),
    "prepare: empty input folder": (lambda w, t: (t / "in").mkdir() or [
        "prepare", "--corpus", "files", "--input", t / "in", "--out", t / "o"], 2,
        ["no files match"]),
    "prepare: other options on a prepared folder": (lambda w, t: [
        "prepare", "--corpus", "stdlib", "--out", w.data, "--max-bytes", "10K"], 2, ["--force"]),
    "prepare: recall gap 0": (lambda w, t: ["prepare", "--corpus", "recall", "--out", t / "o",
                                            "--recall-gap", "0"], 2, ["gap"]),
    "prepare: verify a missing folder": (lambda w, t: ["prepare", "--verify", t / "nope"], 2,
                                         ["does not exist"]),
    # train: data and contract
    "train: missing data folder": (lambda w, t: _train(w, t, folder=t / "nodata"), 2,
                                   ["data.path=", "does not exist", "lamemo prepare"]),
    "train: split folder as data": (lambda w, t: _train(w, t, folder=w.data / "train"), 2,
                                    ["split folder", "stdlib, and choose"]),
    "train: folder without manifest": (lambda w, t: (t / "d").mkdir() or _train(
        w, t, folder=t / "d"), 2, ["manifest.json"]),
    "train: unknown valid split": (lambda w, t: _train(w, t, data={"valid_split": "dev"}), 2,
                                   ["data.valid_split='dev'", "valid"]),
    "train: unknown train split": (lambda w, t: _train(w, t, data={"train_split": "nope"}), 2,
                                   ["data.train_split='nope'"]),
    "train: empty valid split": (lambda w, t: _train(w, t, folder=w.empty_valid), 2,
                                 ["data.valid_split='valid'", "is empty"]),
    "train: train split too small": (lambda w, t: _train(
        w, t, train={"micro_batch_size": 100000}), 2, ["data.train_split", "tokens"]),
    "train: valid split too small": (lambda w, t: _train(w, t, eval={"batch_size": 100000}), 2,
                                     ["data.valid_split", "tokens"]),
    "train: vocab 300 on byte data": (lambda w, t: _train(w, t, model={"vocab_size": 300}), 2,
                                      ["300", "257"]),
    "train: default vocab on BPE data": (lambda w, t: _train(w, t, folder=w.bpe), 2,
                                         ["257", "300", "auto"]),
    "train: vocab not a number": (lambda w, t: _train(w, t, model={"vocab_size": "many"}), 2,
                                  ["model.vocab_size", "'auto'"]),
    "train: unknown key": (lambda w, t: _train(w, t, train={"max_stepz": 3}), 2, ["max_stepz"]),
    "train: missing config": (lambda w, t: ["train", "--config", t / "none.yaml"], 2,
                              ["none.yaml"]),
    "train: output_dir is a file": (lambda w, t: (t / "f").write_text("x") and _train(
        w, t, out=t / "f"), 2, ["is a file"]),
    "train: more stages than layers": (lambda w, t: _train(
        w, t, parallel={"pipeline_stages": 3, "zero_stage": 0}), 2, ["pipeline_stages=3"]),
    # train: the run folder
    "train: --no-resume over checkpoints": (lambda w, t: _resume(w, t) + ["--no-resume"], 2,
                                            ["already holds checkpoints", "--overwrite",
                                             "train.output_dir"]),
    "train: resume=false over checkpoints": (lambda w, t: _resume(
        w, t, checkpoint={"resume": False}), 2, ["--overwrite"]),
    "train: resume with another d_model": (lambda w, t: _resume(w, t, model={"d_model": 64}), 2,
                                           ["model.d_model: 32 in the checkpoint, 64 now"]),
    "train: resume with another layer count": (lambda w, t: _resume(
        w, t, model={"n_layer": 3}, optim={"lr": 1e-3}), 2, ["model.n_layer"]),
    "train: resume with more steps": (lambda w, t: _resume(w, t, train={"max_steps": 8}), 2,
                                      ["train.max_steps: 4 in the checkpoint, 8 now",
                                       "train.allow_schedule_change=true"]),
    "train: resume with another lr": (lambda w, t: _resume(w, t, optim={"lr": 1e-3}), 2,
                                      ["optim.lr", "allow_schedule_change"]),
    "train: resume with warmup": (lambda w, t: _resume(w, t, optim={"warmup_steps": 2}), 2,
                                  ["optim.warmup_steps"]),
    # eval
    "eval: missing data folder": (lambda w, t: _eval(w, data=t / "nodata"), 2,
                                  ["--data=", "does not exist"]),
    "eval: split folder as data": (lambda w, t: _eval(w, data=w.data / "valid"), 2,
                                   ["split folder", "stdlib, and choose the split with --split"]),
    "eval: unknown split": (lambda w, t: _eval(w, "--split", "dev"), 2, ["--split='dev'"]),
    "eval: empty split": (lambda w, t: _eval(w, "--split", "valid", data=w.empty_valid), 2,
                          ["is empty"]),
    "eval: partial score recorded": (lambda w, t: _eval(w, "--record", "--max-segments", "5"),
                                     2, ["--record", "--max-segments 5"]),
    "eval: record into a run folder": (lambda w, t: _eval(w, "--record", model=w.run), 2,
                                       ["--record", "convert"]),
    "eval: BPE model on byte data": (lambda w, t: _eval(w, model=w.bpe_exp), 2, ["300", "257"]),
    "eval: byte model on BPE data": (lambda w, t: _eval(w, data=w.bpe), 2, ["257", "300"]),
    "eval: another tokenizer, same vocab": (lambda w, t: _eval(w, "--no-verify",
                                                               model=w.tok_exp), 2,
                                            ["tokenizer"]),
    "eval: bit-flipped export": (lambda w, t: _eval(w, model=w.bad_exp), 1,
                                 ["model.safetensors is corrupt", "--no-verify"]),
    "eval: batch size 0": (lambda w, t: _eval(w, "--batch-size", "0"), 2, ["--batch-size"]),
    "eval: negative max segments": (lambda w, t: _eval(w, "--max-segments", "-1"), 2,
                                    ["--max-segments"]),
    "eval: memory length not a number": (lambda w, t: _eval(w, "--mem-len", "32,6x"), 2,
                                         ["--mem-len", "'6x'"]),
    "eval: negative memory length": (lambda w, t: _eval(w, "--mem-len", "-4"), 2,
                                     ["--mem-len", "-4"]),
    "eval: record a sweep": (lambda w, t: _eval(w, "--record", "--mem-len", "8,16",
                                                model=w.exp), 2, ["--record", "--mem-len"]),
    "eval: missing model": (lambda w, t: _eval(w, model=t / "nomodel"), 1, ["does not exist"]),
    # generate
    "generate: top-p 1.5": (lambda w, t: _gen(w, "--top-p", "1.5"), 2, ["--top-p 1.5"]),
    "generate: top-p 0": (lambda w, t: _gen(w, "--top-p", "0"), 2, ["--top-p"]),
    "generate: temperature -1": (lambda w, t: _gen(w, "--temperature", "-1"), 2,
                                 ["--temperature"]),
    "generate: top-k -3": (lambda w, t: _gen(w, "--top-k", "-3"), 2, ["--top-k"]),
    "generate: -1 new tokens": (lambda w, t: _gen(w, "--max-new-tokens", "-1"), 2,
                                ["--max-new-tokens"]),
    "generate: negative mem-len": (lambda w, t: _gen(w, "--mem-len", "-1"), 2, ["--mem-len"]),
    "generate: bit-flipped export": (lambda w, t: _gen(w, model=w.bad_exp), 1,
                                     ["model.safetensors is corrupt"]),
    "generate: missing model": (lambda w, t: _gen(w, model=t / "nomodel"), 1,
                                ["does not exist"]),
    "generate: BPE tokenizer for a byte model": (lambda w, t: _gen(w, "--tokenizer", w.bpe), 2,
                                                 ["vocab_size 257", "300"]),
    "generate: tokenizer folder without one": (lambda w, t: (t / "e").mkdir() or _gen(
        w, "--tokenizer", t / "e"), 2, ["no tokenizer in"]),
    # convert
    "convert: bit-flipped export": (lambda w, t: [
        "convert", "--from", "consolidated", w.bad_exp, "--to", "hf", t / "o"], 1,
        ["model.safetensors is corrupt", "nothing was written"]),
    "convert: output exists": (lambda w, t: (t / "o").mkdir() or (t / "o" / "x").write_text(
        "keep") and ["convert", "--from", "consolidated", w.exp, "--to", "hf", t / "o"], 1,
        ["--force"]),
    "convert: missing run": (lambda w, t: [
        "convert", "--from", "deepspeed", t / "norun", "--to", "hf", t / "o"], 1,
        ["does not exist"]),
    "convert: bad shard size": (lambda w, t: [
        "convert", "--from", "consolidated", w.exp, "--to", "hf", t / "o", "--max-shard-size",
        "lots"], 2, ["--max-shard-size"]),
    "convert: bad dtype": (lambda w, t: [
        "convert", "--from", "consolidated", w.exp, "--to", "hf", t / "o", "--dtype", "fp8"], 2,
        ["--dtype"]),
    # inspect
    "inspect: missing path": (lambda w, t: ["inspect", t / "nope"], 1, ["does not exist"]),
    "inspect: folder without checkpoints": (lambda w, t: (t / "e").mkdir() or [
        "inspect", t / "e"], 1, ["no complete checkpoint"]),
    "inspect: corrupt step folder": (lambda w, t: [
        "inspect", w.bad_run / "checkpoints" / "step-00000004"], 1,
        ["mp_rank_00_model_states.pt"]),
    # verify
    "verify: bit-flipped export": (lambda w, t: ["verify", w.bad_exp], 1,
                                   ["model.safetensors is corrupt"]),
    "verify: newest checkpoint corrupt": (lambda w, t: ["verify", w.bad_run], 1,
                                          ["step-00000004", "mp_rank_00_model_states.pt",
                                           "step-00000002"]),
    "verify: missing path": (lambda w, t: ["verify", t / "nope"], 1, ["does not exist"]),
    "verify: export missing a file": (lambda w, t: shutil.copytree(w.exp, t / "x") and (
        t / "x" / "lamemo_tokenizer.json").unlink() or ["verify", t / "x"], 1,
        ["missing file lamemo_tokenizer.json"]),
    "verify: edited hf code": (lambda w, t: shutil.copytree(w.hf, t / "h") and (
        t / "h" / "modeling_lamemo.py").write_text("# edited\n") and ["verify", t / "h"], 1,
        ["modeling_lamemo.py"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, w, tmp_path, lamemo):
    build, code, says = CASES[name]
    argv = [str(a) for a in build(w, tmp_path)]
    before = _snapshot(w.root, w.data, tmp_path)
    r = lamemo(*argv)
    out = r.stdout + r.stderr
    assert r.returncode == code, f"{name}: exit {r.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    for text in says:
        assert text in out, f"{name}: {text!r} not in {out[-2000:]!r}"
    if code == 2:  # a user error is one line: the command name and the problem
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("lamemo", "usage"))]
        assert lines, r.stderr
    assert _snapshot(w.root, w.data, tmp_path) == before, f"{name} left or changed files"


def test_the_suite_covers_every_command():
    commands = {argv_name.split(":")[0] for argv_name in CASES}
    assert commands >= {"prepare", "train", "eval", "generate", "convert", "inspect", "verify"}
    assert len(CASES) >= 40


# ---- the scenarios with a right outcome ---------------------------------------------------------
def test_vocab_auto_is_taken_from_the_data(w):
    from lamemo_ds.commands.train import preflight

    saved = yaml.safe_load((w.run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 257  # the shared run was configured with auto
    cfg = load_config(w.root / "run.yaml", [f"data.path={w.bpe}", "checkpoint.resume=false",
                                            "train.output_dir=/nonexistent/run"])
    assert cfg.model.vocab_size == "auto"
    resolved, plan = preflight(cfg, World())
    assert resolved.model.vocab_size == 300 and plan.dp_size == 1


def test_fresh_start_then_requeue_resumes_the_new_run(w, tmp_path):
    """--overwrite moves the old run aside (nothing deleted); the next plain run resumes the
    new run, not the old run's newer step."""
    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    cfg = write_config(tmp_path / "c.yaml", w.data, run, **dict(RUN, train={"max_steps": 3}))

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "lamemo_ds.cli", "train", "--config", str(cfg),
                               *extra], env=env(), capture_output=True, text=True, timeout=300)

    r = train("--overwrite")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    aside = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and "moved to" in r.stdout
    old = aside[0]
    assert sorted(p.name for p in (old / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004"]
    assert (old / "metrics.jsonl").is_file() and (old / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000003"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]  # the new run's history only
    r = train()  # a requeue: the same command without flags
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000003'} at step 3" in r.stdout
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("checkpoint ")]  # not twice


def test_bit_flipped_export_scores_only_with_no_verify(w, lamemo):
    r = lamemo(*map(str, _eval(w, "--memory", "carried", "--max-segments", "1", "--no-verify",
                               model=w.bad_exp)))
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] > 0, r.stderr[-2000:]
    r = lamemo(*map(str, _eval(w, "--memory", "carried", "--max-segments", "1")))
    assert r.returncode == 0, r.stderr[-2000:]  # the intact export


def test_recorded_eval_keeps_the_export_verified(w, tmp_path, lamemo):
    shutil.copytree(w.exp, tmp_path / "e")
    r = lamemo(*map(str, _eval(w, "--memory", "carried", "--record", "--split", "train",
                               "--batch-size", "1", model=tmp_path / "e", data=w.empty_valid)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "e" / "eval.json").is_file()
    v = lamemo("verify", str(tmp_path / "e"))
    assert v.returncode == 0 and "ok   manifest" in v.stdout, v.stdout


def test_stop_signal_in_the_final_eval_saves_the_step_once(w, tmp_path):
    """The final checkpoint is written before the final evaluation; a stop signal there exits
    for a requeue without writing the same step again."""
    sections = dict(RUN, train={"max_steps": 4, "eval_max_segments": 40})  # stop: every 16
    cfg = write_config(tmp_path / "c.yaml", w.data, tmp_path / "run", **sections)
    (res,) = spawn(cfg, nproc=1, args=("--signal-at", "4", "--fault-rank", "0"))
    assert res.returncode == 75, res.stdout[-3000:]
    saves = [ln for ln in res.stdout.splitlines() if ln.startswith("checkpoint ")]
    assert [ln.split()[-1] for ln in saves] == ["2)", "4)"], saves
    assert "step 4 is saved" in res.stdout
    out = res.stdout
    assert out.index("(step 4)") < out.index("evaluation of valid interrupted")  # saved first
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "manifest.json").is_file()


def test_prepare_counts_each_repair_once_and_reports_a_rebuilt_token_file(tmp_path, lamemo,
                                                                           capsys, w):
    from lamemo_ds.data.manifest import open_tokens

    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "alpha"}\nnot json\n{"text": "beta"}\n{"other": 1}\n'
                   '{"text": "gam\\u0000ma"}\n')
    r = lamemo("prepare", "--corpus", "jsonl", "--input", str(src), "--out", str(tmp_path / "d"),
               "--quiet")
    assert r.returncode == 0, r.stderr
    clean = json.loads((tmp_path / "d" / "manifest.json").read_text())["stats"]["clean"]
    assert (clean["bad_json_lines"], clean["missing_text_field"], clean["nul_bytes"]) == (1, 1, 1)
    shutil.copytree(w.data, tmp_path / "data")
    (tmp_path / "data" / "valid" / "tokens.bin").unlink()
    capsys.readouterr()
    tokens = open_tokens(tmp_path / "data", "valid")
    assert len(tokens) > 0 and "rebuilt" in capsys.readouterr().err


def test_the_bad_input_fixtures_are_what_they_say(w):
    assert torch.load(w.run / "checkpoints" / "step-00000004" / "lamemo" / "rank-00000.pt",
                      weights_only=False)["progress"]["step"] == 4
    assert main(["verify", str(w.exp)]) == 0 and main(["verify", str(w.hf)]) == 0


def test_generate_reads_what_eval_reads(w, lamemo):
    """A run folder, one step folder and an export give the same greedy text (the same
    weights: the run's newest checkpoint); the tokenizer of a run is its training data's."""
    texts = []
    for model in (w.run, w.run / "checkpoints" / "step-00000004", w.exp):
        r = lamemo("generate", "--model", str(model), "--prompt", "def ", "--temperature", "0",
                   "--max-new-tokens", "8", "--no-stream")
        assert r.returncode == 0, r.stderr[-2000:]
        texts.append(r.stdout)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("def ")

