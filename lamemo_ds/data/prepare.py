"""`lamemo prepare`: raw corpus -> tokenizer + document-ordered webdataset shards + manifest.

Documents are streamed piece by piece; a pool of worker processes tokenizes the pieces (at most
`window` in flight, so memory stays bounded) and the main process writes samples in corpus order.
Every output file is written under a temporary name and renamed; manifest.json comes last, so a
finished folder is recognised and re-running prepare over it is a no-op unless forced.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import corpora as C
from . import recall as R
from .manifest import FORMAT, MANIFEST, load_manifest, write_manifest
from .shards import FlatWriter, ShardWriter, token_dtype
from .tokenizer import (
    BPE_FILE,
    LEGACY_FILE,
    PRETRAINED_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    build_vocab,
    count_tokens,
    load_pretrained,
    save_tokenizer,
    tokenizer_from_spec,
    train_bpe,
)

CORPORA = ("stdlib", "files", "books", "jsonl", "enwik8", "text8", "wikitext103", "recall")
MIN_SHARD = 16 << 10
_WORKER: dict = {}  # per worker process: the tokenizer, set once by the pool initializer


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that determines the output bytes (stored in the manifest to detect reruns)."""

    corpus: str = "stdlib"
    input: str | None = None
    tokenizer: str = "byte"
    shard_bytes: int = 64 << 20
    sizes: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)
    valid_frac: float = 0.05
    test_frac: float = 0.05
    pattern: str | None = None
    text_field: str = "text"
    min_freq: int = 1
    bpe_vocab: int = 8192
    max_docs: int | None = None
    max_bytes: int | None = None
    recall: R.RecallSpec | None = None
    """--corpus recall: the generator's knobs (sizes are then tokens per split)."""
    tokenizer_file: str | None = None
    """tokenizer "pretrained": the Hugging Face tokenizer.json to use (its sha256 is recorded)."""
    eos_token: str | None = None
    """tokenizer "pretrained": its end-of-document token (default: found by name)."""


class PrepareError(RuntimeError):
    """prepare cannot proceed (existing output with other options, bad arguments)."""


def open_corpus(o: PrepareOptions, stats: C.CleanStats) -> C.Corpus:
    """The reader for `o.corpus`; `stdlib` (and `files` without --input) is the demo corpus."""
    if o.corpus not in CORPORA:
        raise PrepareError(f"--corpus {o.corpus!r} unknown; choose one of {CORPORA}")
    if o.corpus in ("stdlib", "files") and o.input is None:
        return C.files_corpus(C.stdlib_root(), pattern=o.pattern or "*.py",
                              valid_frac=o.valid_frac, test_frac=o.test_frac, stats=stats,
                              name="stdlib")
    if o.corpus == "recall":
        return R.recall_corpus((o.recall or R.RecallSpec()).check(o.tokenizer), o.sizes)
    if o.input is None:
        raise PrepareError(f"--corpus {o.corpus} needs --input (the raw corpus path)")
    src = Path(o.input)
    if not src.exists():
        raise C.CorpusError(f"{src}: not found (check --input)")
    split = {"valid_frac": o.valid_frac, "test_frac": o.test_frac, "stats": stats}
    if o.corpus == "files":
        return C.files_corpus(src, pattern=o.pattern or "*", **split)
    if o.corpus == "books":
        return C.books_corpus(src, pattern=o.pattern or "*.txt", **split)
    if o.corpus == "jsonl":
        return C.jsonl_corpus(src, text_field=o.text_field, **split)
    if o.corpus == "wikitext103":
        return C.wt103_corpus(src, stats)
    return C.prefix_corpus(src, o.corpus, sizes=o.sizes,
                           raw=o.corpus == "enwik8" and o.tokenizer == "byte", stats=stats)


def limited(docs: Iterator[C.Document], o: PrepareOptions,
            stats: C.CleanStats) -> Iterator[C.Document]:
    """Non-empty documents, capped by --max-docs / --max-bytes (checked at document ends)."""
    n, seen = 0, [0]

    def measured(pieces: Iterator) -> Iterator:
        for p in pieces:
            seen[0] += len(p)
            yield p

    for doc in docs:
        if (o.max_docs is not None and n >= o.max_docs) or \
                (o.max_bytes is not None and seen[0] >= o.max_bytes):
            return
        kept = C.nonempty(doc, stats)
        if kept is not None:
            n += 1
            yield C.Document(kept.name, measured(kept.pieces))


def _init_worker(spec: dict, data_dir: str) -> None:
    # One worker per core already: the BPE's own threads would only oversubscribe (and, in a
    # process forked after the parent trained the BPE, make `tokenizers` warn and fall back).
    if mp.parent_process() is not None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["tok"] = tokenizer_from_spec(spec, data_dir)


def _encode(piece: str | bytes) -> np.ndarray:
    """Token ids of one piece, already in the storage dtype (halves memory and IPC)."""
    tok = _WORKER["tok"]
    ids = tok.encode_bytes(piece) if isinstance(piece, bytes) else tok.encode_array(piece)
    return ids.astype(token_dtype(tok.vocab_size), copy=False)


def _count(args: tuple[str, str]) -> Counter:
    return count_tokens(*args)


class _Pool:
    """Ordered, bounded fan-out of pieces to worker processes (inline when workers <= 1)."""

    def __init__(self, workers: int, init=None, initargs=()):
        self.pool = mp.get_context("fork").Pool(workers, init, initargs) if workers > 1 else None
        if self.pool is None and init is not None:
            init(*initargs)

    def map(self, fn, items: Iterator, window: int = 64) -> Iterator:
        if self.pool is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for it in items:
            pending.append(self.pool.apply_async(fn, (it,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _text_pieces(corpus: C.Corpus, o: PrepareOptions, stats: C.CleanStats) -> Iterator[str]:
    for doc in limited(corpus.splits["train"](), o, stats):
        pieces = doc.pieces
        if corpus.raw_bytes:
            pieces = C.decode_blocks(pieces, doc.name, stats)
        yield from pieces


def build_tokenizer(corpus: C.Corpus, o: PrepareOptions, workers: int):
    """Byte needs no data; char/word count the train split (in the pool); BPE trains on it."""
    if o.tokenizer == "byte":
        return ByteTokenizer()
    if o.tokenizer == "pretrained":
        if o.tokenizer_file is None:
            raise PrepareError("--tokenizer pretrained needs --tokenizer-file PATH")
        try:
            return load_pretrained(o.tokenizer_file, eos_token=o.eos_token)
        except ValueError as e:
            raise PrepareError(str(e)) from None
    if "train" not in corpus.splits:
        raise PrepareError(f"--tokenizer {o.tokenizer} is built from the train split, "
                           f"but corpus {corpus.name} has none")
    stats = C.CleanStats()  # the writing pass counts repairs; this pass only reads
    if o.tokenizer == "bpe":
        return train_bpe(_text_pieces(corpus, o, stats), vocab_size=o.bpe_vocab)
    if o.tokenizer not in ("char", "word"):
        raise PrepareError(f"--tokenizer {o.tokenizer!r} unknown; use byte, char, word or bpe")
    pool, total = _Pool(workers), Counter()
    try:
        items = ((p, o.tokenizer) for p in _text_pieces(corpus, o, stats))
        for c in pool.map(_count, items):
            total.update(c)
    finally:
        pool.close()
    return build_vocab(total, kind=o.tokenizer, min_freq=o.min_freq)


def _encode_tagged(item: tuple[int, str, str | bytes | None]) -> tuple:
    idx, name, piece = item
    if piece is None:
        return idx, name, None, 0
    nbytes = len(piece) if isinstance(piece, bytes) else len(piece.encode("utf-8"))
    return idx, name, _encode(piece), nbytes


def _events(docs: Iterator[C.Document], raw_decode: bool, stats: C.CleanStats) -> Iterator:
    """(doc index, name, piece) for every piece, then (doc index, name, None) at its end."""
    for i, doc in enumerate(docs):
        pieces = C.decode_blocks(doc.pieces, doc.name, stats) if raw_decode else doc.pieces
        for p in pieces:
            yield i, doc.name, p
        yield i, doc.name, None


class _DocAssembler:
    """Cuts each document's token stream into samples of at most `cap` tokens, in order."""

    def __init__(self, shards: ShardWriter, flat: FlatWriter, eos: int | None):
        self.shards, self.flat, self.eos, self.cap = shards, flat, eos, shards.part_tokens
        self.buf: list[np.ndarray] = []
        self.n = self.part = 0
        self.last_tok = -1

    def add(self, idx: int, name: str, toks: np.ndarray) -> None:
        if toks.size:
            self.buf.append(toks)
            self.n += toks.size
            self.last_tok = int(toks[-1])
        while self.n > self.cap:
            self._emit(idx, name, self.cap, last=False)

    def end(self, idx: int, name: str) -> None:
        if self.eos is not None and self.last_tok != self.eos:
            self.add(idx, name, np.array([self.eos], dtype=self.shards.dtype))
        self._emit(idx, name, self.n, last=True)
        self.part, self.last_tok = 0, -1

    def _emit(self, idx: int, name: str, n: int, *, last: bool) -> None:
        allt = np.concatenate(self.buf) if self.buf else np.zeros(0, self.shards.dtype)
        head, rest = allt[:n], allt[n:]
        self.buf, self.n = ([rest] if rest.size else []), int(rest.size)
        self.shards.add(f"{idx:09d}_{self.part:05d}", head,
                        {"doc": idx, "part": self.part, "last": last, "name": name})
        self.flat.write(head)
        self.part += 1


def write_split(corpus: C.Corpus, split: str, o: PrepareOptions, tok, out: Path, pool: _Pool,
                stats: C.CleanStats, progress: bool = True) -> dict:
    """Tokenize one split into shards + flat token file; return its manifest entry."""
    from tqdm import tqdm

    dtype = token_dtype(tok.vocab_size)
    shards = ShardWriter(out, split, shard_bytes=o.shard_bytes, dtype=dtype)
    flat = FlatWriter(out / split / "tokens.bin", dtype)
    asm = _DocAssembler(shards, flat, tok.eos_id if corpus.doc_eos else None)
    raw_decode = corpus.raw_bytes and not isinstance(tok, ByteTokenizer)
    events = _events(limited(corpus.splits[split](), o, stats), raw_decode, stats)
    docs = nbytes = 0
    t0 = last = time.perf_counter()
    bar = tqdm(desc=f"prepare {split}", unit=" doc", disable=not progress, leave=True)
    for idx, name, toks, nb in pool.map(_encode_tagged, events):
        if toks is None:
            asm.end(idx, name)
            docs += 1
            bar.update(1)
        else:
            asm.add(idx, name, toks)
            nbytes += nb
        if progress and time.perf_counter() - last > 0.5:
            last = time.perf_counter()
            dt = max(last - t0, 1e-9)
            bar.set_postfix_str(f"{nbytes / dt / 1e6:.1f} MB/s {flat.tokens / dt / 1e6:.2f} "
                                f"Mtok/s", refresh=False)
    bar.close()
    return {"documents": docs, "text_bytes": nbytes, "tokens": flat.tokens,
            "shards": shards.close(), "flat": flat.close(),
            "seconds": round(time.perf_counter() - t0, 3)}


def _options_json(o: PrepareOptions) -> dict:
    """The options as JSON; a pretrained tokenizer also by content, so an edited file reruns."""
    import hashlib
    import json

    opts = json.loads(json.dumps(asdict(o)))
    for key in ("tokenizer_file", "eos_token"):  # absent when unset: older folders still match
        if opts[key] is None:
            del opts[key]
    if opts["recall"] and opts["recall"]["pairs"] is None:  # single-key recall, as before
        del opts["recall"]["pairs"], opts["recall"]["names"]
    if opts["recall"] and not opts["recall"]["fresh_names"]:  # folders made before the knob
        del opts["recall"]["fresh_names"]
    if o.tokenizer_file is not None and Path(o.tokenizer_file).is_file():
        opts["tokenizer_file_sha256"] = hashlib.sha256(
            Path(o.tokenizer_file).read_bytes()).hexdigest()
    return opts


def _clear(out: Path) -> None:
    """Remove what an earlier prepare wrote (only our own files; used with --force)."""
    for name in (MANIFEST, TOKENIZER_FILE, LEGACY_FILE, BPE_FILE, PRETRAINED_FILE):
        (out / name).unlink(missing_ok=True)
    for split in C.SPLITS:
        if (out / split).is_dir():
            shutil.rmtree(out / split)


def prepare(o: PrepareOptions, out: str | Path, *, workers: int = 2, force: bool = False,
            progress: bool = True) -> tuple[dict, bool]:
    """Prepare `out`; returns (manifest, wrote). An identical finished output is left alone."""
    out = Path(out)
    if o.corpus == "recall" and o.recall is None:
        o = replace(o, recall=R.RecallSpec())
    if o.shard_bytes < MIN_SHARD:
        raise PrepareError(f"--shard-size {o.shard_bytes} is below the minimum {MIN_SHARD} bytes")
    opts = _options_json(o)
    if (out / MANIFEST).is_file():
        old = load_manifest(out)
        if not force and old.get("options") == opts:
            return old, False
        if not force:
            was = old.get("options", {})
            diff = sorted(k for k in opts.keys() | was.keys() if was.get(k) != opts.get(k))
            raise PrepareError(f"{out} already holds data prepared with other options "
                               f"(differ: {diff}); pass --force to overwrite it")
    if force:
        _clear(out)
    created = not out.exists()
    try:
        return _write_all(o, out, opts, workers=workers, progress=progress), True
    except BaseException:  # a failed prepare leaves no folder it made (a bad input, Ctrl-C)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_all(o: PrepareOptions, out: Path, opts: dict, *, workers: int,
               progress: bool) -> dict:
    """Tokenizer, every split and the manifest (written last) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stats = C.CleanStats()
    corpus = open_corpus(o, stats)
    tok = build_tokenizer(corpus, o, workers)
    tok_id = save_tokenizer(tok, out)
    # byte ids are a memcpy of the UTF-8 text: shipping pieces to workers costs more than it saves
    pool = _Pool(1 if tok.kind == "byte" else workers, _init_worker, (tok.spec(), str(out)))
    t0, splits = time.perf_counter(), {}
    try:
        for split in corpus.splits:
            splits[split] = write_split(corpus, split, o, tok, out, pool, stats, progress)
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    manifest = {
        "format": FORMAT, "corpus": corpus.name, "options": opts,
        "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name,
        "doc_eos": corpus.doc_eos,
        "tokenizer": {"kind": tok.kind, "id": tok_id, "file": TOKENIZER_FILE,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      **({"source": tok.source} if tok.kind == "pretrained" else {})},
        "splits": splits,
        **({"recall": opts["recall"]} if o.corpus == "recall" else {}),
        "stats": {"clean": stats.as_dict(), "text_bytes": text_bytes,
                  "documents": sum(s["documents"] for s in splits.values()),
                  "tokens": sum(s["tokens"] for s in splits.values()),
                  "seconds": round(seconds, 3),
                  "mb_per_s": round(text_bytes / max(seconds, 1e-9) / 1e6, 2)},
    }
    write_manifest(out, manifest)
    return load_manifest(out)
