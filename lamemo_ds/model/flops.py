"""FLOP and memory-state accounting of one segment (used by model-info, MFU and `lamemo plan`).

Counts multiply-adds as 2 FLOPs, forward + backward = 3x forward, per target token, including the
relative-position (BD) term and, for LaMemo, the look-ahead branch and the memory rows that go
through W_o and the FFN (all but the last layer's). The look-ahead BD term is counted as the
window it needs (M x W), the work an exact kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ModelConfig, memory_len


@dataclass(frozen=True)
class FlopCount:
    forward_per_segment: float  # one stream (batch row), one segment
    per_target_token: float  # forward + backward, per target token


def segment_flops(cfg: ModelConfig, *, seg_len: int | None = None,
                  mem_len: int | None = None) -> FlopCount:
    n = cfg.segment_len if seg_len is None else seg_len
    m = memory_len(cfg.memory, cfg.mem_len if mem_len is None else mem_len)
    d, hd, di, L = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner, cfg.n_layer
    k = m + n
    lamemo = cfg.memory == "lamemo" and m > 0
    per_layer = 0.0
    # projections: Q on the query rows, K and V on all keys, R on the position table
    q_rows = k if lamemo else n
    per_layer += 2 * d * hd * (q_rows + 2 * k)
    per_layer += 2 * d * hd * (k + (m if lamemo else 0))
    # causal branch: content (AC), position (BD) and the weighted sum of values
    per_layer += 3 * 2 * n * k * hd
    rows_out = n
    if lamemo:
        w = min(m, n)
        per_layer += 3 * 2 * m * w * hd  # look-ahead AC, BD, PV
        per_layer += 10 * m * cfg.n_head  # interpolation (negligible, counted for honesty)
    fwd = per_layer * L
    # W_o + FFN: current rows in every layer, memory rows in all but the last (lamemo)
    ffn_rows = rows_out * L + (m * (L - 1) if lamemo else 0)
    fwd += ffn_rows * (2 * hd * d + 2 * 2 * d * di)
    fwd += 2 * d * cfg.vocab_size * n  # output softmax (full-softmax upper bound)
    return FlopCount(forward_per_segment=fwd, per_target_token=3 * fwd / n)


def state_bytes_per_stream(cfg: ModelConfig, *, mem_len: int | None = None,
                           bytes_per_elem: int = 4) -> int:
    """Memory carried between segments for one stream (lse always fp32)."""
    m = memory_len(cfg.memory, cfg.mem_len if mem_len is None else mem_len)
    if m == 0:
        return 0
    if cfg.memory == "xl":
        return cfg.n_layer * m * cfg.d_model * bytes_per_elem
    per_layer = m * cfg.n_head * cfg.d_head * bytes_per_elem + m * cfg.n_head * 4
    return m * cfg.d_model * bytes_per_elem + cfg.n_layer * per_layer
