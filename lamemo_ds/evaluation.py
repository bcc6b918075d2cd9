"""Segment-by-segment evaluation with carried memory, for training and `lamemo eval`.

Reports the mean token NLL, perplexity, bits per token, and the NLL by segment index (segment 0
of every stream has no memory), so a reader sees what memory buys. `memory="reset"` runs the same
model over the same tokens with an empty memory before every segment: the difference between the
two losses (`memory_gain`) is what the model gets from its memory. An optional `target_mask`
scores a subset of the targets apart (the recall corpus's key symbols: the retrieval cost).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

MemoryMode = Literal["carried", "reset"]
MEMORY_MODES = ("carried", "reset")


@dataclass
class EvalResult:
    loss: float  # mean NLL per target token (nats)
    tokens: int
    by_segment: list[float] = field(default_factory=list)  # mean NLL at segment index s
    interrupted: bool = False  # a stop signal ended the pass early (partial numbers)
    memory: str = "carried"  # "carried" or "reset" (empty memory before every segment)
    subset_loss: float | None = None  # mean NLL over the targets of `target_mask`
    subset_tokens: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    @property
    def subset_bits(self) -> float | None:
        """Bits per scored target (e.g. per recall key symbol); None without a mask."""
        return None if self.subset_loss is None else self.subset_loss / math.log(2)

    def as_dict(self) -> dict:
        out = {"loss": self.loss, "ppl": self.ppl, "bpc": self.bpc, "tokens": self.tokens,
               "memory": self.memory, "loss_by_segment": self.by_segment}
        if self.subset_loss is not None:
            out.update(subset_loss=self.subset_loss, subset_bits=self.subset_bits,
                       subset_tokens=self.subset_tokens)
        return out


def memory_passes(run_pass: Callable[[str], EvalResult], modes: Iterable[str], *,
                  memory_kind: str) -> dict[str, EvalResult]:
    """`run_pass(mode)` for each of `modes` ("carried", "reset"), stopping after an interrupted
    pass. A `none` model's reset pass is its carried pass (the same by construction): it is
    not run twice."""
    results: dict[str, EvalResult] = {}
    for mode in modes:
        if mode == "reset" and memory_kind == "none" and "carried" in results:
            results[mode] = dataclasses.replace(results["carried"], memory="reset")
        else:
            results[mode] = run_pass(mode)
        if results[mode].interrupted:
            break
    return results


def memory_gain(carried: EvalResult, reset: EvalResult) -> dict:
    """What memory buys: loss(reset) - loss(carried) in nats and bits per token, the ppl ratio,
    and the same for the scored subset (bits per recall key symbol) when there is one."""
    gain = reset.loss - carried.loss
    out = {"memory_gain_loss": gain, "memory_gain_bpc": gain / math.log(2),
           "memory_ppl_ratio": math.exp(min(gain, 700.0))}
    if carried.subset_loss is not None and reset.subset_loss is not None:
        out["memory_gain_subset_bits"] = reset.subset_bits - carried.subset_bits
    return out


@torch.no_grad()
def evaluate(model, batches: Iterable, *, mem_len: int | None = None,
             clamp_len: int | None = None, same_length: bool | None = None,
             max_segments: int = 0, max_index: int = 4096,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None,
             stop: Callable[[], bool] | None = None, stop_every: int = 16,
             memory: MemoryMode = "carried",
             target_mask: Callable[[object], torch.Tensor] | None = None) -> EvalResult:
    """Run `model` (a LaMemoLM, in eval mode) over ordered batches.

    `batches` yields objects with .input/.target [rows, N] int64, .reset [rows] bool and .index
    (segment index of the stream). `memory`: "carried" passes each segment's memory to the next
    one of its stream; "reset" starts every segment with an empty memory (same model, same
    tokens). `target_mask(batch)` -> [rows, N] bool selects targets scored apart as well
    (`subset_loss`). `all_reduce` sums a tensor over data-parallel ranks.
    `stop`, called every `stop_every` segments on every rank (so it may be collective), ends the
    pass early when it returns True (a preemption signal must not wait for a long evaluation).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(max_index, dtype=torch.float64, device=device)
    counts = torch.zeros(max_index, dtype=torch.float64, device=device)
    subset = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, count
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: expected one of {MEMORY_MODES}")
    state, interrupted = None, False
    for step, batch in enumerate(batches):
        if max_segments and step >= max_segments:
            break
        if stop is not None and step and step % stop_every == 0 and stop():
            interrupted = True
            break
        x = batch.input.to(device, non_blocking=True)
        y = batch.target.to(device, non_blocking=True)
        if state is None or memory == "reset":
            state = model.init_state(x.shape[0], mem_len=mem_len, device=device)
        state = state.reset(torch.as_tensor(batch.reset, device=device))
        out = model(x, state, targets=y, return_logits=False, clamp_len=clamp_len,
                    same_length=same_length)
        state = out.state
        idx = min(int(batch.index), max_index - 1)
        sums[idx] += out.nll.double().sum()
        counts[idx] += out.nll.numel()
        if target_mask is not None:
            mask = torch.as_tensor(target_mask(batch), device=device)
            subset[0] += out.nll.double()[mask].sum()
            subset[1] += mask.sum()
        if progress is not None:
            progress(out.nll.numel())
    if all_reduce is not None:
        sums, counts, subset = all_reduce(sums), all_reduce(counts), all_reduce(subset)
    model.train(was_training)
    total = counts.sum().item()
    used = int((counts > 0).nonzero().max().item()) + 1 if total > 0 else 0
    by_seg = (sums[:used] / counts[:used].clamp(min=1)).tolist()
    n_sub = int(subset[1].item())
    return EvalResult(loss=sums.sum().item() / max(total, 1.0), tokens=int(total),
                      by_segment=by_seg, interrupted=interrupted, memory=memory,
                      subset_loss=subset[0].item() / max(n_sub, 1) if target_mask else None,
                      subset_tokens=n_sub)
