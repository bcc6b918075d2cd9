"""Cluster sizing for `lamemo plan`: memory, time and communication of a parallel layout.

Pure arithmetic from the model config (no process group, no GPU). Formulas:
- model states per GPU (Adam, mixed precision, ZeRO paper): weights w, gradients g, fp32 master
  copy + two Adam moments k = 12 bytes/param (fp32 training: no master copy, k = 8; weights and
  gradients 4 bytes). ZeRO-1 partitions optimizer states over dp, ZeRO-2 also gradients, ZeRO-3
  also weights. A pipeline stage holds its share of the layers (+ embedding/output on the ends).
- activations: what autograd saves per layer for rows (N current + M memory rows for LaMemo) plus
  attention probabilities (eager) or only O(N) statistics (fused), times the micro-batches in
  flight (1 without a pipeline, up to P with 1F1B).
- LaMemo memory state: model.flops.state_bytes_per_stream per stream and slot.
- time: FLOPs per step / (GPUs x peak x MFU), stretched by the 1F1B bubble (P-1)/m, plus the
  communication volume over the per-GPU bandwidth (not overlapped: an upper bound).
- communication per GPU per step: ring all-reduce 2(dp-1)/dp x grad bytes (ZeRO 0-2), ZeRO-3 adds
  one weight all-gather (3x instead of 2x); pipeline sends [B, M+N, d] forward and back per
  micro-batch per stage boundary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config.schema import ModelConfig, memory_len
from ..model.flops import segment_flops, state_bytes_per_stream

GPUS = {  # dense bf16 TFLOP/s, memory GiB
    "h100": (989.0, 80.0),
    "h200": (989.0, 141.0),
    "a100": (312.0, 80.0),
}
GIB = 2**30


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    zero_stage: int
    micro_batch_size: int  # streams per micro-batch per dp rank
    micro_batches: int  # gradient accumulation steps = pipeline micro-batches


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    params: int
    params_per_gpu: float
    model_state_gib: float
    activation_gib: float
    lamemo_state_gib: float
    total_gib: float
    fits: bool
    step_time_s: float
    tokens_per_step: int
    tokens_per_s: float
    bubble: float
    comm_gib_per_step: float
    comm_time_s: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = asdict(self.layout)
        return d


def param_count(cfg: ModelConfig) -> int:
    """Exact parameter count (tied tensors once), built on the meta device."""
    import torch

    from ..model import LaMemoLM

    with torch.device("meta"):
        return LaMemoLM(cfg).num_parameters()


def stage_params(cfg: ModelConfig, total: int, pp: int) -> float:
    """Parameters on the busiest pipeline stage: its layers plus the (tied) embedding."""
    per_layer = (total - embedding_params(cfg)) / cfg.n_layer
    layers = math.ceil(cfg.n_layer / pp)
    return layers * per_layer + embedding_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model + cfg.vocab_size  # tied weight + output bias


def model_state_bytes(params: float, *, zero_stage: int, dp: int, precision: str) -> float:
    w = 4 if precision == "fp32" else 2
    g = w
    k = 8 if precision == "fp32" else 12
    if zero_stage >= 1:
        k = k / dp
    if zero_stage >= 2:
        g = g / dp
    if zero_stage >= 3:
        w = w / dp
    return params * (w + g + k)


def activation_bytes_per_stream(cfg: ModelConfig, *, precision: str, fused: bool,
                                layers: int, device: str = "cuda") -> float:
    """Bytes autograd keeps for one stream (batch row) of one micro-batch through `layers`.

    On CPU the FFN's ReLU and dropout are one op keeping only a mask (model/dropout.py); on
    CUDA the ReLU output is kept as well.
    """
    e = 4 if precision == "fp32" else 2
    n, m = cfg.segment_len, memory_len(cfg.memory, cfg.mem_len)
    lamemo = cfg.memory == "lamemo" and m > 0
    rows = n + (m if lamemo else 0)
    k = n + m
    d, hd, di, h = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner, cfg.n_head
    drop = 1 if cfg.dropout > 0 else 0  # bool masks
    hidden_copies = 1 if (device == "cpu" or not drop) else 2  # FFN hidden kept by autograd
    per_layer = (
        k * d * e  # layer input (cat of memory and current rows)
        + 3 * k * hd * e  # q, k, v
        + rows * hd * e  # attention output before W_o
        + 2 * rows * d * e + rows * d * drop  # residual/LN inputs, dropout mask
        + hidden_copies * rows * di * e + rows * di * drop  # FFN hidden, dropout mask
        + 2 * rows * d * e + rows * d * drop  # FFN output, LN input
    )
    if not fused:
        per_layer += h * n * k * 4  # causal probabilities (fp32; the only [N, K] tensor kept)
        if lamemo:
            per_layer += h * m * min(m, n) * 4  # look-ahead probabilities
    else:
        per_layer += h * rows * 4  # logsumexp rows
    head = n * d * e * 2 + n * cfg.vocab_size * 4 * (1 if not cfg.cutoffs else 0.2)
    # backward of one layer briefly holds gradients of its largest saved tensors
    workspace = 2 * h * n * k * 4 if not fused else 2 * rows * di * e
    return per_layer * layers + head + workspace


def estimate(cfg: ModelConfig, layout: Layout, *, gpu: str, precision: str = "bf16",
             mfu: float = 0.4, fused: bool = True, params: int | None = None,
             headroom: float = 0.9, bandwidth_gbs: float = 50.0) -> Estimate:
    peak_tflops, mem_gib = GPUS[gpu]
    total = params if params is not None else param_count(cfg)
    p_stage = stage_params(cfg, total, layout.pp) if layout.pp > 1 else float(total)
    states = model_state_bytes(p_stage, zero_stage=layout.zero_stage, dp=layout.dp,
                               precision=precision)
    layers = math.ceil(cfg.n_layer / layout.pp)
    in_flight = min(layout.pp, layout.micro_batches) if layout.pp > 1 else 1
    act = activation_bytes_per_stream(cfg, precision=precision, fused=fused, layers=layers) \
        * layout.micro_batch_size * in_flight
    slots = layout.micro_batches * layout.micro_batch_size
    lam = state_bytes_per_stream(cfg, bytes_per_elem=4 if precision == "fp32" else 2) * slots
    lam *= layers / cfg.n_layer
    total_bytes = states + act + lam
    gpus = layout.dp * layout.pp
    tokens = layout.dp * layout.micro_batch_size * layout.micro_batches * cfg.segment_len
    flops = segment_flops(cfg).per_target_token * tokens
    bubble = (layout.pp - 1) / layout.micro_batches if layout.pp > 1 else 0.0
    step = flops / (gpus * peak_tflops * 1e12 * mfu) * (1 + bubble)
    gbytes = (4 if precision == "fp32" else 2) * p_stage
    comm = 0.0
    if layout.dp > 1:
        comm += (3.0 if layout.zero_stage == 3 else 2.0) * (layout.dp - 1) / layout.dp * gbytes
    if layout.pp > 1:
        e = 4 if precision == "fp32" else 2
        k_rows = cfg.segment_len + (cfg.mem_len if cfg.memory == "lamemo" else 0)
        comm += 2 * layout.micro_batches * layout.micro_batch_size * k_rows * cfg.d_model * e
    comm_time = comm / (bandwidth_gbs * 1e9)  # not overlapped with compute: an upper bound
    step += comm_time
    return Estimate(layout=layout, params=total, params_per_gpu=p_stage / (
        layout.dp if layout.zero_stage == 3 else 1), model_state_gib=states / GIB,
        activation_gib=act / GIB, lamemo_state_gib=lam / GIB, total_gib=total_bytes / GIB,
        fits=total_bytes <= headroom * mem_gib * GIB, step_time_s=step, tokens_per_step=tokens,
        tokens_per_s=tokens / step, bubble=bubble, comm_gib_per_step=comm / GIB,
        comm_time_s=comm_time)


def search(cfg: ModelConfig, *, gpus: int, gpu: str, micro_batch_size: int,
           global_streams: int | None = None, precision: str = "bf16", mfu: float = 0.4,
           fused: bool = True, bandwidth_gbs: float = 50.0) -> list[Estimate]:
    """Every layout that uses all GPUs, sorted fastest first (fitting ones before the rest).

    With global_streams set, dp * micro_batch_size * micro_batches must equal it (the global
    batch is fixed); otherwise micro_batches ranges over 1..16.
    """
    total = param_count(cfg)
    out = []
    for pp in [p for p in range(1, min(gpus, cfg.n_layer) + 1) if gpus % p == 0]:
        dp = gpus // pp
        for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)):
            for mb in (1, 2, 4, 8, 16):
                if global_streams and dp * micro_batch_size * mb != global_streams:
                    continue
                lay = Layout(dp=dp, pp=pp, zero_stage=zero, micro_batch_size=micro_batch_size,
                             micro_batches=mb)
                out.append(estimate(cfg, lay, gpu=gpu, precision=precision, mfu=mfu,
                                    fused=fused, params=total, bandwidth_gbs=bandwidth_gbs))
    return sorted(out, key=lambda e: (not e.fits, -e.tokens_per_s, e.total_gib))
