"""The DeepSpeed PipelineEngine of a LaMemoLM: build, feed, and move weights between layouts.

`build_pipeline_engine` wraps `LaMemoPipe` in deepspeed.initialize with the same optimizer,
schedule and generated DeepSpeed config as the data-parallel engine. `micro_batches` turns one
loader batch (a segment of every stream of this replica) into the per-slot micro-batches that
`engine.train_batch` pulls; stage 0 and the last stage of a replica read the same loader with the
same data-parallel rank, so they see identical batches (middle stages read it too, to keep the
loader position identical on every rank for checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..checkpoint.layer_map import rename_keys
from ..config.derive import Plan
from ..config.schema import RunConfig
from ..model import LaMemoLM
from .ds_adapter import before_fp32_clipping
from .engine import EngineBundle, initialize
from .pipeline import LaMemoPipe, Window


def windows(cfg: RunConfig, plan: Plan) -> tuple[Window, Window]:
    """The (train, eval) memory windows of the stages."""
    m = cfg.model
    ev = plan.eval
    return (Window(m.mem_len, m.clamp_len, m.same_length),
            Window(ev.mem_len, ev.clamp_len, ev.same_length))


def build_pipe(model: LaMemoLM, cfg: RunConfig, plan: Plan) -> LaMemoPipe:
    """The PipelineModule (collective: every rank calls it, with identically seeded models)."""
    train, ev = windows(cfg, plan)
    return LaMemoPipe(model, stages=plan.pp_size, dp=plan.dp_size, train=train, eval=ev,
                      activation_checkpointing=cfg.train.activation_checkpointing)


def build_pipeline_engine(model: LaMemoLM, cfg: RunConfig, plan: Plan) -> EngineBundle:
    """The engine over the pipeline stages (ZeRO 0/1: ParallelConfig.validate, which
    config.derive.resolve runs for every plan, rejects 2/3)."""
    pipe = build_pipe(model, cfg, plan)
    return initialize(pipe, [p for p in pipe.parameters() if p.requires_grad], cfg, plan)


def micro_batches(x: torch.Tensor, y: torch.Tensor, reset: torch.Tensor, *,
                  micro_batch: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """x, y [A*mb, N], reset [A*mb] -> A items ((tokens [mb,N], ctrl [mb,2]), targets [mb,N]).

    ctrl = (slot, reset): micro-batch m of every step is slot m (the same streams every step).
    """
    items = []
    for m in range(x.shape[0] // micro_batch):
        rows = slice(m * micro_batch, (m + 1) * micro_batch)
        r = reset[rows].to(torch.int64)
        ctrl = torch.stack([torch.full_like(r, m), r], 1)  # [mb, 2]
        items.append(((x[rows], ctrl), y[rows]))
    return items


def train_batch(engine, items: list) -> float:
    """One optimizer step over the micro-batch `items` (the tied gradients made whole first);
    returns the mean loss. The caller settles the step: `train.strategy.settle_step` decides,
    on every rank alike, whether it was applied and keeps the memory it wrote only then."""
    engine.module.materialize_tied_grads()
    return float(engine.train_batch(iter(items)))


def stage_grad_norm(engine) -> float:
    """The global gradient norm over every stage (collective: every rank calls it).

    A tied weight lives on each stage of its tie group with the same all-reduced gradient, so
    each copy counts 1/|group|; data-parallel replicas hold the same gradients (divided out)."""
    pipe: LaMemoPipe = engine.module
    tied = {id(w): torch.distributed.get_world_size(g)
            for w, g in pipe.get_tied_weights_and_groups()}
    params = list(pipe.parameters())
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None:
            sq += p.grad.double().pow(2).sum() / tied.get(id(p), 1)
    torch.distributed.all_reduce(sq)
    return math.sqrt(sq.item() / engine.grid.data_parallel_size)


def record_grad_norm(engine) -> Callable[[], float]:
    """On the fp32 ZeRO-0 path DeepSpeed clips (or not) without keeping the gradient norm, and
    `engine.train_batch` zeroes the gradients before it returns: measure the pre-clip norm just
    before DeepSpeed's clipping (or, without clipping, its optimizer step). Returns a getter of
    the last step's norm (NaN until a step ran). Other paths report
    `engine.get_global_grad_norm()` themselves; this leaves them alone."""
    last = [float("nan")]
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return lambda: last[0]

    def measure(*_args, **_kwargs) -> None:
        last[0] = stage_grad_norm(engine)

    if engine.gradient_clipping() > 0.0:
        before_fp32_clipping(engine, measure)
    else:
        engine.optimizer.register_step_pre_hook(measure)
    return lambda: last[0]


# ----------------------------------------------------------------------------- checkpoints
def load_logical(pipe: LaMemoPipe, state: dict[str, torch.Tensor]) -> None:
    """Load a LaMemoLM state dict into this rank's stage modules (any source layout)."""
    for i, f in pipe.local_layers():
        if not isinstance(f, torch.nn.Module):
            continue
        e = pipe.entries[i]
        own = f.state_dict()
        mapped = rename_keys({k: None for k in own}, local_prefix=e.local_prefix,
                             logical=e.logical)
        names = dict(zip(own, mapped))
        missing = [logical for logical in names.values() if logical not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[:4]} (layer {i})")
        f.load_state_dict({local: state[logical] for local, logical in names.items()})
    pipe.synchronize_tied_weights()
