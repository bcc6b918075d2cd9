"""One decoder layer's step with its memory, shared by LaMemoLM.forward and the pipeline stages.

A MemoryState has an embedding part (the `valid` row counts and, for lamemo, the embedding rows)
and one `LayerMemory` per layer: lamemo keeps the layer's attention output ctx [B,M,H,D] and its
log-normaliser lse [B,M,H] for every memory row, xl keeps the layer's input rows of the previous
segment [B,M,d], none keeps nothing. `layer_step` runs one layer the same way for every kind: the
layer's LayerMemory says what it reads, and it returns the layer's LayerMemory for the next
segment. A `MemoryKind` only says how a segment starts (the flow into the first layer, the
position table) and how the layers' parts become the next state. LaMemoLM.forward runs every
layer in one loop; a pipeline stage (parallel/pipeline.py) runs the layers it holds, with their
parts kept on the stage.

Between layers flows a `Flow`: the current rows [B,N,d] and, for lamemo, the memory rows [B,M,d]
as the layer before refreshed them (LaMemo recomputes the memory in every layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from ..config.schema import memory_len
from .memory import LayerMemory, MemoryState, keep_last
from .positional import causal_distances, lookahead_distances


@dataclass(frozen=True, slots=True)
class Flow:
    """What one layer hands the next: current rows [B,N,d]; lamemo memory rows [B,M,d] or None."""

    cur: torch.Tensor
    mem: torch.Tensor | None = None


def _advance(valid: torch.Tensor, emb: torch.Tensor, mem_len: int) -> torch.Tensor:
    """Real memory rows after a segment of emb.shape[1] tokens."""
    return torch.clamp(valid + emb.shape[1], max=mem_len)


class MemoryKind(ABC):
    """How one kind of memory starts a segment and ends it (model.memory, see the docstring)."""

    name: ClassVar[str]
    # the memory rows flow through the layers with the segment, each layer refreshing them
    refreshed: ClassVar[bool] = False

    def distances(self, variant: str, *, mem_len: int, seg_len: int, device, dtype):
        """Distances of the position table: causal K-1..0 (+ the look-ahead ones for lamemo)."""
        return causal_distances(mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)

    @abstractmethod
    def start(self, emb: torch.Tensor, state: MemoryState) -> Flow:
        """The flow into the first layer: the embedded segment (+ the embedding memory)."""

    @abstractmethod
    def next_state(self, state: MemoryState, emb: torch.Tensor,
                   parts: list[LayerMemory]) -> MemoryState:
        """The state after this segment: the embedding part advanced, the layer parts `parts`."""


class NoneMemory(MemoryKind):
    """memory: none (or a memory of length 0): every layer sees the current segment only."""

    name = "none"

    def start(self, emb, state):
        return Flow(emb)

    def next_state(self, state, emb, parts):
        return state


class XLMemory(MemoryKind):
    """Transformer-XL: layer i attends over its own input rows of the previous segment."""

    name = "xl"

    def start(self, emb, state):
        return Flow(emb)

    def next_state(self, state, emb, parts):
        m = state.mem_len
        return MemoryState(valid=_advance(state.valid, emb, m), mem_len=m,
                           hidden=tuple(p.hidden for p in parts))


class LaMemoMemory(MemoryKind):
    """LaMemo: the memory rows flow through every layer, which refreshes them by looking ahead."""

    name = "lamemo"
    refreshed = True

    def distances(self, variant, *, mem_len, seg_len, device, dtype):
        causal = causal_distances(mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)
        ahead = lookahead_distances(variant, mem_len=mem_len, device=device, dtype=dtype)
        return torch.cat([causal, ahead])

    def start(self, emb, state):
        return Flow(emb, state.emb)

    def next_state(self, state, emb, parts):
        m = state.mem_len
        return MemoryState(valid=_advance(state.valid, emb, m), mem_len=m,
                           emb=keep_last(state.emb, emb, m), ctx=tuple(p.ctx for p in parts),
                           lse=tuple(p.lse for p in parts))


MEMORY_KINDS: dict[str, MemoryKind] = {
    k.name: k for k in (LaMemoMemory(), XLMemory(), NoneMemory())}


def memory_kind(memory: str, mem_len: int) -> MemoryKind:
    """The kind of model.memory `memory` with a memory of `mem_len` rows (0: none)."""
    return MEMORY_KINDS[memory if memory_len(memory, mem_len) > 0 else "none"]


def relative_positions(kind: MemoryKind, table, drop, *, variant: str, mem_len: int,
                       seg_len: int, clamp_len: int, device, dtype) -> torch.Tensor:
    """[K (+X), d] position table shared by the layers: sinusoids of the causal distances K-1..0,
    then (lamemo) the look-ahead ones, clamped at clamp_len, dropped out."""
    x = kind.distances(variant, mem_len=mem_len, seg_len=seg_len, device=device, dtype=dtype)
    return drop(table(x, clamp_len))


def layer_step(layer, flow: Flow, part: LayerMemory, *, pos: torch.Tensor, biases,
               valid: torch.Tensor, same_length: bool, last: bool,
               recompute: bool) -> tuple[Flow, LayerMemory, torch.Tensor | None]:
    """Run DecoderLayer `layer` on `flow` with its memory `part`; returns (the flow to the next
    layer, the layer's memory for the next segment, its mean look-ahead alpha or None).

    last: the model's last layer (its refreshed memory rows feed nothing, so they are skipped);
    recompute: non-reentrant activation checkpointing (the old part is an explicit argument).
    """
    # the memory rows the layer attends to: lamemo's flow with the segment (refreshed by the
    # layer before), xl's are the layer's own inputs of the previous segment
    mem = flow.mem if flow.mem is not None else part.hidden
    args = (flow.cur, mem, pos, biases, valid, part.ctx, part.lse)
    if recompute:
        out = checkpoint(layer, *args, use_reentrant=False, same_length=same_length,
                         need_mem_out=not last)
    else:
        out = layer(*args, same_length=same_length, need_mem_out=not last)
    hidden = None  # xl: this segment's input rows join the layer's cache
    if part.hidden is not None:
        hidden = keep_last(part.hidden, flow.cur, part.hidden.shape[1])
    return Flow(out.cur, out.mem), LayerMemory(ctx=out.ctx, lse=out.lse, hidden=hidden), out.alpha
