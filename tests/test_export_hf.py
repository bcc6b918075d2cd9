"""The Hugging Face export loads through transformers (trust_remote_code=True) in a process where
lamemo_ds cannot be imported, and matches our logits over 3 segments with carried memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.convert.hf import build_modeling_source
from lamemo_ds.data.tokenizer import load_tokenizer
from lamemo_ds.model import LaMemoLM

SEG = 8
CONFIGS = {
    "lamemo": ModelConfig(vocab_size=61, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                          dropout=0.0, segment_len=SEG, mem_len=SEG),
    "xl_adaptive": ModelConfig(vocab_size=61, n_layer=2, n_head=2, d_model=16, d_head=8,
                               d_inner=32, dropout=0.0, segment_len=SEG, mem_len=2 * SEG,
                               memory="xl", cutoffs=(20, 40), div_val=2),
}

# Runs in a fresh interpreter: lamemo_ds is made unimportable, so each folder must stand alone.
# Arguments: FOLDER IN OUT, repeated (one interpreter for every export: importing transformers
# takes seconds).
LOADER = '''
import sys
sys.modules["lamemo_ds"] = None
import torch
from transformers import AutoModelForCausalLM
for folder, inp, outp in zip(*[iter(sys.argv[1:])] * 3):
    data = torch.load(inp)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    mems, logits = None, []
    with torch.no_grad():
        for i in range(3):
            seg = data["x"][:, i * 8:(i + 1) * 8]
            out = model(seg, mems=mems, labels=data["y"][:, i * 8:(i + 1) * 8])
            mems = out.mems
            logits.append(out.logits)
            assert out.loss is not None and out.nll.shape == seg.shape
    torch.save({"logits": torch.stack(logits), "class": type(model).__name__}, outp)
'''


def ours(model: LaMemoLM, x: torch.Tensor) -> torch.Tensor:
    s, out = None, []
    with torch.no_grad():
        for i in range(3):
            o = model(x[:, i * SEG:(i + 1) * SEG], s, return_logits=True)
            s = o.state
            out.append(o.logits)
    return torch.stack(out)


@pytest.mark.unit
def test_modeling_file_is_generated_from_our_sources():
    src = build_modeling_source()
    assert "class LaMemoLM(nn.Module)" in src and "def merge_lookahead" in src
    assert "from ..ops" not in src and "from ..config" not in src and "lamemo_ds imports" not in src


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Every CONFIGS model exported to HF and loaded back by one transformers process:
    name -> our model, its input, the files written and what the loader computed."""
    root = tmp_path_factory.mktemp("export")
    runs, argv = {}, []
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = LaMemoLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out = root / f"hf_{name}"
        files = write_target("hf", Loaded(model=model, source="test"), out, quiet=True)
        x = torch.randint(0, 61, (2, 3 * SEG + 1), generator=torch.Generator().manual_seed(3))
        torch.save({"x": x[:, :-1], "y": x[:, 1:]}, root / f"{name}.in.pt")
        argv += [str(out), str(root / f"{name}.in.pt"), str(root / f"{name}.got.pt")]
        runs[name] = {"model": model, "x": x, "files": files}
    (root / "load.py").write_text(LOADER)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HOME": str(root / "hf_home"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(root / "load.py"), *argv], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in runs:
        runs[name]["got"] = torch.load(root / f"{name}.got.pt")
    return runs


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_folder_matches_our_logits_without_lamemo_ds(name, exported):
    run = exported[name]
    assert {"config.json", "modeling_lamemo.py", "configuration_lamemo.py",
            "model.safetensors", "README.md"} <= set(run["files"])
    assert run["got"]["class"] == "LaMemoForCausalLM"
    torch.testing.assert_close(run["got"]["logits"], ours(run["model"], run["x"][:, :-1]),
                               rtol=0, atol=1e-6)


# AutoTokenizer + AutoModelForCausalLM + generate() in a fresh interpreter without lamemo_ds.
# Argument: a JSON job file {"folders": {name: {"texts": [...], "runs": [[prompt, seed, kw]]}}}.
GENERATE = '''
import json, sys
sys.modules["lamemo_ds"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs, got = json.load(open(sys.argv[1])), {}
for folder, job in jobs.items():
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    res = got[folder] = {"ids": [tok(t)["input_ids"] for t in job["texts"]], "runs": []}
    res["decoded"] = [tok.decode(i, skip_special_tokens=True) for i in res["ids"]]
    res["eos"] = tok.eos_token_id
    if not job["runs"]:
        continue
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    for prompt, seed, kw in job["runs"]:
        x = tok(prompt, return_tensors="pt")
        torch.manual_seed(seed)
        out = model.generate(**x, max_new_tokens=12, min_new_tokens=12,
                             pad_token_id=tok.eos_token_id, return_dict_in_generate=True, **kw)
        stepper = out.cache.stepper
        res["runs"].append({"new": out.sequences[0, x["input_ids"].shape[1]:].tolist(),
                            "seen": stepper.seen, "forward_tokens": stepper.forward_tokens})
    try:
        model.generate(**x, max_new_tokens=2, use_cache=False)
    except ValueError as e:
        res["no_cache"] = str(e)
json.dump(got, open(sys.argv[2], "w"))
'''
TEXT = "Hello, wörld — tokens!\nA second line 42.\n"
SAMPLERS = [({"do_sample": False}, {"temperature": 0}),
            ({"do_sample": True, "temperature": 0.8, "top_k": 20},
             {"temperature": 0.8, "top_k": 20}),
            ({"do_sample": True, "top_k": 0, "top_p": 0.9}, {"top_p": 0.9})]


def _tokenizers(root: Path) -> dict:
    """One saved tokenizer of every kind: name -> its folder."""
    from collections import Counter

    from test_tokenizer_file import gpt2_style

    from lamemo_ds.data.tokenizer import (
        ByteTokenizer,
        build_vocab,
        count_tokens,
        load_pretrained,
        save_tokenizer,
        train_bpe,
    )

    train = [TEXT * 4, "other words and chars\n"]
    counts = {k: sum((count_tokens(t, k) for t in train), Counter()) for k in ("char", "word")}
    toks = {"byte": ByteTokenizer(), "char": build_vocab(counts["char"], kind="char"),
            "word": build_vocab(counts["word"], kind="word"),
            "bpe": train_bpe(train, vocab_size=300, min_freq=1),
            "pretrained": load_pretrained(gpt2_style(root / "gpt2.json"))}
    for name, tok in toks.items():
        save_tokenizer(tok, root / f"tok_{name}")
    return {name: root / f"tok_{name}" for name in toks}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """Tiny models exported with each tokenizer (byte: each memory kind), run by GENERATE."""
    from lamemo_ds.data.tokenizer import tokenizer_files

    root = tmp_path_factory.mktemp("generate")
    exports, jobs = {}, {}
    for kind, tok_dir in _tokenizers(root).items():
        tok = load_tokenizer(tok_dir)
        for memory in (("lamemo", "xl", "none") if kind == "byte" else ("lamemo",)):
            torch.manual_seed(0)
            model = LaMemoLM(ModelConfig(
                vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, d_head=8,
                d_inner=32, dropout=0.0, segment_len=4, mem_len=0 if memory == "none" else 4,
                memory=memory)).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn_like(p))  # sharper distributions than the init
            out = root / f"hf_{kind}_{memory}"
            files = write_target("hf", Loaded(model=model, source="t",
                                              tokenizer_files=tokenizer_files(tok_dir)),
                                 out, quiet=True)
            runs = [["Hello wor", seed, kw] for seed, (kw, _) in enumerate(SAMPLERS)]
            exports[str(out)] = {"kind": kind, "memory": memory, "model": model, "tok": tok,
                                 "files": files}
            jobs[str(out)] = {"texts": [TEXT], "runs": runs if kind == "byte" else []}
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "gen.py").write_text(GENERATE)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HOME": str(root / "hf_home"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(root / "gen.py"), str(root / "jobs.json"),
                        str(root / "got.json")], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((root / "got.json").read_text())
    return {folder: {**e, "got": got[folder]} for folder, e in exports.items()}


@pytest.mark.integration
def test_autotokenizer_loads_every_kind_of_tokenizer(generated):
    kinds = set()
    for folder, e in generated.items():
        tok, got = e["tok"], e["got"]
        kinds.add(e["kind"])
        assert {"tokenizer.json", "tokenizer_config.json", "lamemo_tokenizer.json"} <= set(
            e["files"])
        assert got["ids"][0] == tok.encode(TEXT), e["kind"]  # the ids the model was trained on
        assert got["eos"] == tok.eos_id
        if e["kind"] != "word":  # word: HF joins words with spaces
            assert got["decoded"][0] == TEXT
        # our own description stays readable in the export (`lamemo generate` uses it)
        assert load_tokenizer(Path(folder)).encode(TEXT) == tok.encode(TEXT)
    assert kinds == {"byte", "char", "word", "bpe", "pretrained"}


@pytest.mark.integration
@pytest.mark.parametrize("memory", ["lamemo", "xl", "none"])
def test_hf_generate_equals_lamemo_generate(generated, lamemo, memory):
    from lamemo_ds.commands.generate import generate_ids

    folder, e = next((f, e) for f, e in generated.items()
                     if e["kind"] == "byte" and e["memory"] == memory)
    prompt = e["tok"].encode("Hello wor")
    assert len(e["got"]["runs"]) == len(SAMPLERS)
    for seed, ((_, ours_kw), run) in enumerate(zip(SAMPLERS, e["got"]["runs"], strict=True)):
        want = generate_ids(e["model"], prompt, max_new_tokens=12, seed=seed, **ours_kw)
        assert run["new"] == want, (memory, ours_kw)
        # first call: the whole prompt; later calls: only the new token (the last one drawn is
        # never fed); xl runs each token once, the others re-run the unfinished segment
        assert run["seen"] == len(prompt) + 11
        if memory == "xl":
            assert run["forward_tokens"] == len(prompt) + 11
        if not ours_kw.get("top_k"):
            continue  # the command line once (sampling with top-k): each call costs seconds
        args = ["--max-new-tokens", "12", "--seed", str(seed), "--no-stream"]
        for k, v in ours_kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        r = lamemo("generate", "--model", folder, "--prompt", "Hello wor", "--device", "cpu",
                   *args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout == "Hello wor" + e["tok"].decode(run["new"]) + "\n"
    assert "use_cache=True" in e["got"]["no_cache"]
