"""Choose the attention implementation: eager (the oracle) or the fused Triton kernels.

`auto` picks triton on CUDA tensors when Triton imports and attention dropout is 0, eager
otherwise; a fallback from a requested fused path is reported once.
"""

from __future__ import annotations

import warnings

from ..model import attention as eager

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _fused_module():
    try:
        from . import triton_attention
    except ImportError:  # triton absent, or the kernels are not built for this platform
        return None
    return triton_attention if triton_attention.available() else None


def resolve(impl: str, *, device_type: str, dropatt: float, training: bool) -> str:
    """'eager' or 'triton' for this call."""
    if impl == "eager":
        return "eager"
    if dropatt > 0 and training:
        if impl == "triton":
            _warn_once("attention_impl=triton needs model.dropatt=0 in training; using eager")
        return "eager"
    if impl == "auto" and device_type != "cuda":
        return "eager"
    if _fused_module() is None:
        if impl == "triton":
            _warn_once("attention_impl=triton: Triton kernels unavailable here; using eager")
        return "eager"
    return "triton"


def causal_attention(q, k, v, r, u, vb, *, valid, mem_len, same_length, dropatt, training,
                     impl="auto"):
    choice = resolve(impl, device_type=q.device.type, dropatt=dropatt, training=training)
    fn = eager.causal_rel_attention if choice == "eager" else _fused_module().causal_rel_attention
    return fn(q, k, v, r, u, vb, valid=valid, mem_len=mem_len, same_length=same_length,
              dropatt=dropatt, training=training)


def lookahead_attention(q, k, v, r, u, vb, *, valid, mem_len, window_start, variant, dropatt,
                        training, impl="auto"):
    choice = resolve(impl, device_type=q.device.type, dropatt=dropatt, training=training)
    fn = eager.lookahead_attention if choice == "eager" else _fused_module().lookahead_attention
    return fn(q, k, v, r, u, vb, valid=valid, mem_len=mem_len, window_start=window_start,
              variant=variant, dropatt=dropatt, training=training)
