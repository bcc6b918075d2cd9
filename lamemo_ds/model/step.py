"""One decoder layer's step with its memory, shared by LaMemoLM.forward and the pipeline stages.

A MemoryState has an embedding part (the `valid` row counts and, for lamemo, the embedding rows)
and one part per layer: lamemo keeps the layer's attention output ctx [B,M,H,D] and its
log-normaliser lse [B,M,H] for every memory row, xl keeps the layer's input rows of the previous
segment [B,M,d], none keeps nothing. One small strategy per memory kind says what a layer reads
from its part, what flows on to the next layer and what the layer leaves for the next segment;
`layer_step` runs one layer with it. LaMemoLM.forward runs every layer in one loop; a pipeline
stage (parallel/pipeline.py) runs the layers it holds, with their parts kept on the stage.

Between layers flows a `Flow`: the current rows [B,N,d] and, for lamemo, the memory rows [B,M,d]
as the layer before refreshed them (LaMemo recomputes the memory in every layer). Across a
pipeline stage boundary a Flow travels packed into one tensor (`pack` / `unpack`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .memory import MemoryState, keep_last
from .positional import causal_distances, lookahead_distances


class Flow:
    """What one layer hands the next: current rows [B,N,d]; lamemo memory rows [B,M,d] or None."""

    __slots__ = ("cur", "mem")

    def __init__(self, cur: torch.Tensor, mem: torch.Tensor | None = None):
        self.cur = cur
        self.mem = mem


class NoMemory:
    """memory: none (or a memory of length 0): every layer sees the current segment only."""

    name = "none"

    def distances(self, variant: str, *, mem_len: int, seg_len: int, device, dtype):
        """Distances of the position table: causal K-1..0 (+ the look-ahead ones for lamemo)."""
        return causal_distances(mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)

    def start(self, emb: torch.Tensor, state: MemoryState) -> Flow:
        """The flow into the first layer: the embedded segment (+ the embedding memory)."""
        return Flow(emb)

    def layer_memory(self, state: MemoryState, i: int) -> tuple[torch.Tensor, ...]:
        """Layer i's part of `state`."""
        return ()

    def layer_args(self, flow: Flow, part: tuple) -> tuple:
        """(cur, mem, ctx, lse) arguments of DecoderLayer.forward."""
        return flow.cur, None, None, None

    def after_layer(self, flow: Flow, part: tuple, out) -> tuple[Flow, tuple]:
        """(flow to the next layer, this layer's part for the next segment) from LayerOut."""
        return Flow(out.cur), ()

    def next_state(self, state: MemoryState, emb: torch.Tensor, parts: list[tuple]) -> MemoryState:
        """The state after this segment: the embedding part advanced, the layer parts `parts`."""
        return state

    def layer_state(self, valid: torch.Tensor, mem_len: int, part: tuple) -> MemoryState | None:
        """One layer's part as a MemoryState of one layer (what a pipeline stage banks)."""
        return None

    def pack(self, flow: Flow) -> torch.Tensor:
        """The flow as the one tensor that crosses a pipeline stage boundary."""
        return flow.cur

    def unpack(self, h: torch.Tensor, mem_len: int) -> Flow:
        return Flow(h)


def _advance(valid: torch.Tensor, emb: torch.Tensor, mem_len: int) -> torch.Tensor:
    """Real memory rows after a segment of emb.shape[1] tokens."""
    return torch.clamp(valid + emb.shape[1], max=mem_len)


class XLMemory(NoMemory):
    """Transformer-XL: layer i attends over its own input rows of the previous segment."""

    name = "xl"

    def layer_memory(self, state, i):
        return (state.hidden[i],)

    def layer_args(self, flow, part):
        return flow.cur, part[0], None, None

    def after_layer(self, flow, part, out):
        return Flow(out.cur), (keep_last(part[0], flow.cur, part[0].shape[1]),)

    def next_state(self, state, emb, parts):
        m = state.mem_len
        return MemoryState(valid=_advance(state.valid, emb, m), mem_len=m,
                           hidden=tuple(p[0] for p in parts))

    def layer_state(self, valid, mem_len, part):
        return MemoryState(valid=valid, mem_len=mem_len, hidden=part)


class LaMemoMemory(NoMemory):
    """LaMemo: the memory rows flow through every layer, which refreshes them by looking ahead."""

    name = "lamemo"

    def distances(self, variant, *, mem_len, seg_len, device, dtype):
        causal = causal_distances(mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)
        ahead = lookahead_distances(variant, mem_len=mem_len, device=device, dtype=dtype)
        return torch.cat([causal, ahead])

    def start(self, emb, state):
        return Flow(emb, state.emb)

    def layer_memory(self, state, i):
        return (state.ctx[i], state.lse[i])

    def layer_args(self, flow, part):
        return flow.cur, flow.mem, part[0], part[1]

    def after_layer(self, flow, part, out):
        return Flow(out.cur, out.mem), (out.ctx, out.lse)

    def next_state(self, state, emb, parts):
        m = state.mem_len
        return MemoryState(valid=_advance(state.valid, emb, m), mem_len=m,
                           emb=keep_last(state.emb, emb, m), ctx=tuple(p[0] for p in parts),
                           lse=tuple(p[1] for p in parts))

    def layer_state(self, valid, mem_len, part):
        return MemoryState(valid=valid, mem_len=mem_len, ctx=(part[0],), lse=(part[1],))

    def pack(self, flow):
        # [B, M+N, d]: refreshed memory rows, then current rows (the last layer refreshes none)
        return flow.cur if flow.mem is None else torch.cat([flow.mem, flow.cur], 1)

    def unpack(self, h, mem_len):
        return Flow(h[:, mem_len:], h[:, :mem_len])


MEMORY_KINDS = {k.name: k for k in (LaMemoMemory(), XLMemory(), NoMemory())}


def memory_kind(memory: str, mem_len: int) -> NoMemory:
    """The strategy of model.memory `memory` with a memory of `mem_len` rows (0: none)."""
    return MEMORY_KINDS[memory if mem_len > 0 else "none"]


def relative_positions(kind: NoMemory, table, drop, *, variant: str, mem_len: int, seg_len: int,
                       clamp_len: int, device, dtype) -> torch.Tensor:
    """[K (+X), d] position table shared by the layers: sinusoids of the causal distances K-1..0,
    then (lamemo) the look-ahead ones, clamped at clamp_len, dropped out."""
    x = kind.distances(variant, mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)
    return drop(table(x, clamp_len))


def layer_step(kind: NoMemory, layer, flow: Flow, part: tuple, *, pos: torch.Tensor, biases,
               valid: torch.Tensor, same_length: bool, last: bool,
               recompute: bool) -> tuple[Flow, tuple, torch.Tensor | None]:
    """Run DecoderLayer `layer` on `flow` with its memory part; returns (the flow to the next
    layer, the layer's part for the next segment, its mean look-ahead alpha or None).

    last: the model's last layer (its refreshed memory rows feed nothing, so they are skipped);
    recompute: non-reentrant activation checkpointing (the old part is an explicit argument).
    """
    cur, mem, ctx, lse = kind.layer_args(flow, part)
    if recompute:
        out = checkpoint(layer, cur, mem, pos, biases, valid, ctx, lse, use_reentrant=False,
                         same_length=same_length, need_mem_out=not last)
    else:
        out = layer(cur, mem, pos, biases, valid, ctx, lse, same_length=same_length,
                    need_mem_out=not last)
    flow, part = kind.after_layer(flow, part, out)
    return flow, part, out.alpha
