"""Generation: next-token distributions equal segment-wise evaluation (lamemo, none), the xl
cache never re-runs the context, sampling filters behave, and the CLI streams text."""

from __future__ import annotations

import json

import pytest
import torch

from lamemo_ds.commands.generate import generate_ids, sample
from lamemo_ds.config import ModelConfig
from lamemo_ds.convert.convert import Loaded, write_target
from lamemo_ds.model import LaMemoLM
from lamemo_ds.model.decode import Stepper

SEG = 4


def tiny(memory: str, vocab: int = 31) -> LaMemoLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                      dropout=0.0, segment_len=SEG, mem_len=SEG if memory != "none" else 0,
                      memory=memory)
    return LaMemoLM(cfg).eval()


@pytest.mark.unit
@pytest.mark.parametrize("memory", ["lamemo", "none"])
def test_stepper_matches_segment_wise_evaluation(memory):
    model = tiny(memory)
    x = torch.randint(0, 31, (1, 3 * SEG), generator=torch.Generator().manual_seed(1))
    s, want = None, []
    with torch.no_grad():
        for i in range(3):
            o = model(x[:, i * SEG:(i + 1) * SEG], s, return_logits=True)
            s = o.state
            want.append(o.logits[0])
    want = torch.cat(want)  # [3N, V]: distribution after each token
    stepper = Stepper(model)
    got = torch.stack([stepper.feed([int(t)]) for t in x[0]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # shapes differ: fp32 noise


@pytest.mark.unit
def test_xl_cache_runs_each_token_once():
    model = tiny("xl")
    stepper = Stepper(model)
    prompt = list(range(7))
    stepper.feed(prompt)
    for t in range(5):
        stepper.feed([t])
    assert stepper.forward_tokens == 7 + 5  # no context is ever re-run
    assert int(stepper.state.valid[0]) == SEG  # the cache holds the last mem_len tokens


@pytest.mark.unit
def test_sampling_filters_and_seed():
    logp = torch.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.9]), -1)
    g = torch.Generator().manual_seed(0)
    assert sample(logp, temperature=0.0, top_k=0, top_p=1.0, generator=g) == 1
    draws = {sample(logp, temperature=1.0, top_k=2, top_p=1.0, generator=g) for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logp, temperature=1.0, top_k=0, top_p=0.01, generator=g) for _ in range(50)}
    assert draws == {1}
    model = tiny("lamemo")
    a = generate_ids(model, [1, 2, 3], max_new_tokens=12, seed=5, top_p=0.9)
    b = generate_ids(model, [1, 2, 3], max_new_tokens=12, seed=5, top_p=0.9)
    c = generate_ids(model, [1, 2, 3], max_new_tokens=12, seed=6, top_p=0.9)
    assert a == b and len(a) == 12 and a != c


@pytest.mark.integration
def test_generate_cli_streams_text(tmp_path, lamemo):
    model = tiny("lamemo", vocab=257)
    write_target("consolidated", Loaded(model=model, source="t"), tmp_path / "m", quiet=True)
    (tmp_path / "m" / "tokenizer.json").write_text(
        json.dumps({"kind": "byte", "vocab_size": 257, "eos_id": 256}))
    r = lamemo("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello",
               "--max-new-tokens", "10", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Hello") and len(r.stdout.encode()) > len("Hello")
