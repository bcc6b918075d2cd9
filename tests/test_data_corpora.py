"""Corpus readers on small files written in each corpus's real format, with tiny split sizes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lamemo_ds.data.manifest import load_manifest, open_tokens
from lamemo_ds.data.prepare import PrepareOptions, prepare
from lamemo_ds.data.tokenizer import EOS, UNK, load_tokenizer

pytestmark = pytest.mark.unit


def _prep(tmp_path: Path, **kw) -> tuple[dict, Path]:
    out = tmp_path / "out"
    kw.setdefault("shard_bytes", 16384)
    m, wrote = prepare(PrepareOptions(**kw), out, workers=1, progress=False)
    assert wrote
    return m, out


def _split_tokens(out: Path, split: str) -> np.ndarray:
    return np.asarray(open_tokens(out, split))


def test_enwik8_zip_prefix_splits(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", data)
    m, out = _prep(tmp_path, corpus="enwik8", input=str(tmp_path / "enwik8.zip"),
                   sizes=(1000, 200, 100))
    assert {s: m.splits[s]["tokens"] for s in m.splits} == {"train": 1000, "valid": 200,
                                                            "test": 100}
    assert m.vocab_size == 257 and m["tokenizer"]["eos_id"] == 256
    assert bytes(_split_tokens(out, "train").astype(np.uint8)) == data[:1000]
    assert bytes(_split_tokens(out, "valid").astype(np.uint8)) == data[1000:1200]
    assert bytes(_split_tokens(out, "test").astype(np.uint8)) == data[1200:1300]


def test_enwik8_raw_file_too_short_names_path(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"enwik8: 100 bytes, but the splits need 300"):
        _prep(tmp_path, corpus="enwik8", input=str(tmp_path / "enwik8"), sizes=(100, 100, 100))


def test_text8_char_splits(tmp_path):
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("abcdefghij "), 700))
    (tmp_path / "text8").write_text(text)
    m, out = _prep(tmp_path, corpus="text8", input=str(tmp_path / "text8"),
                   tokenizer="char", sizes=(500, 100, 100))
    tok = load_tokenizer(out)
    assert m.splits["train"]["tokens"] == 500 and m.splits["test"]["tokens"] == 100
    assert tok.decode(_split_tokens(out, "train")) == text[:500]
    assert tok.decode(_split_tokens(out, "valid")) == text[500:600]
    assert tok.vocab_size == len(set(text[:500])) + 2  # chars + <eos> + <unk>


WT_TRAIN = (" \n = Alpha = \n \n The cat sat . \n \n = = Life = = \n \n It ran fast . \n"
            " \n = Beta = \n \n The dog sat on the <unk> . \n \n")
WT_VALID = " \n = Gamma = \n \n The zebra sat . \n \n"


def test_wikitext103_articles_word_vocab_eos(tmp_path):
    root = tmp_path / "wikitext-103"
    root.mkdir()
    for split, text in (("train", WT_TRAIN), ("valid", WT_VALID), ("test", WT_VALID)):
        (root / f"wiki.{split}.tokens").write_text(text)
    m, out = _prep(tmp_path, corpus="wikitext103", input=str(root), tokenizer="word")
    tok = load_tokenizer(out)
    lines = WT_TRAIN.split("\n")[:-1]
    # reference count: every line's words plus one <eos>; no extra separator per article
    assert m.splits["train"]["tokens"] == sum(len(ln.split()) + 1 for ln in lines)
    assert m.splits["train"]["documents"] == 2  # "= = Life = =" is a section, not an article
    assert tok.eos_id == 0 and tok.vocab[0] == EOS
    assert "zebra" not in tok.vocab and UNK in tok.vocab  # vocab from train only
    valid = _split_tokens(out, "valid").tolist()  # "Gamma" and "zebra" unseen in train
    assert valid.count(tok.unk_id) == 2 and valid.count(tok.eos_id) == 5
    assert tok.vocab[1] == "="  # frequency order: the commonest word (8 times) first


def test_wikitext103_from_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "wikitext-103-v1.zip", "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-103/wiki.{split}.tokens", WT_TRAIN)
    m, _ = _prep(tmp_path, corpus="wikitext103", input=str(tmp_path / "wikitext-103-v1.zip"),
                 tokenizer="word")
    assert m.splits["test"]["tokens"] == m.splits["train"]["tokens"] > 0


def test_books_pg19_layout_one_document_per_file(tmp_path):
    root = tmp_path / "pg19"
    for folder, names in (("train", ["b2.txt", "a1.txt"]), ("validation", ["v.txt"]),
                          ("test", ["t.txt"])):
        (root / folder).mkdir(parents=True)
        for n in names:
            (root / folder / n).write_text(f"Book {n}.\nIt was a dark night.\n")
    m, out = _prep(tmp_path, corpus="books", input=str(root))
    assert {s: m.splits[s]["documents"] for s in m.splits} == {"train": 2, "valid": 1, "test": 1}
    tok = load_tokenizer(out)
    train = _split_tokens(out, "train")
    assert tok.decode(train).startswith("Book a1.txt.")  # sorted order
    assert (train == tok.eos_id).sum() == 2 and int(train[-1]) == tok.eos_id  # EOS after each


def test_jsonl_text_field_and_bad_lines(tmp_path):
    root = tmp_path / "j"
    root.mkdir()
    rows = [json.dumps({"text": f"doc {i} text"}) for i in range(4)]
    (root / "train.jsonl").write_text("\n".join(rows + ["{not json", '{"body": "x"}']) + "\n")
    (root / "valid.jsonl").write_text(rows[0] + "\n")
    m, out = _prep(tmp_path, corpus="jsonl", input=str(root))
    clean = m["stats"]["clean"]
    assert clean["bad_json_lines"] == 1 and clean["missing_text_field"] == 1
    assert m.splits["train"]["documents"] == 4 and set(m.splits) == {"train", "valid"}
    assert load_tokenizer(out).decode(_split_tokens(out, "valid")) == "doc 0 text"


def test_files_tree_sorted_and_hash_split_deterministic(tmp_path):
    root = tmp_path / "tree"
    for i in range(40):
        p = root / f"d{i % 3}" / f"f{i:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"file {i}\n")
    m1, out1 = _prep(tmp_path, corpus="files", input=str(root), valid_frac=0.2, test_frac=0.2,
                     tokenizer="word")
    m2, _ = prepare(PrepareOptions(corpus="files", input=str(root), valid_frac=0.2,
                                   test_frac=0.2, shard_bytes=16384, tokenizer="word"),
                    tmp_path / "again",
                    workers=2, progress=False)
    assert sum(s["documents"] for s in m1.splits.values()) == 40
    assert m1["tokenizer"]["id"] == m2["tokenizer"]["id"]
    assert all(m1.splits[s]["documents"] > 0 for s in ("train", "valid", "test"))
    for s in m1.splits:  # same bytes with 1 or 2 workers
        assert [r["sha256"] for r in m1.splits[s]["shards"]] == \
               [r["sha256"] for r in m2.splits[s]["shards"]]
    text = load_tokenizer(out1).decode(_split_tokens(out1, "train"))
    names = [ln.split()[1] for ln in text.split("\n") if ln.startswith("file")]
    paths = sorted(f"d{int(n) % 3}/f{int(n):02d}.txt" for n in names)
    assert [f"d{int(n) % 3}/f{int(n):02d}.txt" for n in names] == paths


def test_stdlib_demo_subset(tmp_path):
    m, out = _prep(tmp_path, corpus="stdlib", max_docs=5, shard_bytes=1 << 20)
    assert m["corpus"] == "stdlib" and m.splits["train"]["documents"] == 5
    assert load_manifest(out)["options"]["max_docs"] == 5
