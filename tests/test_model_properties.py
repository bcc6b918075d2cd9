"""Properties the LaMemo algorithm promises (docs/algorithm.md §1-§4), checked on the real model.

- interpolation exactness: the look-ahead merge is ONE softmax over the union of keys, both on
  synthetic scores (merge_lookahead) and end to end (the carried ctx / lse of every memory token);
- no leakage: a token never influences predictions made before it, across segments too;
- gradients reach the refreshed memory inside a segment and never cross segments.
"""

from __future__ import annotations

import pytest
import torch
from _naive_lamemo import NaiveLM, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lamemo_ds.model.memory import merge_lookahead

pytestmark = pytest.mark.unit

EPS_TOL = 5e-6  # the merge's +1e-6 in alpha moves ctx by <= 1e-6 * |ctx_old - e| per merge
MODES = [("lamemo", "default"), ("lamemo", "signed_distance"),
         ("lamemo", "separate_content_bias"), ("lamemo", "unmasked_window"),
         ("xl", "default"), ("none", "default")]
MODE_IDS = [f"{m}-{v}" for m, v in MODES]


def _attend(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, K], values [R, K, D] -> (softmax-weighted values [R, D], logsumexp [R])."""
    return torch.einsum("rk,rkd->rd", scores.softmax(-1), values), scores.logsumexp(-1)


# -- interpolation exactness ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True)
@given(n_old=st.integers(0, 6), n_new=st.integers(1, 6), d=st.integers(1, 4),
       scale=st.sampled_from([0.01, 1.0, 8.0, 60.0]), shift=st.floats(-40.0, 40.0),
       seed=st.integers(0, 2**31 - 1))
def test_merge_is_one_softmax_over_the_union(n_old, n_new, d, scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    rows = 5
    s_old = torch.randn(rows, n_old, generator=g, dtype=torch.float64) * scale + shift
    s_new = torch.randn(rows, n_new, generator=g, dtype=torch.float64) * scale
    v_old = torch.randn(rows, n_old, d, generator=g, dtype=torch.float64)
    v_new = torch.randn(rows, n_new, d, generator=g, dtype=torch.float64)
    if n_old:
        ctx_old, lse_old = _attend(s_old, v_old)
    else:  # a token with nothing seen yet: the merge must return the new softmax exactly
        ctx_old = torch.zeros(rows, d, dtype=torch.float64)
        lse_old = torch.full((rows,), float("-inf"), dtype=torch.float64)
    e, lse_new = _attend(s_new, v_new)
    ctx, lse, alpha = merge_lookahead(ctx_old, lse_old, e, lse_new)
    want_ctx, want_lse = _attend(torch.cat([s_old, s_new], 1), torch.cat([v_old, v_new], 1))
    assert torch.isfinite(ctx).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ctx, want_ctx, atol=EPS_TOL, rtol=0)
    assert ((alpha >= 0) & (alpha < 1)).all()
    if not n_old:
        assert torch.equal(alpha, torch.zeros_like(alpha)) and torch.equal(ctx, e)


def test_merge_gradient_equals_union_softmax_gradient():
    """D_new and e carry gradient, so alpha does: d(merged ctx)/d(new scores) must equal the
    gradient of the single softmax over the union (it would not if alpha were detached)."""
    g = torch.Generator().manual_seed(3)
    s_old = torch.randn(4, 3, generator=g, dtype=torch.float64)
    v_old = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    v_new = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2, generator=g, dtype=torch.float64)
    s_new = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ctx_old, lse_old = _attend(s_old, v_old)
    e, lse_new = _attend(s_new, v_new)
    ctx, _, _ = merge_lookahead(ctx_old, lse_old, e, lse_new)
    (grad_merge,) = torch.autograd.grad((ctx * w).sum(), s_new)
    union, _ = _attend(torch.cat([s_old, s_new], 1), torch.cat([v_old, v_new], 1))
    (grad_union,) = torch.autograd.grad((union * w).sum(), s_new)
    torch.testing.assert_close(grad_merge, grad_union, atol=EPS_TOL, rtol=0)


@pytest.mark.parametrize("variant", ["default", "signed_distance", "separate_content_bias"])
@pytest.mark.parametrize("seg_len,mem_len", [(3, 2), (3, 3), (2, 5), (1, 3)])
def test_carried_ctx_is_one_softmax_over_every_key_seen(variant, seg_len, mem_len):
    """End to end: every memory token's carried ctx / lse (each layer, head) equals one softmax
    over all (score, value) pairs it has attended to in every segment so far, and those keys
    tile the text without gap or overlap: from its first causal key to the first token of the
    latest segment (docs/algorithm.md §4)."""
    model = tiny_model("lamemo", variant, seg_len=seg_len, mem_len=seg_len).eval()
    cfg = model.config
    naive = NaiveLM(model.state_dict(), memory="lamemo", variant=variant, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, d_head=cfg.d_head, mem_len=mem_len)
    tokens = torch.randint(0, 11, (1, seg_len * 5), generator=torch.Generator().manual_seed(5))
    state, mem = model.init_state(1, mem_len=mem_len), naive.empty()
    for s in range(5):
        x = tokens[:, s * seg_len:(s + 1) * seg_len]
        with torch.no_grad():
            state = model(x, state).state
        _, mem = naive.segment(x[0].tolist(), mem)
        end = (s + 1) * seg_len
        first = state.mem_len - int(state.valid[0])
        for layer in range(cfg.n_layer):
            for row, seen_heads in enumerate(mem.seen[layer]):
                a = end - len(mem.seen[layer]) + row  # absolute position of this memory token
                k = a // seg_len  # its segment
                lo = k * seg_len - min(k * seg_len, mem_len)
                last_key = a if k == s else s * seg_len
                for h, seen in enumerate(seen_heads):
                    assert len(seen) == last_key - lo + 1, (s, layer, a, h)
                    scores = torch.tensor([sc for sc, _ in seen], dtype=torch.float64)
                    values = torch.tensor([val for _, val in seen], dtype=torch.float64)
                    want, want_lse = _attend(scores[None], values[None])
                    got = state.ctx[layer][0, first + row, h]
                    torch.testing.assert_close(got, want[0], atol=EPS_TOL * (s + 1), rtol=0)
                    got_lse = state.lse[layer][0, first + row, h]
                    torch.testing.assert_close(got_lse, want_lse[0], atol=1e-9, rtol=0)


# -- no leakage ----------------------------------------------------------------------------------
def _all_log_probs(model, tokens: torch.Tensor, *, seg_len: int, mem_len: int) -> torch.Tensor:
    """Log-probabilities [B, T, V] of every position of every stream, segment after segment."""
    state, outs = model.init_state(tokens.shape[0], mem_len=mem_len), []
    with torch.no_grad():
        for s in range(tokens.shape[1] // seg_len):
            out = model(tokens[:, s * seg_len:(s + 1) * seg_len], state)
            outs.append(out.logits)
            state = out.state
    return torch.cat(outs, 1)


@pytest.mark.parametrize("seg_len,mem_len", [(3, 4), (3, 3), (4, 2)])
@pytest.mark.parametrize("memory,variant", MODES, ids=MODE_IDS)
def test_no_leakage_from_later_tokens(memory, variant, seg_len, mem_len):
    """Changing the token at global position g leaves every prediction at positions < g
    unchanged (those inputs exclude g), including predictions made after g's segment was
    folded into memory; the prediction at g itself does change. Stream 0 is the original
    text, stream g + 1 the text with token g changed (streams of a batch are independent)."""
    model = tiny_model(memory, variant, seg_len=seg_len, mem_len=seg_len).eval()
    length = seg_len * 3
    tokens = torch.randint(0, 11, (1, length), generator=torch.Generator().manual_seed(7))
    bent = tokens.repeat(length + 1, 1)  # [1 + T, T]
    for g in range(length):
        bent[g + 1, g] = (bent[g + 1, g] + 1) % 11
    out = _all_log_probs(model, bent, seg_len=seg_len, mem_len=mem_len)  # [1 + T, T, V]
    for g in range(length):
        torch.testing.assert_close(out[g + 1, :g], out[0, :g], atol=1e-12, rtol=0,
                                   msg=lambda m, g=g: f"token {g} leaked backwards: {m}")
        assert not torch.allclose(out[g + 1, g], out[0, g]), f"token {g} has no effect"


# -- gradients -----------------------------------------------------------------------------------
def test_gradient_reaches_refreshed_memory_inside_a_segment():
    """v' (r_r_bias_future) is used only by the look-ahead branch, so its gradient is zero on a
    first segment and nonzero once there is memory: the loss then depends on layer 1's refreshed
    memory (layer 2's memory input). The layer-1 memory output itself gets a gradient."""
    model = tiny_model("lamemo", seg_len=3, mem_len=3).train()
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(1))
    first = model(tokens[:, :3], None, targets=tokens[:, 1:4])
    first.loss.backward()
    vprime = model.biases.r_r_bias_future
    assert vprime.grad is None or torch.count_nonzero(vprime.grad) == 0
    model.zero_grad()
    captured = []
    hook = model.layers[0].register_forward_hook(lambda mod, inp, out: captured.append(out.mem))
    try:
        out = model(tokens[:, 3:6], first.state, targets=tokens[:, 4:7])
    finally:
        hook.remove()
    mem1 = captured[0]
    mem1.retain_grad()
    out.loss.backward()
    assert torch.count_nonzero(vprime.grad) > 0
    assert mem1.grad is not None and (mem1.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_state_is_detached_and_gradient_stays_in_its_segment(memory):
    """The carried state has no graph; the loss of segment s+1 gives no gradient to segment s's
    embeddings (a leaf copy) but some to its own, and some to the memory rows it reads (a leaf
    copy of the state: real rows only, the unused buffer row gets exactly zero)."""
    model = tiny_model(memory, seg_len=2, mem_len=2).train()
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(2))
    leaves = []

    def leaf_copy(mod, inp, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    hook = model.word_emb.register_forward_hook(leaf_copy)
    try:
        s0 = model(tokens[:, :2], model.init_state(2, mem_len=5), targets=tokens[:, 1:3]).state
        s1 = model(tokens[:, 2:4], s0, targets=tokens[:, 3:5]).state  # valid 4 of M = 5
        for name, t in s1.tensors().items():
            assert not t.requires_grad and t.grad_fn is None, f"state {name} carries a graph"
        mem = s1.emb if memory == "lamemo" else s1.hidden[0]
        mem_leaf = mem.clone().requires_grad_()
        s1_read = s1.map(lambda t: mem_leaf if t is mem else t)
        model(tokens[:, 4:6], s1_read, targets=tokens[:, 5:7]).loss.backward()
    finally:
        hook.remove()
    assert leaves[0].grad is None and leaves[1].grad is None, "gradient crossed a segment"
    assert torch.count_nonzero(leaves[2].grad) > 0
    assert (mem_leaf.grad[:, 1:].abs().sum(-1) > 0).all(), "a real memory row got no gradient"
    assert torch.count_nonzero(mem_leaf.grad[:, 0]) == 0, "the unused buffer row got gradient"


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_parameter_gradients_ignore_earlier_segments(memory):
    """Backward of segment s+1 gives the same parameter gradients whether or not segments
    0..s were computed with autograd: nothing flows back through the carried state."""
    model = tiny_model(memory, seg_len=2, mem_len=3).train()
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(4))

    def grads(track_history: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.set_grad_enabled(track_history):
            st0 = model(tokens[:, :2], None, targets=tokens[:, 1:3]).state
            st1 = model(tokens[:, 2:4], st0, targets=tokens[:, 3:5]).state
        model(tokens[:, 4:6], st1, targets=tokens[:, 5:7]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    tracked, untracked = grads(True), grads(False)
    for name, g in untracked.items():
        torch.testing.assert_close(tracked[name], g, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("variant", ["default", "signed_distance", "unmasked_window"])
def test_attention_backward_matches_finite_differences(variant):
    """The eager attention's hand-written softmax/logsumexp backward (both outputs carry
    gradient: o feeds W_o, lse feeds the merge weight alpha), against numerical derivatives;
    one stream has a partly filled memory so masked keys are exercised."""
    from lamemo_ds.model.positional import lookahead_distances
    from lamemo_ds.ops.attention import (
        causal_rel_attention,
        lookahead_attention,
        lookahead_window,
    )

    g = torch.Generator().manual_seed(11)
    b, h, m, n, d = 2, 2, 3, 2, 2
    valid = torch.tensor([3, 1])

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    q, k, v = rnd(b, h, m + n, d), rnd(b, h, m + n, d), rnd(b, h, m + n, d)
    r_c, r_la = rnd(m + n, h, d), rnd(len(lookahead_distances(variant, mem_len=m)), h, d)
    u, vb = rnd(h, d), rnd(h, d)
    start, width = lookahead_window(mem_len=m, seg_len=n)

    def causal(q, k, v, r, u, vb):
        return causal_rel_attention(q[:, :, m:], k, v, r, u, vb, valid=valid, mem_len=m)

    def look(q, k, v, r, u, vb):
        return lookahead_attention(q[:, :, :m], k[:, :, start:start + width],
                                   v[:, :, start:start + width], r, u, vb, valid=valid,
                                   mem_len=m, window_start=start, variant=variant)

    assert torch.autograd.gradcheck(causal, (q, k, v, r_c, u, vb))
    assert torch.autograd.gradcheck(look, (q, k, v, r_la, u, vb))
