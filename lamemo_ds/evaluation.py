"""Segment-by-segment evaluation with carried memory (SPEC §6), for training and `lamemo eval`.

Reports the mean token NLL, perplexity, bits per token, and the NLL by segment index (segment 0
of every stream has no memory), so a reader sees what memory buys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class EvalResult:
    loss: float  # mean NLL per target token (nats)
    tokens: int
    by_segment: list[float] = field(default_factory=list)  # mean NLL at segment index s
    interrupted: bool = False  # a stop signal ended the pass early (partial numbers)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "bpc": self.bpc, "tokens": self.tokens,
                "loss_by_segment": self.by_segment}


@torch.no_grad()
def evaluate(model, batches: Iterable, *, mem_len: int | None = None,
             clamp_len: int | None = None, same_length: bool | None = None,
             max_segments: int = 0, max_index: int = 4096,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None,
             stop: Callable[[], bool] | None = None, stop_every: int = 16) -> EvalResult:
    """Run `model` (a LaMemoLM, in eval mode) over ordered batches with carried memory.

    `batches` yields objects with .input/.target [rows, N] int64, .reset [rows] bool and .index
    (segment index of the stream). `all_reduce` sums a tensor over data-parallel ranks.
    `stop`, called every `stop_every` segments on every rank (so it may be collective), ends the
    pass early when it returns True (a preemption signal must not wait for a long evaluation).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(max_index, dtype=torch.float64, device=device)
    counts = torch.zeros(max_index, dtype=torch.float64, device=device)
    state, interrupted = None, False
    for step, batch in enumerate(batches):
        if max_segments and step >= max_segments:
            break
        if stop is not None and step and step % stop_every == 0 and stop():
            interrupted = True
            break
        x = batch.input.to(device, non_blocking=True)
        y = batch.target.to(device, non_blocking=True)
        if state is None:
            state = model.init_state(x.shape[0], mem_len=mem_len, device=device)
        state = state.reset(torch.as_tensor(batch.reset, device=device))
        out = model(x, state, targets=y, return_logits=False, clamp_len=clamp_len,
                    same_length=same_length)
        state = out.state
        idx = min(int(batch.index), max_index - 1)
        sums[idx] += out.nll.double().sum()
        counts[idx] += out.nll.numel()
        if progress is not None:
            progress(out.nll.numel())
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    model.train(was_training)
    total = counts.sum().item()
    used = int((counts > 0).nonzero().max().item()) + 1 if total > 0 else 0
    by_seg = (sums[:used] / counts[:used].clamp(min=1)).tolist()
    return EvalResult(loss=sums.sum().item() / max(total, 1.0), tokens=int(total),
                      by_segment=by_seg, interrupted=interrupted)
