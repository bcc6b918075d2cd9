"""The one evaluation of the package: training (data-parallel and pipeline) and `lamemo eval`.

`run_eval` is the loop: it walks ordered segments, asks a `SegmentScorer` for the NLL of each
(a LaMemoLM or DeepSpeed engine: `ModelScorer`; a pipeline: train/pipeline_parallel.py), and
sums NLL and token counts per segment index, so every mean is weighted by tokens. It reports the
mean token NLL and the NLL by segment index (segment 0 of every stream has no memory), so a reader
sees what memory buys. `memory="reset"` runs the same model over the same tokens with an empty
memory before every segment: the difference of the two losses (`memory_gain`) is what the model
gets from its memory. An optional `target_mask` scores a subset of the targets apart (the recall
corpus's key symbols: the retrieval cost).

`Units` turns a loss into the unit its tokenizer makes honest (bits per byte for bytes, bits per
character, perplexity per word, perplexity per token and bits per byte of the text for BPE), and
`describe` is the one line that training logs and `lamemo eval` print.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from .config.schema import keeps_memory

MemoryMode = Literal["carried", "reset"]
MEMORY_MODES = ("carried", "reset")
LN2 = math.log(2)
MAX_GROUPS = 64  # target groups an integer `target_mask` may label (the last takes the rest)


@dataclass
class EvalResult:
    loss: float  # mean NLL per target token (nats)
    tokens: int
    by_segment: list[float] = field(default_factory=list)  # mean NLL at segment index s
    interrupted: bool = False  # a stop signal ended the pass early (partial numbers)
    memory: str = "carried"  # "carried" or "reset" (empty memory before every segment)
    subset_loss: float | None = None  # mean NLL over the targets of `target_mask`
    subset_tokens: int = 0
    subset_groups: list[tuple[float, int]] | None = None  # (mean NLL, targets) per group label
    tokens_by_segment: list[int] = field(default_factory=list)  # targets at segment index s

    @property
    def ppl(self) -> float:
        """Perplexity per token."""
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / LN2

    @property
    def subset_bits(self) -> float | None:
        """Bits per scored target (e.g. per recall key symbol); None without a mask."""
        return None if self.subset_loss is None else self.subset_loss / LN2

    def as_dict(self, units: Units | None = None) -> dict:
        """The JSON of a pass: loss (nats per token), the unit scores of `units` (default:
        per token), tokens, memory mode and the loss by segment index."""
        out = {"loss": self.loss, **(units or Units()).scores(self.loss), "tokens": self.tokens,
               "memory": self.memory, "loss_by_segment": self.by_segment}
        if self.subset_loss is not None:
            out.update(subset_loss=self.subset_loss, subset_bits=self.subset_bits,
                       subset_tokens=self.subset_tokens)
        if self.subset_groups is not None:
            out["subset_bits_by_group"] = [loss / LN2 if n else None
                                           for loss, n in self.subset_groups]
        return out


@dataclass(frozen=True)
class Units:
    """The units a loss is reported in, from the tokenizer kind of the data (manifest).

    byte: bits per byte (every token is a byte, or a document's end); char: bits per
    character; word: perplexity per word; anything else (BPE, a pretrained tokenizer):
    perplexity per token and bits per byte of the underlying UTF-8 text, from the split's
    tokens and text bytes recorded by `lamemo prepare` (None when the manifest predates that).
    """

    kind: str = "token"
    tokens: int | None = None  # target tokens of the split (manifest)
    text_bytes: int | None = None  # UTF-8 bytes of the split's text (manifest)

    @classmethod
    def from_manifest(cls, manifest: dict, split: str) -> Units:
        info = manifest.get("splits", {}).get(split, {})
        return cls(kind=manifest.get("tokenizer", {}).get("kind", "token"),
                   tokens=info.get("tokens"), text_bytes=info.get("text_bytes"))

    @property
    def headline(self) -> str:
        """The name of the main score (a JSON key and TensorBoard tag suffix)."""
        return {"byte": "bits_per_byte", "char": "bits_per_char",
                "word": "ppl_per_word"}.get(self.kind, "ppl_per_token")

    @property
    def bytes_note(self) -> str | None:
        """Why a BPE/pretrained run has no bits per byte (None when it has them)."""
        if self.kind in ("byte", "char", "word") or self.text_bytes:
            return None
        return ("bits_per_byte unavailable: the data manifest has no UTF-8 byte count for this "
                "split (prepared by an older version; re-run `lamemo prepare --force`)")

    def scores(self, loss: float) -> dict[str, float | None]:
        """{unit name: value} of a mean NLL per token (nats)."""
        bits = loss / LN2
        if self.kind == "byte":
            return {"bits_per_byte": bits}
        if self.kind == "char":
            return {"bits_per_char": bits}
        if self.kind == "word":
            return {"ppl_per_word": math.exp(min(loss, 700.0))}
        bpb = bits * self.tokens / self.text_bytes if self.text_bytes and self.tokens else None
        return {"ppl_per_token": math.exp(min(loss, 700.0)), "bits_per_byte": bpb}


def describe(result: EvalResult, units: Units) -> str:
    """'loss 1.2345 | bits_per_byte 1.781 | 12,345 tokens' for logs and `lamemo eval`."""
    parts = [f"loss {result.loss:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in units.scores(result.loss).items() if v is not None]
    return " | ".join(parts + [f"{result.tokens:,} tokens"])


def memory_passes(run_pass: Callable[[str], EvalResult], modes: Iterable[str], *,
                  memory_kind: str) -> dict[str, EvalResult]:
    """`run_pass(mode)` for each of `modes` ("carried", "reset"), stopping after an interrupted
    pass. A `none` model's reset pass is its carried pass (the same by construction): it is
    not run twice."""
    results: dict[str, EvalResult] = {}
    for mode in modes:
        if mode == "reset" and not keeps_memory(memory_kind) and "carried" in results:
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
    out = {"memory_gain_loss": gain, "memory_gain_bits_per_token": gain / LN2,
           "memory_ppl_ratio": math.exp(min(gain, 700.0))}
    if carried.subset_loss is not None and reset.subset_loss is not None:
        out["memory_gain_subset_bits"] = reset.subset_bits - carried.subset_bits
    return out


# ----------------------------------------------------------------------------- the loop
@dataclass
class SegmentScore:
    nll_sum: torch.Tensor  # float64 scalar: summed NLL of the segment's targets
    count: int  # targets scored
    nll: torch.Tensor | None = None  # [rows, N] per-target NLL (None: sums only)


class SegmentScorer(Protocol):
    """What `run_eval` asks of a model: the NLL of one segment with the memory it carries.

    global_sums: True when a score already sums over data-parallel ranks (no all-reduce)."""

    global_sums: bool

    def start(self) -> None:
        """Empty memory before a pass."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, reset: torch.Tensor, *,
                 fresh: bool) -> SegmentScore:
        """Score one segment; `reset` [rows] marks stream starts, `fresh` asks for an empty
        memory for every row (memory="reset")."""

    def close(self) -> None:
        """After a pass (also when it failed)."""


class ModelScorer:
    """A LaMemoLM (or a DeepSpeed engine around one) with its own evaluation memory."""

    global_sums = False

    def __init__(self, model, *, mem_len: int | None = None, clamp_len: int | None = None,
                 same_length: bool | None = None):
        self.model, self.state = model, None
        self.window = {"clamp_len": clamp_len, "same_length": same_length}
        self.mem_len = mem_len
        self.device = next(model.parameters()).device

    def start(self) -> None:
        self.state, self.was_training = None, self.model.training
        self.model.eval()

    def __call__(self, x, y, reset, *, fresh: bool) -> SegmentScore:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.state is None or fresh:
            self.state = self.model.init_state(x.shape[0], mem_len=self.mem_len,
                                               device=self.device)
        state = self.state.reset(torch.as_tensor(reset, device=self.device))
        out = self.model(x, state, targets=y, return_logits=False, **self.window)
        self.state = out.state
        return SegmentScore(out.nll.double().sum(), out.nll.numel(), out.nll)

    def close(self) -> None:
        self.state = None
        self.model.train(self.was_training)


@torch.no_grad()
def run_eval(scorer: SegmentScorer, batches: Iterable, *, max_segments: int = 0,
             max_index: int = 4096,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None,
             stop: Callable[[], bool] | None = None, stop_every: int = 16,
             memory: MemoryMode = "carried",
             target_mask: Callable[[object], torch.Tensor] | None = None) -> EvalResult:
    """Score ordered batches segment by segment; every mean is weighted by tokens.

    `batches` yields objects with .input/.target [rows, N] int64, .reset [rows] bool and .index
    (segment index of the stream). `memory`: "carried" passes each segment's memory to the next
    one of its stream; "reset" starts every segment with an empty memory (same model, same
    tokens). `target_mask(batch)` -> [rows, N] bool selects targets scored apart as well
    (`subset_loss`; needs per-target NLL); an integer mask instead labels them with groups
    0..MAX_GROUPS-1 (-1: not scored), each also scored apart (`subset_groups`). `all_reduce`
    sums a tensor over data-parallel ranks.
    `stop`, called every `stop_every` segments on every rank (so it may be collective), ends the
    pass early when it returns True (a preemption signal must not wait for a long evaluation).
    `progress(tokens)` is called after every segment.
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: expected one of {MEMORY_MODES}")
    sums = torch.zeros(max_index, dtype=torch.float64)
    counts = torch.zeros(max_index, dtype=torch.float64)
    subset = torch.zeros(2, MAX_GROUPS, dtype=torch.float64)  # NLL sum, count per group
    grouped = False
    interrupted = False
    scorer.start()
    try:
        for step, batch in enumerate(batches):
            if max_segments and step >= max_segments:
                break
            if stop is not None and step and step % stop_every == 0 and stop():
                interrupted = True
                break
            s = scorer(batch.input, batch.target, batch.reset, fresh=memory == "reset")
            idx = min(int(batch.index), max_index - 1)
            sums[idx] += s.nll_sum.double().cpu()
            counts[idx] += s.count
            if target_mask is not None and s.nll is not None:
                mask = torch.as_tensor(target_mask(batch)).cpu()
                grouped = grouped or mask.dtype != torch.bool
                group = mask.long().clamp(max=MAX_GROUPS - 1)
                keep = group >= 0 if grouped else mask
                subset[0].index_add_(0, group[keep], s.nll.detach().double().cpu()[keep])
                subset[1].index_add_(0, group[keep], torch.ones(int(keep.sum()),
                                                                dtype=torch.float64))
            if progress is not None:
                progress(s.count)
    finally:
        scorer.close()
    if all_reduce is not None and not scorer.global_sums:
        sums, counts, subset = (all_reduce(t).cpu() for t in (sums, counts, subset))
    return _result(sums, counts, subset, interrupted=interrupted, memory=memory,
                   scored=target_mask is not None, grouped=grouped)


def _result(sums, counts, subset, *, interrupted: bool, memory: str, scored: bool,
            grouped: bool = False) -> EvalResult:
    total = counts.sum().item()
    used = int((counts > 0).nonzero().max().item()) + 1 if total > 0 else 0
    by_seg = (sums[:used] / counts[:used].clamp(min=1)).tolist()
    n_sub = int(subset[1].sum().item())
    groups = None
    if grouped:
        last = int((subset[1] > 0).nonzero().max().item()) + 1 if n_sub else 0
        groups = [(a / max(n, 1.0), int(n)) for a, n in subset[:, :last].T.tolist()]
    return EvalResult(loss=sums.sum().item() / max(total, 1.0), tokens=int(total),
                      by_segment=by_seg, interrupted=interrupted, memory=memory,
                      subset_loss=subset[0].sum().item() / max(n_sub, 1) if scored else None,
                      subset_tokens=n_sub, subset_groups=groups,
                      tokens_by_segment=[int(c) for c in counts[:used].tolist()])


def evaluate(model, batches: Iterable, *, mem_len: int | None = None,
             clamp_len: int | None = None, same_length: bool | None = None,
             **kwargs) -> EvalResult:
    """`run_eval` of a LaMemoLM (in eval mode) with the given memory window; see run_eval."""
    scorer = ModelScorer(model, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
    return run_eval(scorer, batches, **kwargs)
