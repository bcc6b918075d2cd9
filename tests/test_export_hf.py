"""The Hugging Face export loads through transformers (trust_remote_code=True) in a process where
lamemo_ds cannot be imported, and matches our logits over 3 segments with carried memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.convert.hf import build_modeling_source
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
