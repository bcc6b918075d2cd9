"""The model against a naive loop implementation of docs/algorithm.md §1-§5
(tests/_naive_lamemo.py).

Over several consecutive segments, for M < N, M = N, M > N (a longer memory than training, via
init_state(mem_len=...)) and N = 1, for every memory kind and LaMemo ablation: the per-token
log-probabilities and every carried state row must agree. The model's state buffers have a
fixed length M with the `valid` real rows right-aligned; only those rows are compared.
"""

from __future__ import annotations

import pytest
import torch
from _naive_lamemo import NaiveLM, StreamMemory, tiny_model

pytestmark = pytest.mark.unit

MODES = [("lamemo", "default"), ("lamemo", "signed_distance"),
         ("lamemo", "separate_content_bias"), ("lamemo", "unmasked_window"),
         ("xl", "default"), ("none", "default")]
# (N, M, segments): M < N, M = N, M > N (eval memory longer than the trained mem_len), N = 1.
SHAPES = [(4, 2, 3), (3, 3, 3), (2, 5, 4), (1, 3, 5)]
ATOL = 1e-9


def _naive(model, memory: str, variant: str, mem_len: int, **kw) -> NaiveLM:
    cfg = model.config
    return NaiveLM(model.state_dict(), memory=memory, variant=variant, n_layer=cfg.n_layer,
                   n_head=cfg.n_head, d_head=cfg.d_head, mem_len=mem_len, **kw)


def _close(mine: torch.Tensor, ref: list, what: str) -> None:
    ref_t = torch.tensor(ref, dtype=torch.float64)
    assert mine.shape == ref_t.shape, f"{what}: shape {tuple(mine.shape)} vs {tuple(ref_t.shape)}"
    err = (mine - ref_t).abs().max().item() if mine.numel() else 0.0
    assert err < ATOL, f"{what}: max abs error {err:.3e}"


def _check_state(state, mems: list[StreamMemory], memory: str, seg: int) -> None:
    """Compare the real (last `valid`) rows of every state buffer with the naive memory."""
    if memory == "none":
        assert state.mem_len == 0
        return
    for b, mem in enumerate(mems):
        valid = int(state.valid[b])
        rows = len(mem.hidden[0]) if memory == "xl" else len(mem.emb)
        assert valid == rows, f"segment {seg} stream {b}: valid {valid}, expected {rows}"
        first = state.mem_len - valid
        if memory == "xl":
            for layer, hid in enumerate(state.hidden):
                _close(hid[b, first:], mem.hidden[layer], f"seg {seg} b{b} hidden.{layer}")
            continue
        _close(state.emb[b, first:], mem.emb, f"seg {seg} b{b} emb")
        for layer in range(len(state.ctx)):
            _close(state.ctx[layer][b, first:], mem.ctx[layer], f"seg {seg} b{b} ctx.{layer}")
            _close(state.lse[layer][b, first:], mem.lse[layer], f"seg {seg} b{b} lse.{layer}")


def _run_both(memory, variant, *, seg_len, mem_len, segments, batch=2, reset_at=None,
              seed=0, **kw):
    """Feed the same segments to the model and the oracle, comparing after every segment.

    reset_at=(segment, stream): forget that stream's memory before that segment (per-stream
    `valid`, as at a document boundary)."""
    model = tiny_model(memory, variant, seg_len=seg_len, mem_len=seg_len, seed=seed,
                       **kw).eval()
    naive = _naive(model, memory, variant, mem_len, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 11, (batch, seg_len * segments + 1), generator=gen)
    state = model.init_state(batch, mem_len=mem_len)
    mems = [naive.empty() for _ in range(batch)]
    for s in range(segments):
        if reset_at is not None and reset_at[0] == s:
            mask = torch.zeros(batch, dtype=torch.bool)
            mask[reset_at[1]] = True
            state = state.reset(mask)
            mems[reset_at[1]] = naive.empty()
        x = tokens[:, s * seg_len:(s + 1) * seg_len]
        y = tokens[:, s * seg_len + 1:(s + 1) * seg_len + 1]
        with torch.no_grad():
            out = model(x, state, targets=y, return_logits=True)
        state = out.state
        for b in range(batch):
            logp, mems[b] = naive.segment(x[b].tolist(), mems[b])
            _close(out.logits[b], logp, f"segment {s} stream {b} log-probs")
            nll = [-logp[t][y[b, t]] for t in range(seg_len)]
            _close(out.nll[b], nll, f"segment {s} stream {b} nll")
        _check_state(state, mems, memory, s)
    return mems


@pytest.mark.parametrize("memory,variant", MODES, ids=[f"{m}-{v}" for m, v in MODES])
@pytest.mark.parametrize("seg_len,mem_len,segments", SHAPES,
                         ids=[f"N{n}-M{m}" for n, m, _ in SHAPES])
def test_model_matches_naive_loops(memory, variant, seg_len, mem_len, segments):
    _run_both(memory, variant, seg_len=seg_len, mem_len=mem_len, segments=segments)


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_same_length_and_clamp_len_match_naive(memory):
    """The Transformer-XL evaluation protocol: each query sees at most M keys, distances
    clamped (docs/algorithm.md §5, §6); M > N so the same_length window actually cuts."""
    _run_both(memory, "default", seg_len=2, mem_len=3, segments=4, same_length=True,
              clamp_len=2)


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_per_stream_reset_matches_naive(memory):
    """One stream forgets its memory mid-run (valid differs per stream): the other stream's
    outputs are untouched and the reset one restarts like a first segment."""
    _run_both(memory, "default", seg_len=2, mem_len=4, segments=4, reset_at=(2, 0))
