"""Which attention path the dispatcher picks, and that fallbacks are announced once."""

from __future__ import annotations

import warnings

import pytest
import torch

from lamemo_ds.ops import dispatch

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_eager_is_always_eager():
    assert dispatch.resolve("eager", device_type="cuda", dropatt=0.0, training=True) == "eager"


def test_auto_on_cpu_is_eager_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", device_type="cpu", dropatt=0.0, training=True) == "eager"


def test_dropout_in_training_falls_back_and_says_so_once():
    with pytest.warns(UserWarning, match="dropatt=0.1"):
        assert dispatch.resolve("auto", device_type="cuda", dropatt=0.1, training=True) == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert dispatch.resolve("auto", device_type="cuda", dropatt=0.1, training=True) == "eager"


def test_fp64_and_unavailable_device_fall_back_to_eager():
    with pytest.warns(UserWarning, match="fp64"):
        assert (
            dispatch.resolve(
                "triton", device_type="cuda", dropatt=0.0, training=False, dtype=torch.float64
            )
            == "eager"
        )
    # CPU tensors without the interpreter cannot run the kernels
    with pytest.warns(UserWarning, match="cannot run on cpu"):
        assert dispatch.resolve("triton", device_type="cpu", dropatt=0.0, training=False) == "eager"


def test_unknown_impl_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="eager, triton or auto"):
        dispatch.resolve("flash", device_type="cpu", dropatt=0.0, training=False)


def test_eager_dispatch_is_the_oracle_itself():
    from lamemo_ds.ops import attention as eager

    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(1, 2, 3, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 5, 8, generator=g)
    u, vb = torch.randn(2, 2, 8, generator=g)
    kw = dict(valid=torch.tensor([2]), mem_len=2, same_length=False)
    o, lse = dispatch.causal_attention(
        q, k, v, r, u, vb, dropatt=0.0, training=False, impl="auto", **kw
    )
    o_ref, lse_ref = eager.causal_rel_attention(q, k, v, r, u, vb, **kw)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
