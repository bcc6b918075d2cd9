"""Recurrent memory carried between segments, and the exact look-ahead merge
(docs/algorithm.md §1, §3, §4).

The state has a fixed buffer length M (its one source of truth for mem_len) and a per-stream
count `valid` of real rows (the last `valid` rows), so shapes never change between segments.
It is always detached and is replaced, never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config.schema import memory_len

LSE_EPS = 1e-6  # the reference's epsilon in the interpolation weight


@dataclass(frozen=True)
class LayerMemory:
    """One layer's memory of the previous segment (every field None for memory none).

    lamemo: ctx [B,M,H,D] (attention output before W_o) and lse [B,M,H] (log-normalisers);
    xl: hidden [B,M,d] (the layer's input rows of the previous segment).
    """

    ctx: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class MemoryState:
    """Memory of a batch of streams.

    lamemo: emb [B,M,d] (scaled, dropped-out embeddings); per layer ctx [B,M,H,D] (attention
    output before W_o) and lse [B,M,H] (fp32 log-normalisers, fp64 in fp64 models).
    xl: hidden per layer [B,M,d] (each layer's input of the previous segment).
    none: only `valid` (M = 0).
    """

    valid: torch.Tensor  # [B] int64
    mem_len: int
    emb: torch.Tensor | None = None
    ctx: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    lse: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    hidden: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (checkpoints, transfers)."""
        out = {"valid": self.valid}
        if self.emb is not None:
            out["emb"] = self.emb
        for name in ("ctx", "lse", "hidden"):
            for i, t in enumerate(getattr(self, name)):
                out[f"{name}.{i}"] = t
        return out

    def layer(self, i: int) -> LayerMemory:
        """Layer i's part of this state."""
        return LayerMemory(ctx=self.ctx[i] if self.ctx else None,
                           lse=self.lse[i] if self.lse else None,
                           hidden=self.hidden[i] if self.hidden else None)

    def fits(self, batch: int, mem_len: int) -> bool:
        """True when this state has the shapes a batch of `batch` streams with a memory of
        `mem_len` rows needs."""
        return self.batch_size == batch and self.mem_len == mem_len

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor],
                     mem_len: int | None = None) -> MemoryState:
        """The inverse of `tensors()`; mem_len defaults to the buffers' length (0 without any)."""
        def seq(name: str) -> tuple[torch.Tensor, ...]:
            keys = sorted((k for k in tensors if k.startswith(name + ".")),
                          key=lambda k: int(k.split(".")[1]))
            return tuple(tensors[k] for k in keys)
        if mem_len is None:
            mem_len = next((t.shape[1] for k, t in tensors.items() if k != "valid"), 0)
        return cls(valid=tensors["valid"], mem_len=mem_len, emb=tensors.get("emb"),
                   ctx=seq("ctx"), lse=seq("lse"), hidden=seq("hidden"))

    def map(self, fn) -> MemoryState:
        """Apply fn to every tensor (e.g. `.to(device)`), returning a new state."""
        t = {k: fn(v) for k, v in self.tensors().items()}
        return MemoryState.from_tensors(t, self.mem_len)

    def detach(self) -> MemoryState:
        return self.map(lambda t: t.detach())

    def reset(self, mask: torch.Tensor) -> MemoryState:
        """Forget the memory of streams where mask [B] is True (a new epoch, a new text)."""
        return replace(self, valid=torch.where(mask.to(self.valid.device),
                                               torch.zeros_like(self.valid), self.valid))


def empty_state(kind: str, *, batch_size: int, mem_len: int, n_layer: int, d_model: int,
                n_head: int, d_head: int, dtype: torch.dtype, device=None) -> MemoryState:
    """A state with no real rows; buffers are zero (lse -inf) so unused slots stay finite."""
    valid = torch.zeros(batch_size, dtype=torch.int64, device=device)
    if memory_len(kind, mem_len) == 0:
        return MemoryState(valid=valid, mem_len=0)
    if kind == "xl":
        hidden = tuple(torch.zeros(batch_size, mem_len, d_model, dtype=dtype, device=device)
                       for _ in range(n_layer))
        return MemoryState(valid=valid, mem_len=mem_len, hidden=hidden)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    emb = torch.zeros(batch_size, mem_len, d_model, dtype=dtype, device=device)
    ctx = tuple(torch.zeros(batch_size, mem_len, n_head, d_head, dtype=dtype, device=device)
                for _ in range(n_layer))
    lse = tuple(torch.full((batch_size, mem_len, n_head), float("-inf"), dtype=lse_dtype,
                           device=device) for _ in range(n_layer))
    return MemoryState(valid=valid, mem_len=mem_len, emb=emb, ctx=ctx, lse=lse)


def merge_lookahead(ctx_old: torch.Tensor, lse_old: torch.Tensor, e: torch.Tensor,
                    lse_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merge of two softmaxes over disjoint key sets (docs/algorithm.md §3).

    ctx_old [.., D] and lse_old [..] are constants; e and lse_new carry gradient.
    alpha = e^{lse_old} / (e^{lse_old} + e^{lse_new} + eps) computed stably; returns
    (ctx, logaddexp(lse_old, lse_new), alpha). Rows with lse_old = -inf get alpha = 0.
    """
    c = torch.maximum(lse_old, lse_new)
    a = torch.exp(lse_old - c)
    b = torch.exp(lse_new - c)
    alpha = a / (a + b + LSE_EPS)
    w = alpha.unsqueeze(-1).to(e.dtype)
    ctx = w * ctx_old + (1 - w) * e
    return ctx, torch.logaddexp(lse_old, lse_new), alpha


def keep_last(old: torch.Tensor, new: torch.Tensor, mem_len: int) -> torch.Tensor:
    """Last mem_len rows (dim 1) of [old ; new], detached."""
    return torch.cat([old, new], dim=1)[:, -mem_len:].detach()
