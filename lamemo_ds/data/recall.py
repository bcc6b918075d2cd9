"""The long-range recall corpus: a random key is written once and must be reproduced later.

A document is a run of episodes, each

    #KEY\\n  filler...  ?KEY\\n

KEY is `key_len` symbols drawn uniformly from `alphabet`; the filler repeats `filler` (one
character by default, so it costs almost nothing to predict and the training budget goes to the
copy). Every key symbol is recalled exactly `gap` tokens after its first copy (gap drawn per
episode from [gap_min, gap_max]). With gap larger than the segment length N, no recall target can
see its key in its own segment: it is predictable only through memory. Without that information
the best possible cost is log2(len(alphabet)) bits per key symbol. The random spacing between
episodes keeps the streams that training reads side by side out of step with each other (with
equal-length episodes every row of a batch would sit at the same point of its episode).

The generator is seeded by (seed, split), so a split is a pure function of the options. The
scoring side, `target_mask`, marks the recall key symbols of a token array, so evaluation can
report the retrieval cost (bits per key symbol) apart from the rest of the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .corpora import SPLITS, Corpus, CorpusError, Document

WRITE, RECALL, END = "#", "?", "\n"  # markers: first copy, recall, end of a key
DEFAULT_SIZES = (4_000_000, 131_072, 131_072)  # tokens per split (train, valid, test)


@dataclass(frozen=True)
class RecallSpec:
    """The generator's knobs (validated by `check`; every field is stored in the manifest)."""

    gap_min: int = 48
    gap_max: int = 48
    key_len: int = 6
    alphabet: str = "0123456789abcdef"
    filler: str = "."
    episodes: int = 16
    spacing: int = 16
    seed: int = 0

    @property
    def bits_per_symbol(self) -> float:
        """Cost of a key symbol with no information about it: log2(len(alphabet))."""
        return float(np.log2(len(self.alphabet)))

    def check(self, tokenizer: str = "byte") -> RecallSpec:
        """Raise CorpusError naming the knob and the fix for any setting that cannot work."""
        def bad(what: str) -> None:
            raise CorpusError(f"recall corpus: {what}")

        if self.key_len < 1:
            bad(f"--recall-key-len {self.key_len}: must be >= 1")
        least = self.key_len + 2
        if self.gap_min < least:
            bad(f"--recall-gap {self.gap_min}: a key symbol's two copies are at least key_len + 2 "
                f"= {least} tokens apart (the key, its end and the recall marker lie between); "
                f"use a gap >= {least}, larger than the training segment length")
        if self.gap_max < self.gap_min:
            bad(f"--recall-gap {self.gap_min}-{self.gap_max}: the range is empty (write LO-HI "
                "with LO <= HI)")
        if len(self.alphabet) < 2:
            bad(f"--recall-alphabet {self.alphabet!r}: needs at least 2 distinct symbols (a "
                "1-symbol key carries no information to recall)")
        if len(set(self.alphabet)) != len(self.alphabet):
            bad(f"--recall-alphabet {self.alphabet!r}: repeats a symbol; list each once")
        if not self.filler:
            bad("--recall-filler is empty: give at least one character")
        markers = set(WRITE + RECALL + END)
        for name, text, other in (("alphabet", self.alphabet, self.filler),
                                  ("filler", self.filler, self.alphabet)):
            clash = sorted((set(text) & markers) | (set(text) & set(other)))
            if clash:
                bad(f"--recall-{name} {text!r} uses {clash}: the markers {sorted(markers)!r} and "
                    "the other knob's characters must not appear in it")
        if tokenizer not in ("byte", "char"):
            bad(f"--tokenizer {tokenizer}: the recall corpus needs one token per character "
                "(use byte or char)")
        if tokenizer == "byte" and not (self.alphabet + self.filler).isascii():
            bad("with --tokenizer byte the alphabet and filler must be ASCII (one byte, one "
                "token each); use --tokenizer char for other characters")
        if self.episodes < 1:
            bad(f"--recall-episodes {self.episodes}: must be >= 1")
        if self.spacing < 0:
            bad(f"--recall-spacing {self.spacing}: must be >= 0")
        return self

    def episode(self, rng: np.random.Generator) -> str:
        """One episode's text: `#KEY\\n`, filler, `?KEY\\n` with every symbol `gap` apart, then
        0..spacing filler tokens."""
        key = "".join(rng.choice(list(self.alphabet), size=self.key_len))
        gap = int(rng.integers(self.gap_min, self.gap_max + 1))
        fill = gap - self.key_len - 2  # tokens between the first copy's END and RECALL
        after = int(rng.integers(0, self.spacing + 1))
        return f"{WRITE}{key}{END}{self._fill(fill)}{RECALL}{key}{END}{self._fill(after)}"

    def _fill(self, n: int) -> str:
        return (self.filler * (n // len(self.filler) + 1))[:n]

    def documents(self, split: str, tokens: int) -> Iterator[Document]:
        """Documents of `split` until about `tokens` characters are written."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        written, i = 0, 0
        while written < tokens:
            text = "".join(self.episode(rng) for _ in range(self.episodes))
            written += len(text) + 1  # + EOS
            yield Document(f"recall-{split}-{i:07d}", iter([text]))
            i += 1


def parse_gap(text: str) -> tuple[int, int]:
    """'48' -> (48, 48); '40-56' -> (40, 56)."""
    try:
        lo, _, hi = str(text).partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise CorpusError(f"--recall-gap {text!r}: write a token count (48) or a range "
                          "(40-56)") from None


def recall_corpus(spec: RecallSpec, sizes: tuple[int, int, int]) -> Corpus:
    """The corpus reader prepare uses; `sizes` are tokens per split (train, valid, test)."""
    for split, n in zip(SPLITS, sizes):
        if n < 1:
            raise CorpusError(f"recall corpus: {split} size {n}: must be >= 1 token")
    return Corpus(name="recall", splits={
        s: (lambda s=s, n=n: spec.documents(s, n)) for s, n in zip(SPLITS, sizes)})


def spec_from_manifest(manifest: dict) -> RecallSpec | None:
    """The RecallSpec a prepared folder was made with (None for other corpora)."""
    info = manifest.get("recall")
    return RecallSpec(**info) if info else None


def target_mask(tokens: np.ndarray, recall_id: int, key_len: int) -> np.ndarray:
    """[T] bool: True at every recall key symbol (the key_len tokens after each RECALL marker)."""
    mask = np.zeros(len(tokens), dtype=np.bool_)
    marks = np.flatnonzero(np.asarray(tokens) == recall_id)
    for j in range(1, key_len + 1):
        pos = marks + j
        mask[pos[pos < len(mask)]] = True
    return mask


class RecallScorer:
    """`target_mask` for evaluation: which targets of a stream batch are recall key symbols.

    Built from a prepared recall folder (its manifest says the key length; the tokenizer gives
    the marker's id); called with a `Batch`, returns [R, N] bool over its targets.
    """

    def __init__(self, data_dir: str, split: str, manifest: dict | None = None):
        from .manifest import load_manifest, open_tokens
        from .tokenizer import load_tokenizer

        manifest = load_manifest(data_dir) if manifest is None else manifest
        self.spec = spec_from_manifest(manifest)
        if self.spec is None:
            raise CorpusError(f"{data_dir} was not prepared with --corpus recall")
        (marker,) = load_tokenizer(data_dir).encode(RECALL)
        tokens = open_tokens(data_dir, split, verify_sha=False)
        self.mask = target_mask(np.asarray(tokens), marker, self.spec.key_len)

    def __call__(self, batch):
        import torch

        n = batch.target.shape[1]
        pos = batch.offsets.numpy()[:, None] + 1 + np.arange(n)  # split positions of targets
        return torch.from_numpy(self.mask[pos % len(self.mask)])


def recall_scorer(data_dir: str, split: str) -> RecallScorer | None:
    """A RecallScorer when `data_dir` holds a recall corpus, else None."""
    from .manifest import load_manifest

    manifest = load_manifest(data_dir)
    return RecallScorer(data_dir, split, manifest) if manifest.get("recall") else None
