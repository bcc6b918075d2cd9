"""Tokenizers saved beside the shards: byte, char vocab, word vocab, a locally trained BPE and a
pretrained Hugging Face `tokenizer.json` (GPT-2 / Llama-style BPE, `prepare --tokenizer-file`).

All share one small interface (encode / encode_array / decode / vocab_size / eos_id) so the
prepare pipeline and the evaluation code never branch on the kind. The file `lamemo_tokenizer.json`
beside the shards describes the tokenizer completely (with, for bpe and pretrained, the Hugging
Face tokenizer file it names); the sha256 of both is the tokenizer id the manifest records, so
shards and vocabulary can never be silently mixed. `tokenizer.json` is left to Hugging Face's
format (HF exports ship one); folders written before the rename keep working (LEGACY_FILE).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..fileio import atomic_write

TOKENIZER_FILE = "lamemo_tokenizer.json"
LEGACY_FILE = "tokenizer.json"  # our description's name before HF exports needed it
BPE_FILE = "tokenizer-bpe.json"
PRETRAINED_FILE = "tokenizer-pretrained.json"
EOS = "<eos>"
UNK = "<unk>"
KINDS = ("byte", "char", "word", "bpe", "pretrained")
# end-of-text tokens of common pretrained tokenizers (GPT-2, Llama 1/2, Llama 3, ours), in order
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", EOS)


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


BATCH_CHARS = 1 << 14  # the trained BPE encodes long texts in chunks of about this many chars


def line_chunks(text: str, size: int) -> list[str]:
    """`text` cut after the first newline at or beyond every `size` characters (a text without
    one stays whole); the chunks join back to `text`."""
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size - 1)
        end = len(text) if cut < 0 else cut + 1
        out.append(text[start:end])
        start = end
    return out


class BpeTokenizer:
    """A `tokenizers` BPE: trained locally on the train split (kind "bpe") or a pretrained one
    read from a Hugging Face tokenizer.json (kind "pretrained").

    The trained BPE's pre-tokenizer first splits after every newline, so encoding a document line
    block by line block (what prepare does for long documents) gives exactly the ids of encoding
    it whole. A pretrained tokenizer is used as it is: its ids can differ from whole-document
    encoding at those block cuts (one every MiB of text), which prepare accepts.

    Args:
        tok: the `tokenizers.Tokenizer`.
        kind: "bpe" or "pretrained".
        eos_token: the end-of-document token (must be in the vocabulary).
        source: pretrained: the name of the file it was read from (recorded, not used).
    """

    def __init__(self, tok, *, kind: str = "bpe", eos_token: str = EOS, source: str | None = None):
        self.tok, self.kind, self.eos_token, self.source = tok, kind, eos_token, source
        self.eos_id = tok.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"{kind} tokenizer lacks the special token {eos_token}")
        self.vocab_size = tok.get_vocab_size()
        self.file = BPE_FILE if kind == "bpe" else PRETRAINED_FILE

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text`. The trained BPE encodes a long text as line-aligned chunks in one
        `encode_batch` (the same ids, since its pre-tokenizer cuts after every newline; about
        1.4x faster on one core than one `encode` of a 1 MiB piece)."""
        if self.kind != "bpe" or len(text) <= BATCH_CHARS:
            return np.asarray(self.encode(text), dtype=np.int64)
        encs = self.tok.encode_batch(line_chunks(text, BATCH_CHARS), add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])

    def spec(self) -> dict:
        if self.kind == "bpe":
            return {"kind": "bpe", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                    "file": BPE_FILE}
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "file": self.file, "source": self.source}


def load_pretrained(path: str | Path, *, eos_token: str | None = None) -> BpeTokenizer:
    """A Hugging Face tokenizer.json as a "pretrained" tokenizer; the end-of-document token is
    `eos_token`, else the first of EOS_CANDIDATES the vocabulary holds.

    Raises:
        ValueError: the file is missing, not a tokenizer.json, or has no end-of-document token.
    """
    from tokenizers import Tokenizer as HfTokenizer

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--tokenizer-file {p}: not found (give a Hugging Face tokenizer.json)")
    try:
        tok = HfTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"--tokenizer-file {p}: not a Hugging Face tokenizer.json "
                         f"({str(e).splitlines()[0][:200]})") from None
    if eos_token is None:
        eos_token = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos_token is None:
            raise ValueError(f"--tokenizer-file {p}: none of {list(EOS_CANDIDATES)} is in its "
                             "vocabulary; name its end-of-text token with --eos-token")
    elif tok.token_to_id(eos_token) is None:
        raise ValueError(f"--eos-token {eos_token!r} is not in the vocabulary of {p}")
    return BpeTokenizer(tok, kind="pretrained", eos_token=eos_token, source=p.name)


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
    """Write lamemo_tokenizer.json (+ the BPE / pretrained tokenizer file) atomically; return the
    tokenizer id (sha256)."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, BpeTokenizer):
        atomic_write(d / tok.file, tok.tok.to_str().encode())
    body = json.dumps(tok.spec(), ensure_ascii=False, sort_keys=True).encode()
    atomic_write(d / TOKENIZER_FILE, body)
    return tokenizer_id(d)


def _spec_path(d: Path) -> Path | None:
    """lamemo_tokenizer.json, or a tokenizer.json in our format written before the rename."""
    if (d / TOKENIZER_FILE).is_file():
        return d / TOKENIZER_FILE
    legacy = d / LEGACY_FILE
    if legacy.is_file():
        try:
            if "kind" in json.loads(legacy.read_text()):
                return legacy
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return None


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """The files that make up the tokenizer of `folder`: {name to copy it under: path}."""
    d = Path(folder)
    spec_path = _spec_path(d)
    if spec_path is None:
        return {}
    files = {TOKENIZER_FILE: spec_path}
    name = json.loads(spec_path.read_text()).get("file")
    if name and (d / name).is_file():
        files[name] = d / name
    return files


def tokenizer_id(data_dir: str | Path) -> str:
    """sha256 over the description (and its BPE file): changes whenever any id would change."""
    files = tokenizer_files(data_dir)
    if not files:
        raise FileNotFoundError(f"{Path(data_dir) / TOKENIZER_FILE} not found")
    h = hashlib.sha256()
    for path in files.values():
        h.update(path.read_bytes())
    return h.hexdigest()


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared data folder (or a model folder with its tokenizer) holds."""
    d = Path(data_dir)
    path = _spec_path(d)
    if path is None:
        raise FileNotFoundError(f"{d / TOKENIZER_FILE} not found: run `lamemo prepare --out {d}` "
                                "first")
    spec = json.loads(path.read_text())
    if spec.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {spec.get('kind')!r} "
                         f"(expected one of {KINDS})")
    return tokenizer_from_spec(spec, d)


def tokenizer_from_spec(spec: dict, data_dir: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its spec (BPE and pretrained need the saved file beside it)."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] in ("char", "word"):
        return VocabTokenizer(spec["kind"], spec["vocab"])
    from tokenizers import Tokenizer as HfTokenizer

    tok = HfTokenizer.from_file(str(Path(data_dir) / spec["file"]))
    return BpeTokenizer(tok, kind=spec["kind"], eos_token=spec.get("eos_token", EOS),
                        source=spec.get("source"))
