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

With `pairs` = K (multi-query recall, the probe of Zoology's MQAR) an episode is instead

    NAME=VALUE\n x K   filler...   the same K lines in random order   filler...

names distinct within the episode, and every value asked for `gap` tokens after its first copy
(each gap of the episode in [gap_min, gap_max]): K keys are pending when the first is asked for,
and no marker says where a key is.

The generator is seeded by (seed, split), so a split is a pure function of the options. It also
says where the recalled key symbols are (`RecallSpec.scored`), so evaluation can report the
retrieval cost (bits per key symbol) apart from the rest of the text, for either kind of episode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .corpora import SPLITS, Corpus, CorpusError, Document

WRITE, RECALL, END = "#", "?", "\n"  # markers: first copy, recall, end of a key
SEP = "="  # multi-query recall: between a key's name and its value
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
    pairs: int | None = None
    """Multi-query recall: keys pending at once (None: the single-key `#KEY` episodes)."""
    names: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    """Multi-query recall: the symbols a key's name is drawn from (distinct in an episode)."""
    fresh_names: bool = False
    """Multi-query recall: no name of an episode was used by the episode before it, so a query's
    name matches one line in reach of the memory, not also the stale line of the last episode."""

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
        if self.gap_min < least and self.pairs is None:
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
        self._check_symbols(bad)
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
        if self.pairs is not None:
            self._check_pairs(bad)
        return self

    def _check_symbols(self, bad) -> None:
        """Markers, key symbols, names and filler are pairwise disjoint."""
        multi = self.pairs is not None
        markers = set(SEP + END) if multi else set(WRITE + RECALL + END)
        knobs = [("alphabet", self.alphabet), ("filler", self.filler)]
        knobs += [("names", self.names)] if multi else []
        for name, text in knobs:
            others = set().union(*(set(t) for n, t in knobs if n != name))
            clash = sorted((set(text) & markers) | (set(text) & others))
            if clash:
                bad(f"--recall-{name} {text!r} uses {clash}: the markers {sorted(markers)!r} and "
                    "the other knobs' characters must not appear in it")

    def _check_pairs(self, bad) -> None:
        """K pairs fit the names, and a fill exists that puts every gap in [gap_min, gap_max]."""
        k, line = self.pairs, self.line_len
        if k < 1:
            bad(f"--recall-pairs {k}: must be >= 1")
        if len(set(self.names)) < k or len(set(self.names)) != len(self.names):
            bad(f"--recall-names {self.names!r}: needs {k} distinct symbols (one name per pending "
                f"pair), each listed once; give more names or fewer --recall-pairs")
        if self.fresh_names and len(self.names) < 2 * k:
            bad(f"--recall-fresh-names with --recall-names {self.names!r}: two neighbouring "
                f"episodes need {2 * k} distinct names; give more names or fewer --recall-pairs")
        if self.gap_max < line * (2 * k - 1):
            bad(f"--recall-gap {self.gap_min}-{self.gap_max}: with {k} pairs of {line}-token "
                f"lines the last query can lie {line * (2 * k - 1)} tokens after its pair; "
                f"use a gap whose upper end is >= {line * (2 * k - 1)}")
        if self.gap_max - self.gap_min < line * (2 * k - 2):
            bad(f"--recall-gap {self.gap_min}-{self.gap_max}: queries in random order spread "
                f"the gaps of {k} pairs of {line}-token lines over {line * (2 * k - 2)} tokens; "
                f"widen the range to HI - LO >= {line * (2 * k - 2)} or use fewer --recall-pairs")

    def episode(self, rng: np.random.Generator, avoid: str = "") -> tuple[str, list[int]]:
        """One episode's text and the offsets in it of the recalled key symbols (multi-query:
        no name drawn from `avoid`)."""
        return self._multi(rng, avoid) if self.pairs is not None else self._single(rng)

    def _single(self, rng: np.random.Generator) -> tuple[str, list[int]]:
        """`#KEY\\n`, filler, `?KEY\\n` with every symbol `gap` apart, then 0..spacing filler."""
        key = "".join(rng.choice(list(self.alphabet), size=self.key_len))
        gap = int(rng.integers(self.gap_min, self.gap_max + 1))
        fill = gap - self.key_len - 2  # tokens between the first copy's END and RECALL
        after = int(rng.integers(0, self.spacing + 1))
        text = f"{WRITE}{key}{END}{self._fill(fill)}{RECALL}{key}{END}{self._fill(after)}"
        at = 1 + self.key_len + 1 + fill + 1  # the recalled copy's first symbol
        return text, list(range(at, at + self.key_len))

    def _multi(self, rng: np.random.Generator, avoid: str = "") -> tuple[str, list[int]]:
        """`pairs` lines `NAME=VALUE\\n`, filler, the same lines in a random order, filler.

        Pair i is written in line i and queried in line K + order[i] (K = pairs, lines L tokens
        long), so its gap is fill + L * (K + order[i] - i); `fill` is drawn so that every gap
        of the episode lies in [gap_min, gap_max] (`check` makes sure one exists).
        """
        k, line = self.pairs, self.line_len
        names = rng.choice([n for n in self.names if n not in avoid], size=k, replace=False)
        values = ["".join(rng.choice(list(self.alphabet), size=self.key_len)) for _ in range(k)]
        order = rng.permutation(k)  # pair i is the order[i]-th query
        off = [line * (k + int(order[i]) - i) for i in range(k)]
        fill = int(rng.integers(max(0, self.gap_min - min(off)), self.gap_max - max(off) + 1))
        after = int(rng.integers(0, self.spacing + 1))
        lines = [f"{n}{SEP}{v}{END}" for n, v in zip(names, values)]
        queries = [lines[i] for i in np.argsort(order)]
        text = "".join(lines) + self._fill(fill) + "".join(queries) + self._fill(after)
        first = k * line + fill + 2  # the first query's first value symbol
        marks = [first + q * line + j for q in range(k) for j in range(self.key_len)]
        return text, marks

    @property
    def line_len(self) -> int:
        """Tokens of one `NAME=VALUE\\n` line."""
        return 1 + len(SEP) + self.key_len + 1

    def _fill(self, n: int) -> str:
        return (self.filler * (n // len(self.filler) + 1))[:n]

    def _texts(self, split: str, tokens: int) -> Iterator[tuple[str, list[int]]]:
        """(text, offsets of its recalled key symbols) per document, about `tokens` in all."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        written = 0
        while written < tokens:
            text, marks, last = "", [], ""
            for _ in range(self.episodes):
                t, m = self.episode(rng, avoid=last)
                if self.fresh_names:  # the names open the episode's first K lines
                    last = t[:self.pairs * self.line_len:self.line_len]
                marks += [len(text) + i for i in m]
                text += t
            written += len(text) + 1  # + EOS
            yield text, marks

    def documents(self, split: str, tokens: int) -> Iterator[Document]:
        """Documents of `split` until about `tokens` characters are written."""
        for i, (text, _) in enumerate(self._texts(split, tokens)):
            yield Document(f"recall-{split}-{i:07d}", iter([text]))

    def scored(self, split: str, tokens: int) -> np.ndarray:
        """[T] bool over the split's tokens (one per character, EOS after each document): True
        at every recalled key symbol. The generator itself says where they are, so the text
        needs no marker for the scorer to find them."""
        return self.targets(split, tokens)[0] >= 0

    def targets(self, split: str, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """([T] int16, [T] float32) over the split's tokens: each recalled key symbol's group
        (query order q and symbol j: q * key_len + j; single-key episodes: j), -1 elsewhere;
        and, for multi-query recall, its cost in bits to a reader who knows the values still
        pending in the episode but not which name holds which (NaN elsewhere)."""
        labels, elim = [], []
        for text, marks in self._texts(split, tokens):
            lab = np.full(len(text) + 1, -1, dtype=np.int16)
            lab[marks] = np.arange(len(marks)) % (self.key_len * (self.pairs or 1))
            el = np.full(len(text) + 1, np.nan, dtype=np.float32)
            if self.pairs is not None:
                el[marks] = self._elimination(text, marks)
            labels.append(lab)
            elim.append(el)
        if not labels:
            return np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.float32)
        return np.concatenate(labels), np.concatenate(elim)

    def _elimination(self, text: str, marks: list[int]) -> list[float]:
        """Bits per recalled symbol of a reader that holds the multiset of values not yet asked
        for in the episode and picks among those that fit the symbols already given. With K
        pairs it needs no name lookup and still pays only log2(K), log2(K - 1), ..., 0 bits for
        the first symbols of the K queries: the part of a score that recall by name must beat."""
        n, per = self.key_len, self.key_len * self.pairs
        out = []
        for e in range(0, len(marks), per):
            values = [text[marks[e + q * n]:marks[e + q * n] + n] for q in range(self.pairs)]
            for q, v in enumerate(values):
                for j in range(n):
                    fit = [r for r in values[q:] if r[:j] == v[:j]]
                    out.append(float(np.log2(len(fit) / sum(r[j] == v[j] for r in fit))))
        return out

    def group_names(self) -> list[str]:
        """Names of the `targets` groups: 'q1 s1', 'q1 s2', ... (single-key: 's1', ...)."""
        qs = [f"q{q + 1} " for q in range(self.pairs)] if self.pairs is not None else [""]
        return [f"{q}s{j + 1}" for q in qs for j in range(self.key_len)]


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


class RecallScorer:
    """The evaluation's target mask: which targets of a stream batch are recall key symbols.

    Built from a prepared recall folder (its manifest holds the generator's knobs, so the
    generator says again where the recalled symbols are); called with a `Batch`, returns
    [R, N] bool over its targets.
    """

    def __init__(self, data_dir: str, split: str, manifest: dict | None = None, *,
                 grouped: bool = False):
        from .manifest import load_manifest, open_tokens

        manifest = load_manifest(data_dir) if manifest is None else manifest
        self.spec = spec_from_manifest(manifest)
        if self.spec is None:
            raise CorpusError(f"{data_dir} was not prepared with --corpus recall")
        sizes = manifest["options"]["sizes"]
        self.labels, self.elimination = self.spec.targets(split, sizes[SPLITS.index(split)])
        self.mask = self.labels >= 0
        self.grouped = grouped
        """Called, return each target's group (int64, -1: not scored) instead of a bool mask."""
        tokens = len(open_tokens(data_dir, split, verify_sha=False))
        if len(self.mask) != tokens:
            raise CorpusError(f"{data_dir}: its {split} split holds {tokens} tokens, the recall "
                              f"generator writes {len(self.mask)} for its manifest; prepare it "
                              "again with --force")

    def __call__(self, batch):
        import torch

        n = batch.target.shape[1]
        pos = (batch.offsets.numpy()[:, None] + 1 + np.arange(n)) % len(self.mask)
        if self.grouped:
            return torch.from_numpy(self.labels[pos].astype(np.int64))
        return torch.from_numpy(self.mask[pos])

    def elimination_bits(self) -> tuple[float | None, list[float | None]]:
        """The elimination reader's mean bits per key symbol over the split, and per group
        (None for single-key episodes, where one key is pending and it costs nothing)."""
        if self.spec.pairs is None:
            return None, [None] * len(self.spec.group_names())
        groups = [float(self.elimination[self.labels == g].mean())
                  for g in range(len(self.spec.group_names()))]
        return float(self.elimination[self.mask].mean()), groups


def recall_scorer(data_dir: str, split: str, *, grouped: bool = False) -> RecallScorer | None:
    """A RecallScorer when `data_dir` holds a recall corpus, else None."""
    from .manifest import load_manifest

    manifest = load_manifest(data_dir)
    return (RecallScorer(data_dir, split, manifest, grouped=grouped) if manifest.get("recall")
            else None)
