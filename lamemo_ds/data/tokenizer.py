"""Tokenizers saved beside the shards: byte, char vocab, word vocab and a locally trained BPE.

All four share one small interface (encode / encode_array / decode / vocab_size / eos_id) so the
prepare pipeline and the evaluation code never branch on the kind. The file `tokenizer.json`
beside the shards describes the tokenizer completely; its sha256 is the tokenizer id the manifest
records, so shards and vocabulary can never be silently mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
BPE_FILE = "tokenizer-bpe.json"
EOS = "<eos>"
UNK = "<unk>"
KINDS = ("byte", "char", "word", "bpe")


def split_lines(text: str) -> list[str]:
    """Lines of `text` split at '\\n' only (a final newline ends a line, it does not open one).

    Word tokenization adds `<eos>` at every line end (the WikiText-103 convention), and prepare
    cuts long documents only after a '\\n', so this split makes chunked encoding exact.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256 (vocab 257): lossless for any input."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes (enwik8 is modelled as bytes, not as decoded text)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if int(i) != self.eos_id)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": 257, "eos_id": 256}


class VocabTokenizer:
    """A fixed vocabulary of characters or whitespace-separated words, with `<eos>` and `<unk>`.

    Args:
        kind: "char" (every character a token) or "word" (split at whitespace, `<eos>` at every
            line end, as the WikiText-103 reference does).
        vocab: the token strings, id = position; must contain `<eos>` and `<unk>`.
    """

    def __init__(self, kind: str, vocab: list[str]):
        if kind not in ("char", "word"):
            raise ValueError(f"VocabTokenizer kind must be 'char' or 'word', got {kind!r}")
        self.kind = kind
        self.vocab = list(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError(f"{kind} vocabulary has duplicate entries")
        for special in (EOS, UNK):
            if special not in self.index:
                raise ValueError(f"{kind} vocabulary lacks the special token {special}")
        self.eos_id = self.index[EOS]
        self.unk_id = self.index[UNK]
        self.vocab_size = len(self.vocab)
        self._lut: np.ndarray | None = None

    def _char_lut(self) -> np.ndarray:
        """Code point -> id table: char encoding becomes one numpy gather (text8: 100M chars)."""
        if self._lut is None:
            lut = np.full(0x110000, self.unk_id, dtype=np.int64)
            for tok, i in self.index.items():
                if len(tok) == 1:
                    lut[ord(tok)] = i
            self._lut = lut
        return self._lut

    def encode_array(self, text: str) -> np.ndarray:
        if self.kind == "char":
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            return self._char_lut()[cps]
        get, unk, out = self.index.get, self.unk_id, []
        for line in split_lines(text):
            out.extend(get(w, unk) for w in line.split())
            out.append(self.eos_id)
        return np.asarray(out, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        toks = [self.vocab[int(i)] for i in ids]
        if self.kind == "char":
            return "".join(t for t in toks if t != EOS)
        return " ".join(toks).replace(f" {EOS} ", "\n").replace(EOS, "\n")

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "unk_id": self.unk_id, "vocab": self.vocab}


class BpeTokenizer:
    """Byte-level BPE from the `tokenizers` package, trained locally on the train split.

    The pre-tokenizer first splits after every newline, so encoding a document line block by
    line block (what prepare does for long documents) gives exactly the ids of encoding it whole.
    """

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"BPE tokenizer lacks the special token {EOS}")
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])

    def spec(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "file": BPE_FILE}


Tokenizer = ByteTokenizer | VocabTokenizer | BpeTokenizer


def build_vocab(counts: Counter, *, kind: str, min_freq: int = 1) -> VocabTokenizer:
    """Frequency-ordered vocabulary (adaptive-softmax cutoffs assume it), ties in first-seen order.

    `<eos>` gets id 0 (as in the reference vocabulary), types below `min_freq` map to `<unk>`.
    """
    vocab = [EOS]
    for tok, c in counts.most_common():
        if c >= min_freq and tok not in (EOS, UNK):
            vocab.append(tok)
    vocab.append(UNK)
    return VocabTokenizer(kind, vocab)


def count_tokens(text: str, kind: str) -> Counter:
    """Type counts of one piece of training text (run in the worker pool)."""
    if kind == "char":
        return Counter(text)
    c: Counter = Counter()
    for line in split_lines(text):
        c.update(line.split())
    return c


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_freq: int = 2) -> BpeTokenizer:
    """Train a byte-level BPE on an iterator of texts (the train split only)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_freq, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def save_tokenizer(tok: Tokenizer, data_dir: str | Path) -> str:
    """Write tokenizer.json (+ the BPE model file) atomically; return the tokenizer id (sha256)."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, BpeTokenizer):
        _atomic_write(d / BPE_FILE, tok.tok.to_str().encode())
    body = json.dumps(tok.spec(), ensure_ascii=False, sort_keys=True).encode()
    _atomic_write(d / TOKENIZER_FILE, body)
    return tokenizer_id(d)


def tokenizer_id(data_dir: str | Path) -> str:
    """sha256 over tokenizer.json (and the BPE file): changes whenever any id would change."""
    d = Path(data_dir)
    h = hashlib.sha256((d / TOKENIZER_FILE).read_bytes())
    if (d / BPE_FILE).is_file():
        h.update((d / BPE_FILE).read_bytes())
    return h.hexdigest()


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared data folder was written with."""
    d = Path(data_dir)
    path = d / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lamemo prepare --out {d}` first")
    spec = json.loads(path.read_text())
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("char", "word"):
        return VocabTokenizer(kind, spec["vocab"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HfTokenizer

        return BpeTokenizer(HfTokenizer.from_file(str(d / spec["file"])))
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (expected one of {KINDS})")


def tokenizer_from_spec(spec: dict, data_dir: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer in a worker process from its spec (BPE needs the saved file)."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] in ("char", "word"):
        return VocabTokenizer(spec["kind"], spec["vocab"])
    from tokenizers import Tokenizer as HfTokenizer

    return BpeTokenizer(HfTokenizer.from_file(str(Path(data_dir) / spec["file"])))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
