"""Fused Triton attention against the eager oracle: outputs, logsumexp and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set only while
this module's tests run). Sizes are tiny but the interpreter tiles are 16x16, so several row and
key tiles, band edges and the padded head dim 41 are all exercised.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lamemo_ds.ops import attention as eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton picks interpreter or compiler when it is first imported, so the switch must come first.
_PRIOR_INTERPRET = os.environ.get("TRITON_INTERPRET")
_IMPORTED_BEFORE = "triton" in sys.modules
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

pytestmark = pytest.mark.gpu
ATOL = 2e-5  # fp32, tight: only the summation order differs


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Keep TRITON_INTERPRET=1 for this module only (dispatch reads it when choosing a path)."""
    if DEVICE == "cpu" and _IMPORTED_BEFORE and _PRIOR_INTERPRET != "1":
        pytest.fail(
            "triton was imported (by an earlier test module) before TRITON_INTERPRET=1 "
            "was set, so its CPU interpreter is unusable in this process; run "
            "`TRITON_INTERPRET=1 pytest -m gpu` or this module on its own"
        )
    yield
    if DEVICE == "cpu":
        if _PRIOR_INTERPRET is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _PRIOR_INTERPRET


def _fused():
    from lamemo_ds.ops import triton_attention

    return triton_attention


def _inputs(gen, *, batch: int, heads: int, n_q: int, n_k: int, n_r: int, d_head: int, mem_len):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE)

    args = (
        rnd(batch, heads, n_q, d_head),
        rnd(batch, heads, n_k, d_head),
        rnd(batch, heads, n_k, d_head),
        rnd(n_r, heads, d_head),
        rnd(heads, d_head),
        rnd(heads, d_head),
    )
    # one stream with a full memory, the others partially filled (incl. empty)
    valid = torch.randint(0, mem_len + 1, (batch,), generator=gen)
    valid[0] = mem_len
    return args, valid.to(DEVICE)


def _compare(fn_eager, fn_fused, args, kwargs, gen, *, atol: float = ATOL):
    ref_in = [a.clone().requires_grad_() for a in args]
    fus_in = [a.clone().requires_grad_() for a in args]
    o_ref, lse_ref = fn_eager(*ref_in, **kwargs)
    o_fus, lse_fus = fn_fused(*fus_in, **kwargs)
    assert o_fus.shape == o_ref.shape and lse_fus.shape == lse_ref.shape
    assert lse_fus.dtype == torch.float32
    torch.testing.assert_close(o_fus, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(lse_fus, lse_ref, atol=atol, rtol=0)
    # upstream gradients on both outputs: the look-ahead merge differentiates through lse
    g_o = torch.randn(o_ref.shape, generator=gen).to(DEVICE)
    g_lse = torch.randn(lse_ref.shape, generator=gen).to(DEVICE)
    ((o_ref * g_o).sum() + (lse_ref * g_lse).sum()).backward()
    ((o_fus * g_o).sum() + (lse_fus * g_lse).sum()).backward()
    for name, a, b in zip(("q", "k", "v", "r", "u", "vb"), ref_in, fus_in):
        torch.testing.assert_close(b.grad, a.grad, atol=atol * 4, rtol=1e-5, msg=f"d{name}")


# (segment N, memory M, head dim, same_length, batch): M = 0, < N, = N, > N, N = 1, N > one tile
CAUSAL_CASES = [
    (8, 0, 32, False, 2),
    (8, 5, 41, False, 2),
    (8, 8, 64, True, 2),
    (6, 20, 32, False, 2),
    (6, 20, 41, True, 1),
    (1, 7, 32, False, 2),
    (1, 0, 32, False, 1),
    (19, 3, 32, False, 1),
]


@pytest.mark.parametrize("seg,mem,d_head,same,batch", CAUSAL_CASES)
def test_causal_matches_eager(seg, mem, d_head, same, batch):
    gen = torch.Generator().manual_seed(seg * 100 + mem + d_head)
    k_len = mem + seg
    args, valid = _inputs(
        gen, batch=batch, heads=2, n_q=seg, n_k=k_len, n_r=k_len, d_head=d_head, mem_len=mem
    )
    kwargs = dict(valid=valid, mem_len=mem, same_length=same)
    _compare(eager.causal_rel_attention, _fused().causal_rel_attention, args, kwargs, gen)


# (segment N, memory M, head dim, variant): M < N, = N, > N (several tiles), N = 1, M = 1
LOOKAHEAD_CASES = [
    (8, 5, 32, "default"),
    (8, 8, 41, "default"),
    (6, 20, 64, "default"),
    (1, 6, 32, "default"),
    (4, 1, 32, "default"),
    (8, 8, 32, "signed_distance"),
    (6, 9, 32, "separate_content_bias"),
    (8, 5, 32, "unmasked_window"),
    (6, 20, 41, "unmasked_window"),
    (1, 3, 32, "unmasked_window"),
]


@pytest.mark.parametrize("seg,mem,d_head,variant", LOOKAHEAD_CASES)
def test_lookahead_matches_eager(seg, mem, d_head, variant):
    gen = torch.Generator().manual_seed(seg * 100 + mem + d_head + len(variant))
    start, width = eager.lookahead_window(mem_len=mem, seg_len=seg)
    n_r = mem + 1 if variant == "unmasked_window" else mem
    args, valid = _inputs(
        gen, batch=2, heads=2, n_q=mem, n_k=width, n_r=n_r, d_head=d_head, mem_len=mem
    )
    kwargs = dict(valid=valid, mem_len=mem, window_start=start, variant=variant)
    _compare(eager.lookahead_attention, _fused().lookahead_attention, args, kwargs, gen)


_BF16_CPU = pytest.mark.skipif(
    DEVICE == "cpu",
    reason="Triton's CPU interpreter mis-computes "
    "bf16 tl.dot (numpy has no bf16); checked on GPU by the bench",
)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=_BF16_CPU), torch.float16])
def test_half_precision_forward_close_to_fp32_eager(dtype):
    """bf16/fp16 inputs: fp32 accumulation keeps the output near the fp32 oracle."""
    gen = torch.Generator().manual_seed(7)
    args, valid = _inputs(gen, batch=1, heads=2, n_q=8, n_k=16, n_r=16, d_head=32, mem_len=8)
    kwargs = dict(valid=valid, mem_len=8, same_length=False)
    o_ref, lse_ref = eager.causal_rel_attention(*args, **kwargs)
    o, lse = _fused().causal_rel_attention(*(a.to(dtype) for a in args), **kwargs)
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(lse, lse_ref, atol=0.1, rtol=0.02)


def test_noncontiguous_views_and_mixed_bias_dtype():
    """The model passes q/k/v as strided views of one qkv projection: no copy needed."""
    gen = torch.Generator().manual_seed(3)
    b, h, seg, mem, d = 2, 2, 5, 7, 32
    qkv = torch.randn(b, mem + seg, 3, h, d, generator=gen).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, K, D], strided
    r = torch.randn(mem + seg, h, d, generator=gen).to(DEVICE)
    u, vb = torch.randn(2, h, d, generator=gen).to(DEVICE)
    valid = torch.tensor([mem, 3], device=DEVICE)
    kwargs = dict(valid=valid, mem_len=mem, same_length=False)
    _compare(
        eager.causal_rel_attention,
        _fused().causal_rel_attention,
        (q[:, :, mem:], k, v, r, u, vb),
        kwargs,
        gen,
    )


def test_refuses_fp64_and_dropout_with_clear_errors():
    gen = torch.Generator().manual_seed(1)
    args, valid = _inputs(gen, batch=1, heads=2, n_q=4, n_k=4, n_r=4, d_head=32, mem_len=0)
    with pytest.raises(TypeError, match="fp64|float64"):
        _fused().causal_rel_attention(*(a.double() for a in args), valid=valid, mem_len=0)
    with pytest.raises(ValueError, match="dropatt"):
        _fused().causal_rel_attention(*args, valid=valid, mem_len=0, dropatt=0.1, training=True)


def _model_pair(**overrides):
    from lamemo_ds.model import LaMemoLM, ModelConfig

    base = dict(
        vocab_size=40,
        n_layer=2,
        n_head=2,
        d_model=32,
        d_head=16,
        d_inner=48,
        dropout=0.0,
        dropatt=0.0,
        segment_len=6,
        mem_len=6,
        attention_impl="eager",
    )
    base.update(overrides)
    torch.manual_seed(0)
    ref = LaMemoLM(ModelConfig(**base)).to(DEVICE)
    fused = LaMemoLM(ModelConfig(**{**base, "attention_impl": "triton"})).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(variant="unmasked_window", mem_len=9, same_length=True),
        dict(memory="xl", mem_len=4),
    ],
    ids=["lamemo", "unmasked-longmem-samelength", "xl"],
)
def test_whole_model_triton_matches_eager_over_three_segments(overrides):
    """Three segments through memory: per-token NLL, carried state and gradients agree."""
    from lamemo_ds.ops import dispatch

    ref, fused = _model_pair(**overrides)
    assert dispatch.resolve("triton", device_type=DEVICE, dropatt=0.0, training=True) == "triton"
    n = ref.config.segment_len
    tokens = torch.randint(0, 40, (2, 3 * n + 1), generator=torch.Generator().manual_seed(5))
    tokens = tokens.to(DEVICE)
    s_ref = s_fus = None
    for seg in range(3):
        x, y = tokens[:, seg * n : (seg + 1) * n], tokens[:, seg * n + 1 : (seg + 1) * n + 1]
        out_ref, out_fus = ref(x, s_ref, targets=y), fused(x, s_fus, targets=y)
        torch.testing.assert_close(out_fus.nll, out_ref.nll, atol=1e-5, rtol=1e-5)
        fus_state = out_fus.state.tensors()
        for name, a in out_ref.state.tensors().items():
            torch.testing.assert_close(fus_state[name], a, atol=1e-5, rtol=1e-5, msg=name)
        s_ref, s_fus = out_ref.state.detach(), out_fus.state.detach()
    out_ref.loss.backward()
    out_fus.loss.backward()
    for (name, p_ref), p_fus in zip(ref.named_parameters(), fused.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_fus.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
