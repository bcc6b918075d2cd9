"""Corpus readers: each turns a raw corpus into documents, in corpus order, per split.

A document is a name plus an iterator of text pieces (or raw byte pieces for enwik8), so a
100 MB document is streamed block by block and memory stays bounded. Text is decoded here, once,
with every repair counted in `CleanStats` (invalid UTF-8 replaced, NUL bytes removed, empty and
binary documents dropped): nothing is lost silently, and prepare reports the counts.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import re
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 1 << 20  # bytes read per file block
MAX_CARRY = 4 << 20  # longest partial line carried between pieces before a forced cut
SPLITS = ("train", "valid", "test")
_SURROGATES = re.compile("[\ud800-\udfff]+")
_WT103_TITLE = re.compile(r"^ = (?!=).* = $")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


class CorpusError(ValueError):
    """The raw corpus is missing, unreadable or malformed; the message names the path."""


@dataclass
class CleanStats:
    """Counts of every repair or skip, reported by prepare and stored in the manifest."""

    invalid_utf8_bytes: int = 0
    nul_bytes: int = 0
    empty_docs: int = 0
    binary_files: int = 0
    bad_json_lines: int = 0
    missing_text_field: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, what: str, name: str, n: int = 1) -> None:
        setattr(self, what, getattr(self, what) + n)
        ex = self.examples.setdefault(what, [])
        if len(ex) < 5 and name not in ex:
            ex.append(name)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Document:
    name: str
    pieces: Iterator[str | bytes]


@dataclass
class Corpus:
    """Split name -> document iterator factory, plus the conventions prepare must follow."""

    name: str
    splits: dict[str, Callable[[], Iterator[Document]]]
    doc_eos: bool = True
    """Append EOS after each document (off for enwik8/text8: one document per split)."""
    raw_bytes: bool = False
    """Pieces are raw bytes (enwik8); tokenizers other than byte decode them first."""


def read_blocks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """Blocks of a file or `archive.zip:member`, naming the path when it cannot be read."""
    try:
        if ":" in str(path) and str(path).split(":", 1)[0].endswith(".zip"):
            arch, member = str(path).split(":", 1)
            with zipfile.ZipFile(arch) as z, z.open(member) as f:
                yield from _range_blocks(f, start, length)
        else:
            with open(path, "rb") as f:
                yield from _range_blocks(f, start, length)
    except FileNotFoundError as e:
        raise CorpusError(f"{path}: file not found") from e
    except PermissionError as e:
        raise CorpusError(f"{path}: not readable (permission denied); fix its mode") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise CorpusError(f"{path}: cannot be read: {e}") from e


def _range_blocks(f, start: int, length: int | None) -> Iterator[bytes]:
    if start:
        f.seek(start)
    left = length
    while left is None or left > 0:
        b = f.read(BLOCK if left is None else min(BLOCK, left))
        if not b:
            return
        if left is not None:
            left -= len(b)
        yield b


def decode_blocks(blocks: Iterator[bytes], name: str, stats: CleanStats) -> Iterator[str]:
    """UTF-8 text pieces that each end at a line end (except a forced cut in a huge line).

    Invalid bytes become U+FFFD and NULs are removed, both counted. Pieces end after '\\n' so
    line-based tokenizers (word, BPE) give the same ids as on the whole document.
    """
    dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    carry = ""
    for b in blocks:
        text = carry + clean_text(dec.decode(b), name, stats)
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) > MAX_CARRY:
            cut = text.rfind(" ") + 1 or len(text)
        carry = text[cut:]
        if cut:
            yield text[:cut]
    tail = carry + clean_text(dec.decode(b"", final=True), name, stats)
    if tail:
        yield tail


def clean_text(text: str, name: str, stats: CleanStats) -> str:
    """Replace undecodable bytes / lone surrogates by U+FFFD and drop NULs, counting both."""
    if "\x00" in text:
        stats.note("nul_bytes", name, text.count("\x00"))
        text = text.replace("\x00", "")
    if _has_surrogates(text):
        n = sum(len(m) for m in _SURROGATES.findall(text))
        stats.note("invalid_utf8_bytes", name, n)
        text = _SURROGATES.sub(lambda m: "\ufffd" * len(m.group()), text)
    return text


def _has_surrogates(text: str) -> bool:
    """Fast path for clean text: ASCII, or encodable as UTF-8 (the regex is 20x slower)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def nonempty(doc: Document, stats: CleanStats) -> Document | None:
    """The document, or None (counted) when it holds only whitespace."""
    head: list[str | bytes] = []
    for piece in doc.pieces:
        head.append(piece)
        if piece.strip():
            return Document(doc.name, _chain(head, doc.pieces))
    stats.note("empty_docs", doc.name)
    return None


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def hash_split(name: str, *, valid_frac: float, test_frac: float) -> str:
    """Deterministic split of a document from the hash of its name (path or JSONL position)."""
    u = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "valid" if u < valid_frac else "test" if u < valid_frac + test_frac else "train"


def stdlib_root() -> Path:
    """The demo corpus: this Python's own standard library source tree (on every machine)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, pattern: str) -> list[str]:
    """Relative paths of matching files, sorted: the deterministic document order."""
    if not root.is_dir():
        raise CorpusError(f"{root}: not a folder (give --input a folder of text files)")
    out = []
    for dirpath, dirs, files in os.walk(root, onerror=_walk_error):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        out += [str(rel / f) for f in files if fnmatch.fnmatch(f, pattern) and f[0] != "."]
    return sorted(out)


def _walk_error(e: OSError) -> None:
    raise CorpusError(f"{e.filename}: cannot list folder: {e.strerror}") from e


def file_document(path: Path, name: str, stats: CleanStats) -> Document | None:
    """One text file as one document; files with NUL in the first 8 KiB count as binary."""
    blocks = read_blocks(path)
    first = next(blocks, b"")
    if b"\x00" in first[:8192]:
        stats.note("binary_files", name)
        return None
    return Document(name, decode_blocks(_chain([first], blocks), name, stats))


def files_corpus(root: Path, *, pattern: str, valid_frac: float, test_frac: float,
                 stats: CleanStats, name: str = "files") -> Corpus:
    """A folder tree of text files: sorted paths, split by path hash, one document per file."""
    names = list_files(root, pattern)
    if not names:
        raise CorpusError(f"{root}: no files match {pattern!r}")
    by_split = {s: [] for s in SPLITS}
    for n in names:
        by_split[hash_split(n, valid_frac=valid_frac, test_frac=test_frac)].append(n)

    def docs(split: str) -> Iterator[Document]:
        for n in by_split[split]:
            d = file_document(root / n, n, stats)
            if d is not None:
                yield d

    return Corpus(name, {s: (lambda s=s: docs(s)) for s in SPLITS if by_split[s]})


def books_corpus(root: Path, *, pattern: str, valid_frac: float, test_frac: float,
                 stats: CleanStats) -> Corpus:
    """PG-19 style: train/ validation/ test/ folders of books (else one folder, hash split)."""
    sub = {"train": "train", "valid": "validation", "test": "test"}
    if not (root / "train").is_dir():
        return files_corpus(root, pattern=pattern, valid_frac=valid_frac, test_frac=test_frac,
                            stats=stats, name="books")
    splits = {}
    for split, folder in sub.items():
        d = root / folder if (root / folder).is_dir() else root / split
        if d.is_dir():
            names = list_files(d, pattern)
            splits[split] = (lambda d=d, names=names: (
                doc for n in names if (doc := file_document(d / n, n, stats)) is not None))
    return Corpus("books", splits)


def jsonl_corpus(path: Path, *, text_field: str, valid_frac: float, test_frac: float,
                 stats: CleanStats) -> Corpus:
    """JSONL with a text field: `train/valid/test.jsonl` in a folder, or one file hash-split."""
    files = {s: path / f"{s}.jsonl" for s in SPLITS} if path.is_dir() else {}
    files = {s: p for s, p in files.items() if p.is_file()}
    if path.is_dir() and not files:
        raise CorpusError(f"{path}: folder holds no train.jsonl / valid.jsonl / test.jsonl")
    if not path.exists():
        raise CorpusError(f"{path}: file not found")

    splits = list(files) if files else list(SPLITS)

    def docs(split: str) -> Iterator[Document]:
        src = files.get(split, path)
        # one hash-split file is read once per split: its repairs count on the first pass only
        counted = stats if files or split == splits[0] else CleanStats()
        for i, text in enumerate(_jsonl_texts(src, text_field, counted)):
            name = f"{src.name}:{i}"
            if files or hash_split(name, valid_frac=valid_frac, test_frac=test_frac) == split:
                yield Document(name, iter([text]))

    return Corpus("jsonl", {s: (lambda s=s: docs(s)) for s in splits})


def _jsonl_texts(path: Path, text_field: str, stats: CleanStats) -> Iterator[str]:
    lines = decode_blocks(read_blocks(path), str(path), stats)
    lineno = 0
    for piece in lines:
        for line in piece.splitlines():
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.note("bad_json_lines", f"{path}:{lineno}")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.note("missing_text_field", f"{path}:{lineno}")
                continue
            yield clean_text(text, f"{path}:{lineno}", stats)


def wt103_corpus(root: Path, stats: CleanStats) -> Corpus:
    """WikiText-103 `wiki.{train,valid,test}.tokens`: one document per article (title line).

    Lines before the first title join the first article, so the token count (one `<eos>` per
    line, from the word tokenizer) equals the reference's.
    """
    src = {s: _find_member(root, f"wiki.{s}.tokens") for s in SPLITS}

    def docs(split: str) -> Iterator[Document]:
        article: list[str] = []
        for piece in decode_blocks(read_blocks(src[split]), src[split], stats):
            for line in piece.splitlines(keepends=True):
                if _WT103_TITLE.match(line.rstrip("\n")) and any(a.strip() for a in article):
                    yield Document(f"{split}:{len(article)}", iter(["".join(article)]))
                    article = []
                article.append(line)
        if article:
            yield Document(f"{split}:end", iter(["".join(article)]))

    return Corpus("wikitext103", {s: (lambda s=s: docs(s)) for s in SPLITS}, doc_eos=False)


def _find_member(root: Path, fname: str) -> Path:
    """`root/fname`, `root/*/fname`, or `root.zip:.../fname`."""
    if root.is_dir():
        for cand in [root / fname, *sorted(root.glob(f"*/{fname}"))]:
            if cand.is_file():
                return cand
        raise CorpusError(f"{root}: no {fname} in the folder or its subfolders")
    if zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as z:
            for m in z.namelist():
                if m.rsplit("/", 1)[-1] == fname:
                    return Path(f"{root}:{m}")
        raise CorpusError(f"{root}: archive holds no {fname}")
    raise CorpusError(f"{root}: not found (expected the folder or zip holding {fname})")


def prefix_corpus(path: Path, name: str, *, sizes: tuple[int, int, int],
                  raw: bool, stats: CleanStats) -> Corpus:
    """enwik8 / text8: the first sizes[0] bytes train, next sizes[1] valid, next sizes[2] test.

    Each split is one document (no EOS appended, like the reference); pieces are raw bytes for
    enwik8 so the byte tokenizer models the file exactly.
    """
    src = path if not zipfile.is_zipfile(path) else _find_member(path, name)
    total = _source_size(src)
    if total < sum(sizes):
        raise CorpusError(f"{path}: {total:,} bytes, but the splits need {sum(sizes):,} "
                          f"({'/'.join(f'{s:,}' for s in sizes)}); is this the real {name}?")
    starts = [0, sizes[0], sizes[0] + sizes[1]]

    def docs(i: int) -> Iterator[Document]:
        blocks = read_blocks(src, starts[i], sizes[i])
        pieces = blocks if raw else decode_blocks(blocks, str(src), stats)
        yield Document(f"{name}:{SPLITS[i]}", pieces)

    return Corpus(name, {s: (lambda i=i: docs(i)) for i, s in enumerate(SPLITS) if sizes[i]},
                  doc_eos=False, raw_bytes=raw)


def _source_size(src: Path) -> int:
    s = str(src)
    if ":" in s and s.split(":", 1)[0].endswith(".zip"):
        arch, member = s.split(":", 1)
        with zipfile.ZipFile(arch) as z:
            return z.getinfo(member).file_size
    if not src.is_file():
        raise CorpusError(f"{src}: file not found")
    return src.stat().st_size
