"""Choose the attention implementation: eager (the oracle) or the fused Triton kernels.

`auto` picks triton on CUDA tensors when Triton imports and attention dropout is 0, eager
otherwise; a fallback is reported once (for `auto` too when dropout is what rules triton out on
CUDA, so a slow run is never a silent surprise). CPU tensors reach the kernels only through
Triton's interpreter (TRITON_INTERPRET=1, used by the tests), and fp64 always stays eager.
"""

from __future__ import annotations

import warnings

import torch

from . import attention as eager

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _fused_module(device_type: str = "cuda"):
    """The kernel module when its kernels can run on this device type, else None."""
    try:
        from . import triton_attention
    except ImportError:  # triton absent, or the kernels are not built for this platform
        return None
    return triton_attention if triton_attention.supports_device(device_type) else None


def resolve(
    impl: str,
    *,
    device_type: str,
    dropatt: float,
    training: bool,
    dtype: torch.dtype = torch.float32,
) -> str:
    """'eager' or 'triton' for this call."""
    if impl not in ("eager", "triton", "auto"):
        raise ValueError(f"model.attention_impl={impl!r}: expected eager, triton or auto")
    if impl == "eager" or (impl == "auto" and device_type != "cuda"):
        return "eager"
    if dropatt > 0 and training:
        _warn_once(
            f"attention_impl={impl}: the fused kernels need model.dropatt=0 in training "
            f"(dropatt={dropatt}); using eager attention"
        )
        return "eager"
    if dtype == torch.float64:
        if impl == "triton":
            _warn_once("attention_impl=triton: fp64 inputs run on the eager path")
        return "eager"
    if _fused_module(device_type) is None:
        if impl == "triton":
            _warn_once(
                f"attention_impl=triton: Triton kernels cannot run on {device_type} here "
                "(no triton, or CPU without TRITON_INTERPRET=1); using eager"
            )
        return "eager"
    return "triton"


def _pick(name: str, impl: str, q, *, dropatt: float, training: bool):
    """The function `name` of the implementation chosen for this call."""
    choice = resolve(impl, device_type=q.device.type, dropatt=dropatt, training=training,
                     dtype=q.dtype)
    return getattr(eager if choice == "eager" else _fused_module(q.device.type), name)


def causal_attention(q, k, v, r, u, vb, *, valid, mem_len, same_length, dropatt, training,
                     impl="auto"):
    """Causal relative attention (docs/algorithm.md §2) through the chosen implementation."""
    fn = _pick("causal_rel_attention", impl, q, dropatt=dropatt, training=training)
    return fn(q, k, v, r, u, vb, valid=valid, mem_len=mem_len, same_length=same_length,
              dropatt=dropatt, training=training)


def lookahead_attention(q, k, v, r, u, vb, *, valid, mem_len, window_start, variant, dropatt,
                        training, impl="auto"):
    """Look-ahead attention (docs/algorithm.md §3) through the chosen implementation."""
    fn = _pick("lookahead_attention", impl, q, dropatt=dropatt, training=training)
    return fn(q, k, v, r, u, vb, valid=valid, mem_len=mem_len, window_start=window_start,
              variant=variant, dropatt=dropatt, training=training)
