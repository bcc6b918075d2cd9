"""Structural facts about the model: equivalences between memory kinds, parameter counts of the
reference shapes, import hygiene (no distributed code in lamemo_ds.model) and determinism."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _naive_lamemo import tiny_model

from lamemo_ds.model import LaMemoLM
from lamemo_ds.model.presets import preset

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- M = 0: LaMemo is Transformer-XL; `none` is a plain relative-position transformer -------------
def test_first_lamemo_segment_is_a_transformer_xl_segment():
    """With no memory (M = 0, or a buffer with no real rows) a LaMemo layer is exactly a
    Transformer-XL layer (docs/algorithm.md §1): same weights, same first-segment outputs."""
    lam = tiny_model("lamemo", seg_len=4, mem_len=4).eval()
    xl = tiny_model("xl", seg_len=4, mem_len=4, seed=99).eval()
    missing, unexpected = xl.load_state_dict(lam.state_dict(), strict=False)
    assert missing == [] and unexpected == ["biases.r_r_bias_future"]
    x = _tokens(2, 8, 0)
    with torch.no_grad():
        ref = xl(x[:, :4], None)
        for state in (None, lam.init_state(2, mem_len=6)):
            out = lam(x[:, :4], state)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-12, rtol=0)
        # once there is memory the two differ (the look-ahead refresh changes layer-2 memory)
        second_lam = lam(x[:, 4:], lam(x[:, :4], None).state).logits
        second_xl = xl(x[:, 4:], ref.state).logits
    assert not torch.allclose(second_lam, second_xl, atol=1e-6)


def _layer_norm(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps=1e-5)


def _plain_relative_transformer(sd: dict, tokens: torch.Tensor, *, n_head: int,
                                d_head: int) -> torch.Tensor:
    """A causal post-LN transformer with Transformer-XL relative positions, written directly:
    the distance matrix t - j indexes the sinusoid table (no shift trick). -> log-probs [B,N,V]."""
    emb = sd["word_emb.emb_layers.0.weight"]
    b, n = tokens.shape
    d = emb.shape[1]
    h = emb[tokens] * math.sqrt(d)  # [B, N, d]
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # [N, N] query minus key
    freqs = (1.0 / 10000 ** (torch.arange(0.0, d, 2.0) / d)).double()  # float32 constants
    ang = dist.clamp(min=0).double()[..., None] * freqs  # [N, N, d/2]
    table = torch.cat([ang.sin(), ang.cos()], -1)  # [N, N, d]
    u, v = sd["biases.r_w_bias"], sd["biases.r_r_bias"]  # [H, D]
    hd = n_head * d_head
    for layer in range(sum(k.endswith("qkv.weight") for k in sd)):
        p = f"layers.{layer}."
        q, k, val = (h @ sd[p + "qkv.weight"].T).split(hd, -1)  # each [B, N, H*D]
        q, k, val = (t.view(b, n, n_head, d_head) for t in (q, k, val))
        r = (table @ sd[p + "r_net.weight"].T).view(n, n, n_head, d_head)  # [N, N, H, D]
        scores = (torch.einsum("bthd,bjhd->bhtj", q + u, k)
                  + torch.einsum("bthd,tjhd->bhtj", q + v, r)) / math.sqrt(d_head)
        scores = scores.masked_fill(dist < 0, float("-inf"))
        att = torch.einsum("bhtj,bjhd->bthd", scores.softmax(-1), val).reshape(b, n, hd)
        y = _layer_norm(h + att @ sd[p + "o_net.weight"].T, sd, p + "norm")
        ff = F.relu(y @ sd[p + "ff.fc1.weight"].T + sd[p + "ff.fc1.bias"])
        h = _layer_norm(y + ff @ sd[p + "ff.fc2.weight"].T + sd[p + "ff.fc2.bias"], sd,
                        p + "ff.norm")
    return (h @ emb.T + sd["crit.out_layers.0.bias"]).log_softmax(-1)


def test_no_memory_model_is_a_plain_causal_relative_transformer():
    model = tiny_model("none", seg_len=5, mem_len=5).eval()
    sd = model.state_dict()
    x = _tokens(2, 10, 1)
    state = model.init_state(2)
    assert state.mem_len == 0
    for s in range(2):  # segments are independent: the second one sees nothing of the first
        seg = x[:, s * 5:(s + 1) * 5]
        with torch.no_grad():
            out = model(seg, state)
        state = out.state
        want = _plain_relative_transformer(sd, seg, n_head=2, d_head=3)
        torch.testing.assert_close(out.logits, want, atol=1e-10, rtol=0)


# -- parameter counts of the reference shapes (docs/algorithm.md §6) -----------------------
@pytest.mark.parametrize("name,millions", [("wt103_base", 151.1), ("enwik8_base", 41.0)])
def test_reference_parameter_counts(name, millions):
    with torch.device("meta"):
        model = LaMemoLM(preset(name))
    count = sum(p.numel() for p in model.parameters())  # the tied softmax weight counts once
    assert model.num_parameters() == count
    assert abs(count / 1e6 - millions) / millions < 0.005, f"{name}: {count / 1e6:.2f}M"


# -- import hygiene ------------------------------------------------------------------------------
_PROBE = """
import json, sys
import torch
bare = set(sys.modules)
import lamemo_ds.model
from lamemo_ds.model import LaMemoLM, ModelConfig
cfg = ModelConfig(vocab_size=11, n_layer=1, n_head=1, d_model=4, d_head=2, d_inner=4,
                  segment_len=2, mem_len=2)
m = LaMemoLM(cfg)
out = m(torch.zeros(1, 2, dtype=torch.long), None)
m(torch.zeros(1, 2, dtype=torch.long), out.state)  # a memory segment: the look-ahead path
print(json.dumps({"added": sorted(set(sys.modules) - bare),
                  "deepspeed": any(k.split(".")[0] == "deepspeed" for k in sys.modules)}))
"""


def test_model_imports_no_distributed_code():
    """`import torch` itself may load torch.distributed (torch 2.x does), so the assertion is
    relative: importing lamemo_ds.model and running a forward with memory must add neither
    deepspeed nor any torch.distributed module beyond what a bare `import torch` loaded."""
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["deepspeed"], "lamemo_ds.model pulled in deepspeed"
    bad = [m for m in report["added"] if m.startswith("torch.distributed")
           or m.split(".")[0] in ("deepspeed", "mpi4py")]
    assert not bad, f"lamemo_ds.model imported distributed modules: {bad}"
    assert "lamemo_ds.model" in report["added"]


# -- determinism -----------------------------------------------------------------------------------
def _train_run(memory: str, dropout_seed: int) -> list[torch.Tensor]:
    """Two training segments (dropout and attention dropout on) of a fresh float32 model."""
    model = tiny_model(memory, seg_len=3, mem_len=3, seed=0, dropout=0.2, dropatt=0.1)
    model = model.float().train()
    torch.manual_seed(dropout_seed)
    x = _tokens(2, 7, 3)
    first = model(x[:, :3], None, targets=x[:, 1:4], return_logits=True)
    second = model(x[:, 3:6], first.state, targets=x[:, 4:7], return_logits=True)
    (first.loss + second.loss).backward()
    results = [first.logits, second.logits, second.nll]
    results += list(second.state.tensors().values())
    return results + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_same_seed_is_bit_identical(memory):
    a, b = _train_run(memory, 1234), _train_run(memory, 1234)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"result {i} differs between identical seeded runs"
    other = _train_run(memory, 4321)
    assert not torch.equal(a[2], other[2]), "dropout seed had no effect: dropout inactive?"
