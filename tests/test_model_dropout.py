"""The CPU dropout: right keep rate, unbiased, reproducible from torch's RNG (so seeds, resumes
and activation checkpointing see the same masks), and exact gradients."""

from __future__ import annotations

import pytest
import torch

from lamemo_ds.model import LaMemoLM, ModelConfig
from lamemo_ds.model.dropout import dropout, relu_dropout

pytestmark = pytest.mark.unit


def test_keep_rate_and_unbiased():
    torch.manual_seed(0)
    x = torch.ones(2000, 1000)
    y = dropout(x, 0.1, True)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.9) < 1e-3  # 2M draws: 6 sigma ~ 1.3e-3
    assert abs(y.double().mean().item() - 1.0) < 2e-3
    assert torch.equal(dropout(x, 0.1, False), x) and torch.equal(dropout(x, 0.0, True), x)


def test_masks_follow_torch_seed():
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    a = dropout(x, 0.3, True)
    torch.manual_seed(5)
    b = dropout(x, 0.3, True)
    c = dropout(x, 0.3, True)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradients_are_mask_times_scale():
    x = torch.randn(128, 64, requires_grad=True)
    g = torch.randn(128, 64)
    torch.manual_seed(1)
    y = dropout(x, 0.25, True)
    y.backward(g)
    keep = y.detach() != 0
    scale = (y.detach()[keep] / x.detach()[keep]).mean().item()
    assert abs(scale - 1 / 0.75) < 1e-4
    assert torch.allclose(x.grad, torch.where(keep, g, 0.0) * scale)


def test_fused_relu_dropout_equals_the_two_ops():
    x = torch.randn(96, 80, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(96, 80)
    torch.manual_seed(3)
    relu_dropout(x, 0.2, True).backward(g)
    torch.manual_seed(3)
    ref = dropout(torch.relu(x2), 0.2, True)
    ref.backward(g)
    torch.manual_seed(3)
    assert torch.equal(relu_dropout(x.detach(), 0.2, True), ref.detach())
    assert torch.equal(x.grad, x2.grad)


def test_activation_checkpointing_replays_the_same_masks():
    cfg = ModelConfig(vocab_size=31, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                      dropout=0.2, segment_len=6, mem_len=6, attention_impl="eager")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LaMemoLM(cfg).train()
        model.activation_checkpointing = ckpt
        x = torch.randint(0, 31, (2, 13))
        state = None
        for s in range(2):
            out = model(x[:, s * 6:(s + 1) * 6], state, targets=x[:, s * 6 + 1:(s + 1) * 6 + 1])
            state = out.state
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numeric_mask_is_the_bool_mask_times_the_scale(dtype):
    from lamemo_ds.model.dropout import _keep_mask, _keep_scale

    shape = torch.Size([37, 129])  # numel not a multiple of 4: the last draw is split
    for p in (0.1, 0.25, 0.5, 0.9):
        torch.manual_seed(11)
        keep, scale = _keep_mask(shape, p)
        torch.manual_seed(11)
        mask = _keep_scale(shape, p, dtype)
        assert mask.dtype == dtype
        assert torch.equal(mask, torch.where(keep, torch.tensor(scale, dtype=dtype), 0))


@pytest.mark.parametrize("relu", [False, True])
def test_float_and_bool_paths_agree(relu):
    """fp32 multiplies by a numeric mask, bf16 selects with a bool one: same masks, same
    values (up to bf16 rounding) and the same gradients."""
    x = torch.randn(64, 96).bfloat16().float()  # values both dtypes hold exactly
    g = torch.randn(64, 96).bfloat16().float()
    outs, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype).clone().requires_grad_()
        torch.manual_seed(4)
        y = relu_dropout(xi, 0.3, True) if relu else dropout(xi, 0.3, True)
        y.backward(g.to(dtype))
        outs.append(y.detach().float())
        grads.append(xi.grad.float())
    assert torch.equal(outs[0] != 0, outs[1] != 0)
    assert torch.allclose(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    assert torch.equal(grads[0] != 0, grads[1] != 0)
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-2)


def test_relu_dropout_gradient_is_zero_where_dropped_or_negative():
    x = torch.randn(50, 70, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, 70, dtype=torch.float64)
    torch.manual_seed(8)
    y = relu_dropout(x, 0.4, True)
    y.backward(g)
    from lamemo_ds.model.dropout import _keep_mask

    torch.manual_seed(8)
    keep, scale = _keep_mask(x.shape, 0.4)
    live = keep & (x.detach() > 0)
    assert torch.equal(y.detach(), torch.where(live, x.detach() * scale, 0.0))
    assert torch.equal(x.grad, torch.where(live, g * scale, 0.0))


def test_p_just_below_one_keeps_a_finite_scale():
    torch.manual_seed(0)
    y = dropout(torch.ones(4096), 1 - 1e-7, True)
    assert torch.isfinite(y).all() and y.max().item() in (0.0, 65536.0)
