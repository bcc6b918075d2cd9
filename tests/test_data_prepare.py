"""prepare: round trip, plain-webdataset readability, reproducible bytes, reruns, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamemo_ds.commands.prepare import run as cli_run
from lamemo_ds.data.corpora import CorpusError
from lamemo_ds.data.manifest import load_manifest, open_tokens, verify
from lamemo_ds.data.prepare import PrepareError, PrepareOptions, prepare
from lamemo_ds.data.shards import ShardError, iter_shard
from lamemo_ds.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "b/c.txt": "Ünïcödé text — with em dash.\n\nand a blank line\n" * 20,
    "b/d.txt": "no trailing newline",
    "e.txt": "x" * 20000 + "\n",  # larger than one tiny shard: split into parts
}


def _tree(root: Path, docs: dict[str, str | bytes]) -> Path:
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def _prep(src: Path, out: Path, **kw) -> dict:
    workers = kw.pop("workers", 1)
    o = PrepareOptions(corpus="files", input=str(src), valid_frac=0.0, test_frac=0.0,
                       shard_bytes=kw.pop("shard_bytes", 16384), **kw)
    return prepare(o, out, workers=workers, progress=False)[0]


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe"])
def test_round_trip_equals_direct_tokenisation(tmp_path, kind):
    src = _tree(tmp_path / "src", DOCS)
    out = tmp_path / "out"
    m = _prep(src, out, tokenizer=kind, bpe_vocab=300)
    tok = load_tokenizer(out)
    assert m["tokenizer"]["kind"] == kind and m.vocab_size == tok.vocab_size
    expect = []
    for name in sorted(DOCS):
        ids = tok.encode(DOCS[name])
        expect += ids if ids and ids[-1] == tok.eos_id else ids + [tok.eos_id]
    assert open_tokens(out, "train").tolist() == expect
    samples = [t for rec in m.splits["train"]["shards"] for _, t, _ in iter_shard(out / rec["url"])]
    assert np.concatenate(samples).tolist() == expect
    assert open_tokens(out, "train").dtype == (np.uint16 if tok.vocab_size > 256 else np.uint8)
    if kind in ("byte", "char"):
        assert tok.decode(tok.encode(DOCS["b/c.txt"])) == DOCS["b/c.txt"]


@pytest.mark.unit
def test_big_document_split_into_consecutive_parts(tmp_path):
    out = tmp_path / "out"
    m = _prep(_tree(tmp_path / "src", DOCS), out)
    metas = [meta for rec in m.splits["train"]["shards"] for _, _, meta in
             iter_shard(out / rec["url"])]
    parts = [x for x in metas if x["name"] == "e.txt"]
    assert len(parts) >= 2 and [x["part"] for x in parts] == list(range(len(parts)))
    assert [x["last"] for x in parts] == [False] * (len(parts) - 1) + [True]
    assert len(m.splits["train"]["shards"]) >= 3
    assert all(r["bytes"] <= 16384 for r in m.splits["train"]["shards"])
    offs = [r["token_offset"] for r in m.splits["train"]["shards"]]
    toks = [r["tokens"] for r in m.splits["train"]["shards"]]
    assert offs == list(np.cumsum([0] + toks[:-1]))


@pytest.mark.unit
def test_plain_webdataset_reads_shards(tmp_path):
    import io

    import webdataset as wds

    out = tmp_path / "out"
    m = _prep(_tree(tmp_path / "src", DOCS), out)
    urls = [str(out / r["url"]) for r in m.splits["train"]["shards"]]
    got = [np.load(io.BytesIO(s["tokens.npy"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert np.concatenate(got).tolist() == open_tokens(out, "train").tolist()


@pytest.mark.unit
def test_reproducible_bytes_noop_rerun_and_force(tmp_path):
    src = _tree(tmp_path / "src", DOCS)
    m1 = _prep(src, tmp_path / "o1")
    m2 = _prep(src, tmp_path / "o2", workers=2)
    sha = [r["sha256"] for r in m1.splits["train"]["shards"]]
    assert sha == [r["sha256"] for r in m2.splits["train"]["shards"]]
    shard0 = tmp_path / "o1" / m1.splits["train"]["shards"][0]["url"]
    before = shard0.stat().st_mtime_ns
    m3, wrote = prepare(PrepareOptions(**m1["options"] | {"sizes": tuple(m1["options"]["sizes"])}),
                        tmp_path / "o1", progress=False)
    assert not wrote and shard0.stat().st_mtime_ns == before
    with pytest.raises(PrepareError, match="--force"):
        _prep(src, tmp_path / "o1", tokenizer="char")
    m4, wrote = prepare(PrepareOptions(corpus="files", input=str(src), tokenizer="char",
                                       valid_frac=0.0, test_frac=0.0, shard_bytes=16384),
                        tmp_path / "o1", force=True, progress=False)
    assert wrote and m4["tokenizer"]["kind"] == "char"
    assert not list((tmp_path / "o1").rglob("*.tmp"))


@pytest.mark.unit
def test_invalid_utf8_replaced_and_counted(tmp_path):
    out = tmp_path / "out"
    m = _prep(_tree(tmp_path / "src", {"bad.txt": b"abc\xff\xfedef\n", "ok.txt": "fine\n"}), out)
    assert m["stats"]["clean"]["invalid_utf8_bytes"] == 2
    text = load_tokenizer(out).decode(open_tokens(out, "train"))
    assert "abc\ufffd\ufffddef" in text and "fine" in text


@pytest.mark.unit
def test_nul_bytes_binary_skipped_or_removed_counted(tmp_path):
    docs = {"bin.dat": b"\x00\x01\x02binary", "late.txt": b"a" * 9000 + b"\x00\x00tail\n",
            "ok.txt": b"ok\n"}
    out = tmp_path / "out"
    m = _prep(_tree(tmp_path / "src", docs), out)
    clean = m["stats"]["clean"]
    assert clean["binary_files"] == 1 and clean["examples"]["binary_files"] == ["bin.dat"]
    assert clean["nul_bytes"] == 2 and m.splits["train"]["documents"] == 2
    assert 0 not in open_tokens(out, "train").tolist()


@pytest.mark.unit
def test_empty_and_whitespace_documents_dropped_counted(tmp_path):
    docs = {"empty.txt": "", "ws.txt": " \n\t\n  ", "ok.txt": "content\n"}
    m = _prep(_tree(tmp_path / "src", docs), tmp_path / "out")
    assert m["stats"]["clean"]["empty_docs"] == 2 and m.splits["train"]["documents"] == 1


@pytest.mark.unit
def test_missing_input_and_unreadable_file_name_the_path(tmp_path):
    with pytest.raises(CorpusError, match=str(tmp_path / "nope")):
        _prep(tmp_path / "nope", tmp_path / "out")
    src = _tree(tmp_path / "src", {"ok.txt": "ok\n"})
    (src / "gone.txt").symlink_to(src / "deleted-target.txt")  # listed but cannot be opened
    with pytest.raises(CorpusError, match=r"gone\.txt: file not found"):
        _prep(src, tmp_path / "out2")
    # a bad input is a user error (exit 2), and a failed prepare leaves no folder behind
    assert cli_run(_args(corpus="files", input=str(src), out=str(tmp_path / "o3"))) == 2
    assert not (tmp_path / "o3").exists()


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_permission_denied_names_the_path(tmp_path):
    src = _tree(tmp_path / "src", {"secret.txt": "x\n"})
    (src / "secret.txt").chmod(0)
    with pytest.raises(CorpusError, match=r"secret\.txt: not readable"):
        _prep(src, tmp_path / "out")


@pytest.mark.unit
def test_corrupted_and_truncated_shard_detected(tmp_path, capsys):
    out = tmp_path / "out"
    m = _prep(_tree(tmp_path / "src", DOCS), out)
    recs = m.splits["train"]["shards"]
    assert verify(out) == []
    with open(out / recs[1]["url"], "r+b") as f:  # flip one byte in the middle
        f.seek(recs[1]["bytes"] // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    os.truncate(out / recs[2]["url"], recs[2]["bytes"] - 100)
    problems = verify(out)
    assert len(problems) == 2 and recs[1]["url"] in problems[0] and "truncated" in problems[1]
    assert cli_run(_args(verify=str(out))) == 1
    assert "2 problem(s)" in capsys.readouterr().out
    (out / "train" / "tokens.bin").unlink()  # force the loader to rebuild from the shards
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*lamemo prepare --verify"):
        open_tokens(out, "train")


@pytest.mark.unit
def test_damaged_token_file_rebuilt_from_shards(tmp_path):
    out = tmp_path / "out"
    _prep(_tree(tmp_path / "src", DOCS), out)
    good = open_tokens(out, "train").tolist()
    with open(out / "train" / "tokens.bin", "r+b") as f:
        f.write(b"\xff\xff")
    assert open_tokens(out, "train").tolist() == good
    assert verify(out) == []


@pytest.mark.slow
def test_100mb_single_document_streams_with_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    line = (b"lorem ipsum dolor sit amet " * 40 + b"\n")
    with open(src / "huge.txt", "wb") as f:
        for _ in range(100_000_000 // len(line) + 1):
            f.write(line)
    size = (src / "huge.txt").stat().st_size
    # Peak ANONYMOUS memory, sampled by a thread: file-backed pages of memory-mapped outputs
    # count in ru_maxrss but are page cache the kernel reclaims at will, not memory held.
    code = ("import threading, time; from lamemo_ds.data.prepare import PrepareOptions, prepare\n"
            "peak = [0]\n"
            "def anon():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('RssAnon:'):\n"
            "            return int(line.split()[1])\n"
            "def watch():\n"
            "    while True:\n"
            "        peak[0] = max(peak[0], anon()); time.sleep(0.002)\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            f"m, _ = prepare(PrepareOptions(corpus='files', input={str(src)!r}, valid_frac=0, "
            f"test_frac=0, shard_bytes=8 << 20), {str(tmp_path / 'out')!r}, workers=2, "
            "progress=False)\n"
            "peak[0] = max(peak[0], anon())\n"
            "print(m.splits['train']['tokens'], peak[0])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    tokens, maxrss_kb = map(int, res.stdout.split())
    assert tokens == size + 1  # every byte plus the document's EOS
    assert maxrss_kb < 300 * 1024, f"prepare held {maxrss_kb / 1024:.0f} MiB for a {size} B doc"
    print(f"peak anonymous memory {maxrss_kb / 1024:.0f} MiB")
    m = load_manifest(tmp_path / "out")
    assert len(m.splits["train"]["shards"]) >= 12 and m.splits["train"]["documents"] == 1


def _args(**kw):
    import argparse

    from lamemo_ds.commands.prepare import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", v]
    return p.parse_args(argv + ["--quiet"])


@pytest.mark.unit
def test_bpe_encodes_long_text_in_line_chunks_with_the_ids_of_one_encode():
    from lamemo_ds.data.tokenizer import BATCH_CHARS, line_chunks, train_bpe

    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "γάμμα", "x=1;", "  ", "\t", "end.", "😀"]
    lines = [" ".join(rng.choice(words, size=rng.integers(0, 30))) for _ in range(3000)]
    ends = ["\n", "\r\n", "\n\n"]
    text = "".join(ln + ends[i % 3] for i, ln in enumerate(lines)) + "x" * (BATCH_CHARS + 5)
    text += "\nlast line without newline"
    chunks = line_chunks(text, BATCH_CHARS)
    assert "".join(chunks) == text and len(chunks) > 4
    assert all(c.endswith("\n") for c in chunks[:-1])
    tok = train_bpe([text[:20000]], vocab_size=400, min_freq=1)
    assert tok.encode_array(text).tolist() == tok.encode(text)
    assert line_chunks("no newline at all" * 2000, 64) == ["no newline at all" * 2000]
    assert line_chunks("", 64) == []
