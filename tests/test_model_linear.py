"""lamemo_ds.model.linear: the CPU backward with transposed GEMM layouts gives nn.Linear's
values and gradients, and the module keeps nn.Linear's parameters and state-dict names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamemo_ds.model.linear import Linear, _NarrowingLinear, linear

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 40), (3, 5, 40), (2, 3, 4, 40)])
def test_gradients_equal_f_linear(bias, shape):
    torch.manual_seed(0)
    w = torch.randn(12, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 12, dtype=torch.float64)
    params = [x, w] + ([b] if bias else [])
    y = linear(x, w, b)
    assert y.grad_fn.name().startswith("_NarrowingLinear")
    got = torch.autograd.grad(y, params, g)
    ref_y = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_y, params, g)
    assert torch.allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.is_contiguous()
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_NarrowingLinear.apply, (x, w, b))


def test_other_cases_are_plain_f_linear():
    w = torch.randn(40, 12, requires_grad=True)  # widening
    assert linear(torch.randn(3, 12), w).grad_fn.name().startswith("Mm")
    narrow = torch.randn(12, 40, requires_grad=True)
    with torch.no_grad():
        assert linear(torch.randn(3, 40), narrow).grad_fn is None
    assert linear(torch.randn(3, 40), narrow.detach()).grad_fn is None


def test_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(2)
    ref = torch.nn.Linear(40, 12)
    mod = Linear(40, 12)
    mod.load_state_dict(ref.state_dict())
    assert isinstance(mod, torch.nn.Linear)
    assert list(mod.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 40)
    assert torch.allclose(mod(x), ref(x), rtol=1e-6, atol=1e-6)
    mod(x).sum().backward()
    ref(x).sum().backward()
    assert torch.allclose(mod.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mod.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
